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
use crate::sampling::samplers::Sampler;
use crate::sampling::schedule::ScheduleKind;
use crate::sampling::schedule::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;

/// Model families sdgen can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// CLIP ViT-L text encoder (quick GELU).
    Sd1,
    /// OpenCLIP ViT-H text encoder (GELU, penultimate layer, `!` padding).
    Sd2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
        }
    }

    /// VAE latent scaling factor when no config says otherwise.
    pub fn vae_scaling(self) -> f64 {
        match self {
            Family::Sd1 | Family::Sd2 => 0.18215,
        }
    }
}

/// How a model is meant to be run, beyond its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Standard,
    /// Adversarially distilled (SD-Turbo, SDXL-Turbo): 1–4 steps, no guidance.
    Turbo,
}

impl Preset {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "standard" | "none" => Ok(Preset::Standard),
            "turbo" => Ok(Preset::Turbo),
            other => anyhow::bail!("--preset {other:?}: use standard or turbo"),
        }
    }

    /// Turbo models are recognised by name (`sd_turbo`, `sdxl-turbo`, …): their
    /// files hold nothing else that tells them apart.
    pub fn from_name(name: &str) -> Self {
        if name.to_ascii_lowercase().contains("turbo") {
            Preset::Turbo
        } else {
            Preset::Standard
        }
    }
}

/// What a model runs with when the command line does not say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    pub size: usize,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: Sampler,
    pub schedule: ScheduleKind,
}

/// The defaults of every family and preset, in one place; the first row that
/// matches wins, `None` matching anything.
const DEFAULTS: &[(Option<Family>, Option<Prediction>, Preset, Defaults)] = &[
    // SD-Turbo and SDXL-Turbo: one step of Euler ancestral on trailing
    // timesteps without guidance, at 512².
    (
        None,
        None,
        Preset::Turbo,
        Defaults {
            size: 512,
            steps: 1,
            cfg_scale: 0.0,
            sampler: Sampler::EulerAncestral,
            schedule: ScheduleKind::Trailing,
        },
    ),
    // SD 2.x v-prediction models were trained at 768², the ε (base) ones at 512².
    (Some(Family::Sd2), Some(Prediction::V), Preset::Standard, Defaults { size: 768, ..STANDARD_512 }),
    (None, None, Preset::Standard, STANDARD_512),
];

impl Defaults {
    pub fn sampling(&self) -> (Sampler, ScheduleKind) {
        (self.sampler, self.schedule)
    }
}

/// 20 steps of DPM++ 2M with Karras σs at cfg 7.5, 512²: A1111's defaults.
pub const STANDARD_512: Defaults =
    Defaults { size: 512, steps: 20, cfg_scale: 7.5, sampler: Sampler::DpmPP2M, schedule: ScheduleKind::Karras };

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
    pub preset: Preset,
    /// Stored tensors that no model used (EMA copies, schedule buffers, …).
    pub unused: BTreeSet<String>,
}

impl Model {
    /// Size, steps, guidance and sampler when the command line gives none.
    pub fn defaults(&self) -> Defaults {
        DEFAULTS
            .iter()
            .find(|(f, p, preset, _)| {
                f.is_none_or(|f| f == self.family) && p.is_none_or(|p| p == self.prediction) && *preset == self.preset
            })
            .map_or(STANDARD_512, |row| row.3)
    }

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
    let at = |what: &str| format!("{}: {what}", path.display());
    let clip_prefix = ldm::CLIP_PREFIXES.iter().find(|p| tensors.has(&format!("{p}embeddings.token_embedding.weight")));
    let (family, clip_cfg, clip_names, tokenizer) = match clip_prefix {
        Some(prefix) => {
            let cfg = ldm::infer_clip(&tensors, prefix, crate::models::clip::Activation::QuickGelu)
                .with_context(|| at("text encoder"))?;
            (Family::Sd1, cfg, weights::NameMap::prefixed(prefix), ClipTokenizer::embedded()?)
        }
        None if tensors.has(&format!("{}token_embedding.weight", ldm::OPENCLIP_PREFIX)) => {
            let cfg = ldm::infer_openclip(&tensors).with_context(|| at("text encoder"))?;
            let names = ldm::openclip_names(cfg.num_hidden_layers);
            // SD 2.x pads prompts with `!` (id 0), not with the end token.
            (Family::Sd2, cfg, names, ClipTokenizer::embedded()?.with_pad_id(0))
        }
        None => return Err(not_a_checkpoint(path, &tensors)),
    };
    let unet_cfg = ldm::infer_unet(&tensors).with_context(|| at("UNet"))?;
    let vae_cfg = ldm::infer_vae(&tensors, family.vae_scaling()).with_context(|| at("VAE"))?;
    let text_encoder = ClipTextModel::new(&clip_cfg, ckpt.var_builder(clip_names, "text encoder", dtype, device))?;
    let unet = UNet::new(&unet_cfg, ckpt.var_builder(ldm::unet_names(&unet_cfg), "UNet", dtype, device))?;
    let vae = Vae::new(&vae_cfg, true, ckpt.var_builder(ldm::vae_names(&vae_cfg), "VAE", dtype, device))?;
    let (scheduler, prediction) = match family {
        Family::Sd1 => (SchedulerConfig::sd15(), Prediction::Epsilon),
        Family::Sd2 => (SchedulerConfig::sd21(), detect_prediction(&unet).with_context(|| at("UNet"))?),
    };
    Ok(Model {
        family,
        name: model_name(path),
        hash_file: path.to_path_buf(),
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler,
        prediction,
        preset: Preset::from_name(&model_name(path)),
        unused: ckpt.unused(),
    })
}

/// Whether a single-file SD 2.x UNet predicts v or ε, which the file does not
/// say. The rule A1111 and stable-diffusion.cpp use: run the UNet once on a
/// sample of 0.5 everywhere (1×C×8×8) at t = 999 with a context of 0.5
/// everywhere (two tokens); v-prediction when mean(output − sample) < −1
/// (a v model predicts about −x₀-ish values there, an ε model about 0).
pub fn detect_prediction(unet: &UNet) -> anyhow::Result<Prediction> {
    Ok(if v_probe(unet)? < -1.0 { Prediction::V } else { Prediction::Epsilon })
}

/// The value [`detect_prediction`] compares with −1.
pub fn v_probe(unet: &UNet) -> anyhow::Result<f32> {
    let (dtype, device) = (unet.dtype(), unet.device());
    let x = (candle_core::Tensor::ones((1, unet.config.in_channels, 8, 8), dtype, &device)? * 0.5)?;
    let context = (candle_core::Tensor::ones((1, 2, unet.config.cross_attention_dim), dtype, &device)? * 0.5)?;
    let out = unet.forward(&x, 999.0, &context, None)?;
    let x = x.narrow(1, 0, out.dim(1)?)?;
    Ok((out - x)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?)
}
