//! Model families: what each is, how it is recognised (from a single file's
//! tensor names or a diffusers folder's configs), and what it runs with
//! when the user does not say.

use std::path::Path;
use std::str::FromStr;

use super::ldm;
use crate::models::clip::{Activation, ClipConfig};
use crate::sampling::denoiser::Prediction;
use crate::sampling::samplers::Sampler;
use crate::sampling::schedule::{ScheduleKind, SchedulerConfig};

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
    /// SD 3.5: CLIP-L, OpenCLIP-G and T5, an MMDiT, flow matching.
    Sd3,
}

/// A single file's text encoder: where its tensors are and how it is built.
#[derive(Debug, Clone, Copy)]
pub enum TextTower {
    /// OpenAI CLIP (transformers names) under the first of `prefixes` that holds it.
    Clip { prefixes: &'static [&'static str] },
    /// OpenCLIP (open_clip names, fused q/k/v) under `prefix`, its last
    /// `skip` layers unused.
    OpenClip { prefix: &'static str, skip: usize },
}

impl TextTower {
    /// Where the encoder's tensors start in `t`, if it is there.
    pub fn prefix_in(self, t: &ldm::Tensors) -> Option<&'static str> {
        match self {
            TextTower::Clip { prefixes } => {
                prefixes.iter().copied().find(|p| t.has(&format!("{p}embeddings.token_embedding.weight")))
            }
            TextTower::OpenClip { prefix, .. } => t.has(&format!("{prefix}token_embedding.weight")).then_some(prefix),
        }
    }

    /// The name of its token table in the checkpoint.
    pub fn token_table(self, prefix: &str) -> String {
        match self {
            TextTower::Clip { .. } => format!("{prefix}embeddings.token_embedding.weight"),
            TextTower::OpenClip { .. } => format!("{prefix}token_embedding.weight"),
        }
    }
}

/// What sets a family apart, in one place: how its single files are laid
/// out and read, and the constants it runs with.
#[derive(Debug)]
pub struct FamilySpec {
    pub family: Family,
    pub name: &'static str,
    pub text_encoder: TextTower,
    /// A second, pooled text encoder (SDXL's OpenCLIP bigG).
    pub pooled_text_encoder: Option<TextTower>,
    /// VAE latent scaling factor when no config says otherwise.
    pub vae_scaling: f64,
    /// Its VAE overflows in f16 and runs in f32 unless its config says
    /// `force_upcast: false` (diffusers' rule).
    pub vae_upcast: bool,
    /// The scheduler config of its single files.
    pub scheduler: fn() -> SchedulerConfig,
    /// Its single files do not say ε or v: the UNet is probed.
    pub probe_prediction: bool,
}

/// Every family, in the order single files are recognised.
pub const FAMILIES: &[FamilySpec] = &[
    FamilySpec {
        family: Family::Sd1,
        name: "SD 1.x",
        text_encoder: TextTower::Clip { prefixes: ldm::CLIP_PREFIXES },
        pooled_text_encoder: None,
        vae_scaling: 0.18215,
        vae_upcast: false,
        scheduler: SchedulerConfig::sd15,
        probe_prediction: false,
    },
    FamilySpec {
        family: Family::Sd2,
        name: "SD 2.x",
        // SD 2.x conditions on the penultimate layer.
        text_encoder: TextTower::OpenClip { prefix: ldm::OPENCLIP_PREFIX, skip: 1 },
        pooled_text_encoder: None,
        vae_scaling: 0.18215,
        vae_upcast: false,
        scheduler: SchedulerConfig::sd21,
        probe_prediction: true,
    },
    FamilySpec {
        family: Family::Sdxl,
        name: "SDXL",
        text_encoder: TextTower::Clip { prefixes: &[ldm::SDXL_CLIP_PREFIX] },
        pooled_text_encoder: Some(TextTower::OpenClip { prefix: ldm::SDXL_OPENCLIP_PREFIX, skip: 0 }),
        vae_scaling: 0.13025,
        vae_upcast: true,
        scheduler: SchedulerConfig::sdxl,
        probe_prediction: false,
    },
    FamilySpec {
        family: Family::Sd3,
        name: "SD 3.5",
        // The encoders as bundled single files name them (not loaded from single files yet).
        text_encoder: TextTower::Clip { prefixes: &["text_encoders.clip_l.transformer.text_model."] },
        pooled_text_encoder: Some(TextTower::Clip { prefixes: &["text_encoders.clip_g.transformer.text_model."] }),
        vae_scaling: 1.5305,
        vae_upcast: true,
        scheduler: SchedulerConfig::sd3,
        probe_prediction: false,
    },
];

impl Family {
    pub fn spec(self) -> &'static FamilySpec {
        FAMILIES.iter().find(|s| s.family == self).expect("every family has a spec")
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The family of a diffusers folder: a second text encoder makes SDXL;
    /// otherwise the text encoder's activation tells SD 2.x's OpenCLIP
    /// (exact GELU) from SD 1.x's CLIP (quick GELU).
    pub fn of_folder(dir: &Path) -> anyhow::Result<Family> {
        if dir.join("transformer").is_dir() && dir.join("text_encoder_2").is_dir() {
            return Ok(Family::Sd3);
        }
        if dir.join("text_encoder_2").is_dir() {
            return Ok(Family::Sdxl);
        }
        let clip: ClipConfig = crate::files::read_json(&dir.join("text_encoder/config.json"))?;
        Ok(match clip.hidden_act {
            Activation::Gelu => Family::Sd2,
            Activation::QuickGelu => Family::Sd1,
        })
    }

    /// The family of a single-file checkpoint from its tensor names, or
    /// what else the file holds.
    pub fn of_single_file(path: &Path, t: &ldm::Tensors) -> anyhow::Result<Family> {
        let has_unet = t.has(&format!("{}input_blocks.0.0.weight", ldm::UNET_PREFIX));
        if t.has(&format!("{}joint_blocks.0.x_block.attn.qkv.weight", ldm::UNET_PREFIX)) {
            return Ok(Family::Sd3);
        }
        let found = FAMILIES.iter().find(|spec| {
            spec.text_encoder.prefix_in(t).is_some()
                && spec.pooled_text_encoder.is_none_or(|tower| tower.prefix_in(t).is_some())
        });
        if let (true, Some(spec)) = (has_unet, found) {
            return Ok(spec.family);
        }
        let what = if t.any_with_prefix("conditioner.embedders.0.model.") {
            "an SDXL refiner, which sdgen does not run (only base models)".to_string()
        } else if t.any_with_prefix("lora_") || t.names().any(|n| n.contains(".lora_down.") || n.contains(".lora_A.")) {
            "a LoRA, not a full model".to_string()
        } else if t.any_with_prefix("encoder.") && t.any_with_prefix("decoder.") {
            "a VAE on its own, not a full model".to_string()
        } else if has_unet {
            format!("a UNet with no text encoder sdgen knows (unexpected tensors: {})", ldm::unexpected(t))
        } else {
            format!("not a Stable Diffusion 1.x/2.x/XL checkpoint (unexpected tensors: {})", ldm::unexpected(t))
        };
        anyhow::bail!("{}: {what}", path.display())
    }
}

/// How a model is meant to be run, beyond its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Standard,
    /// Adversarially distilled (SD-Turbo, SDXL-Turbo): 1–4 steps, no guidance.
    Turbo,
}

impl FromStr for Preset {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "standard" | "none" => Ok(Preset::Standard),
            "turbo" => Ok(Preset::Turbo),
            other => anyhow::bail!("--preset {other:?}: use standard or turbo"),
        }
    }
}

impl Preset {
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

/// What a model runs with when the user does not say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    pub size: usize,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: Sampler,
    pub schedule: ScheduleKind,
}

impl Defaults {
    pub fn sampling(&self) -> (Sampler, ScheduleKind) {
        (self.sampler, self.schedule)
    }

    /// The defaults of `family` with `prediction` run as `preset`: the
    /// first row of the table that matches, `None` matching anything.
    pub fn of(family: Family, prediction: Prediction, preset: Preset) -> Defaults {
        DEFAULTS
            .iter()
            .find(|(f, p, r, _)| f.is_none_or(|f| f == family) && p.is_none_or(|p| p == prediction) && *r == preset)
            .map_or(STANDARD_512, |row| row.3)
    }
}

/// 20 steps of DPM++ 2M with Karras σs at cfg 7.5, 512²: A1111's defaults.
pub const STANDARD_512: Defaults =
    Defaults { size: 512, steps: 20, cfg_scale: 7.5, sampler: Sampler::DpmPP2M, schedule: ScheduleKind::Karras };

/// SD 3.5 Large's model card: 28 steps at cfg 3.5, 1024².
pub const SD35_LARGE: Defaults =
    Defaults { size: 1024, steps: 28, cfg_scale: 3.5, sampler: Sampler::Euler, schedule: ScheduleKind::Normal };

/// The defaults of every family and preset, in one place.
const DEFAULTS: &[(Option<Family>, Option<Prediction>, Preset, Defaults)] = &[
    // SD 3.5 Large Turbo: 4 steps without guidance.
    (
        Some(Family::Sd3),
        None,
        Preset::Turbo,
        Defaults { size: 1024, steps: 4, cfg_scale: 0.0, sampler: Sampler::Euler, schedule: ScheduleKind::Normal },
    ),
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
    // SD 3.5 Medium's model card: 40 steps at cfg 4.5, 1024².
    (
        Some(Family::Sd3),
        None,
        Preset::Standard,
        Defaults { size: 1024, steps: 40, cfg_scale: 4.5, sampler: Sampler::Euler, schedule: ScheduleKind::Normal },
    ),
    // SDXL: 1024², and diffusers' guidance scale for it.
    (Some(Family::Sdxl), None, Preset::Standard, Defaults { size: 1024, cfg_scale: 5.0, ..STANDARD_512 }),
    (None, None, Preset::Standard, STANDARD_512),
];
