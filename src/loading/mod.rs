//! Finding and loading models: single-file checkpoints (LDM names) and
//! diffusers folders, both into the same model structs.

pub mod catalog;
pub mod diffusers;
pub mod embeddings;
#[cfg(feature = "download")]
pub mod hub;
pub mod ldm;
pub mod locate;
pub mod lora;
pub mod weights;

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device};

use crate::models::clip::{Activation, ClipTextModel};
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
    /// Two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG), pooled text
    /// and size conditioning.
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        }
    }

    /// VAE latent scaling factor when no config says otherwise.
    pub fn vae_scaling(self) -> f64 {
        match self {
            Family::Sd1 | Family::Sd2 => 0.18215,
            Family::Sdxl => 0.13025,
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
    // SDXL: 1024², and diffusers' guidance scale for it.
    (Some(Family::Sdxl), None, Preset::Standard, Defaults { size: 1024, cfg_scale: 5.0, ..STANDARD_512 }),
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

/// A text encoder whose pooled, projected output also conditions the UNet
/// (SDXL's second).
pub struct PooledTextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
    pub projection: candle_nn::Linear,
}

/// A loaded pipeline's components and what identifies them.
pub struct Model {
    pub family: Family,
    /// The file or folder name without extension, as A1111 shows it.
    pub name: String,
    /// The file or folder it was loaded from.
    pub path: std::path::PathBuf,
    /// The weights file whose SHA-256 is the model hash (A1111 convention:
    /// the checkpoint; for a diffusers folder, its UNet weights).
    pub hash_file: std::path::PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<PooledTextEncoder>,
    /// An empty negative prompt conditions on zeros instead of the encoded
    /// "" (diffusers' `force_zeros_for_empty_prompt`, true for SDXL; A1111
    /// does the same for SDXL).
    pub zero_empty_negative: bool,
    pub unet: UNet,
    pub vae: Vae,
    pub scheduler: SchedulerConfig,
    pub prediction: Prediction,
    pub preset: Preset,
    /// Stored tensors that no model used (EMA copies, schedule buffers, …).
    pub unused: BTreeSet<String>,
    /// The adapters loaded with it.
    pub applied: Applied,
}

/// What to load with a model.
#[derive(Debug, Clone, Default)]
pub struct Adapters {
    pub loras: Vec<lora::LoraSpec>,
    /// The textual-inversion embeddings folder.
    pub embeddings: Option<std::path::PathBuf>,
    /// A VAE file replacing the model's.
    pub vae: Option<std::path::PathBuf>,
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
        Self::load_with(path, device, dtype, &Adapters::default())
    }

    /// [`Model::load`] with LoRAs merged into the weights, another VAE and
    /// textual-inversion embeddings.
    pub fn load_with(path: &Path, device: &Device, dtype: DType, adapters: &Adapters) -> anyhow::Result<Self> {
        let patches = match adapters.loras.as_slice() {
            [] => None,
            specs => Some(std::sync::Arc::new(lora::Patches::new(specs)?)),
        };
        let mut model = if path.is_dir() {
            diffusers::load(path, device, dtype, patches.as_ref())?
        } else {
            load_single_file(path, device, dtype, patches.as_ref())?
        };
        if let Some(p) = patches {
            model.applied.lora_report = p.report();
            for spec in &adapters.loras {
                model.applied.loras.push((spec.name(), lora::short_hash(&spec.path)?));
            }
        }
        if let Some(path) = &adapters.vae {
            model.vae = load_vae(path, &model.vae.config, vae_dtype(model.family, &model.vae.config, dtype), device)?;
            model.applied.vae = Some((model_name(path), file_hash(path)?));
        }
        if let Some(dir) = &adapters.embeddings {
            let mut widths = vec![model.text_encoder.config.hidden_size];
            widths.extend(model.text_encoder_2.as_ref().map(|e| e.model.config.hidden_size));
            (model.applied.embeddings, model.applied.embeddings_skipped) = embeddings::read_dir(dir, &widths);
        }
        Ok(model)
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
    Ok(catalog::sha256(path)?[..10].to_string())
}

/// The name A1111 shows for a model path: the file stem or folder name.
pub fn model_name(path: &Path) -> String {
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// The family of a single-file checkpoint from its tensor names, or what
/// else the file holds.
pub fn detect_family(path: &Path, t: &ldm::Tensors) -> anyhow::Result<Family> {
    let text_encoder = |p: &str| t.has(&format!("{p}embeddings.token_embedding.weight"));
    let has_unet = t.has(&format!("{}input_blocks.0.0.weight", ldm::UNET_PREFIX));
    if has_unet {
        if sd1_clip_prefix(t).is_some() {
            return Ok(Family::Sd1);
        }
        if t.has(&format!("{}token_embedding.weight", ldm::OPENCLIP_PREFIX)) {
            return Ok(Family::Sd2);
        }
        if text_encoder(ldm::SDXL_CLIP_PREFIX) && t.has(&format!("{}token_embedding.weight", ldm::SDXL_OPENCLIP_PREFIX))
        {
            return Ok(Family::Sdxl);
        }
    }
    let what = if t.any_with_prefix("conditioner.embedders.0.model.") {
        "an SDXL refiner, which sdgen does not run (only base models)".to_string()
    } else if t.any_with_prefix("lora_") || t.names().any(|n| n.contains(".lora_down.") || n.contains(".lora_A.")) {
        "a LoRA, not a full model".to_string()
    } else if t.any_with_prefix("encoder.") && t.any_with_prefix("decoder.") {
        "a VAE on its own, not a full model".to_string()
    } else if has_unet {
        format!("a UNet with no text encoder sdgen knows (unexpected tensors: {})", unexpected(t))
    } else {
        format!("not a Stable Diffusion 1.x/2.x/XL checkpoint (unexpected tensors: {})", unexpected(t))
    };
    anyhow::bail!("{}: {what}", path.display())
}

/// Where an SD 1.x single file keeps its CLIP text model.
fn sd1_clip_prefix(t: &ldm::Tensors) -> Option<&'static str> {
    ldm::CLIP_PREFIXES.iter().copied().find(|p| t.has(&format!("{p}embeddings.token_embedding.weight")))
}

/// A single file's (first) tokenizer: CLIP's, sized to the text encoder's
/// token table; SD 2.x pads with `!` (id 0), not with the end token.
fn single_file_tokenizer(family: Family, t: &ldm::Tensors) -> anyhow::Result<ClipTokenizer> {
    let table = match family {
        Family::Sd1 => format!("{}embeddings.token_embedding.weight", sd1_clip_prefix(t).unwrap_or_default()),
        Family::Sd2 => format!("{}token_embedding.weight", ldm::OPENCLIP_PREFIX),
        Family::Sdxl => format!("{}embeddings.token_embedding.weight", ldm::SDXL_CLIP_PREFIX),
    };
    let tokenizer = ClipTokenizer::embedded_for(t.dim(&table, 0)?)?;
    Ok(if family == Family::Sd2 { tokenizer.with_pad_id(0) } else { tokenizer })
}

/// The names of a checkpoint outside the parts sdgen loads, grouped by their
/// first two components (`` `double_blocks.0.*` (24) ``), at most five groups.
fn unexpected(t: &ldm::Tensors) -> String {
    // The model's parts, and the training state LDM checkpoints carry.
    const KNOWN: &[&str] = &[
        ldm::UNET_PREFIX,
        ldm::VAE_PREFIX,
        "cond_stage_model.",
        "conditioner.embedders.",
        "model_ema.",
        "betas",
        "alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_",
        "posterior_",
        "logvar",
        "lvlb_weights",
    ];
    let mut groups = std::collections::BTreeMap::<String, usize>::new();
    for name in t.names().filter(|n| !KNOWN.iter().any(|k| n.starts_with(k))) {
        let parts: Vec<&str> = name.splitn(3, '.').collect();
        let group = if parts.len() > 2 { format!("{}.{}.*", parts[0], parts[1]) } else { name.clone() };
        *groups.entry(group).or_default() += 1;
    }
    if groups.is_empty() {
        return "none; the text encoder is missing".into();
    }
    let mut list: Vec<String> = groups.iter().take(5).map(|(g, n)| format!("`{g}` ({n})")).collect();
    if groups.len() > 5 {
        list.push(format!("and {} more groups", groups.len() - 5));
    }
    list.join(", ")
}

fn load_single_file(
    path: &Path,
    device: &Device,
    dtype: DType,
    patches: Option<&std::sync::Arc<lora::Patches>>,
) -> anyhow::Result<Model> {
    let ckpt = weights::Checkpoint::open(&[path.to_path_buf()])?;
    if let Some(p) = patches {
        ckpt.patch_with(p);
    }
    let tensors = ldm::Tensors::new(ckpt.shapes());
    let family = detect_family(path, &tensors)?;
    let at = |what: &str| format!("{}: {what}", path.display());
    let (clip_cfg, clip_names) = match family {
        Family::Sd1 => {
            let prefix = sd1_clip_prefix(&tensors).unwrap_or_default();
            (ldm::infer_clip(&tensors, prefix, Activation::QuickGelu), weights::NameMap::prefixed(prefix))
        }
        Family::Sd2 => {
            let cfg = ldm::infer_openclip(&tensors, ldm::OPENCLIP_PREFIX, 1);
            let layers = cfg.as_ref().map_or(0, |c| c.num_hidden_layers);
            (cfg, ldm::openclip_names(ldm::OPENCLIP_PREFIX, layers))
        }
        Family::Sdxl => (
            ldm::infer_clip(&tensors, ldm::SDXL_CLIP_PREFIX, Activation::QuickGelu),
            weights::NameMap::prefixed(ldm::SDXL_CLIP_PREFIX),
        ),
    };
    let clip_cfg = clip_cfg.with_context(|| at("text encoder"))?;
    let tokenizer = single_file_tokenizer(family, &tensors).with_context(|| at("text encoder"))?;
    let text_encoder = ClipTextModel::new(&clip_cfg, ckpt.var_builder(clip_names, "text encoder", dtype, device))?;
    let text_encoder_2 = match family {
        Family::Sdxl => {
            Some(load_openclip_pooled(&ckpt, &tensors, dtype, device).with_context(|| at("second text encoder"))?)
        }
        Family::Sd1 | Family::Sd2 => None,
    };
    let pooled_dim = text_encoder_2.as_ref().map(|e| e.projection.weight().dim(0)).transpose()?;
    let unet_cfg = ldm::infer_unet(&tensors, pooled_dim).with_context(|| at("UNet"))?;
    let vae_cfg = ldm::infer_vae(&tensors, family.vae_scaling()).with_context(|| at("VAE"))?;
    if let Some(p) = patches {
        p.set_unet_names(&unet_cfg);
    }
    let unet = UNet::new(&unet_cfg, ckpt.var_builder(ldm::unet_names(&unet_cfg), "UNet", dtype, device))?;
    let vae_dtype = vae_dtype(family, &vae_cfg, dtype);
    let vae = Vae::new(
        &vae_cfg,
        true,
        ckpt.var_builder(ldm::vae_names(&vae_cfg, ldm::VAE_PREFIX), "VAE", vae_dtype, device),
    )?;
    let (scheduler, prediction) = match family {
        Family::Sd1 => (SchedulerConfig::sd15(), Prediction::Epsilon),
        Family::Sd2 => (SchedulerConfig::sd21(), detect_prediction(&unet).with_context(|| at("UNet"))?),
        Family::Sdxl => (SchedulerConfig::sdxl(), Prediction::Epsilon),
    };
    Ok(Model {
        family,
        name: model_name(path),
        path: path.to_path_buf(),
        hash_file: path.to_path_buf(),
        tokenizer,
        text_encoder,
        zero_empty_negative: text_encoder_2.is_some(),
        text_encoder_2,
        unet,
        vae,
        scheduler,
        prediction,
        preset: Preset::from_name(&model_name(path)),
        unused: ckpt.unused(),
        applied: Applied::default(),
    })
}

/// The (first) tokenizer of a model, without loading its weights: a
/// folder's `tokenizer/`, or for a single file CLIP's, sized to its token
/// table and padding as its family does.
pub fn tokenizer_of(path: &Path) -> anyhow::Result<ClipTokenizer> {
    if path.is_dir() {
        let dir = path.join("tokenizer");
        return if dir.is_dir() { ClipTokenizer::from_dir(&dir) } else { ClipTokenizer::embedded() };
    }
    let ckpt = weights::Checkpoint::open(&[path.to_path_buf()])?;
    let tensors = ldm::Tensors::new(ckpt.shapes());
    let family = detect_family(path, &tensors)?;
    single_file_tokenizer(family, &tensors).with_context(|| format!("{}: text encoder", path.display()))
}

/// SDXL's second text encoder from a single file (open_clip names): all of
/// its blocks (the pooled output comes from the last), the `!` padding.
fn load_openclip_pooled(
    ckpt: &std::sync::Arc<weights::Checkpoint>,
    tensors: &ldm::Tensors,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<PooledTextEncoder> {
    let p = ldm::SDXL_OPENCLIP_PREFIX;
    let cfg = ldm::infer_openclip(tensors, p, 0)?;
    let names = ldm::openclip_names(p, cfg.num_hidden_layers);
    let projection_dim = cfg.projection_dim.with_context(|| format!("missing tensor `{p}text_projection`"))?;
    let model = ClipTextModel::new(&cfg, ckpt.var_builder(names.clone(), "second text encoder", dtype, device))?;
    let vb = ckpt.var_builder(names, "second text encoder", dtype, device);
    let projection = candle_nn::linear_no_bias(cfg.hidden_size, projection_dim, vb.pp("text_projection"))?;
    let tokenizer = ClipTokenizer::embedded_for(cfg.vocab_size)?.with_pad_id(0);
    Ok(PooledTextEncoder { tokenizer, model, projection })
}

/// A VAE on its own (`--vae`), in the original names (with or without
/// `first_stage_model.`) or diffusers': it must have the model's VAE
/// architecture (`cfg`, whose scaling factor it keeps).
fn load_vae(path: &Path, cfg: &crate::models::vae::VaeConfig, dtype: DType, device: &Device) -> anyhow::Result<Vae> {
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
    Vae::new(cfg, true, ckpt.var_builder(names, "VAE", dtype, device))
        .with_context(|| format!("{}: VAE", path.display()))
}

/// SDXL's VAE overflows in f16 (diffusers' `force_upcast`, set in its
/// config and true for single files): it then runs in f32.
pub fn vae_dtype(family: Family, cfg: &crate::models::vae::VaeConfig, dtype: DType) -> DType {
    let force_upcast = cfg.other.get("force_upcast").and_then(|v| v.as_bool()).unwrap_or(true);
    if family == Family::Sdxl && dtype == DType::F16 && force_upcast {
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
