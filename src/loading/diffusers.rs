//! diffusers folders: `model_index.json` plus one folder per component, each
//! with its `config.json` and safetensors weights (plain, `.fp16` variant or
//! sharded with an index).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device};

use super::assets::display_name;
use super::family::{Family, Preset};
use super::lora::{component_weights, Merging};
use super::model::{vae_dtype, Model};
use super::weights::{Checkpoint, Component, NameMap};
use crate::files::read_json;
use crate::models::clip::{ClipConfig, ClipTextModel};
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::models::Network;
use crate::sampling::schedule::SchedulerConfig;
use crate::text::{ClipText, PooledTextEncoder, Text};
use crate::tokenizer::ClipTokenizer;

/// A folder's denoising network: `transformer/` (SD 3) or `unet/`.
pub fn backbone_dir(dir: &Path) -> PathBuf {
    let transformer = dir.join("transformer");
    if transformer.is_dir() {
        transformer
    } else {
        dir.join("unet")
    }
}

/// The weight files of a component folder whose weights are named `base`
/// (`diffusion_pytorch_model` or `model`): safetensors, full precision
/// preferred, else the pickled `.bin` files of older folders (transformers
/// names those `pytorch_model.bin`).
pub fn weight_files(dir: &Path, base: &str) -> anyhow::Result<Vec<PathBuf>> {
    for ext in ["safetensors", "bin"] {
        let base = if ext == "bin" && base == "model" { "pytorch_model" } else { base };
        for variant in ["", ".fp16"] {
            let single = dir.join(format!("{base}{variant}.{ext}"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{base}{variant}.{ext}.index.json"));
            if index.is_file() {
                #[derive(serde::Deserialize)]
                struct Index {
                    weight_map: std::collections::BTreeMap<String, String>,
                }
                let idx: Index = read_json(&index)?;
                let files: BTreeSet<&String> = idx.weight_map.values().collect();
                return Ok(files.into_iter().map(|f| dir.join(f)).collect());
            }
        }
    }
    bail!("{}: no {base}.safetensors or {base}.bin (or .fp16 / sharded variant) found", dir.display())
}

/// Loads a folder; `no_t5` leaves out an SD 3 folder's T5.
pub fn load(dir: &Path, device: &Device, dtype: DType, merging: Merging, no_t5: bool) -> anyhow::Result<Model> {
    #[derive(serde::Deserialize)]
    struct ModelIndex {
        #[serde(rename = "_class_name")]
        class: String,
        force_zeros_for_empty_prompt: Option<bool>,
    }
    let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
    if matches!(
        index.class.as_str(),
        "StableDiffusion3Pipeline" | "StableDiffusion3Img2ImgPipeline" | "StableDiffusion3InpaintPipeline"
    ) {
        return super::sd3::load_folder(dir, device, dtype, merging, no_t5);
    }
    // SD 1.x/2.x/XL pipelines; the others of a family hold the same
    // components, inpainting ones a UNet with more inputs.
    if !matches!(
        index.class.as_str(),
        "StableDiffusionPipeline"
            | "StableDiffusionInpaintPipeline"
            | "StableDiffusionImg2ImgPipeline"
            | "StableDiffusionXLPipeline"
            | "StableDiffusionXLInpaintPipeline"
            | "StableDiffusionXLImg2ImgPipeline"
    ) {
        bail!("{}: pipeline {} is not supported", dir.display(), index.class);
    }
    let scheduler: SchedulerConfig = read_json(&dir.join("scheduler/scheduler_config.json"))?;
    // SD-Turbo and SDXL-Turbo ship Euler schedulers with trailing spacing,
    // which no standard model's folder has.
    let euler =
        scheduler.class_name.starts_with("EulerAncestralDiscrete") || scheduler.class_name.starts_with("EulerDiscrete");
    let preset = match Preset::from_name(&display_name(dir)) {
        Preset::Standard if euler && scheduler.timestep_spacing.as_deref() == Some("trailing") => Preset::Turbo,
        by_name => by_name,
    };
    let clip_cfg: ClipConfig = read_json(&dir.join("text_encoder/config.json"))?;
    let unet_cfg: UNetConfig = read_json(&dir.join("unet/config.json"))?;
    let vae_cfg: VaeConfig = read_json(&dir.join("vae/config.json"))?;

    let family = Family::of_folder(dir)?;
    let (te, text_encoder) =
        load_text_encoder(&dir.join("text_encoder"), Component::TextEncoder, &clip_cfg, dtype, device, merging)?;
    // SDXL: a second, pooled text encoder.
    let (te2, text_encoder_2) = if dir.join("text_encoder_2").is_dir() {
        let (ckpt, encoder) = load_pooled_encoder(dir, dtype, device, merging)?;
        (Some(ckpt), Some(encoder))
    } else {
        (None, None)
    };
    let unet_files = weight_files(&dir.join("unet"), "diffusion_pytorch_model")?;
    let unet_ckpt = Checkpoint::open(&unet_files)?;
    if let Some(p) = merging.patches {
        p.set_backbone_names(super::ldm::unet_names(&unet_cfg));
    }
    let unet_weights = component_weights(&unet_ckpt, NameMap::prefixed(""), Component::Unet, merging, dtype, device);
    let unet = UNet::new(&unet_cfg, unet_weights).with_context(|| format!("{}: UNet", dir.display()))?;

    let vae_ckpt = Checkpoint::open(&weight_files(&dir.join("vae"), "diffusion_pytorch_model")?)?;
    let vae_dtype = vae_dtype(family, &vae_cfg, dtype);
    let vae = Vae::new(&vae_cfg, true, vae_ckpt.var_builder(NameMap::prefixed(""), Component::Vae, vae_dtype, device))
        .with_context(|| format!("{}: VAE", dir.display()))?;

    let tokenizer = clip_tokenizer(dir)?;
    let unused = [Some(&te), te2.as_ref(), Some(&unet_ckpt), Some(&vae_ckpt)]
        .into_iter()
        .flatten()
        .flat_map(|c| c.unused())
        .collect();
    Ok(Model {
        family,
        name: display_name(dir),
        path: dir.to_path_buf(),
        hash_file: unet_files[0].clone(),
        text: Text::Clip(Box::new(ClipText {
            tokenizer,
            encoder: text_encoder,
            zero_empty_negative: text_encoder_2.is_some() && index.force_zeros_for_empty_prompt.unwrap_or(true),
            pooled: text_encoder_2,
            pool_both: false,
        })),
        backbone: Network::Unet(Box::new(unet)),
        vae,
        prediction: scheduler.prediction_type.parse()?,
        preset,
        scheduler,
        unused,
        applied: Default::default(),
        base: merging.keep_base.cloned(),
        on_demand: Default::default(),
    })
}

/// A folder's `tokenizer/`, else CLIP's built-in vocabulary (random
/// benchmark models come without one).
pub(super) fn clip_tokenizer(dir: &Path) -> anyhow::Result<ClipTokenizer> {
    let tok_dir = dir.join("tokenizer");
    if tok_dir.is_dir() {
        ClipTokenizer::from_dir(&tok_dir)
    } else {
        ClipTokenizer::embedded()
    }
}

/// The second, pooled and projected text encoder (`text_encoder_2/`, SDXL's
/// and SD 3's OpenCLIP-G) with its tokenizer.
pub(super) fn load_pooled_encoder(
    dir: &Path,
    dtype: DType,
    device: &Device,
    merging: Merging,
) -> anyhow::Result<(Arc<Checkpoint>, PooledTextEncoder)> {
    let second = dir.join("text_encoder_2");
    let cfg: ClipConfig = read_json(&second.join("config.json"))?;
    let Some(projection_dim) = cfg.projection_dim else {
        bail!("{}: config.json has no projection_dim (the second encoder projects)", second.display());
    };
    let (ckpt, model) = load_text_encoder(&second, Component::TextEncoder2, &cfg, dtype, device, merging)?;
    let vb = component_weights(&ckpt, NameMap::prefixed(""), Component::TextEncoder2, merging, dtype, device);
    let projection = candle_nn::linear_no_bias(cfg.hidden_size, projection_dim, vb.pp("text_projection"))
        .with_context(|| format!("{}: text projection", second.display()))?;
    // Without a folder, CLIP's vocabulary as OpenCLIP pads it ("!", id 0), as single files load it.
    let tok_dir = dir.join("tokenizer_2");
    let tokenizer = if tok_dir.is_dir() {
        ClipTokenizer::from_dir(&tok_dir)?
    } else {
        ClipTokenizer::embedded_for(cfg.vocab_size)?.with_pad_id(0)
    };
    Ok((ckpt, PooledTextEncoder { tokenizer, model, projection }))
}

/// A CLIP text model from its component folder; transformers < 5.6 saved its
/// weights under `text_model.`.
pub(super) fn load_text_encoder(
    dir: &Path,
    component: Component,
    cfg: &ClipConfig,
    dtype: DType,
    device: &Device,
    merging: Merging,
) -> anyhow::Result<(Arc<Checkpoint>, ClipTextModel)> {
    let ckpt = Checkpoint::open(&weight_files(dir, "model")?)?;
    let prefix = if ckpt.shapes().iter().any(|(n, _)| n.starts_with("text_model.")) { "text_model." } else { "" };
    let weights = component_weights(&ckpt, NameMap::prefixed(prefix), component, merging, dtype, device);
    let model = ClipTextModel::new(cfg, weights).with_context(|| format!("{}: text encoder", dir.display()))?;
    Ok((ckpt, model))
}
