//! The denoiser wrapper `(x, σ) → x̂₀` around the UNet: input scaling,
//! timestep lookup, classifier-free guidance, and ε/v prediction. Samplers
//! see only this.

use candle_core::{Result, Tensor};

use crate::models::unet::{TextTime, UNet};
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

/// The text conditioning of a batch: the context `(B, L, D)` the UNet
/// attends to and, for SDXL, the pooled embedding `(B, P)`.
pub struct TextEmbedding {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

impl TextEmbedding {
    /// The embeddings of several prompts as one batch.
    pub fn cat(each: &[TextEmbedding]) -> Result<Self> {
        let contexts: Vec<&Tensor> = each.iter().map(|e| &e.context).collect();
        let pooled: Option<Vec<&Tensor>> = each.iter().map(|e| e.pooled.as_ref()).collect();
        Ok(Self { context: Tensor::cat(&contexts, 0)?, pooled: pooled.map(|p| Tensor::cat(&p, 0)).transpose()? })
    }
}

/// The conditioning of a batch: the prompts' text embeddings and, when
/// guided, the negative prompts'; for SDXL the size numbers `(B, 6)`.
pub struct Conditioning {
    pub cond: TextEmbedding,
    pub uncond: Option<TextEmbedding>,
    pub cfg_scale: f64,
    pub time_ids: Option<Tensor>,
}

pub struct UNetDenoiser<'a> {
    unet: &'a UNet,
    schedule: &'a Schedule,
    prediction: Prediction,
    /// `[uncond; cond]` when guided, else `cond`.
    context: Tensor,
    /// SDXL's pooled embeddings and size numbers, batched like `context`.
    added: Option<(Tensor, Tensor)>,
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
        let batch = c.cond.context.dim(0)?;
        // An LCM UNet embeds w = cfg − 1 and runs once, unguided.
        let guidance = match unet.config.time_cond_proj_dim {
            Some(dim) => Some(
                crate::models::unet::guidance_embedding(c.cfg_scale as f32 - 1.0, dim, c.cond.context.device())?
                    .repeat((batch, 1))?
                    .to_dtype(unet.dtype())?,
            ),
            None => None,
        };
        let uncond = c.uncond.as_ref().filter(|_| c.cfg_scale > 1.0 && guidance.is_none());
        // The negative rows first, as diffusers batches them.
        let both = |u: &Tensor, c: &Tensor| match uncond {
            Some(_) => Tensor::cat(&[u, c], 0),
            None => Ok(c.clone()),
        };
        let context = match uncond {
            Some(u) => both(&u.context, &c.cond.context)?,
            None => c.cond.context.clone(),
        };
        let added = match (&c.cond.pooled, &c.time_ids) {
            (Some(pooled), Some(ids)) => {
                let pooled = match uncond.map(|u| u.pooled.as_ref()) {
                    Some(Some(u)) => both(u, pooled)?,
                    Some(None) => candle_core::bail!("the negative prompt has no pooled embedding"),
                    None => pooled.clone(),
                };
                Some((pooled.to_dtype(unet.dtype())?, both(ids, ids)?))
            }
            _ => None,
        };
        let context = context.to_dtype(unet.dtype())?;
        let cfg_scale = uncond.map(|_| c.cfg_scale);
        Ok(Self { unet, schedule, prediction, context, added, cfg_scale, extra, guidance })
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
        let added = self.added.as_ref().map(|(text_embeds, time_ids)| TextTime { text_embeds, time_ids });
        let forward = |input: &Tensor, guidance: Option<&Tensor>| -> Result<Tensor> {
            self.unet.forward_with(input, t, &self.context, guidance, added.as_ref())?.to_dtype(x.dtype())
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
