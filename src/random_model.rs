//! Random-weight models with the real shapes of a model family, for
//! benchmarks: speed does not depend on weight values, and real weights
//! cannot be downloaded everywhere. Deterministic from a seed; written as a
//! diffusers folder with f16 weights (configs of the real model), plus, for
//! SD 1.5, the same weights as one LDM-named `model.safetensors` for tools
//! that load single files (stable-diffusion.cpp in `scripts/bench`). SD 3.5
//! Medium comes without T5-XXL (4.7 B parameters that a 24 GB machine cannot
//! hold beside the rest in f32): it runs as `--no-t5` does.

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
use crate::models::mmdit::{Mmdit, MmditConfig};
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

/// SDXL base 1.0's `unet/config.json`.
const SDXL_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
  "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
  "center_input_sample": false, "cross_attention_dim": 2048,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
  "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
  "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
  "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": false,
  "use_linear_projection": true
}"#;

/// SDXL's `vae/config.json` (SD 1.5's architecture, its own scale; diffusers
/// runs it in f32, as `force_upcast` says).
const SDXL_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

/// OpenCLIP ViT-bigG's text tower, as in SDXL's `text_encoder_2/config.json`.
const SDXL_CLIP_2: &str = r#"{
  "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_act": "gelu",
  "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
  "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-05, "projection_dim": 1280,
  "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float16"
}"#;

const SDXL_SCHEDULER: &str = r#"{
  "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
  "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false, "skip_prk_steps": true,
  "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null, "use_karras_sigmas": false
}"#;

const SDXL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": true,
  "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
  "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}"#;

/// SD 3.5 Medium's `transformer/config.json` (MMDiT-X).
const SD35M_TRANSFORMER: &str = r#"{
  "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
  "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "in_channels": 16,
  "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
  "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128
}"#;

/// SD 3.5's `vae/config.json`: 16 latent channels, a shift, no quant convs.
const SD35_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true, "in_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "use_post_quant_conv": false, "use_quant_conv": false
}"#;

/// SD 3.5's CLIP-L: SD 1.5's text tower with a projection (the identity).
const SD35_CLIP_L: &str = r#"{
  "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
  "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
  "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-05, "projection_dim": 768,
  "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float16"
}"#;

const SD35_SCHEDULER: &str = r#"{
  "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
  "use_dynamic_shifting": false
}"#;

const SD35_INDEX: &str = r#"{
  "_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
  "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_3": [null, null],
  "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
  "tokenizer_3": [null, null], "transformer": ["diffusers", "SD3Transformer2DModel"],
  "vae": ["diffusers", "AutoencoderKL"]
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

/// The denoising network's `config.json` text.
#[derive(Clone, Copy)]
enum Backbone<'a> {
    Unet(&'a str),
    Mmdit(&'a str),
}

/// A family's folder: its index, scheduler and components' `config.json` texts.
struct Configs<'a> {
    index: &'a str,
    scheduler: &'a str,
    backbone: Backbone<'a>,
    vae: &'a str,
    clip: &'a str,
    /// SDXL's and SD 3's second, projecting text encoder.
    clip_2: Option<&'a str>,
}

/// Writes a random `family` model (`sd15`, `sdxl` or `sd35m`) as a diffusers folder.
pub fn write(family: &str, out: &Path, seed: u64) -> anyhow::Result<()> {
    let configs = match family {
        "sd15" => Configs {
            index: SD15_INDEX,
            scheduler: SD15_SCHEDULER,
            backbone: Backbone::Unet(SD15_UNET),
            vae: SD15_VAE,
            clip: SD15_CLIP,
            clip_2: None,
        },
        // SDXL's first text encoder is SD 1.5's CLIP ViT-L, its second OpenCLIP-G.
        "sdxl" => Configs {
            index: SDXL_INDEX,
            scheduler: SDXL_SCHEDULER,
            backbone: Backbone::Unet(SDXL_UNET),
            vae: SDXL_VAE,
            clip: SD15_CLIP,
            clip_2: Some(SDXL_CLIP_2),
        },
        "sd35m" => Configs {
            index: SD35_INDEX,
            scheduler: SD35_SCHEDULER,
            backbone: Backbone::Mmdit(SD35M_TRANSFORMER),
            vae: SD35_VAE,
            clip: SD35_CLIP_L,
            clip_2: Some(SDXL_CLIP_2),
        },
        _ => bail!("unknown family {family:?}; available: sd15, sdxl, sd35m"),
    };
    write_with(out, seed, &configs)
}

/// A projecting CLIP text encoder: the tower and `text_projection`.
fn projecting_clip(cfg: &ClipConfig, vb: VarBuilder) -> anyhow::Result<()> {
    let projection = cfg.projection_dim.context("a projecting text encoder's config has no projection_dim")?;
    ClipTextModel::new(cfg, vb.clone())?;
    candle_nn::linear_no_bias(cfg.hidden_size, projection, vb.pp("text_projection"))?;
    Ok(())
}

/// Writes a random model from its configs; SD 1.x layouts also as one
/// LDM-named `model.safetensors` (the name tables store no other family).
fn write_with(out: &Path, seed: u64, configs: &Configs) -> anyhow::Result<()> {
    if out.exists() {
        bail!("{}: already exists", out.display());
    }
    let vae: VaeConfig = serde_json::from_str(configs.vae)?;
    let clip: ClipConfig = serde_json::from_str(configs.clip)?;
    // Written to a temporary folder and renamed, so a half-written model is never picked up.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let tmp = tempfile::Builder::new().prefix(".sdgen-random-").tempdir_in(parent)?;
    let root = tmp.path();
    let backbone = match configs.backbone {
        Backbone::Unet(text) => ("unet/config.json", text),
        Backbone::Mmdit(text) => ("transformer/config.json", text),
    };
    let mut files = vec![
        ("model_index.json", configs.index),
        ("scheduler/scheduler_config.json", configs.scheduler),
        backbone,
        ("vae/config.json", configs.vae),
        ("text_encoder/config.json", configs.clip),
    ];
    files.extend(configs.clip_2.map(|c| ("text_encoder_2/config.json", c)));
    for (file, text) in files {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().expect("has a folder"))?;
        std::fs::write(&path, text)?;
    }
    const WEIGHTS: &str = "diffusion_pytorch_model.fp16.safetensors";
    let unet = match configs.backbone {
        Backbone::Unet(text) => {
            let cfg: UNetConfig = serde_json::from_str(text)?;
            let weights = write_component(&root.join("unet"), WEIGHTS, seed, |vb| UNet::new(&cfg, vb).map(|_| ()))?;
            Some((cfg, weights))
        }
        Backbone::Mmdit(text) => {
            let cfg: MmditConfig = serde_json::from_str(text)?;
            write_component(&root.join("transformer"), WEIGHTS, seed, |vb| Mmdit::new(&cfg, vb).map(|_| ()))?;
            None
        }
    };
    let vae_weights =
        write_component(&root.join("vae"), WEIGHTS, seed.wrapping_add(1), |vb| Vae::new(&vae, true, vb).map(|_| ()))?;
    let te = root.join("text_encoder");
    let clip_weights = match unet {
        Some(_) => write_component(&te, "model.fp16.safetensors", seed.wrapping_add(2), |vb| {
            ClipTextModel::new(&clip, vb).map(|_| ())
        })?,
        // SD 3 pools CLIP-L unprojected: diffusers applies the folder's
        // projection, so it is the identity, as in the real folders.
        None => {
            let mut weights =
                write_component(&te, "model.fp16.safetensors", seed.wrapping_add(2), |vb| projecting_clip(&clip, vb))?;
            let eye = Tensor::eye(clip.hidden_size, DType::F16, &Device::Cpu)?;
            weights.insert("text_projection.weight".into(), eye);
            candle_core::safetensors::save(&weights, te.join("model.fp16.safetensors"))?;
            weights
        }
    };
    if let Some(json) = configs.clip_2 {
        let cfg: ClipConfig = serde_json::from_str(json)?;
        write_component(&root.join("text_encoder_2"), "model.fp16.safetensors", seed.wrapping_add(3), |vb| {
            projecting_clip(&cfg, vb)
        })?;
    } else if let Some((cfg, unet_weights)) = unet {
        let single = ldm_checkpoint(&cfg, &vae, [unet_weights, vae_weights, clip_weights])?;
        candle_core::safetensors::save(&single, root.join("model.safetensors"))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, out).with_context(|| format!("{}: cannot create", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny fixture's config texts: small configs of the same architecture
    /// exercise the same code.
    fn tiny(fixture: &str, files: &[&str]) -> Vec<String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(fixture);
        files.iter().map(|f| std::fs::read_to_string(dir.join(f)).unwrap()).collect()
    }

    #[test]
    fn random_models_are_deterministic_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let texts = tiny("tiny-sd1", &["unet/config.json", "vae/config.json", "text_encoder/config.json"]);
        let cfgs = Configs {
            index: SD15_INDEX,
            scheduler: SD15_SCHEDULER,
            backbone: Backbone::Unet(&texts[0]),
            vae: &texts[1],
            clip: &texts[2],
            clip_2: None,
        };
        let cfgs = &cfgs;
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
        fn unet_of(m: &crate::loading::Model) -> &crate::models::unet::UNet {
            m.backbone.unet().expect("a UNet model")
        }
        let x = Tensor::randn(0f32, 1.0, (1, unet_of(&model).config.in_channels, 8, 8), &Device::Cpu).unwrap();
        let ctx = Tensor::ones((1, 77, unet_of(&model).config.cross_attention_dim), DType::F32, &Device::Cpu).unwrap();
        let out = |m: &crate::loading::Model| {
            let eps = unet_of(m).forward(&x, 500.0, &ctx, None).unwrap();
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
        assert!(write("sd3", &dir.path().join("x"), 0).is_err());
    }

    #[test]
    fn random_sdxl_models_load_as_sdxl() {
        let dir = tempfile::tempdir().unwrap();
        let texts = tiny(
            "tiny-sdxl",
            &["unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json"],
        );
        let cfgs = Configs {
            index: SDXL_INDEX,
            scheduler: SDXL_SCHEDULER,
            backbone: Backbone::Unet(&texts[0]),
            vae: &texts[1],
            clip: &texts[2],
            clip_2: Some(&texts[3]),
        };
        let out = dir.path().join("xl");
        write_with(&out, 1, &cfgs).unwrap();
        let model = crate::loading::Model::load(&out, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(model.family, crate::loading::Family::Sdxl);
        assert!(model.unused.is_empty(), "{:?}", model.unused);
        assert!(model.text.clip().pooled.is_some());
    }

    #[test]
    fn random_sd35_models_load_as_sd35_without_t5() {
        let dir = tempfile::tempdir().unwrap();
        let texts = tiny(
            "tiny-sd35",
            &["transformer/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json"],
        );
        let cfgs = Configs {
            index: SD35_INDEX,
            scheduler: SD35_SCHEDULER,
            backbone: Backbone::Mmdit(&texts[0]),
            vae: &texts[1],
            clip: &texts[2],
            clip_2: Some(&texts[3]),
        };
        let out = dir.path().join("sd35");
        write_with(&out, 1, &cfgs).unwrap();
        let model = crate::loading::Model::load(&out, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(model.family, crate::loading::Family::Sd3);
        assert!(model.unused.is_empty(), "{:?}", model.unused);
        let crate::text::Text::Sd3(text) = &model.text else { panic!("SD 3 text") };
        assert!(text.t5.is_none());
        // The real configs parse and build.
        serde_json::from_str::<MmditConfig>(SD35M_TRANSFORMER).unwrap();
        serde_json::from_str::<VaeConfig>(SD35_VAE).unwrap();
        serde_json::from_str::<ClipConfig>(SD35_CLIP_L).unwrap();
    }
}
