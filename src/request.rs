//! One generation job, fully resolved: what the pipeline runs. Built from
//! [`crate::settings::Settings`] over a model's defaults; checked here, once,
//! whoever built it (command line, batch file, PNG replay, server).

use std::fmt;
use std::str::FromStr;

use anyhow::bail;

use crate::editing::Mask;
use crate::hires::{HiresSize, HiresTarget, HiresUpscaler};
use crate::image_io::Image;
use crate::preprocess::Preprocess;
use crate::prompt::Syntax;
use crate::sampling::samplers::Sampler;
use crate::sampling::schedule::ScheduleKind;

/// An image size, written `WIDTHxHEIGHT` (command line, job lines, PNG
/// parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: usize,
    pub height: usize,
}

impl FromStr for Size {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        s.split_once(['x', 'X'])
            .and_then(|(w, h)| Some(Size { width: w.trim().parse().ok()?, height: h.trim().parse().ok()? }))
            .ok_or_else(|| anyhow::anyhow!("{s:?} is not a size WIDTHxHEIGHT"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// A crop's corner, written `TOP,LEFT` in pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopLeft {
    pub top: usize,
    pub left: usize,
}

impl FromStr for TopLeft {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        s.split_once(',')
            .and_then(|(t, l)| Some(TopLeft { top: t.trim().parse().ok()?, left: l.trim().parse().ok()? }))
            .ok_or_else(|| anyhow::anyhow!("{s:?} is not TOP,LEFT in pixels"))
    }
}

impl fmt::Display for TopLeft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.top, self.left)
    }
}

/// Where the latents come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    /// Noise only (txt2img).
    Noise,
    /// An image, noised to `strength` (img2img).
    Image { image: Image, strength: f64 },
    /// An image repainted where `mask` is set (inpaint, outpaint), starting
    /// there from what `fill` says, the original laid back over the result as
    /// `overlay` says.
    Inpaint { image: Image, mask: Mask, strength: f64, overlay: Overlay, fill: LatentFill },
}

/// How the original pixels come back over an inpainted image.
#[derive(Debug, Clone, PartialEq)]
pub enum Overlay {
    /// Exactly outside the mask, the generated pixels fading in over this
    /// many pixels inside it (the CLI's `--mask-blur`).
    Feather(f32),
    /// Each pixel's weight of the generated image, 0 to 1, row-major (A1111's
    /// blurred "mask for overlay").
    Alpha(Vec<f32>),
}

/// What the masked area's latents start from before they are noised
/// (A1111's "masked content" for the latent choices).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LatentFill {
    /// The image's own latents (diffusers; A1111's "original" and "fill").
    #[default]
    Original,
    /// Gaussian noise, drawn from the image's generator after its initial
    /// noise (A1111's "latent noise").
    Noise,
    /// Zeros (A1111's "latent nothing").
    Nothing,
}

impl Init {
    /// The size asked for: the input image's (which is then the output's),
    /// else `settings`' width and height.
    pub fn size_asked(&self, width: Option<usize>, height: Option<usize>) -> (Option<usize>, Option<usize>) {
        match self.size() {
            Some(s) => (Some(s.width), Some(s.height)),
            None => (width, height),
        }
    }

    /// The input image's size, which is then the output's.
    pub fn size(&self) -> Option<Size> {
        match self {
            Init::Noise => None,
            Init::Image { image, .. } | Init::Inpaint { image, .. } => {
                Some(Size { width: image.width, height: image.height })
            }
        }
    }
}

/// SDXL's size conditioning ("micro-conditioning"). Other models ignore it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SizeConditioning {
    /// The size the training image had before resizing [default: the output size].
    pub original: Option<Size>,
    pub crop_top_left: TopLeft,
    /// [default: the output size].
    pub target: Option<Size>,
}

impl SizeConditioning {
    /// diffusers' `add_time_ids` for an image of `height` × `width`:
    /// `(height, width)` pairs and `(top, left)`, as diffusers orders them.
    pub fn time_ids(&self, height: usize, width: usize) -> [f32; 6] {
        let output = Size { width, height };
        let (o, t) = (self.original.unwrap_or(output), self.target.unwrap_or(output));
        let TopLeft { top, left } = self.crop_top_left;
        [o.height, o.width, top, left, t.height, t.width].map(|v| v as f32)
    }
}

/// How prompts become text conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextOptions {
    pub syntax: Syntax,
    /// A1111's "Clip skip": 1 = the family's usual layer, 2 = one earlier, ….
    pub clip_skip: usize,
}

impl Default for TextOptions {
    fn default() -> Self {
        Self { syntax: Syntax::A1111, clip_skip: 1 }
    }
}

/// One ControlNet of a job, with its control image (any size: it is
/// stretched to the output's).
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    /// The ControlNet's path or its name in the models dir.
    pub model: String,
    pub image: Image,
    /// diffusers' `controlnet_conditioning_scale`.
    pub weight: f64,
    /// The part of the sampling it acts in (diffusers' `control_guidance_start/end`).
    pub start: f64,
    pub end: f64,
}

impl Control {
    /// Checks the weight and the range (as diffusers does).
    pub fn validate(&self) -> anyhow::Result<()> {
        check_control(&self.model, Some(self.weight), Some((self.start, self.end)))
    }
}

/// The checks of a ControlNet's numbers, wherever they are given.
pub fn check_control(model: &str, weight: Option<f64>, range: Option<(f64, f64)>) -> anyhow::Result<()> {
    if let Some(w) = weight.filter(|w| !w.is_finite()) {
        bail!("--control {model}: the weight must be a number, got {w}");
    }
    if let Some((start, end)) = range {
        if !(0.0..=1.0).contains(&start) || !(0.0..=1.0).contains(&end) || start >= end {
            bail!("--control {model}: START:END must satisfy 0 ≤ START < END ≤ 1, got {start}:{end}");
        }
    }
    Ok(())
}

/// How a job's ControlNets work.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ControlOptions {
    /// Applied to every control image.
    pub preprocess: Preprocess,
    /// diffusers' `guess_mode` (A1111: "ControlNet is more important").
    pub guess_mode: bool,
}

/// A txt2img job's hires fix: the image is generated at the request's
/// size, upscaled, and refined by an img2img pass at `denoise`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hires {
    /// What was asked for (recorded as A1111's `Hires upscale`/`Hires resize`).
    pub target: HiresTarget,
    /// Where that lands, from the first pass's size.
    pub size: HiresSize,
    pub upscaler: HiresUpscaler,
    /// Steps the second pass runs; 0: as many as the first.
    pub steps: usize,
    /// How much of the upscaled image is repainted (A1111's "Denoising strength").
    pub denoise: f64,
    pub sampler: Sampler,
    pub schedule: ScheduleKind,
    pub prompt: String,
    pub negative_prompt: String,
    pub cfg_scale: f64,
}

/// One generation job.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub cfg_scale: f64,
    pub width: usize,
    pub height: usize,
    pub sampler: Sampler,
    pub schedule: ScheduleKind,
    pub init: Init,
    pub size_conditioning: SizeConditioning,
    pub text: TextOptions,
    pub controls: Vec<Control>,
    pub control_options: ControlOptions,
    pub hires: Option<Hires>,
}

/// What jobs must share to run as one UNet batch: everything but prompts,
/// seeds and input images.
#[derive(Debug, PartialEq)]
pub struct BatchKey {
    size: (usize, usize),
    steps: usize,
    sampler: Sampler,
    schedule: ScheduleKind,
    cfg_scale: f64,
    kind: u8,
    strength: Option<f64>,
    /// Each ControlNet's model, weight and range.
    controls: Vec<(String, f64, f64, f64)>,
    control_options: ControlOptions,
    /// The hires fix without its prompts.
    hires: Option<Hires>,
}

impl Request {
    /// Checks what can be checked before any model is loaded.
    pub fn validate(&self) -> anyhow::Result<()> {
        let max = crate::image_io::MAX_SIDE as usize;
        for (what, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % 8 != 0 {
                bail!("--{what} must be a positive multiple of 8, got {v}");
            }
            if v > max {
                bail!("--{what} {v} is larger than the {max} pixels sdgen allows");
            }
        }
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if self.text.clip_skip == 0 {
            bail!("--clip-skip must be at least 1 (1 = the model's usual text encoder layer)");
        }
        if !self.cfg_scale.is_finite() || self.cfg_scale < 0.0 {
            bail!("--cfg-scale must be a number ≥ 0, got {}", self.cfg_scale);
        }
        self.controls.iter().try_for_each(Control::validate)?;
        self.validate_hires()?;
        if let Some(s) = self.strength() {
            if !(s > 0.0 && s <= 1.0) {
                bail!("--strength must be in (0, 1], got {s}");
            }
            if (self.steps as f64 * s) < 1.0 {
                bail!("--strength {s} × {} steps runs no step; raise --strength or --steps", self.steps);
            }
        }
        Ok(())
    }

    /// Checks the hires fix, if any.
    pub fn validate_hires(&self) -> anyhow::Result<()> {
        let Some(h) = &self.hires else { return Ok(()) };
        let max = crate::image_io::MAX_SIDE as usize;
        if self.init != Init::Noise {
            bail!("the hires fix (--hires-*) is for txt2img; img2img and inpainting take no second pass");
        }
        if !self.controls.is_empty() {
            bail!("the hires fix with ControlNets is not supported yet");
        }
        // The output is never larger than what the first pass is upscaled to.
        if h.size.upscale_to.width.max(h.size.upscale_to.height) > max {
            bail!("the hires fix's size {} is larger than the {max} pixels sdgen allows", h.size.upscale_to);
        }
        if !(h.denoise > 0.0 && h.denoise <= 1.0) {
            bail!("--hires-denoise must be in (0, 1], got {}", h.denoise);
        }
        if !h.cfg_scale.is_finite() || h.cfg_scale < 0.0 {
            bail!("--hires-cfg-scale must be a number ≥ 0, got {}", h.cfg_scale);
        }
        let (total, _) = crate::hires::steps(h.steps, self.steps, h.denoise);
        if total > 1000 {
            bail!("--hires-steps / --hires-denoise make a schedule of {total} steps, more than 1000");
        }
        Ok(())
    }

    /// Jobs with equal keys can share UNet calls.
    pub fn batch_key(&self) -> BatchKey {
        let kind = match self.init {
            Init::Noise => 0,
            Init::Image { .. } => 1,
            Init::Inpaint { .. } => 2,
        };
        BatchKey {
            size: (self.width, self.height),
            steps: self.steps,
            sampler: self.sampler,
            schedule: self.schedule,
            cfg_scale: self.cfg_scale,
            kind,
            strength: self.strength(),
            controls: self.controls.iter().map(|c| (c.model.clone(), c.weight, c.start, c.end)).collect(),
            control_options: self.control_options,
            hires: self.hires.as_ref().map(|h| Hires {
                prompt: String::new(),
                negative_prompt: String::new(),
                ..h.clone()
            }),
        }
    }

    /// The denoising strength of image-based jobs.
    pub fn strength(&self) -> Option<f64> {
        match &self.init {
            Init::Noise => None,
            Init::Image { strength, .. } | Init::Inpaint { strength, .. } => Some(*strength),
        }
    }
}
