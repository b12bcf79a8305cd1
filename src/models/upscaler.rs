//! ESRGAN-family image upscalers, as spandrel (ComfyUI's loader) runs them:
//! RRDBNet (ESRGAN, BSRGAN, Real-ESRGAN x4plus, x2plus with its
//! pixel-unshuffled input, the 6-block anime model) and SRVGGNetCompact
//! (realesr-general-x4v3). Weights use Real-ESRGAN's names; the loader maps
//! the older namings onto them. Inputs and outputs are RGB in [0, 1].

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::conv3x3_same;
use crate::ops::Conv2d;

/// An RRDBNet's shape, read from its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct RrdbConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub features: usize,
    /// Channels each dense-block convolution adds (32 in every real model).
    pub growth: usize,
    pub blocks: usize,
    /// 2× nearest-upsampling convolutions.
    pub upconvs: usize,
    /// Real-ESRGAN x2plus / x1: the input is pixel-unshuffled by this (1: not).
    pub unshuffle: usize,
}

/// An SRVGGNetCompact's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub features: usize,
    pub convs: usize,
    pub scale: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UpscalerConfig {
    Rrdb(RrdbConfig),
    Compact(CompactConfig),
}

impl UpscalerConfig {
    /// How many times larger the output is.
    pub fn scale(&self) -> usize {
        match self {
            UpscalerConfig::Rrdb(c) => (1 << c.upconvs) / c.unshuffle,
            UpscalerConfig::Compact(c) => c.scale,
        }
    }

    /// Blocks (RRDB) or body convolutions (Compact).
    pub fn blocks(&self) -> usize {
        match self {
            UpscalerConfig::Rrdb(c) => c.blocks,
            UpscalerConfig::Compact(c) => c.convs,
        }
    }

    pub fn architecture(&self) -> &'static str {
        match self {
            UpscalerConfig::Rrdb(_) => "RRDBNet",
            UpscalerConfig::Compact(_) => "SRVGGNetCompact",
        }
    }

    /// Input pixels of context a tile needs on each side so that cropping
    /// it gives the untiled result within rounding: the network's receptive
    /// radius (one pixel per 3×3 convolution at input resolution), capped.
    pub fn tile_margin(&self) -> usize {
        let radius = match self {
            // conv_first, 15 per block, conv_body; the upsampled layers reach less than one input pixel each.
            UpscalerConfig::Rrdb(c) => (2 + 15 * c.blocks + c.upconvs + 2) * c.unshuffle,
            UpscalerConfig::Compact(c) => c.convs + 2,
        };
        radius.min(32)
    }
}

fn lrelu(x: &Tensor) -> Result<Tensor> {
    x.maximum(&(x * 0.2)?)
}

/// Residual dense block: five convolutions over the growing concatenation.
#[derive(Debug)]
struct DenseBlock {
    convs: Vec<Conv2d>,
}

impl DenseBlock {
    fn new(c: &RrdbConfig, vb: VarBuilder) -> Result<Self> {
        let convs = (0..5)
            .map(|i| {
                let cout = if i == 4 { c.features } else { c.growth };
                conv3x3_same(c.features + i * c.growth, cout, vb.pp(format!("conv{}", i + 1)))
            })
            .collect::<Result<_>>()?;
        Ok(Self { convs })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut parts = vec![x.clone()];
        for conv in &self.convs[..4] {
            let y = lrelu(&conv.forward(&Tensor::cat(&parts, 1)?)?)?;
            parts.push(y);
        }
        (self.convs[4].forward(&Tensor::cat(&parts, 1)?)? * 0.2)? + x
    }
}

#[derive(Debug)]
pub struct RrdbNet {
    config: RrdbConfig,
    conv_first: Conv2d,
    /// Per block its three dense blocks.
    body: Vec<[DenseBlock; 3]>,
    conv_body: Conv2d,
    upconvs: Vec<Conv2d>,
    conv_hr: Conv2d,
    conv_last: Conv2d,
}

impl RrdbNet {
    pub fn new(c: &RrdbConfig, vb: VarBuilder) -> Result<Self> {
        let f = c.features;
        let body = (0..c.blocks)
            .map(|i| {
                let b = vb.pp(format!("body.{i}"));
                Ok([
                    DenseBlock::new(c, b.pp("rdb1"))?,
                    DenseBlock::new(c, b.pp("rdb2"))?,
                    DenseBlock::new(c, b.pp("rdb3"))?,
                ])
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config: c.clone(),
            conv_first: conv3x3_same(c.in_channels, f, vb.pp("conv_first"))?,
            body,
            conv_body: conv3x3_same(f, f, vb.pp("conv_body"))?,
            upconvs: (1..=c.upconvs)
                .map(|i| conv3x3_same(f, f, vb.pp(format!("conv_up{i}"))))
                .collect::<Result<_>>()?,
            conv_hr: conv3x3_same(f, f, vb.pp("conv_hr"))?,
            conv_last: conv3x3_same(f, c.out_channels, vb.pp("conv_last"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let r = self.config.unshuffle;
        let (_, _, h, w) = x.dims4()?;
        let x = if r > 1 { pixel_unshuffle(&pad_reflect_to(x, r)?, r)? } else { x.clone() };
        let fea = self.conv_first.forward(&x)?;
        let mut trunk = fea.clone();
        for rrdb in &self.body {
            let mut out = trunk.clone();
            for dense in rrdb {
                out = dense.forward(&out)?;
            }
            trunk = ((out * 0.2)? + &trunk)?;
        }
        let mut fea = self.conv_body.forward_with(&trunk, None, Some(&fea))?;
        for up in &self.upconvs {
            let (_, _, fh, fw) = fea.dims4()?;
            fea = lrelu(&up.forward_resized(&fea, (2 * fh, 2 * fw))?)?;
        }
        let out = self.conv_last.forward(&lrelu(&self.conv_hr.forward(&fea)?)?)?;
        let s = (1 << self.config.upconvs) / r;
        out.narrow(2, 0, h * s)?.narrow(3, 0, w * s)
    }
}

#[derive(Debug)]
pub struct Compact {
    config: CompactConfig,
    convs: Vec<Conv2d>,
    /// PReLU slopes, one per feature channel, after each convolution but the last.
    slopes: Vec<Tensor>,
}

impl Compact {
    pub fn new(c: &CompactConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("body");
        let mut convs = vec![conv3x3_same(c.in_channels, c.features, vb.pp("0"))?];
        let mut slopes = vec![vb.get(c.features, "1.weight")?];
        for i in 0..c.convs {
            convs.push(conv3x3_same(c.features, c.features, vb.pp(2 * i + 2))?);
            slopes.push(vb.get(c.features, &format!("{}.weight", 2 * i + 3))?);
        }
        let out = c.out_channels * c.scale * c.scale;
        convs.push(conv3x3_same(c.features, out, vb.pp(2 * c.convs + 2))?);
        Ok(Self { config: c.clone(), convs, slopes })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = x.clone();
        for (conv, slope) in self.convs.iter().zip(&self.slopes) {
            let y = conv.forward(&out)?;
            let a = slope.reshape((1, (), 1, 1))?;
            // PReLU: y where positive, a·y where not.
            out = (y.relu()? + y.minimum(0f32)?.broadcast_mul(&a)?)?;
        }
        let s = self.config.scale;
        let out = pixel_shuffle(&self.convs[self.convs.len() - 1].forward(&out)?, s)?;
        let (_, _, h, w) = x.dims4()?;
        out + x.upsample_nearest2d(h * s, w * s)?
    }
}

/// A loaded upscaler.
#[derive(Debug)]
pub enum Upscaler {
    Rrdb(Box<RrdbNet>),
    Compact(Box<Compact>),
}

impl Upscaler {
    pub fn new(c: &UpscalerConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match c {
            UpscalerConfig::Rrdb(r) => Upscaler::Rrdb(Box::new(RrdbNet::new(r, vb)?)),
            UpscalerConfig::Compact(k) => Upscaler::Compact(Box::new(Compact::new(k, vb)?)),
        })
    }

    pub fn config(&self) -> UpscalerConfig {
        match self {
            Upscaler::Rrdb(r) => UpscalerConfig::Rrdb(r.config.clone()),
            Upscaler::Compact(c) => UpscalerConfig::Compact(c.config.clone()),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Upscaler::Rrdb(r) => r.conv_first.weight().dtype(),
            Upscaler::Compact(c) => c.convs[0].weight().dtype(),
        }
    }

    /// `(B, 3, H, W)` RGB in [0, 1] → `(B, 3, H·s, W·s)`, not clamped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Upscaler::Rrdb(r) => r.forward(x),
            Upscaler::Compact(c) => c.forward(x),
        }
    }
}

/// `(B, C·r², H, W)` → `(B, C, H·r, W·r)`, as `torch.pixel_shuffle`.
fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let c = c / (r * r);
    x.reshape((b, c, r, r, h, w))?.permute((0, 1, 4, 2, 5, 3))?.reshape((b, c, h * r, w * r))
}

/// `(B, C, H·r, W·r)` → `(B, C·r², H, W)`, as `torch.pixel_unshuffle`.
fn pixel_unshuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h, w) = (h / r, w / r);
    x.reshape((b, c, h, r, w, r))?.permute((0, 1, 3, 5, 2, 4))?.reshape((b, c * r * r, h, w))
}

/// Pads the bottom and right by reflection to multiples of `r` (spandrel's
/// `pad_to_multiple(…, mode="reflect")`).
fn pad_reflect_to(x: &Tensor, r: usize) -> Result<Tensor> {
    let mut x = x.clone();
    for dim in [2, 3] {
        let n = x.dim(dim)?;
        let pad = (r - n % r) % r;
        if pad >= n {
            candle_core::bail!("an image {n} pixels across is too small for this upscaler (at least {r})");
        }
        if pad > 0 {
            // Reflection excludes the edge: n-2, n-3, …
            let idx: Vec<u32> = (0..pad).map(|i| (n as i64 - 2 - i as i64).unsigned_abs() as u32).collect();
            let idx = Tensor::new(idx, x.device())?;
            x = Tensor::cat(&[&x, &x.index_select(&idx, dim)?], dim)?;
        }
    }
    Ok(x)
}
