//! Random-weight models with the real shapes of a model family, for
//! benchmarks: speed does not depend on weight values, and real weights
//! cannot be downloaded everywhere. Deterministic from a seed; written as a
//! diffusers folder with f16 weights (configs of the real model), plus the
//! same weights as one LDM-named `model.safetensors` for tools that load
//! single files (stable-diffusion.cpp in `scripts/bench`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::loading::ldm;
use crate::loading::weights::{NameMap, Transform};
use crate::models::clip::{ClipConfig, ClipTextModel};
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::rng::TorchRng;

/// SD 1.5's `unet/config.json` (the fields diffusers writes that matter here).
const SD15_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// SD 1.5's `vae/config.json`.
const SD15_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
  "sample_size": 512, "scaling_factor": 0.18215,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

/// CLIP ViT-L/14's text tower, as in SD 1.5's `text_encoder/config.json`.
const SD15_CLIP: &str = r#"{
  "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
  "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
  "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-05, "projection_dim": 768,
  "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float16"
}"#;

const SD15_SCHEDULER: &str = r#"{
  "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
  "clip_sample": false, "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
  "steps_offset": 1, "trained_betas": null
}"#;

const SD15_INDEX: &str = r#"{
  "_class_name": "StableDiffusionPipeline", "feature_extractor": [null, null], "safety_checker": [null, null],
  "requires_safety_checker": false, "scheduler": ["diffusers", "PNDMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]
}"#;

/// A `VarBuilder` backend that invents each requested tensor from the seed
/// and the tensor's name, following the layer's init hint (unit norms, zero
/// biases, fan-in-scaled weights), and remembers them.
struct RandomBackend {
    seed: u64,
    made: Mutex<HashMap<String, Tensor>>,
}

impl RandomBackend {
    fn normal(&self, name: &str, n: usize) -> Vec<f32> {
        // FNV-1a of the name: each tensor has its own stream.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        TorchRng::new(self.seed ^ h).randn(n)
    }
}

impl SimpleBackend for RandomBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        let fan_in = s.dims().iter().skip(1).product::<usize>().max(1) as f64;
        let values: Vec<f32> = match h {
            Init::Const(v) => vec![v as f32; n],
            Init::Randn { mean, stdev } => {
                self.normal(name, n).iter().map(|x| (mean + stdev * *x as f64) as f32).collect()
            }
            // Uniform hints (biases) as a normal of the same spread.
            Init::Uniform { lo, up } => {
                let (mid, half) = ((lo + up) / 2.0, (up - lo) / 2.0);
                self.normal(name, n).iter().map(|x| (mid + half / 3f64.sqrt() * *x as f64) as f32).collect()
            }
            Init::Kaiming { non_linearity, .. } => {
                let std = non_linearity.gain() / fan_in.sqrt();
                self.normal(name, n).iter().map(|x| (std * *x as f64) as f32).collect()
            }
        };
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(DType::F16)?;
        self.made.lock().expect("lock").insert(name.to_string(), t.clone());
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("random models need a shape for {name}")))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

type Tensors = HashMap<String, Tensor>;

/// Builds one component with random weights, saves them as f16 and returns them.
fn write_component(
    dir: &Path,
    file: &str,
    seed: u64,
    build: impl FnOnce(VarBuilder) -> anyhow::Result<()>,
) -> anyhow::Result<Tensors> {
    let backend = std::sync::Arc::new(RandomBackend { seed, made: Mutex::new(HashMap::new()) });
    let shared = SharedBackend(backend.clone());
    build(VarBuilder::from_backend(Box::new(shared), DType::F16, Device::Cpu))?;
    let made = std::mem::take(&mut *backend.made.lock().expect("lock"));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    candle_core::safetensors::save(&made, dir.join(file))
        .with_context(|| format!("{}: cannot write", dir.display()))?;
    Ok(made)
}

/// The components' tensors under their LDM checkpoint names (SD 1.x layout),
/// through the same name tables that read single files.
fn ldm_checkpoint(unet: &UNetConfig, vae: &VaeConfig, parts: [Tensors; 3]) -> anyhow::Result<Tensors> {
    let maps = [ldm::unet_names(unet), ldm::vae_names(vae, ldm::VAE_PREFIX), NameMap::prefixed(ldm::CLIP_PREFIXES[0])];
    let mut out = HashMap::new();
    for (map, part) in maps.iter().zip(parts) {
        for (name, t) in part {
            let (ckpt, transform) = map.rename(&name).with_context(|| format!("no LDM name for {name}"))?;
            let t = match transform {
                Transform::None => t,
                // Biases pass as they are; weights regain their 1×1 kernel.
                Transform::Conv1x1ToLinear if t.rank() == 1 => t,
                Transform::Conv1x1ToLinear => t.reshape((t.dim(0)?, t.dim(1)?, 1, 1))?,
                other => bail!("{name}: cannot store {other:?} in an SD 1.x checkpoint"),
            };
            out.insert(ckpt, t);
        }
    }
    Ok(out)
}

/// Lets the builder own a handle while we keep one to read the tensors back.
struct SharedBackend(std::sync::Arc<RandomBackend>);

impl SimpleBackend for SharedBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Writes a random `family` model (only `sd15` so far) as a diffusers folder.
pub fn write(family: &str, out: &Path, seed: u64) -> anyhow::Result<()> {
    if family != "sd15" {
        bail!("unknown family {family:?}; available: sd15");
    }
    write_with(out, seed, [SD15_UNET, SD15_VAE, SD15_CLIP])
}

/// Writes a random model with the given UNet, VAE and CLIP `config.json` texts.
fn write_with(out: &Path, seed: u64, [unet_json, vae_json, clip_json]: [&str; 3]) -> anyhow::Result<()> {
    if out.exists() {
        bail!("{}: already exists", out.display());
    }
    let unet: UNetConfig = serde_json::from_str(unet_json)?;
    let vae: VaeConfig = serde_json::from_str(vae_json)?;
    let clip: ClipConfig = serde_json::from_str(clip_json)?;
    // Written to a temporary folder and renamed, so a half-written model is never picked up.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new().prefix(".sdgen-random-").tempdir_in(parent)?;
    let root = tmp.path();
    for (file, text) in [
        ("model_index.json", SD15_INDEX),
        ("scheduler/scheduler_config.json", SD15_SCHEDULER),
        ("unet/config.json", unet_json),
        ("vae/config.json", vae_json),
        ("text_encoder/config.json", clip_json),
    ] {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().expect("has a folder"))?;
        std::fs::write(&path, text)?;
    }
    let unet_weights = write_component(&root.join("unet"), "diffusion_pytorch_model.fp16.safetensors", seed, |vb| {
        UNet::new(&unet, vb).map(|_| ())
    })?;
    let vae_weights =
        write_component(&root.join("vae"), "diffusion_pytorch_model.fp16.safetensors", seed.wrapping_add(1), |vb| {
            Vae::new(&vae, true, vb).map(|_| ())
        })?;
    let clip_weights =
        write_component(&root.join("text_encoder"), "model.fp16.safetensors", seed.wrapping_add(2), |vb| {
            ClipTextModel::new(&clip, vb).map(|_| ())
        })?;
    let single = ldm_checkpoint(&unet, &vae, [unet_weights, vae_weights, clip_weights])?;
    candle_core::safetensors::save(&single, root.join("model.safetensors"))?;
    let kept = tmp.keep();
    std::fs::rename(&kept, out).with_context(|| format!("{}: cannot create", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small configs of the same architecture exercise the same code.
    fn tiny() -> [String; 3] {
        let fixture = |p: &str| {
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1").join(p))
                .unwrap()
        };
        [fixture("unet/config.json"), fixture("vae/config.json"), fixture("text_encoder/config.json")]
    }

    #[test]
    fn random_models_are_deterministic_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let cfgs = tiny();
        let cfgs = [cfgs[0].as_str(), cfgs[1].as_str(), cfgs[2].as_str()];
        let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
        write_with(&a, 7, cfgs).unwrap();
        write_with(&b, 7, cfgs).unwrap();
        write_with(&c, 8, cfgs).unwrap();
        let unet = "unet/diffusion_pytorch_model.fp16.safetensors";
        let read = |p: &Path| std::fs::read(p.join(unet)).unwrap();
        assert_eq!(read(&a), read(&b), "same seed, same weights");
        assert_ne!(read(&a), read(&c), "another seed, other weights");
        let model = crate::loading::Model::load(&a, &Device::Cpu, DType::F32).unwrap();
        assert!(model.unused.is_empty());
        // The single file holds the same weights under LDM names.
        let single = crate::loading::Model::load(&a.join("model.safetensors"), &Device::Cpu, DType::F32).unwrap();
        assert!(single.unused.is_empty());
        let x = Tensor::randn(0f32, 1.0, (1, model.unet.config.in_channels, 8, 8), &Device::Cpu).unwrap();
        let ctx = Tensor::ones((1, 77, model.unet.config.cross_attention_dim), DType::F32, &Device::Cpu).unwrap();
        let out = |m: &crate::loading::Model| {
            let eps = m.unet.forward(&x, 500.0, &ctx, None).unwrap();
            let img = m.vae.decode(&x).unwrap();
            [eps, img].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        };
        let [eps, img] = out(&model);
        assert_eq!([eps.clone(), img.clone()], out(&single));
        // Layers follow their init hints: nothing is left at zero.
        for values in [eps, img] {
            let mean = values.iter().sum::<f32>() / values.len() as f32;
            assert!(values.iter().any(|v| (v - mean).abs() > 1e-3), "a constant output: weights left at zero");
        }
        assert!(write_with(&a, 7, cfgs).is_err(), "an existing folder is not overwritten");
        assert!(write("sdxl", &dir.path().join("x"), 0).is_err());
    }
}
