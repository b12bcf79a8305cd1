//! Building blocks shared by the UNet and the VAE, named as diffusers names
//! them: ResNet blocks, up/down samplers, spatial transformers, attention.

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, group_norm, layer_norm, linear, linear_no_bias, Conv2d, Conv2dConfig};
use candle_nn::{GroupNorm, LayerNorm, Linear, VarBuilder};

use super::attention::attention;

fn conv3x3(cin: usize, cout: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    conv2d(cin, cout, 3, cfg, vb)
}

pub fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(cin, cout, 1, Default::default(), vb)
}

pub fn conv3x3_same(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv3x3(cin, cout, 1, 1, vb)
}

/// `silu(group_norm(x))`, the pre-activation both ResNets and output heads use.
pub fn norm_silu(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(&norm.forward(x)?)
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
            Some(t) => Some(linear(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if cin != cout { Some(conv1x1(cin, cout, vb.pp("conv_shortcut"))?) } else { None };
        Ok(Self {
            norm1: group_norm(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv3x3_same(cin, cout, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv3x3_same(cout, cout, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&norm_silu(&self.norm1, x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&candle_nn::ops::silu(temb)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&norm_silu(&self.norm2, &h)?)?;
        match &self.conv_shortcut {
            Some(c) => c.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Stride-2 3×3 convolution. The VAE encoder pads right/bottom only, as
/// diffusers' `Downsample2D(padding=0)` does; the UNet pads all sides by 1.
#[derive(Debug)]
pub struct Downsample {
    conv: Conv2d,
    asymmetric: bool,
}

impl Downsample {
    pub fn new(channels: usize, asymmetric: bool, vb: VarBuilder) -> Result<Self> {
        let padding = if asymmetric { 0 } else { 1 };
        let conv = conv3x3(channels, channels, 2, padding, vb.pp("conv"))?;
        Ok(Self { conv, asymmetric })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.asymmetric {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
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
        self.conv.forward(&x.upsample_nearest2d(size.0, size.1)?)
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
            to_q: linear_no_bias(dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, dim, vb.pp("to_out.0"))?,
            heads,
            upcast,
        })
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        self.to_out.forward(&attention(&q, &k, &v, self.heads, false, self.upcast)?)
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
        Ok(Self { proj: linear(dim, 2 * inner, vb.pp("net.0.proj"))?, out: linear(inner, dim, vb.pp("net.2"))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hg = self.proj.forward(x)?;
        let inner = hg.dim(candle_core::D::Minus1)? / 2;
        let h = hg.narrow(candle_core::D::Minus1, 0, inner)?;
        let g = hg.narrow(candle_core::D::Minus1, inner, inner)?;
        self.out.forward(&(h * g.gelu_erf()?)?)
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
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// Input/output projection of a spatial transformer: a 1×1 convolution (SD1)
/// or a linear layer on the flattened pixels (SD2, SDXL).
#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(cin: usize, cout: usize, linear_proj: bool, vb: VarBuilder) -> Result<Self> {
        Ok(if linear_proj {
            Projection::Linear(linear(cin, cout, vb)?)
        } else {
            Projection::Conv(conv1x1(cin, cout, vb)?)
        })
    }
}

/// diffusers' `Transformer2DModel` for continuous inputs: group norm, project in,
/// transformer blocks over the pixels as a sequence, project out, residual.
#[derive(Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
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
        Ok(Self {
            norm: group_norm(c.groups, c.channels, 1e-6, vb.pp("norm"))?,
            proj_in: Projection::new(c.channels, c.channels, c.linear_projection, vb.pp("proj_in"))?,
            blocks,
            proj_out: Projection::new(c.channels, c.channels, c.linear_projection, vb.pp("proj_out"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_seq = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let from_seq = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let normed = self.norm.forward(x)?;
        let mut seq = match &self.proj_in {
            Projection::Conv(conv) => to_seq(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_seq(&normed)?)?,
        };
        for block in &self.blocks {
            seq = block.forward(&seq, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&from_seq(&seq)?)?,
            Projection::Linear(lin) => from_seq(&lin.forward(&seq)?)?,
        };
        out + x
    }
}

/// The VAE's single-head self-attention over pixels, with its own group norm.
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    pub fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let seq = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&seq)?;
        let k = self.to_k.forward(&seq)?;
        let v = self.to_v.forward(&seq)?;
        let out = self.to_out.forward(&attention(&q, &k, &v, 1, false, false)?)?;
        out.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}
