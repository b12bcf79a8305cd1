//! Building blocks shared by the networks, named as diffusers names them:
//! ResNet blocks, up/down samplers, spatial transformers, attention, norms.

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use crate::ops::{attention, geglu, Conv2d, GroupNorm, Linear};

pub fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::new(cin, cout, 1, 1, 0, vb)
}

pub fn conv3x3_same(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    Conv2d::new(cin, cout, 3, 1, 1, vb)
}

/// diffusers' `ResnetBlock2D` with the default ("default" time-scale-shift) wiring.
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// `temb` is the time-embedding width (UNet) or `None` (VAE).
    pub fn new(cin: usize, cout: usize, temb: Option<usize>, groups: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let time_emb_proj = match temb {
            Some(t) => Some(Linear::new(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if cin != cout { Some(conv1x1(cin, cout, vb.pp("conv_shortcut"))?) } else { None };
        Ok(Self {
            norm1: GroupNorm::new(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv3x3_same(cin, cout, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: GroupNorm::new(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv3x3_same(cout, cout, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // The time embedding is a per-image channel offset of conv1's output,
        // and the skip connection conv2's residual: both ride in the convolutions.
        let offset = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&candle_nn::ops::silu(temb)?)?),
            _ => None,
        };
        let h = self.conv1.forward_with(&self.norm1.forward_silu(x)?, offset.as_ref(), None)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        self.conv2.forward_with(&self.norm2.forward_silu(&h)?, None, Some(&skip))
    }
}

/// Stride-2 3×3 convolution. The VAE encoder pads right/bottom only, as
/// diffusers' `Downsample2D(padding=0)` does; the UNet pads all sides by 1.
#[derive(Debug)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub fn new(channels: usize, asymmetric: bool, vb: VarBuilder) -> Result<Self> {
        let conv = if asymmetric {
            Conv2d::new(channels, channels, 3, 2, 0, vb.pp("conv"))?.with_bottom_right_padding(1)
        } else {
            Conv2d::new(channels, channels, 3, 2, 1, vb.pp("conv"))?
        };
        Ok(Self { conv })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// Nearest-neighbour resize to an explicit size, then a 3×3 convolution. The
/// size is the matching skip connection's, so odd latent sizes work.
#[derive(Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv3x3_same(channels, channels, vb.pp("conv"))? })
    }

    pub fn forward(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        self.conv.forward_resized(x, size)
    }
}

/// diffusers' `Attention` as used in transformer blocks: no q/k/v bias.
#[derive(Debug)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    upcast: bool,
}

impl CrossAttention {
    pub fn new(dim: usize, context_dim: usize, heads: usize, upcast: bool, vb: VarBuilder) -> Result<Self> {
        let head_dim = dim / heads;
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::no_bias(dim, inner, vb.pp("to_q"))?,
            to_k: Linear::no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: Linear::no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: Linear::new(inner, dim, vb.pp("to_out.0"))?,
            heads,
            upcast,
        })
    }

    /// `residual + attention(x, context)`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        self.to_out.forward_add(&attention(&q, &k, &v, self.heads, false, self.upcast)?, residual)
    }
}

/// GEGLU feed-forward: `W2 (h ⊙ gelu(g))` where `[h, g] = W1 x`, with exact
/// (erf) GELU as diffusers uses.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::new(dim, 2 * inner, vb.pp("net.0.proj"))?,
            out: Linear::new(inner, dim, vb.pp("net.2"))?,
        })
    }

    /// `residual + ff(x)`.
    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out.forward_add(&geglu(&self.proj.forward(x)?)?, residual)
    }
}

#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(dim: usize, context_dim: usize, heads: usize, upcast: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, dim, heads, upcast, vb.pp("attn1"))?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(dim, context_dim, heads, upcast, vb.pp("attn2"))?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.attn1.forward(&self.norm1.forward(x)?, None, x)?;
        let x = self.attn2.forward(&self.norm2.forward(&x)?, Some(context), &x)?;
        self.ff.forward(&self.norm3.forward(&x)?, &x)
    }
}

/// diffusers' `Transformer2DModel` for continuous inputs: group norm, project in,
/// transformer blocks over the pixels as a sequence, project out, residual.
#[derive(Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    /// The projections are 1×1 convolutions (SD1) or linear layers on the
    /// flattened pixels (SD2, SDXL): the same product, so `proj_in` is a
    /// linear layer reading the feature map as a sequence and `proj_out` a
    /// 1×1 convolution reading the sequence as a feature map, both in place.
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Conv2d,
}

pub struct SpatialTransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub upcast_attention: bool,
}

impl SpatialTransformer {
    pub fn new(c: &SpatialTransformerConfig, vb: VarBuilder) -> Result<Self> {
        let blocks = (0..c.depth)
            .map(|i| {
                let vb = vb.pp(format!("transformer_blocks.{i}"));
                TransformerBlock::new(c.channels, c.context_dim, c.heads, c.upcast_attention, vb)
            })
            .collect::<Result<_>>()?;
        let ch = c.channels;
        let (proj_in, proj_out) = if c.linear_projection {
            (Linear::new(ch, ch, vb.pp("proj_in"))?, Conv2d::from_linear(ch, ch, vb.pp("proj_out"))?)
        } else {
            (Linear::from_conv1x1(ch, ch, vb.pp("proj_in"))?, conv1x1(ch, ch, vb.pp("proj_out"))?)
        };
        Ok(Self { norm: GroupNorm::new(c.groups, ch, 1e-6, vb.pp("norm"))?, proj_in, blocks, proj_out })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let mut seq = self.proj_in.forward(&pixels_as_sequence(&normed)?)?;
        for block in &self.blocks {
            seq = block.forward(&seq, context)?;
        }
        self.proj_out.forward_with(&seq.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?, None, Some(x))
    }
}

/// The VAE's single-head self-attention over pixels, with its own group norm.
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    /// A linear layer on the sequence, run as a 1×1 convolution back to the feature map.
    to_out: Conv2d,
}

impl VaeAttention {
    pub fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: Linear::new(channels, channels, vb.pp("to_q"))?,
            to_k: Linear::new(channels, channels, vb.pp("to_k"))?,
            to_v: Linear::new(channels, channels, vb.pp("to_v"))?,
            to_out: Conv2d::from_linear(channels, channels, vb.pp("to_out.0"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let seq = pixels_as_sequence(&self.group_norm.forward(x)?)?;
        let q = self.to_q.forward(&seq)?;
        let k = self.to_k.forward(&seq)?;
        let v = self.to_v.forward(&seq)?;
        let out = attention(&q, &k, &v, 1, false, false)?;
        self.to_out.forward_with(&out.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?, None, Some(x))
    }
}

/// A `(B, C, H, W)` feature map as a `(B, H·W, C)` sequence: a strided view
/// that the linear layers read without a copy.
fn pixels_as_sequence(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h * w))?.transpose(1, 2)
}

/// RMS normalisation (T5's `T5LayerNorm`, diffusers' `RMSNorm`): `x / rms(x)`
/// over the last dimension, computed in f32, times the weight; no mean
/// subtraction, no bias.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(candle_core::DType::F32)?;
        let mean_square = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = x.broadcast_div(&(mean_square + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)
    }
}

/// LayerNorm without weights (diffusers' `elementwise_affine=False`), in f32.
pub fn plain_layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(candle_core::DType::F32)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(candle_core::D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}
