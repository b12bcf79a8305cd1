//! The KL autoencoder (diffusers' `AutoencoderKL`): the decoder turns latents
//! into images, the encoder (loaded only when an image is encoded) the reverse.

use std::collections::HashMap;

use anyhow::bail;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::ops::{Conv2d, GroupNorm};

use super::blocks::{conv1x1, conv3x3_same, Downsample, ResnetBlock, Upsample, VaeAttention};

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "super::value::<3>")]
    pub in_channels: usize,
    #[serde(default = "super::value::<3>")]
    pub out_channels: usize,
    #[serde(default = "super::value::<4>")]
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "super::value::<1>")]
    pub layers_per_block: usize,
    #[serde(default = "super::value::<32>")]
    pub norm_num_groups: usize,
    #[serde(default = "sd1_scaling")]
    pub scaling_factor: f64,
    /// SD 3: latents are `(z − shift) · scale`.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// SD 3's VAE has neither 1×1 convolution around the latents.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Every other key, checked against [`SUPPORTED`].
    #[serde(flatten)]
    pub other: HashMap<String, serde_json::Value>,
}

/// Settings of other autoencoder variants, with the values implemented here.
const SUPPORTED: &[(&str, &[&str])] = &[("act_fn", &["\"silu\""]), ("mid_block_add_attention", &["true"])];

fn yes() -> bool {
    true
}

fn sd1_scaling() -> f64 {
    0.18215
}

/// Every norm in the VAE uses this epsilon (diffusers' default for it).
const EPS: f64 = 1e-6;

impl VaeConfig {
    fn check(&self) -> anyhow::Result<()> {
        super::check_supported(&self.other, SUPPORTED)?;
        if self.block_out_channels.is_empty() {
            bail!("block_out_channels is empty");
        }
        if let Some(c) = self.block_out_channels.iter().find(|c| *c % self.norm_num_groups != 0) {
            bail!("block width {c} is not a multiple of norm_num_groups {}", self.norm_num_groups);
        }
        Ok(())
    }

    /// Image pixels per latent pixel along each side.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The diffusion model's latents of the posterior mean `z`.
    pub fn to_latents(&self, z: &Tensor) -> Result<Tensor> {
        match self.shift_factor {
            Some(shift) => (z - shift)? * self.scaling_factor,
            None => z * self.scaling_factor,
        }
    }

    /// What the decoder takes, of the diffusion model's latents `x` at `scale`.
    pub fn from_latents(&self, x: &Tensor, scale: f64) -> Result<Tensor> {
        let z = (x * (scale / self.scaling_factor))?;
        match self.shift_factor {
            Some(shift) => z + shift,
            None => Ok(z),
        }
    }
}

/// Middle of both halves: ResNet, self-attention, ResNet.
#[derive(Debug)]
struct MidBlock {
    resnet_0: ResnetBlock,
    attention: VaeAttention,
    resnet_1: ResnetBlock,
}

impl MidBlock {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resnet_0: ResnetBlock::new(c, c, None, groups, EPS, vb.pp("resnets.0"))?,
            attention: VaeAttention::new(c, groups, vb.pp("attentions.0"))?,
            resnet_1: ResnetBlock::new(c, c, None, groups, EPS, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.resnet_0.forward(x, None)?;
        let h = self.attention.forward(&h)?;
        self.resnet_1.forward(&h, None)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let chans: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut prev = chans[0];
        let mut up = Vec::with_capacity(chans.len());
        for (i, &c) in chans.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(if j == 0 { prev } else { c }, c, None, g, EPS, vb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < chans.len() { Some(Upsample::new(c, vb.pp("upsamplers.0"))?) } else { None };
            up.push((resnets, upsample));
            prev = c;
        }
        let c0 = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv3x3_same(cfg.latent_channels, chans[0], vb.pp("conv_in"))?,
            mid: MidBlock::new(chans[0], g, vb.pp("mid_block"))?,
            up,
            conv_norm_out: GroupNorm::new(g, c0, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3_same(c0, cfg.out_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, upsample) in &self.up {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = upsample {
                let (_, _, hh, ww) = h.dims4()?;
                h = u.forward(&h, (2 * hh, 2 * ww))?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<(Vec<ResnetBlock>, Option<Downsample>)>,
    mid: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let chans = &cfg.block_out_channels;
        let mut prev = chans[0];
        let mut down = Vec::with_capacity(chans.len());
        for (i, &c) in chans.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(if j == 0 { prev } else { c }, c, None, g, EPS, vb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample =
                if i + 1 < chans.len() { Some(Downsample::new(c, true, vb.pp("downsamplers.0"))?) } else { None };
            down.push((resnets, downsample));
            prev = c;
        }
        let last = *chans.last().expect("checked non-empty");
        Ok(Self {
            conv_in: conv3x3_same(cfg.in_channels, chans[0], vb.pp("conv_in"))?,
            down,
            mid: MidBlock::new(last, g, vb.pp("mid_block"))?,
            conv_norm_out: GroupNorm::new(g, last, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3_same(last, 2 * cfg.latent_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, downsample) in &self.down {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = downsample {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

#[derive(Debug)]
pub struct Vae {
    decoder: Decoder,
    post_quant_conv: Option<Conv2d>,
    encoder: Option<(Encoder, Option<Conv2d>)>,
    dtype: DType,
    pub config: VaeConfig,
    /// Decode and encode in overlapping tiles: always, or when the image is large.
    pub tiling: Tiling,
}

/// When to decode and encode in tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiling {
    /// When the last up-block's 3×3 convolutions would need more than
    /// [`AUTO_TILING_BYTES`] for their im2col buffer.
    Auto,
    Always,
    Never,
}

impl std::str::FromStr for Tiling {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Tiling::Auto,
            "on" | "always" => Tiling::Always,
            "off" | "never" => Tiling::Never,
            other => bail!("--vae-tiling {other:?}: use auto, on or off"),
        })
    }
}

/// Memory of one full-resolution im2col buffer above which `Auto` tiles
/// (SD: above about 800², where a whole decode would pass 8 GB in all).
pub const AUTO_TILING_BYTES: usize = 3 << 30;
/// Latent tile side and overlap (diffusers' defaults for SD: 64 and 25 %).
const TILE: usize = 64;
const OVERLAP: usize = 16;

impl Vae {
    /// Builds the decoder, and the encoder too when `with_encoder` is set.
    pub fn new(cfg: &VaeConfig, with_encoder: bool, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.check()?;
        let l = cfg.latent_channels;
        let encoder = if with_encoder {
            let quant_conv = if cfg.use_quant_conv { Some(conv1x1(2 * l, 2 * l, vb.pp("quant_conv"))?) } else { None };
            Some((Encoder::new(cfg, vb.pp("encoder"))?, quant_conv))
        } else {
            None
        };
        Ok(Self {
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(conv1x1(l, l, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            encoder,
            dtype: vb.dtype(),
            config: cfg.clone(),
            tiling: Tiling::Auto,
        })
    }

    /// The dtype the weights run in.
    pub fn dtype(&self) -> candle_core::DType {
        self.dtype
    }

    /// Unscaled latents to images in [-1, 1] (not clamped), tiled when
    /// [`Vae::tiling`] says so. Takes and returns f32 whatever the weights' dtype.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        let s = self.config.downscale();
        if self.tiles(h * s * w * s, h, w) {
            self.decode_tiled(latents, TILE, OVERLAP)
        } else {
            self.decode_whole(latents)
        }
    }

    /// [`Vae::decode`] of a batch, one image per item: on a GPU all at once
    /// when one image would not be tiled (its kernels fill the device
    /// better; every layer treats images independently, so the images are
    /// the same), else one at a time, so memory stays that of one image.
    pub fn decode_batch(&self, latents: &Tensor) -> Result<Vec<Tensor>> {
        let (b, _, h, w) = latents.dims4()?;
        let s = self.config.downscale();
        if b > 1 && !latents.device().is_cpu() && !self.tiles(h * s * w * s, h, w) {
            let images = self.decode_whole(latents)?;
            return (0..b).map(|i| images.narrow(0, i, 1)).collect();
        }
        (0..b).map(|i| self.decode(&latents.narrow(0, i, 1)?)).collect()
    }

    fn decode_whole(&self, latents: &Tensor) -> Result<Tensor> {
        let mut latents = latents.to_dtype(self.dtype())?;
        if let Some(conv) = &self.post_quant_conv {
            latents = conv.forward(&latents)?;
        }
        self.decoder.forward(&latents)?.to_dtype(DType::F32)
    }

    /// Decodes `tile`-sized latent windows overlapping by `overlap`, and
    /// averages them with weights that ramp up linearly across the overlaps,
    /// so seams fade. Memory is that of one tile; the result differs from a
    /// whole decode because the decoder's group norms and attention see one
    /// tile at a time.
    pub fn decode_tiled(&self, latents: &Tensor, tile: usize, overlap: usize) -> Result<Tensor> {
        let (s, out) = (self.config.downscale(), self.config.out_channels);
        self.tiled(latents, tile, overlap, (1, s), out, |x| self.decode_whole(x))
    }

    /// The encoder's counterpart of [`Vae::decode_tiled`] (`tile` and
    /// `overlap` in latents): images to unscaled posterior means.
    pub fn encode_tiled(&self, images: &Tensor, tile: usize, overlap: usize) -> anyhow::Result<Tensor> {
        let (s, l) = (self.config.downscale(), self.config.latent_channels);
        let encode = |x: &Tensor| self.encode_whole(x).map_err(|e| candle_core::Error::Msg(format!("{e:#}")));
        Ok(self.tiled(images, tile, overlap, (s, 1), l, encode)?)
    }

    /// Runs `f` over windows of `x` that are `tile` latents wide and overlap
    /// by at least `overlap`, blending the outputs. `per_latent` is how many
    /// input and output pixels make one latent (decode: 1 and 8; encode: 8
    /// and 1).
    fn tiled(
        &self,
        x: &Tensor,
        tile: usize,
        overlap: usize,
        (per_in, per_out): (usize, usize),
        out_channels: usize,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let (h, w) = (h / per_in, w / per_in);
        // As few tiles as keep every overlap ≥ `overlap`, spread evenly.
        let starts = |len: usize| -> Vec<usize> {
            if len <= tile {
                return vec![0];
            }
            let n = (len - overlap).div_ceil(tile.saturating_sub(overlap).max(1)).max(2);
            (0..n).map(|i| (i * (len - tile) + (n - 1) / 2) / (n - 1)).collect()
        };
        // Weight along one axis of a tile: ramps at edges shared with a neighbour.
        let ramp = |start: usize, size: usize, len: usize| -> Vec<f32> {
            let edge = (overlap * per_out).max(1) as f32;
            (0..size * per_out)
                .map(|p| {
                    let rise = if start > 0 { ((p as f32 + 0.5) / edge).min(1.0) } else { 1.0 };
                    let fall =
                        if start + size < len { (((size * per_out - p) as f32 - 0.5) / edge).min(1.0) } else { 1.0 };
                    rise.min(fall)
                })
                .collect()
        };
        let dev = x.device();
        let (oh, ow) = (h * per_out, w * per_out);
        let mut acc = Tensor::zeros((b, out_channels, oh, ow), DType::F32, dev)?;
        let mut total = Tensor::zeros((1, 1, oh, ow), DType::F32, dev)?;
        for &y0 in &starts(h) {
            for &x0 in &starts(w) {
                let (th, tw) = (tile.min(h), tile.min(w));
                let window = x.narrow(2, y0 * per_in, th * per_in)?.narrow(3, x0 * per_in, tw * per_in)?;
                let part = f(&window)?.to_dtype(DType::F32)?;
                let wy = Tensor::from_vec(ramp(y0, th, h), (th * per_out, 1), dev)?;
                let wx = Tensor::from_vec(ramp(x0, tw, w), (1, tw * per_out), dev)?;
                let weight = wy.broadcast_mul(&wx)?.reshape((1, 1, th * per_out, tw * per_out))?;
                let (ys, xs) = (y0 * per_out..(y0 + th) * per_out, x0 * per_out..(x0 + tw) * per_out);
                let region =
                    |t: &Tensor| t.narrow(2, y0 * per_out, th * per_out)?.narrow(3, x0 * per_out, tw * per_out);
                let weighted = (region(&acc)? + part.broadcast_mul(&weight)?)?;
                acc = acc.slice_assign(&[0..b, 0..out_channels, ys.clone(), xs.clone()], &weighted)?;
                total = total.slice_assign(&[0..1, 0..1, ys, xs], &(region(&total)? + weight)?)?;
            }
        }
        acc.broadcast_div(&total)
    }

    /// Whether a full-resolution pass at `pixels` would pass the auto-tiling
    /// memory bound (the largest im2col buffer, at the first/last block).
    fn tiles(&self, pixels: usize, latents_h: usize, latents_w: usize) -> bool {
        let im2col = pixels * self.config.block_out_channels[0] * 9 * 4;
        let tile = match self.tiling {
            Tiling::Always => true,
            Tiling::Never => false,
            Tiling::Auto => im2col > AUTO_TILING_BYTES,
        };
        tile && (latents_h > TILE || latents_w > TILE)
    }

    /// Images in [-1, 1] to the posterior mean (unscaled latents), tiled
    /// when [`Vae::tiling`] says so. Takes any dtype, returns f32.
    pub fn encode_mean(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        let s = self.config.downscale();
        if self.tiles(h * w, h / s, w / s) {
            self.encode_tiled(images, TILE, OVERLAP)
        } else {
            self.encode_whole(images)
        }
    }

    fn encode_whole(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let Some((encoder, quant_conv)) = &self.encoder else {
            bail!("the VAE was loaded without its encoder");
        };
        let mut moments = encoder.forward(&images.to_dtype(self.dtype)?)?;
        if let Some(conv) = quant_conv {
            moments = conv.forward(&moments)?;
        }
        Ok(moments.narrow(1, 0, self.config.latent_channels)?.to_dtype(DType::F32)?)
    }
}
