//! Samplers in the k-diffusion style: each is one small step function over a
//! σ schedule and a denoiser; [`sample`] is the one loop they share, and it
//! calls the per-step hook (inpaint blending, previews, progress).
//!
//! How each maps to diffusers (σ-space `x = x_ddpm · √(σ² + 1)`):
//! - `euler`: EulerDiscreteScheduler, already in σ-space; starts at
//!   `σ_max · noise` (linspace spacing), ends at σ = 0.
//! - `euler_a`: EulerAncestralDiscreteScheduler, same schedule; each step
//!   goes down to σ_down with Euler and adds σ_up of fresh noise, drawn from
//!   the seed's generator after the initial latents (diffusers' order).
//! - `ddim`: DDIMScheduler (η = 0). Its DDPM-space update equals an Euler
//!   step between σ(ᾱ_t) and σ(ᾱ_prev); it starts from unit noise in
//!   DDPM-space (`√(σ₀² + 1) · noise` here) and ends at ᾱ₀, so the result is
//!   divided by `√(σ_last² + 1)` before decoding.

use anyhow::bail;
use candle_core::{Device, Tensor};

use super::denoiser::Denoise;
use super::schedule::{Schedule, SchedulerConfig};
use crate::rng::TorchRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    Euler,
    EulerAncestral,
    Ddim,
}

pub const SAMPLER_NAMES: &[&str] = &["euler", "euler_a", "ddim"];

impl Sampler {
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "euler" => Sampler::Euler,
            "euler_a" | "euler a" | "euler_ancestral" => Sampler::EulerAncestral,
            "ddim" => Sampler::Ddim,
            other => bail!("unknown sampler {other:?}; available: {}", SAMPLER_NAMES.join(", ")),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Sampler::Euler => "euler",
            Sampler::EulerAncestral => "euler_a",
            Sampler::Ddim => "ddim",
        }
    }

    /// The name AUTOMATIC1111 shows (and writes into PNG metadata).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Sampler::Euler => "Euler",
            Sampler::EulerAncestral => "Euler a",
            Sampler::Ddim => "DDIM",
        }
    }

    /// The schedule diffusers' scheduler class for this sampler builds from `cfg`.
    pub fn schedule(self, cfg: &SchedulerConfig, steps: usize) -> anyhow::Result<Schedule> {
        match self {
            Sampler::Euler | Sampler::EulerAncestral => Schedule::euler(cfg, steps),
            Sampler::Ddim => Schedule::ddim(cfg, steps),
        }
    }

    fn step_fn(self) -> StepFn {
        match self {
            Sampler::Euler | Sampler::Ddim => euler_step,
            Sampler::EulerAncestral => euler_ancestral_step,
        }
    }
}

/// What a step needs besides the sample: the schedule and the noise source.
pub struct StepContext<'a> {
    pub sigmas: &'a [f32],
    /// One generator per image of the batch, each continuing its seed's stream.
    pub rngs: &'a mut [TorchRng],
    pub device: &'a Device,
}

impl StepContext<'_> {
    /// Fresh unit noise shaped like `x`, each image's from its own generator,
    /// so a batch draws exactly what one-by-one runs would.
    fn noise_like(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        let per_image = x.elem_count() / self.rngs.len();
        let values: Vec<f32> = self.rngs.iter_mut().flat_map(|r| r.randn(per_image)).collect();
        Tensor::from_vec(values, x.shape(), self.device)?.to_dtype(x.dtype())
    }
}

type StepFn = fn(&mut dyn Denoise, &Tensor, usize, &mut StepContext) -> anyhow::Result<Tensor>;

/// Euler: `x += (σ' − σ) · (x − x̂₀)/σ`.
fn euler_step(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = (ctx.sigmas[i], ctx.sigmas[i + 1]);
    let denoised = model.denoise(x, s)?;
    let d = ((x - denoised)? / s as f64)?;
    Ok((x + (d * (next - s) as f64)?)?)
}

/// Euler ancestral: Euler down to σ_down, then add σ_up of fresh noise, with
/// σ_up² + σ_down² = σ'² (η = 1).
fn euler_ancestral_step(
    model: &mut dyn Denoise,
    x: &Tensor,
    i: usize,
    ctx: &mut StepContext,
) -> anyhow::Result<Tensor> {
    let (s, next) = (ctx.sigmas[i], ctx.sigmas[i + 1]);
    let up = (next * next * (s * s - next * next) / (s * s)).sqrt();
    let down = (next * next - up * up).sqrt();
    let denoised = model.denoise(x, s)?;
    let d = ((x - denoised)? / s as f64)?;
    let x = (x + (d * (down - s) as f64)?)?;
    let noise = ctx.noise_like(&x)?;
    Ok((x + (noise * up as f64)?)?)
}

/// Runs `sampler` over the schedule from `x` (already scaled by the
/// schedule's initial noise factor), calling `hook(step, x)` after every step;
/// the hook may replace the latents. Returns σ-space latents at the last σ.
pub fn sample(
    sampler: Sampler,
    model: &mut dyn Denoise,
    x: Tensor,
    ctx: &mut StepContext,
    hook: &mut dyn FnMut(usize, Tensor) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Tensor> {
    let step = sampler.step_fn();
    let mut x = x;
    for i in 0..ctx.sigmas.len() - 1 {
        let next = step(model, &x, i, ctx)?;
        x = hook(i, next)?;
    }
    Ok(x)
}
