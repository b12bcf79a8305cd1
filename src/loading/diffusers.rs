//! diffusers folders: `model_index.json` plus one folder per component, each
//! with its `config.json` and safetensors weights (plain, `.fp16` variant or
//! sharded with an index).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use serde::de::DeserializeOwned;

use super::weights::{Checkpoint, NameMap};
use super::{model_name, Family, Model, Preset};
use crate::models::clip::{Activation, ClipConfig, ClipTextModel};
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::sampling::denoiser::Prediction;
use crate::sampling::schedule::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;

fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))
}

/// The weight files of a component folder whose weights are named `base`
/// (`diffusion_pytorch_model` or `model`), full precision preferred.
pub fn weight_files(dir: &Path, base: &str) -> anyhow::Result<Vec<PathBuf>> {
    for variant in ["", ".fp16"] {
        let single = dir.join(format!("{base}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{base}{variant}.safetensors.index.json"));
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
    for pickle in [format!("{base}.bin"), format!("{base}.fp16.bin"), format!("{base}.ckpt")] {
        let p = dir.join(&pickle);
        if p.is_file() {
            super::weights::refuse_pickle(&p)?;
        }
    }
    bail!("{}: no {base}.safetensors (or .fp16 / sharded variant) found", dir.display())
}

pub fn load(dir: &Path, device: &Device, dtype: DType) -> anyhow::Result<Model> {
    #[derive(serde::Deserialize)]
    struct ModelIndex {
        #[serde(rename = "_class_name")]
        class: String,
    }
    let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
    // SD 1.x/2.x pipelines; inpainting ones differ only in the UNet's inputs.
    if !matches!(index.class.as_str(), "StableDiffusionPipeline" | "StableDiffusionInpaintPipeline") {
        bail!("{}: pipeline {} is not supported yet", dir.display(), index.class);
    }
    let scheduler: SchedulerConfig = read_json(&dir.join("scheduler/scheduler_config.json"))?;
    let clip_cfg: ClipConfig = read_json(&dir.join("text_encoder/config.json"))?;
    let unet_cfg: UNetConfig = read_json(&dir.join("unet/config.json"))?;
    let vae_cfg: VaeConfig = read_json(&dir.join("vae/config.json"))?;

    let te = Checkpoint::open(&weight_files(&dir.join("text_encoder"), "model")?)?;
    // transformers < 5.6 saved CLIPTextModel weights under `text_model.`.
    let prefix = if te.shapes().iter().any(|(n, _)| n.starts_with("text_model.")) { "text_model." } else { "" };
    let text_encoder =
        ClipTextModel::new(&clip_cfg, te.var_builder(NameMap::prefixed(prefix), "text encoder", dtype, device))
            .with_context(|| format!("{}: text encoder", dir.display()))?;

    let unet_files = weight_files(&dir.join("unet"), "diffusion_pytorch_model")?;
    let unet_ckpt = Checkpoint::open(&unet_files)?;
    let unet = UNet::new(&unet_cfg, unet_ckpt.var_builder(NameMap::prefixed(""), "UNet", dtype, device))
        .with_context(|| format!("{}: UNet", dir.display()))?;

    let vae_ckpt = Checkpoint::open(&weight_files(&dir.join("vae"), "diffusion_pytorch_model")?)?;
    let vae = Vae::new(&vae_cfg, true, vae_ckpt.var_builder(NameMap::prefixed(""), "VAE", dtype, device))
        .with_context(|| format!("{}: VAE", dir.display()))?;

    let tok_dir = dir.join("tokenizer");
    let tokenizer = if tok_dir.is_dir() { ClipTokenizer::from_dir(&tok_dir)? } else { ClipTokenizer::embedded()? };
    let unused = [&te, &unet_ckpt, &vae_ckpt].iter().flat_map(|c| c.unused()).collect();
    // SD 2.x's OpenCLIP text tower uses exact GELU; SD 1.x's CLIP quick GELU.
    let family = if clip_cfg.hidden_act == Activation::Gelu { Family::Sd2 } else { Family::Sd1 };
    Ok(Model {
        family,
        name: model_name(dir),
        hash_file: unet_files[0].clone(),
        tokenizer,
        text_encoder,
        unet,
        vae,
        prediction: Prediction::parse(&scheduler.prediction_type)?,
        preset: Preset::from_name(&model_name(dir)),
        scheduler,
        unused,
    })
}
