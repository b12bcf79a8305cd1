//! A loaded pipeline's components, what they were loaded with, and the
//! per-component rules that do not depend on the file format.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use candle_core::{DType, Device};

use super::assets::{self, Asset};
use super::controlnet::{self, LoadedControlNet};
use super::family::{Defaults, Family, Preset};
use super::hashing;
use super::upscaler::{self, LoadedUpscaler};
use super::weights::{self, Component};
use super::{embeddings, ldm, lora};
use crate::failure::{Failure, Tag};
use crate::models::unet::UNet;
use crate::models::vae::Vae;
use crate::models::Network;
use crate::sampling::denoiser::Prediction;
use crate::sampling::schedule::SchedulerConfig;
use crate::text::Text;

/// A loaded pipeline's components and what identifies them.
pub struct Model {
    pub family: Family,
    /// The file or folder name without extension, as A1111 shows it.
    pub name: String,
    /// The file or folder it was loaded from.
    pub path: PathBuf,
    /// The weights file whose SHA-256 is the model hash (A1111 convention:
    /// the checkpoint; for a diffusers folder, its UNet weights).
    pub hash_file: PathBuf,
    /// The text encoders.
    pub text: Text,
    /// The denoising network: a UNet, or SD 3's MMDiT.
    pub backbone: Network,
    pub vae: Vae,
    pub scheduler: SchedulerConfig,
    pub prediction: Prediction,
    pub preset: Preset,
    /// Stored tensors that no model used (EMA copies, schedule buffers, …).
    pub unused: BTreeSet<String>,
    /// The adapters loaded with it.
    pub applied: Applied,
    /// The LoRA targets' weights before any LoRA, when loaded with
    /// [`Adapters::retain_base`].
    pub base: Option<std::sync::Arc<lora::BaseWeights>>,
    /// The ControlNets and upscalers jobs have named so far.
    pub on_demand: OnDemand,
}

/// ControlNets and upscaler models loaded on first use, by the names jobs
/// give them.
#[derive(Default)]
pub struct OnDemand {
    /// Where names are looked up (`<models>/ControlNet/`, `<models>/ESRGAN/`, …).
    models_dir: Option<PathBuf>,
    controlnets: Mutex<Vec<(String, Arc<LoadedControlNet>)>>,
    upscalers: Mutex<Vec<(String, Arc<LoadedUpscaler>)>>,
}

impl OnDemand {
    pub fn new(models_dir: Option<PathBuf>) -> Self {
        Self { models_dir, ..Self::default() }
    }

    fn models_dir(&self) -> &Path {
        self.models_dir.as_deref().unwrap_or(Path::new(""))
    }
}

/// What to load with a model.
#[derive(Debug, Clone, Default)]
pub struct Adapters {
    pub loras: Vec<lora::LoraSpec>,
    /// The textual-inversion embeddings folder.
    pub embeddings: Option<PathBuf>,
    /// A VAE file replacing the model's.
    pub vae: Option<PathBuf>,
    /// Keep the base weights so that [`Model::merge_loras`] can swap LoRAs
    /// later without reading the model files again (a server's sessions).
    pub retain_base: bool,
    /// The models dir, where ControlNets and upscalers named by jobs are looked up.
    pub models_dir: Option<PathBuf>,
    /// SD 3.5: leave out T5.
    pub no_t5: bool,
    /// SD 3.5 single files: text encoder files (`--text-encoder`).
    pub text_encoders: Vec<PathBuf>,
    /// SD 3.5 single files: T5's `tokenizer.json` (`--t5-tokenizer`).
    pub t5_tokenizer: Option<PathBuf>,
}

/// The adapters a model was loaded with, for reports and PNG metadata.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// (name, A1111 short hash) of each LoRA.
    pub loras: Vec<(String, String)>,
    /// One line per LoRA, and whether all of it applied.
    pub lora_report: Vec<(String, bool)>,
    /// Textual-inversion embeddings that prompts may use.
    pub embeddings: Vec<embeddings::Embedding>,
    /// Embedding files that do not fit this model, and why.
    pub embeddings_skipped: Vec<String>,
    /// (name, A1111 short hash) of a VAE that replaced the model's.
    pub vae: Option<(String, String)>,
}

impl Model {
    /// Size, steps, guidance and sampler when the user gives none.
    pub fn defaults(&self) -> Defaults {
        let defaults = Defaults::of(self.family, self.prediction, self.preset);
        // SD 3.5 Large (38 blocks) has its own card; Medium has 24.
        match &self.backbone {
            Network::Mmdit(m) if self.preset == Preset::Standard && m.config.num_layers >= 38 => {
                super::family::SD35_LARGE
            }
            _ => defaults,
        }
    }

    /// A1111's model hash: the first 10 hex digits of the SHA-256 of
    /// [`Model::hash_file`].
    pub fn hash(&self) -> anyhow::Result<String> {
        hashing::short_sha256(&self.hash_file, hashing::MODEL_HASH_DIGITS)
    }

    /// Whether the UNet takes the mask and masked image beside the sample.
    pub fn is_inpainting(&self) -> bool {
        self.backbone.in_channels() == self.vae.config.latent_channels * 2 + 1
    }

    /// The ControlNet `name` (a path, or a name in the models dir), loaded
    /// the first time it is asked for and checked against this model.
    pub fn controlnet(&self, name: &str) -> anyhow::Result<Arc<LoadedControlNet>> {
        let mut loaded = self.on_demand.controlnets.lock().expect("lock");
        if let Some((_, net)) = loaded.iter().find(|(n, _)| n == name) {
            return Ok(net.clone());
        }
        let dir = self.on_demand.models_dir();
        let Some(unet) = self.backbone.unet() else {
            return Err(anyhow::anyhow!("ControlNets guide UNet models (SD 1.x, 2.x, XL), not {}", self.family.name()))
                .tag(Failure::Usage);
        };
        let path = assets::find(Asset::ControlNet, name, dir)?;
        let net = controlnet::load(&path, &unet.config, unet.dtype(), &unet.device()).tag(Failure::Model)?;
        let net = Arc::new(net);
        loaded.push((name.to_string(), net.clone()));
        Ok(net)
    }

    /// The ControlNet `name` if a job has loaded it.
    pub fn loaded_controlnet(&self, name: &str) -> Option<Arc<LoadedControlNet>> {
        let loaded = self.on_demand.controlnets.lock().expect("lock");
        loaded.iter().find(|(n, _)| n == name).map(|(_, net)| net.clone())
    }

    /// The upscaler model `name` (a path, or a name in the models dir),
    /// loaded the first time it is asked for, on the backbone's device.
    pub fn upscaler(&self, name: &str) -> anyhow::Result<Arc<LoadedUpscaler>> {
        let mut loaded = self.on_demand.upscalers.lock().expect("lock");
        if let Some((_, model)) = loaded.iter().find(|(n, _)| n == name) {
            return Ok(model.clone());
        }
        let path = assets::find(Asset::Upscaler, name, self.on_demand.models_dir())?;
        let model = Arc::new(upscaler::load(&path, &self.backbone.device()).tag(Failure::Model)?);
        loaded.push((name.to_string(), model.clone()));
        Ok(model)
    }
}

/// A VAE on its own (`--vae`), in the original names (with or without
/// `first_stage_model.`) or diffusers': it must have the model's VAE
/// architecture (`cfg`, whose scaling factor it keeps).
pub(super) fn load_vae(
    path: &Path,
    cfg: &crate::models::vae::VaeConfig,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Vae> {
    let ckpt = weights::Checkpoint::open(&[path.to_path_buf()])?;
    let tensors = ldm::Tensors::new(ckpt.shapes());
    let names = if tensors.any_with_prefix("decoder.up_blocks.") {
        weights::NameMap::prefixed("")
    } else if tensors.any_with_prefix("decoder.up.") {
        ldm::vae_names(cfg, "")
    } else if tensors.any_with_prefix(&format!("{}decoder.up.", ldm::VAE_PREFIX)) {
        ldm::vae_names(cfg, ldm::VAE_PREFIX)
    } else {
        anyhow::bail!("{}: not a VAE (no `decoder.up.*` or `decoder.up_blocks.*` tensors)", path.display());
    };
    Vae::new(cfg, true, ckpt.var_builder(names, Component::Vae, dtype, device))
        .with_context(|| format!("{}: VAE", path.display()))
}

/// SDXL's VAE overflows in f16 (diffusers' `force_upcast`, set in its
/// config and true for single files): it then runs in f32.
pub fn vae_dtype(family: Family, cfg: &crate::models::vae::VaeConfig, dtype: DType) -> DType {
    let force_upcast = cfg.other.get("force_upcast").and_then(|v| v.as_bool()).unwrap_or(true);
    if family.spec().vae_upcast && dtype == DType::F16 && force_upcast {
        DType::F32
    } else {
        dtype
    }
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
