//! Model code: the CLIP and T5 text encoders, the UNet and its ControlNets,
//! SD 3's MMDiT, the VAE and the ESRGAN-family upscalers, built on our fused [`crate::ops`] and
//! candle-nn layers from a `VarBuilder` whose tensor names are diffusers'
//! names; the [`Backbone`] seam the denoiser drives ([`Network`]).

pub mod blocks;
pub mod clip;
pub mod controlnet;
pub mod mmdit;
pub mod t5;
pub mod unet;
pub mod upscaler;
pub mod vae;

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

/// What a backbone is conditioned on for one batch.
pub struct BackboneConditioning<'a> {
    /// The text states it attends to, `(B, L, D)`.
    pub context: &'a Tensor,
    /// An LCM UNet's embedded guidance scale, `(B, d)`.
    pub guidance: Option<&'a Tensor>,
    /// The pooled text embedding, `(B, P)` (SDXL, SD 3).
    pub pooled: Option<&'a Tensor>,
    /// SDXL's six size numbers per image, row after row.
    pub time_ids: Option<&'a [f32]>,
    /// ControlNets' residuals, summed.
    pub control: Option<&'a unet::Residuals>,
}

/// A denoising network: the model output (ε, v, velocity, … as its
/// parameterisation says) for a scaled sample at timestep `t`.
pub trait Backbone {
    fn dtype(&self) -> DType;
    /// The width of the guidance-scale embedding it takes instead of
    /// classifier-free guidance (LCM), if any.
    fn guidance_dim(&self) -> Option<usize>;
    fn forward(&self, sample: &Tensor, t: f32, cond: &BackboneConditioning) -> Result<Tensor>;
}

/// A model's denoising network: the UNet (SD 1.x, 2.x, XL) or SD 3's MMDiT.
#[derive(Debug)]
pub enum Network {
    Unet(Box<unet::UNet>),
    Mmdit(Box<mmdit::Mmdit>),
}

impl Network {
    /// The UNet, for what only UNets have (ControlNets, LoRA targets, …).
    pub fn unet(&self) -> Option<&unet::UNet> {
        match self {
            Network::Unet(u) => Some(u),
            Network::Mmdit(_) => None,
        }
    }

    pub fn device(&self) -> candle_core::Device {
        match self {
            Network::Unet(u) => u.device(),
            Network::Mmdit(m) => m.device(),
        }
    }

    /// The channels of the sample it takes (more than the latents' for inpainting UNets).
    pub fn in_channels(&self) -> usize {
        match self {
            Network::Unet(u) => u.config.in_channels,
            Network::Mmdit(m) => m.config.in_channels,
        }
    }

    /// The side of the latent patches it reads (1: a UNet reads pixels).
    pub fn patch_size(&self) -> usize {
        match self {
            Network::Unet(_) => 1,
            Network::Mmdit(m) => m.config.patch_size,
        }
    }

    /// Whether it takes SDXL's size numbers.
    pub fn takes_size_conditioning(&self) -> bool {
        self.unet().is_some_and(|u| u.config.addition_time_embed_dim.is_some())
    }
}

impl Backbone for Network {
    fn dtype(&self) -> DType {
        match self {
            Network::Unet(u) => u.dtype(),
            Network::Mmdit(m) => m.dtype(),
        }
    }

    fn guidance_dim(&self) -> Option<usize> {
        match self {
            Network::Unet(u) => u.config.time_cond_proj_dim,
            Network::Mmdit(_) => None,
        }
    }

    fn forward(&self, sample: &Tensor, t: f32, cond: &BackboneConditioning) -> Result<Tensor> {
        match self {
            Network::Unet(u) => {
                let text_time = match (cond.pooled, cond.time_ids) {
                    (Some(text_embeds), Some(time_ids)) => Some(unet::TextTime { text_embeds, time_ids }),
                    _ => None,
                };
                u.forward_with(sample, t, cond.context, cond.guidance, text_time.as_ref(), cond.control)
            }
            Network::Mmdit(m) => {
                let Some(pooled) = cond.pooled else {
                    candle_core::bail!("the MMDiT needs the pooled text embedding");
                };
                m.forward(sample, t, cond.context, pooled)
            }
        }
    }
}

/// serde default for numeric config fields: `#[serde(default = "value::<N>")]`.
pub(crate) fn value<const N: usize>() -> usize {
    N
}

/// A config value that diffusers writes either as one number or one per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i` of `n`; a list of the wrong length is an error.
    pub fn get(&self, i: usize, n: usize) -> anyhow::Result<usize> {
        match self {
            PerBlock::One(v) => Ok(*v),
            PerBlock::Each(v) if v.len() == n => Ok(v[i]),
            PerBlock::Each(v) => anyhow::bail!("expected 1 or {n} values per block, got {}", v.len()),
        }
    }
}

/// Refuses config settings that our modules do not implement. `supported`
/// lists, per key, the JSON values we can run; an absent key is fine (the
/// default), any other value is an error instead of a silently wrong model.
pub fn check_supported(
    extra: &HashMap<String, serde_json::Value>,
    supported: &[(&str, &[&str])],
) -> anyhow::Result<()> {
    for (key, allowed) in supported {
        if let Some(value) = extra.get(*key) {
            let text = value.to_string();
            if !allowed.contains(&text.as_str()) {
                anyhow::bail!("config {key} = {text} is not supported (supported: {})", allowed.join(", "));
            }
        }
    }
    Ok(())
}
