//! diffusers' `ControlNetModel`: a copy of the UNet's first half that also
//! sees a control image (edges, depth, pose …) and returns residuals for the
//! UNet's skip connections and mid block.

use anyhow::bail;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::blocks::{conv1x1, conv3x3_same};
use super::unet::{Encoder, Residuals, TextTime, UNetConfig};
use crate::ops::Conv2d;

/// A ControlNet's config: the UNet settings of its first half and its own.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    #[serde(default = "rgb")]
    pub controlnet_conditioning_channel_order: String,
    /// Widths of the control image's embedding, a stride-2 step between each.
    #[serde(default = "embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    #[serde(default = "super::value::<3>")]
    pub conditioning_channels: usize,
    /// Residuals averaged over space, and only for the prompt's half of a
    /// guided batch (the "shuffle" ControlNets).
    #[serde(default)]
    pub global_pool_conditions: bool,
    #[serde(flatten)]
    pub unet: UNetConfig,
}

fn rgb() -> String {
    "rgb".into()
}

fn embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

/// diffusers' `ControlNetConditioningEmbedding`: the control image in
/// `[0, 1]` down to latent size, SiLU after every convolution but the last.
#[derive(Debug)]
struct HintEmbedding {
    convs: Vec<Conv2d>,
}

impl HintEmbedding {
    fn new(cin: usize, widths: &[usize], cout: usize, vb: VarBuilder) -> Result<Self> {
        let Some(&first) = widths.first() else { candle_core::bail!("conditioning_embedding_out_channels is empty") };
        let mut convs = vec![conv3x3_same(cin, first, vb.pp("conv_in"))?];
        for (i, pair) in widths.windows(2).enumerate() {
            convs.push(conv3x3_same(pair[0], pair[0], vb.pp(format!("blocks.{}", 2 * i)))?);
            convs.push(Conv2d::new(pair[0], pair[1], 3, 2, 1, vb.pp(format!("blocks.{}", 2 * i + 1)))?);
        }
        convs.push(conv3x3_same(widths[widths.len() - 1], cout, vb.pp("conv_out"))?);
        Ok(Self { convs })
    }

    fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let (last, hidden) = self.convs.split_last().expect("at least conv_in and conv_out");
        let h = hidden.iter().try_fold(image.clone(), |h, conv| candle_nn::ops::silu(&conv.forward(&h)?))?;
        last.forward(&h)
    }
}

#[derive(Debug)]
pub struct ControlNet {
    encoder: Encoder,
    hint: HintEmbedding,
    /// One 1×1 convolution per skip connection ("zero convolutions").
    down_outs: Vec<Conv2d>,
    mid_out: Conv2d,
    pub config: ControlNetConfig,
}

impl ControlNet {
    pub fn new(config: &ControlNetConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let unet = config.unet.mirrored();
        if config.conditioning_channels != 3 {
            bail!("conditioning_channels = {} is not supported (control images are RGB)", config.conditioning_channels);
        }
        if !matches!(config.controlnet_conditioning_channel_order.as_str(), "rgb" | "bgr") {
            bail!(
                "controlnet_conditioning_channel_order {:?} is not rgb or bgr",
                config.controlnet_conditioning_channel_order
            );
        }
        let encoder = Encoder::new(&unet, &vb)?;
        let c0 = unet.block_out_channels[0];
        let hint =
            HintEmbedding::new(3, &config.conditioning_embedding_out_channels, c0, vb.pp("controlnet_cond_embedding"))?;
        // conv_in's output, then each down layer's and each downsampler's.
        let n = unet.block_out_channels.len();
        let mut widths = vec![c0];
        for (i, &c) in unet.block_out_channels.iter().enumerate() {
            widths.extend(std::iter::repeat_n(c, unet.layers_per_block + usize::from(i + 1 < n)));
        }
        let down_outs = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| conv1x1(c, c, vb.pp(format!("controlnet_down_blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let last = unet.block_out_channels[n - 1];
        let mid_out = conv1x1(last, last, vb.pp("controlnet_mid_block"))?;
        Ok(Self { encoder, hint, down_outs, mid_out, config: config.clone() })
    }

    pub fn dtype(&self) -> DType {
        self.encoder.dtype()
    }

    /// The control images `(N, 3, H, W)` in `[0, 1]` embedded at latent size
    /// `(N, C, H/8, W/8)`: the same at every step, so computed once.
    pub fn embed_hint(&self, images: &Tensor) -> Result<Tensor> {
        let images = match self.config.controlnet_conditioning_channel_order.as_str() {
            "bgr" => Tensor::cat(&[images.narrow(1, 2, 1)?, images.narrow(1, 1, 1)?, images.narrow(1, 0, 1)?], 1)?,
            _ => images.clone(),
        };
        self.hint.forward(&images.to_dtype(self.dtype())?)
    }

    /// The residuals for `sample` (the UNet's scaled input) at timestep `t`,
    /// with `hint` from [`ControlNet::embed_hint`] (one row per sample row).
    /// Each residual is scaled by its entry of `scales` (skips in order, then
    /// the mid block), then averaged over space for pooled ControlNets.
    pub fn forward(
        &self,
        sample: &Tensor,
        t: f32,
        context: &Tensor,
        text_time: Option<&TextTime>,
        hint: &Tensor,
        scales: &[f64],
    ) -> Result<Residuals> {
        let temb = self.encoder.embed(sample, t, None, text_time)?;
        let h = (self.encoder.conv_in(sample)? + hint)?;
        let (mid, skips) = self.encoder.down_mid(h, &temb, context)?;
        let finish = |x: Tensor, scale: f64| -> Result<Tensor> {
            let x = (x * scale)?;
            if self.config.global_pool_conditions {
                x.mean_keepdim(3)?.mean_keepdim(2)
            } else {
                Ok(x)
            }
        };
        let down = skips
            .iter()
            .zip(&self.down_outs)
            .zip(scales)
            .map(|((skip, conv), &s)| finish(conv.forward(skip)?, s))
            .collect::<Result<Vec<_>>>()?;
        let mid = finish(self.mid_out.forward(&mid)?, scales[scales.len() - 1])?;
        Ok(Residuals { down, mid })
    }

    /// How many residuals [`ControlNet::forward`] returns (skips and mid).
    pub fn outputs(&self) -> usize {
        self.down_outs.len() + 1
    }
}
