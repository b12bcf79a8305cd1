//! Finding and loading models: single-file checkpoints (LDM names) and
//! diffusers folders, both into the same model structs.

pub mod diffusers;
#[cfg(feature = "download")]
pub mod hub;
pub mod ldm;
pub mod locate;
pub mod weights;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device};
use sha2::{Digest, Sha256};

use crate::models::clip::ClipTextModel;
use crate::models::unet::UNet;
use crate::models::vae::Vae;
use crate::sampling::denoiser::Prediction;
use crate::sampling::schedule::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;

/// Model families sdgen can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Sd1,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
        }
    }

    /// The image side the family was trained at.
    pub fn native_size(self) -> usize {
        match self {
            Family::Sd1 => 512,
        }
    }

    /// VAE latent scaling factor when no config says otherwise.
    pub fn vae_scaling(self) -> f64 {
        match self {
            Family::Sd1 => 0.18215,
        }
    }
}

/// A loaded pipeline's components and what identifies them.
pub struct Model {
    pub family: Family,
    /// The file or folder name without extension, as A1111 shows it.
    pub name: String,
    /// The weights file whose SHA-256 is the model hash (A1111 convention:
    /// the checkpoint; for a diffusers folder, its UNet weights).
    pub hash_file: std::path::PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet,
    pub vae: Vae,
    pub scheduler: SchedulerConfig,
    pub prediction: Prediction,
    /// Stored tensors that no model used (EMA copies, schedule buffers, …).
    pub unused: BTreeSet<String>,
}

impl Model {
    /// Loads a single `.safetensors` checkpoint or a diffusers folder.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        if path.is_dir() {
            diffusers::load(path, device, dtype)
        } else {
            load_single_file(path, device, dtype)
        }
    }

    /// First 10 hex digits of the SHA-256 of [`Model::hash_file`].
    pub fn hash(&self) -> anyhow::Result<String> {
        file_hash(&self.hash_file)
    }
}

/// The model hash of a checkpoint file or diffusers folder, without loading it.
pub fn model_hash(path: &Path) -> anyhow::Result<String> {
    if path.is_dir() {
        let unet = diffusers::weight_files(&path.join("unet"), "diffusion_pytorch_model")?;
        file_hash(&unet[0])
    } else {
        file_hash(path)
    }
}

/// First 10 hex digits of a file's SHA-256 (A1111's "Model hash").
fn file_hash(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("{}: read failed", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(hex[..10].to_string())
}

/// The name A1111 shows for a model path: the file stem or folder name.
pub fn model_name(path: &Path) -> String {
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// Explains what a safetensors file that is not a full SD checkpoint holds.
fn not_a_checkpoint(path: &Path, t: &ldm::Tensors) -> anyhow::Error {
    let what = if t.any_with_prefix("conditioner.embedders.") {
        "an SDXL checkpoint (not supported yet)"
    } else if t.any_with_prefix("cond_stage_model.model.") {
        "an SD 2.x checkpoint (not supported yet)"
    } else if t.any_with_prefix("lora_") || t.any_with_prefix("lora_unet_") {
        "a LoRA, not a full model"
    } else if t.any_with_prefix("encoder.") && t.any_with_prefix("decoder.") {
        "a VAE on its own, not a full model"
    } else {
        "not a Stable Diffusion checkpoint"
    };
    anyhow::anyhow!("{}: {what} (found no `{}input_blocks.*` UNet tensors)", path.display(), ldm::UNET_PREFIX)
}

fn load_single_file(path: &Path, device: &Device, dtype: DType) -> anyhow::Result<Model> {
    let ckpt = weights::Checkpoint::open(&[path.to_path_buf()])?;
    let tensors = ldm::Tensors::new(ckpt.shapes());
    if !tensors.has(&format!("{}input_blocks.0.0.weight", ldm::UNET_PREFIX)) {
        return Err(not_a_checkpoint(path, &tensors));
    }
    let Some(clip_prefix) =
        ldm::CLIP_PREFIXES.iter().find(|p| tensors.has(&format!("{p}embeddings.token_embedding.weight")))
    else {
        return Err(not_a_checkpoint(path, &tensors));
    };
    let family = Family::Sd1;
    let at = |what: &str| format!("{}: {what}", path.display());
    let clip_cfg = ldm::infer_clip(&tensors, clip_prefix, crate::models::clip::Activation::QuickGelu)
        .with_context(|| at("text encoder"))?;
    let unet_cfg = ldm::infer_unet(&tensors).with_context(|| at("UNet"))?;
    let vae_cfg = ldm::infer_vae(&tensors, family.vae_scaling()).with_context(|| at("VAE"))?;
    let text_encoder = ClipTextModel::new(
        &clip_cfg,
        ckpt.var_builder(weights::NameMap::prefixed(clip_prefix), "text encoder", dtype, device),
    )?;
    let unet = UNet::new(&unet_cfg, ckpt.var_builder(ldm::unet_names(&unet_cfg), "UNet", dtype, device))?;
    let vae = Vae::new(&vae_cfg, true, ckpt.var_builder(ldm::vae_names(&vae_cfg), "VAE", dtype, device))?;
    Ok(Model {
        family,
        name: model_name(path),
        hash_file: path.to_path_buf(),
        tokenizer: ClipTokenizer::embedded()?,
        text_encoder,
        unet,
        vae,
        scheduler: SchedulerConfig::sd15(),
        prediction: Prediction::Epsilon,
        unused: ckpt.unused(),
    })
}
