//! Text to image: encode the prompts, sample from the seed's noise, decode.

use candle_core::{DType, Device, Tensor};

use crate::loading::Model;
use crate::rng::TorchRng;
use crate::sampling::denoiser::{Conditioning, UNetDenoiser};
use crate::sampling::samplers::{sample, Sampler, StepContext};

/// One txt2img job.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub cfg_scale: f64,
    pub width: usize,
    pub height: usize,
    pub sampler: Sampler,
}

/// What the pipeline reports while it runs.
#[derive(Debug)]
pub enum Event {
    Warning(String),
    EncodingText,
    Step { done: usize, total: usize },
    Decoding,
}

impl Request {
    /// Checks what can be checked before any model is loaded.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (what, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % 8 != 0 {
                anyhow::bail!("{what} must be a positive multiple of 8, got {v}");
            }
        }
        if self.steps == 0 {
            anyhow::bail!("steps must be at least 1");
        }
        if !self.cfg_scale.is_finite() || self.cfg_scale < 0.0 {
            anyhow::bail!("cfg scale must be a number ≥ 0, got {}", self.cfg_scale);
        }
        Ok(())
    }
}

/// An 8-bit RGB image, row-major.
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Model {
    /// The text encoder's last hidden state for `text`, `(1, 77, D)`.
    pub fn encode_text(&self, text: &str, device: &Device, events: &mut dyn FnMut(Event)) -> anyhow::Result<Tensor> {
        let encoded = self.tokenizer.encode_padded(text);
        if let Some(dropped) = &encoded.dropped {
            events(Event::Warning(format!("prompt is longer than 77 tokens; this part was dropped: {dropped:?}")));
        }
        let ids = Tensor::new(encoded.ids.as_slice(), device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    /// Runs one txt2img job on `device`.
    pub fn txt2img(&self, req: &Request, device: &Device, events: &mut dyn FnMut(Event)) -> anyhow::Result<Image> {
        req.validate()?;
        let scale = self.vae.config.downscale();
        if !req.width.is_multiple_of(scale) || !req.height.is_multiple_of(scale) {
            anyhow::bail!("width and height must be multiples of {scale} for this model's VAE");
        }
        events(Event::EncodingText);
        let cond = self.encode_text(&req.prompt, device, events)?;
        let uncond =
            if req.cfg_scale > 1.0 { Some(self.encode_text(&req.negative_prompt, device, events)?) } else { None };
        let conditioning = Conditioning { cond, uncond, cfg_scale: req.cfg_scale };
        let schedule = req.sampler.schedule(&self.scheduler, req.steps)?;
        let shape = (1, self.unet.config.in_channels, req.height / scale, req.width / scale);
        // Noise comes from the CPU generator on every device, so a seed gives
        // the same image everywhere (and the same as diffusers/ComfyUI).
        let mut rng = TorchRng::new(req.seed);
        let noise = Tensor::from_vec(rng.randn(shape.0 * shape.1 * shape.2 * shape.3), shape, device)?;
        let dtype = self.unet.dtype();
        let x = (noise * schedule.init_noise_scale as f64)?.to_dtype(dtype)?;
        let mut denoiser = UNetDenoiser::new(&self.unet, &schedule, self.prediction, &conditioning)?;
        let total = schedule.timesteps.len();
        let mut ctx = StepContext { sigmas: &schedule.sigmas, rng: &mut rng, device };
        let mut hook = |i: usize, x: Tensor| {
            events(Event::Step { done: i + 1, total });
            Ok(x)
        };
        let latents = sample(req.sampler, &mut denoiser, x, &mut ctx, &mut hook)?;
        events(Event::Decoding);
        let latents = (latents * (schedule.final_scale() as f64 / self.vae.config.scaling_factor))?;
        let decoded = self.vae.decode(&latents)?;
        to_image(&decoded)
    }
}

/// `(1, 3, H, W)` in [-1, 1] → 8-bit RGB: `round(clamp(x/2 + 0.5, 0, 1) · 255)`,
/// rounding half to even as numpy does.
pub fn to_image(decoded: &Tensor) -> anyhow::Result<Image> {
    let (_, c, h, w) = decoded.dims4()?;
    if c != 3 {
        anyhow::bail!("the VAE produced {c} channels, expected 3");
    }
    let hwc: Vec<f32> = decoded.get(0)?.permute((1, 2, 0))?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if hwc.iter().any(|v| !v.is_finite()) {
        anyhow::bail!("the VAE produced NaN/Inf values; try --dtype f32");
    }
    let rgb = hwc.iter().map(|v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8).collect();
    Ok(Image { width: w, height: h, rgb })
}
