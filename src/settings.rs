//! Generation settings, typed. Every option is parsed once, by its type's
//! `FromStr` (clap uses it through `value_parser`; batch job lines, JSON
//! Lines, PNG parameters and the server through [`Settings::set`]), layered
//! ("these settings over those", [`Settings::over`]), checked once
//! ([`Settings::validate`], which is [`Request::validate`] on the resolved
//! request), and resolved against a model's defaults into the pipeline's
//! [`Request`] ([`Settings::resolve`]).

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::device::{DeviceSpec, Precision};
use crate::hires::{HiresSize, HiresTarget, HiresUpscaler};
use crate::loading::lora::LoraArg;
use crate::loading::{Defaults, Preset, STANDARD_512};
use crate::models::vae::Tiling;
use crate::preprocess::Preprocess;
use crate::prompt::Syntax;
use crate::request::{
    check_control, ControlOptions, Hires, Init, Request, Size, SizeConditioning, TextOptions, TopLeft,
};
use crate::sampling::denoiser::Prediction;
use crate::sampling::samplers::{resolve, SamplerName};
use crate::sampling::schedule::ScheduleKind;

/// More images than this from one job is surely a typo.
pub const MAX_BATCH_COUNT: usize = 10_000;

/// The settings of one job's images; unset ones come from the layer below
/// (the command line under a job line, the model's defaults under all).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub sampler: Option<SamplerName>,
    pub schedule: Option<ScheduleKind>,
    pub batch_count: Option<usize>,
    pub clip_skip: Option<usize>,
    pub prompt_syntax: Option<Syntax>,
    /// SDXL's size conditioning.
    pub original_size: Option<Size>,
    pub crop_top_left: Option<TopLeft>,
    pub target_size: Option<Size>,
    /// The ControlNets, in order (`--control`, repeatable).
    pub controls: Option<Vec<ControlArg>>,
    pub control_preprocess: Option<Preprocess>,
    pub control_guess_mode: Option<bool>,
    pub hires: HiresSettings,
}

/// The hires fix's settings (`--hires-*`); it runs when a scale or a size
/// is given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HiresSettings {
    pub scale: Option<f64>,
    /// Takes precedence over `scale`, as in A1111.
    pub size: Option<Size>,
    pub upscaler: Option<HiresUpscaler>,
    /// 0: as many as the first pass.
    pub steps: Option<usize>,
    pub denoise: Option<f64>,
    pub sampler: Option<SamplerName>,
    pub schedule: Option<ScheduleKind>,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub cfg_scale: Option<f64>,
}

/// `a` if set, else `b`: one layer of settings over another.
fn or<T: Clone>(a: &Option<T>, b: &Option<T>) -> Option<T> {
    a.clone().or_else(|| b.clone())
}

/// The hires fix's default denoising strength (A1111's).
pub const HIRES_DENOISE: f64 = 0.7;

impl HiresSettings {
    fn over(&self, base: &HiresSettings) -> HiresSettings {
        HiresSettings {
            scale: or(&self.scale, &base.scale),
            size: or(&self.size, &base.size),
            upscaler: or(&self.upscaler, &base.upscaler),
            steps: or(&self.steps, &base.steps),
            denoise: or(&self.denoise, &base.denoise),
            sampler: or(&self.sampler, &base.sampler),
            schedule: or(&self.schedule, &base.schedule),
            prompt: or(&self.prompt, &base.prompt),
            negative_prompt: or(&self.negative_prompt, &base.negative_prompt),
            cfg_scale: or(&self.cfg_scale, &base.cfg_scale),
        }
    }

    /// The size asked for, if the hires fix is on.
    pub fn target(&self) -> Option<HiresTarget> {
        match (self.size, self.scale) {
            (Some(size), _) => Some(HiresTarget::Resize(size)),
            (None, scale) => scale.map(HiresTarget::Scale),
        }
    }

    /// Sets `hires-KEY`; false if `key` is not one of these settings.
    fn set(&mut self, key: &str, value: &str) -> anyhow::Result<bool> {
        let full = format!("hires-{key}");
        match key {
            "scale" => self.scale = Some(number(&full, value)?),
            "size" => self.size = Some(value.parse().with_context(|| format!("--{full}"))?),
            "upscaler" => self.upscaler = Some(value.parse().with_context(|| format!("--{full}"))?),
            "steps" => self.steps = Some(number(&full, value)?),
            "denoise" => self.denoise = Some(number(&full, value)?),
            "sampler" => self.sampler = Some(value.parse().with_context(|| format!("--{full}"))?),
            "schedule" => self.schedule = Some(value.parse().with_context(|| format!("--{full}"))?),
            "prompt" => self.prompt = Some(value.to_string()),
            "negative-prompt" => self.negative_prompt = Some(value.to_string()),
            "cfg-scale" => self.cfg_scale = Some(number(&full, value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The hires fix of a `width × height` txt2img job, or `None` when no
    /// scale or size asks for one (then no other `--hires-*` may be set).
    fn resolve(&self, first: &Request) -> anyhow::Result<Option<Hires>> {
        let Some(target) = self.target() else {
            if *self != HiresSettings::default() {
                bail!("the --hires-* options need --hires-scale or --hires-size, which turn the hires fix on");
            }
            return Ok(None);
        };
        // An own sampler keeps the first pass's schedule unless it implies one.
        let (sampler, schedule) = match self.sampler {
            Some(named) if named.schedule.is_none() && self.schedule.is_none() => (named.sampler, first.schedule),
            _ => resolve(self.sampler, self.schedule, (first.sampler, first.schedule))?,
        };
        Ok(Some(Hires {
            target,
            size: HiresSize::of(first.width, first.height, target)?,
            upscaler: self.upscaler.clone().unwrap_or_default(),
            steps: self.steps.unwrap_or(0),
            denoise: self.denoise.unwrap_or(HIRES_DENOISE),
            sampler,
            schedule,
            prompt: self.prompt.clone().unwrap_or_else(|| first.prompt.clone()),
            negative_prompt: self.negative_prompt.clone().unwrap_or_else(|| first.negative_prompt.clone()),
            cfg_scale: self.cfg_scale.unwrap_or(first.cfg_scale),
        }))
    }
}

/// One `--control PATH:IMAGE[:WEIGHT[:START:END]]`. What a replayed PNG
/// records has no image: the command line's entry with the same index
/// must give it.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlArg {
    pub model: String,
    pub image: Option<PathBuf>,
    pub weight: Option<f64>,
    pub range: Option<(f64, f64)>,
}

impl std::str::FromStr for ControlArg {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let usage = || {
            anyhow::anyhow!(
                "--control {s:?}: expected PATH:IMAGE[:WEIGHT[:START:END]] (a ':' inside PATH or IMAGE is not supported)"
            )
        };
        if !matches!(parts.len(), 2 | 3 | 5) || parts[0].is_empty() || parts[1].is_empty() {
            return Err(usage());
        }
        let number = |i: usize, what: &str| -> anyhow::Result<f64> {
            parts[i]
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--control {s:?}: {what} {:?} is not a number", parts[i]))
        };
        let weight = if parts.len() > 2 { Some(number(2, "WEIGHT")?) } else { None };
        let range = if parts.len() == 5 { Some((number(3, "START")?, number(4, "END")?)) } else { None };
        check_control(parts[0], weight, range)?;
        Ok(ControlArg { model: parts[0].to_string(), image: Some(PathBuf::from(parts[1])), weight, range })
    }
}

impl ControlArg {
    /// This entry over `base`'s: each part given here wins.
    fn over(&self, base: &ControlArg) -> ControlArg {
        ControlArg {
            model: self.model.clone(),
            image: self.image.clone().or_else(|| base.image.clone()),
            weight: self.weight.or(base.weight),
            range: self.range.or(base.range),
        }
    }
}

/// `true`/`false` (also `yes`/`no`, `1`/`0`), the error naming the option.
fn flag(key: &str, value: &str) -> anyhow::Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => bail!("--{key}: {value:?} is not true or false"),
    }
}

/// The names [`Settings::set`] takes (kebab-case; snake_case works too).
pub const KEYS: &[&str] = &[
    "prompt",
    "negative-prompt",
    "seed",
    "steps",
    "cfg-scale",
    "width",
    "height",
    "sampler",
    "schedule",
    "batch-count",
    "clip-skip",
    "prompt-syntax",
    "original-size",
    "crop-top-left",
    "target-size",
    "control",
    "control-preprocess",
    "control-guess-mode",
    "hires-scale",
    "hires-size",
    "hires-upscaler",
    "hires-steps",
    "hires-denoise",
    "hires-sampler",
    "hires-schedule",
    "hires-prompt",
    "hires-negative-prompt",
    "hires-cfg-scale",
];

/// `value` as a number, the error naming the option.
fn number<T: std::str::FromStr>(key: &str, value: &str) -> anyhow::Result<T> {
    value.trim().parse().map_err(|_| anyhow::anyhow!("--{key}: {value:?} is not a valid number"))
}

impl Settings {
    /// Sets one setting from its text, by name.
    pub fn set(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        let key = key.replace('_', "-");
        let key = key.as_str();
        if let Some(k) = key.strip_prefix("hires-") {
            if self.hires.set(k, value)? {
                return Ok(());
            }
        }
        match key {
            "prompt" => self.prompt = Some(value.to_string()),
            "negative-prompt" => self.negative_prompt = Some(value.to_string()),
            "seed" => self.seed = Some(number(key, value)?),
            "steps" => self.steps = Some(number(key, value)?),
            "cfg-scale" => self.cfg_scale = Some(number(key, value)?),
            "width" => self.width = Some(number(key, value)?),
            "height" => self.height = Some(number(key, value)?),
            "sampler" => self.sampler = Some(value.parse()?),
            "schedule" => self.schedule = Some(value.parse()?),
            "batch-count" => self.batch_count = Some(number(key, value)?),
            "clip-skip" => self.clip_skip = Some(number(key, value)?),
            "prompt-syntax" => self.prompt_syntax = Some(value.parse()?),
            "original-size" => self.original_size = Some(value.parse().with_context(|| format!("--{key}"))?),
            "crop-top-left" => self.crop_top_left = Some(value.parse().with_context(|| format!("--{key}"))?),
            "target-size" => self.target_size = Some(value.parse().with_context(|| format!("--{key}"))?),
            // Repeated, it adds ControlNets.
            "control" => self.controls.get_or_insert_with(Vec::new).push(value.parse()?),
            "control-preprocess" => self.control_preprocess = Some(value.parse().with_context(|| format!("--{key}"))?),
            "control-guess-mode" => self.control_guess_mode = Some(flag(key, value)?),
            other => bail!("unknown option --{other} (job options: {})", KEYS.join(", ")),
        }
        Ok(())
    }

    /// These settings over `base`: each one set here wins.
    pub fn over(&self, base: &Settings) -> Settings {
        Settings {
            prompt: or(&self.prompt, &base.prompt),
            negative_prompt: or(&self.negative_prompt, &base.negative_prompt),
            seed: or(&self.seed, &base.seed),
            steps: or(&self.steps, &base.steps),
            cfg_scale: or(&self.cfg_scale, &base.cfg_scale),
            width: or(&self.width, &base.width),
            height: or(&self.height, &base.height),
            sampler: or(&self.sampler, &base.sampler),
            schedule: or(&self.schedule, &base.schedule),
            batch_count: or(&self.batch_count, &base.batch_count),
            clip_skip: or(&self.clip_skip, &base.clip_skip),
            prompt_syntax: or(&self.prompt_syntax, &base.prompt_syntax),
            original_size: or(&self.original_size, &base.original_size),
            crop_top_left: or(&self.crop_top_left, &base.crop_top_left),
            target_size: or(&self.target_size, &base.target_size),
            // Entry by entry: a replay's `--control` adds the image to what the PNG recorded.
            controls: match (&self.controls, &base.controls) {
                (Some(mine), Some(theirs)) => Some(
                    (0..mine.len().max(theirs.len()))
                        .map(|i| match (mine.get(i), theirs.get(i)) {
                            (Some(m), Some(t)) => m.over(t),
                            (m, t) => m.or(t).expect("one of them is there").clone(),
                        })
                        .collect(),
                ),
                (mine, theirs) => or(mine, theirs),
            },
            control_preprocess: or(&self.control_preprocess, &base.control_preprocess),
            control_guess_mode: or(&self.control_guess_mode, &base.control_guess_mode),
            hires: self.hires.over(&base.hires),
        }
    }

    /// Checks everything that can be checked before a model is loaded
    /// (then only its defaults can change the request).
    pub fn validate(&self, init: &Init) -> anyhow::Result<()> {
        if self.prompt.is_none() {
            bail!("no prompt: give one with --prompt");
        }
        self.image_count()?;
        self.resolve(&STANDARD_512, init.clone())?;
        Ok(())
    }

    /// How many images the job makes (`--batch-count`).
    pub fn image_count(&self) -> anyhow::Result<usize> {
        match self.batch_count.unwrap_or(1) {
            n @ 1..=MAX_BATCH_COUNT => Ok(n),
            n => bail!("--batch-count must be between 1 and {MAX_BATCH_COUNT}, got {n}"),
        }
    }

    /// The request of the job's first image, with `defaults` (the model's)
    /// for what is unset; the size is the input image's when there is one.
    pub fn resolve(&self, defaults: &Defaults, init: Init) -> anyhow::Result<Request> {
        let size = init.size().unwrap_or(Size {
            width: self.width.unwrap_or(defaults.size),
            height: self.height.unwrap_or(defaults.size),
        });
        let (sampler, schedule) = resolve(self.sampler, self.schedule, defaults.sampling())?;
        let mut request = Request {
            prompt: self.prompt.clone().unwrap_or_default(),
            negative_prompt: self.negative_prompt.clone().unwrap_or_default(),
            seed: self.seed.unwrap_or_default(),
            steps: self.steps.unwrap_or(defaults.steps),
            cfg_scale: self.cfg_scale.unwrap_or(defaults.cfg_scale),
            width: size.width,
            height: size.height,
            sampler,
            schedule,
            init,
            size_conditioning: SizeConditioning {
                original: self.original_size,
                crop_top_left: self.crop_top_left.unwrap_or_default(),
                target: self.target_size,
            },
            text: TextOptions {
                syntax: self.prompt_syntax.unwrap_or_default(),
                clip_skip: self.clip_skip.unwrap_or(1),
            },
            // The front end reads the control images into these.
            controls: Vec::new(),
            control_options: ControlOptions {
                preprocess: self.control_preprocess.unwrap_or_default(),
                guess_mode: self.control_guess_mode.unwrap_or(false),
            },
            hires: None,
        };
        // The first pass is checked before the hires fix is sized from it.
        request.validate()?;
        request.hires = self.hires.resolve(&request)?;
        request.validate_hires()?;
        Ok(request)
    }
}

/// What a session is opened with: the model, its adapters, where and how
/// it runs.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// A path or a name in the models dir; `None`: the only model there.
    pub model: Option<String>,
    pub models_dir: PathBuf,
    pub device: DeviceSpec,
    pub dtype: Option<Precision>,
    pub preset: Option<Preset>,
    pub prediction: Option<Prediction>,
    pub vae_tiling: Tiling,
    pub loras: Vec<LoraArg>,
    pub vae: Option<String>,
    /// Never download a model.
    pub offline: bool,
    /// No download progress bars.
    pub quiet: bool,
    /// Images per UNet batch.
    pub batch_size: usize,
    /// Keep the base weights so that the session can swap LoRAs without
    /// reading the model again ([`crate::session::Session::set_loras`]).
    pub swappable_loras: bool,
    /// SD 3.5 without its T5 text encoder (zeros in its place): far less memory.
    pub no_t5: bool,
    /// SD 3.5 single files: their text encoder files.
    pub text_encoders: Vec<PathBuf>,
    /// SD 3.5 single files: T5's `tokenizer.json`.
    pub t5_tokenizer: Option<PathBuf>,
}

impl SessionSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_parses_each_setting_and_over_layers_them() {
        let mut job = Settings::default();
        job.set("prompt", "a fox").unwrap();
        job.set("cfg_scale", "6").unwrap();
        job.set("sampler", "DPM++ 2M Karras").unwrap();
        job.set("original-size", "128x96").unwrap();
        let base = Settings { steps: Some(9), cfg_scale: Some(7.0), ..Settings::default() };
        let both = job.over(&base);
        assert_eq!((both.steps, both.cfg_scale), (Some(9), Some(6.0)));
        let r = both.resolve(&STANDARD_512, Init::Noise).unwrap();
        assert_eq!(r.schedule, ScheduleKind::Karras);
        assert_eq!(r.size_conditioning.time_ids(512, 512), [96.0, 128.0, 0.0, 0.0, 512.0, 512.0]);
        assert!(job.set("bogus", "1").unwrap_err().to_string().starts_with("unknown option --bogus"));
        let err = job.set("steps", "many").unwrap_err().to_string();
        assert_eq!(err, "--steps: \"many\" is not a valid number");
    }

    #[test]
    fn hires_settings_layer_and_resolve_against_the_first_pass() {
        let mut line = Settings::default();
        line.set("hires_scale", "1.5").unwrap();
        line.set("hires-schedule", "exponential").unwrap();
        let base = Settings {
            prompt: Some("x".into()),
            width: Some(600),
            height: Some(512),
            hires: HiresSettings { denoise: Some(0.4), scale: Some(2.0), ..HiresSettings::default() },
            ..Settings::default()
        };
        let r = line.over(&base).resolve(&STANDARD_512, Init::Noise).unwrap();
        let h = r.hires.as_ref().unwrap();
        assert_eq!((h.size.output(), h.denoise, h.steps), (Size { width: 896, height: 768 }, 0.4, 0));
        assert_eq!((h.sampler, h.schedule), (r.sampler, ScheduleKind::Exponential));
        assert_eq!((h.prompt.as_str(), h.cfg_scale), ("x", r.cfg_scale));
        let err = line.set("hires-upscaler", "latent-cubic").unwrap_err();
        assert!(format!("{err:#}").contains("is not a latent upscale mode"), "{err:#}");
    }

    #[test]
    fn validation_says_what_is_wrong() {
        let ok = Settings { prompt: Some("x".into()), ..Settings::default() };
        assert!(ok.validate(&Init::Noise).is_ok());
        for (bad, want) in [
            (Settings { width: Some(65), ..ok.clone() }, "--width must be a positive multiple of 8"),
            (Settings { steps: Some(0), ..ok.clone() }, "--steps must be at least 1"),
            (Settings { batch_count: Some(0), ..ok.clone() }, "--batch-count must be between 1 and"),
            (Settings { prompt: None, ..ok.clone() }, "no prompt"),
            (Settings { cfg_scale: Some(f64::NAN), ..ok.clone() }, "--cfg-scale must be a number"),
            (
                Settings { hires: HiresSettings { steps: Some(3), ..HiresSettings::default() }, ..ok.clone() },
                "the --hires-* options need --hires-scale or --hires-size",
            ),
            (
                Settings {
                    hires: HiresSettings { scale: Some(2.0), denoise: Some(1.5), ..HiresSettings::default() },
                    ..ok.clone()
                },
                "--hires-denoise must be in (0, 1]",
            ),
            (
                Settings { hires: HiresSettings { scale: Some(40.0), ..HiresSettings::default() }, ..ok.clone() },
                "the hires fix's size 20480x20480 is larger",
            ),
        ] {
            let err = bad.validate(&Init::Noise).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
    }
}
