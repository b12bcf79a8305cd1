//! Model code: the CLIP text encoder, the UNet, its ControlNets and the VAE, built on our
//! fused [`crate::ops`] and candle-nn layers from a `VarBuilder` whose tensor
//! names are diffusers' names; the [`Backbone`] seam the denoiser drives.

pub mod blocks;
pub mod clip;
pub mod controlnet;
pub mod unet;
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
    /// SDXL's pooled text and size numbers.
    pub text_time: Option<unet::TextTime<'a>>,
    /// ControlNets' residuals, summed.
    pub control: Option<&'a unet::Residuals>,
}

/// A denoising network (the UNet today; MMDiT next): the model output (ε,
/// v, …, as its parameterisation says) for a scaled sample at timestep `t`.
pub trait Backbone {
    fn dtype(&self) -> DType;
    /// The width of the guidance-scale embedding it takes instead of
    /// classifier-free guidance (LCM), if any.
    fn guidance_dim(&self) -> Option<usize>;
    fn forward(&self, sample: &Tensor, t: f32, cond: &BackboneConditioning) -> Result<Tensor>;
}

impl Backbone for unet::UNet {
    fn dtype(&self) -> DType {
        unet::UNet::dtype(self)
    }

    fn guidance_dim(&self) -> Option<usize> {
        self.config.time_cond_proj_dim
    }

    fn forward(&self, sample: &Tensor, t: f32, cond: &BackboneConditioning) -> Result<Tensor> {
        self.forward_with(sample, t, cond.context, cond.guidance, cond.text_time.as_ref(), cond.control)
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
