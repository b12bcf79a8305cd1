//! The denoiser wrapper `(x, σ) → x̂₀` around the UNet: input scaling,
//! timestep lookup, classifier-free guidance, and ε/v prediction. Samplers
//! see only this.

use candle_core::{Result, Tensor};

use crate::models::unet::UNet;
use crate::sampling::schedule::Schedule;

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
}

impl Prediction {
    /// diffusers' `prediction_type` values, and `eps` / `v` as the CLI says them.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "epsilon" | "eps" => Ok(Prediction::Epsilon),
            "v_prediction" | "v" => Ok(Prediction::V),
            other => anyhow::bail!("prediction type {other:?} is not supported; use eps or v"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "eps",
            Prediction::V => "v",
        }
    }
}

/// Anything that maps a noisy σ-space sample to its denoised estimate.
pub trait Denoise {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> anyhow::Result<Tensor>;
}

/// The conditioning of a batch: the prompts' text embeddings `(B, L, D)`
/// and, when guided, the negative prompts'.
pub struct Conditioning {
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
    pub cfg_scale: f64,
}

pub struct UNetDenoiser<'a> {
    unet: &'a UNet,
    schedule: &'a Schedule,
    prediction: Prediction,
    /// `[uncond; cond]` when guided, else `cond`.
    context: Tensor,
    cfg_scale: Option<f64>,
    /// Channels appended to the scaled sample (an inpainting UNet's latent
    /// mask and masked-image latents).
    extra: Option<Tensor>,
    /// LCM UNets: the embedded guidance scale, in place of guidance.
    guidance: Option<Tensor>,
}

impl<'a> UNetDenoiser<'a> {
    /// Guidance runs only for `cfg_scale > 1` (with a negative embedding), as
    /// in diffusers; otherwise one conditional UNet pass per step.
    pub fn new(
        unet: &'a UNet,
        schedule: &'a Schedule,
        prediction: Prediction,
        c: &Conditioning,
        extra: Option<Tensor>,
    ) -> Result<Self> {
        let batch = c.cond.dim(0)?;
        // An LCM UNet embeds w = cfg − 1 and runs once, unguided.
        let guidance = match unet.config.time_cond_proj_dim {
            Some(dim) => Some(
                crate::models::unet::guidance_embedding(c.cfg_scale as f32 - 1.0, dim, c.cond.device())?
                    .repeat((batch, 1))?
                    .to_dtype(unet.dtype())?,
            ),
            None => None,
        };
        let (context, cfg_scale) = match &c.uncond {
            Some(u) if c.cfg_scale > 1.0 && guidance.is_none() => (Tensor::cat(&[u, &c.cond], 0)?, Some(c.cfg_scale)),
            _ => (c.cond.clone(), None),
        };
        let context = context.to_dtype(unet.dtype())?;
        Ok(Self { unet, schedule, prediction, context, cfg_scale, extra, guidance })
    }
}

impl Denoise for UNetDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> anyhow::Result<Tensor> {
        let t = self.schedule.timestep(sigma);
        let c_in = (sigma * sigma + 1.0).sqrt() as f64;
        // The sampler's latents are f32; the UNet runs in its own dtype.
        let scaled = (x / c_in)?.to_dtype(self.unet.dtype())?;
        let input = match &self.extra {
            Some(extra) => Tensor::cat(&[&scaled, extra], 1)?,
            None => scaled,
        };
        let forward = |input: &Tensor, guidance: Option<&Tensor>| -> Result<Tensor> {
            self.unet.forward(input, t, &self.context, guidance)?.to_dtype(x.dtype())
        };
        let out = match self.cfg_scale {
            Some(scale) => {
                let both = forward(&Tensor::cat(&[&input, &input], 0)?, None)?;
                let b = x.dim(0)?;
                let (uncond, cond) = (both.narrow(0, 0, b)?, both.narrow(0, b, b)?);
                (&uncond + ((cond - &uncond)? * scale)?)?
            }
            None => forward(&input, self.guidance.as_ref())?,
        };
        let s = sigma as f64;
        Ok(match self.prediction {
            Prediction::Epsilon => (x - (out * s)?)?,
            Prediction::V => ((x / (s * s + 1.0))? + (out * (-s / (s * s + 1.0).sqrt()))?)?,
        })
    }
}
