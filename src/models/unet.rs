//! The conditional UNet (diffusers' `UNet2DConditionModel`) for SD 1.x/2.x
//! layouts, configured from `unet/config.json` or from a checkpoint's tensors.

use std::collections::HashMap;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use serde::Deserialize;

use crate::ops::{Conv2d, GroupNorm};

use super::blocks::{conv3x3_same, Downsample, ResnetBlock, SpatialTransformer};
use super::blocks::{SpatialTransformerConfig, Upsample};
use super::PerBlock;

/// The subset of diffusers' UNet config that the supported families use.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "super::value::<4>")]
    pub in_channels: usize,
    #[serde(default = "super::value::<4>")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    /// A ControlNet's config has none (it is the UNet's first half only).
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "super::value::<2>")]
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    /// diffusers' misnomer: for SD 1.x/2.x this is the number of heads.
    #[serde(default = "eight")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "super::value::<32>")]
    pub norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Attention scores in f32 even in f16 (SD 2.1); no effect in f32.
    #[serde(default)]
    pub upcast_attention: bool,
    /// SDXL's micro-conditioning (`addition_embed_type: "text_time"`): width
    /// of each size/crop number's sinusoids, and of the add embedding's input
    /// (pooled text width + 6 × that).
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "one_layer")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
    /// Width of the guidance-scale embedding of LCM-distilled UNets.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Every other key, checked against [`SUPPORTED`].
    #[serde(flatten)]
    pub other: HashMap<String, serde_json::Value>,
}

/// Settings of other UNet variants, with the values this UNet implements.
const SUPPORTED: &[(&str, &[&str])] = &[
    ("act_fn", &["\"silu\""]),
    ("resnet_time_scale_shift", &["\"default\""]),
    ("time_embedding_type", &["\"positional\""]),
    ("mid_block_type", &["\"UNetMidBlock2DCrossAttn\""]),
    ("conv_in_kernel", &["3"]),
    ("conv_out_kernel", &["3"]),
    ("center_input_sample", &["false"]),
    ("only_cross_attention", &["false"]),
    ("dual_cross_attention", &["false"]),
    ("mid_block_scale_factor", &["1", "1.0"]),
    ("resnet_out_scale_factor", &["1", "1.0"]),
    ("addition_embed_type", &["null", "\"text_time\""]),
    ("class_embed_type", &["null"]),
    ("num_class_embeds", &["null"]),
    ("encoder_hid_dim", &["null"]),
    ("time_embedding_dim", &["null"]),
    ("timestep_post_act", &["null"]),
];

fn eight() -> PerBlock {
    PerBlock::One(8)
}
fn norm_eps() -> f64 {
    1e-5
}
fn one_layer() -> PerBlock {
    PerBlock::One(1)
}
fn yes() -> bool {
    true
}

/// Per-block settings resolved from the config.
#[derive(Debug, Clone)]
struct Level {
    channels: usize,
    attention: bool,
    heads: usize,
    depth: usize,
}

impl UNetConfig {
    /// The same UNet's config with up blocks mirroring the down blocks (a
    /// ControlNet's, which has no up blocks of its own).
    pub fn mirrored(&self) -> UNetConfig {
        let up = self.down_block_types.iter().rev().map(|t| t.replace("Down", "Up")).collect();
        UNetConfig { up_block_types: up, ..self.clone() }
    }

    /// Checks the config and resolves per-level settings (down-block order).
    fn levels(&self) -> anyhow::Result<Vec<Level>> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!("block_out_channels, down_block_types and up_block_types must have the same non-zero length");
        }
        super::check_supported(&self.other, SUPPORTED)?;
        let heads = self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim);
        (0..n)
            .map(|i| {
                let kind = &self.down_block_types[i];
                let up_kind = &self.up_block_types[n - 1 - i];
                let attention = kind.starts_with("CrossAttn");
                if attention != up_kind.starts_with("CrossAttn") {
                    bail!("down block {kind} does not mirror up block {up_kind}");
                }
                for t in [kind, up_kind] {
                    if !matches!(
                        t.as_str(),
                        "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
                    ) {
                        bail!("block type {t} is not supported");
                    }
                }
                let channels = self.block_out_channels[i];
                if !channels.is_multiple_of(self.norm_num_groups) {
                    bail!("block width {channels} is not a multiple of norm_num_groups {}", self.norm_num_groups);
                }
                Ok(Level {
                    channels,
                    attention,
                    heads: heads.get(i, n).context("attention heads")?,
                    depth: self.transformer_layers_per_block.get(i, n).context("transformer_layers_per_block")?,
                })
            })
            .collect()
    }
}

#[derive(Debug)]
struct Layer {
    resnet: ResnetBlock,
    attention: Option<SpatialTransformer>,
}

impl Layer {
    fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.resnet.forward(x, Some(temb))?;
        match &self.attention {
            Some(a) => a.forward(&h, context),
            None => Ok(h),
        }
    }
}

#[derive(Debug)]
struct DownBlock {
    layers: Vec<Layer>,
    downsample: Option<Downsample>,
}

#[derive(Debug)]
struct UpBlock {
    layers: Vec<Layer>,
    upsample: Option<Upsample>,
}

/// SDXL's extra conditioning of one batch: the pooled text embedding
/// `(B, P)` and the six numbers of each image, row after row (original
/// size, crop top-left, target size), kept on the host: their sinusoids are
/// computed there, so no pass waits to read them back from the device.
pub struct TextTime<'a> {
    pub text_embeds: &'a Tensor,
    pub time_ids: &'a [f32],
}

/// diffusers' `add_time_proj` + `add_embedding`: sinusoids of each time id,
/// concatenated after the pooled text, through linear–SiLU–linear.
#[derive(Debug)]
struct AddEmbedding {
    time_dim: usize,
    linear_1: Linear,
    linear_2: Linear,
}

/// The UNet's first half, which a ControlNet copies: the timestep (and
/// SDXL's added) embedding, `conv_in`, the down blocks and the mid block.
#[derive(Debug)]
pub struct Encoder {
    /// SDXL: added to the timestep embedding.
    add_embedding: Option<AddEmbedding>,
    time_proj_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: usize,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// LCM: projects the guidance embedding onto the timestep features.
    cond_proj: Option<Linear>,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: (ResnetBlock, SpatialTransformer, ResnetBlock),
}

/// What a UNet's layers are built with.
struct Builder<'a> {
    config: &'a UNetConfig,
    temb: usize,
}

impl Builder<'_> {
    fn transformer(&self, level: &Level, channels: usize, vb: VarBuilder) -> Result<SpatialTransformer> {
        let c = self.config;
        SpatialTransformer::new(
            &SpatialTransformerConfig {
                channels,
                heads: level.heads,
                depth: level.depth,
                context_dim: c.cross_attention_dim,
                groups: c.norm_num_groups,
                linear_projection: c.use_linear_projection,
                upcast_attention: c.upcast_attention,
            },
            vb,
        )
    }

    fn resnet(&self, cin: usize, cout: usize, vb: VarBuilder) -> Result<ResnetBlock> {
        ResnetBlock::new(cin, cout, Some(self.temb), self.config.norm_num_groups, self.config.norm_eps, vb)
    }

    fn layer(&self, level: &Level, cin: usize, cout: usize, vb: &VarBuilder, j: usize) -> Result<Layer> {
        Ok(Layer {
            resnet: self.resnet(cin, cout, vb.pp(format!("resnets.{j}")))?,
            attention: if level.attention {
                Some(self.transformer(level, cout, vb.pp(format!("attentions.{j}")))?)
            } else {
                None
            },
        })
    }
}

impl Encoder {
    pub fn new(config: &UNetConfig, vb: &VarBuilder) -> anyhow::Result<Self> {
        let levels = config.levels()?;
        let n = levels.len();
        let c0 = levels[0].channels;
        let temb = 4 * c0;
        let b = Builder { config, temb };
        let mut down = Vec::with_capacity(n);
        let mut cin = c0;
        for (i, level) in levels.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let layers = (0..config.layers_per_block)
                .map(|j| {
                    let from = if j == 0 { cin } else { level.channels };
                    b.layer(level, from, level.channels, &vb, j)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample =
                if i + 1 < n { Some(Downsample::new(level.channels, false, vb.pp("downsamplers.0"))?) } else { None };
            down.push(DownBlock { layers, downsample });
            cin = level.channels;
        }
        let last = &levels[n - 1];
        let mid_vb = vb.pp("mid_block");
        let mid = (
            b.resnet(last.channels, last.channels, mid_vb.pp("resnets.0"))?,
            b.transformer(last, last.channels, mid_vb.pp("attentions.0"))?,
            b.resnet(last.channels, last.channels, mid_vb.pp("resnets.1"))?,
        );
        let text_time = config.other.get("addition_embed_type").and_then(|v| v.as_str()) == Some("text_time");
        let add_embedding =
            match (text_time, config.addition_time_embed_dim, config.projection_class_embeddings_input_dim) {
                (false, ..) => None,
                (true, Some(time_dim), Some(input)) => Some(AddEmbedding {
                    time_dim,
                    linear_1: linear(input, temb, vb.pp("add_embedding.linear_1"))?,
                    linear_2: linear(temb, temb, vb.pp("add_embedding.linear_2"))?,
                }),
                _ => bail!(
                "addition_embed_type text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim"
            ),
            };
        Ok(Self {
            add_embedding,
            time_proj_dim: c0,
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
            time_linear_1: linear(c0, temb, vb.pp("time_embedding.linear_1"))?,
            time_linear_2: linear(temb, temb, vb.pp("time_embedding.linear_2"))?,
            cond_proj: match config.time_cond_proj_dim {
                Some(d) => Some(candle_nn::linear_no_bias(d, c0, vb.pp("time_embedding.cond_proj"))?),
                None => None,
            },
            conv_in: conv3x3_same(config.in_channels, c0, vb.pp("conv_in"))?,
            down,
            mid,
        })
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.conv_in.weight().dtype()
    }

    /// The timestep embedding of a batch of `sample`'s size and dtype at
    /// timestep `t` (with LCM's guidance and SDXL's added embeddings).
    pub fn embed(
        &self,
        sample: &Tensor,
        t: f32,
        guidance: Option<&Tensor>,
        text_time: Option<&TextTime>,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let mut feats = sinusoids(&[t], self.time_proj_dim, self.flip_sin_to_cos, self.freq_shift, sample.device())?
            .repeat((batch, 1))?;
        feats = feats.to_dtype(sample.dtype())?;
        if let (Some(proj), Some(g)) = (&self.cond_proj, guidance) {
            feats = (feats + proj.forward(g)?)?;
        }
        let temb = self.time_linear_1.forward(&feats)?;
        let temb = self.time_linear_2.forward(&candle_nn::ops::silu(&temb)?)?;
        match (&self.add_embedding, text_time) {
            (Some(add), Some(tt)) => {
                let times =
                    sinusoids(tt.time_ids, add.time_dim, self.flip_sin_to_cos, self.freq_shift, sample.device())?
                        .reshape((batch, ()))?;
                let input = Tensor::cat(&[&tt.text_embeds.to_dtype(DType::F32)?, &times], 1)?.to_dtype(temb.dtype())?;
                let aug = add.linear_2.forward(&candle_nn::ops::silu(&add.linear_1.forward(&input)?)?)?;
                temb + aug
            }
            (Some(_), None) => Err(candle_core::Error::Msg(
                "this UNet (SDXL) needs pooled text embeddings and size conditioning".into(),
            )),
            (None, _) => Ok(temb),
        }
    }

    /// `conv_in` of the sample.
    pub fn conv_in(&self, sample: &Tensor) -> Result<Tensor> {
        self.conv_in.forward(sample)
    }

    /// The down and mid blocks from `conv_in`'s output `h`: the mid block's
    /// output and every skip connection (`conv_in`'s output first).
    pub fn down_mid(&self, h: Tensor, temb: &Tensor, context: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = h;
        let mut skips = vec![h.clone()];
        for block in &self.down {
            for layer in &block.layers {
                h = layer.forward(&h, temb, context)?;
                skips.push(h.clone());
            }
            if let Some(d) = &block.downsample {
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
        }
        h = self.mid.0.forward(&h, Some(temb))?;
        h = self.mid.1.forward(&h, context)?;
        h = self.mid.2.forward(&h, Some(temb))?;
        Ok((h, skips))
    }
}

/// What a ControlNet adds to a UNet: one tensor per skip connection and
/// one for the mid block's output (broadcast over space when pooled).
#[derive(Debug)]
pub struct Residuals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl Residuals {
    /// The sum of two ControlNets' residuals.
    pub fn add(&self, other: &Residuals) -> Result<Residuals> {
        let down = self.down.iter().zip(&other.down).map(|(a, b)| a.broadcast_add(b)).collect::<Result<_>>()?;
        Ok(Residuals { down, mid: self.mid.broadcast_add(&other.mid)? })
    }
}

#[derive(Debug)]
pub struct UNet {
    encoder: Encoder,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: UNetConfig,
}

impl UNet {
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let levels = config.levels()?;
        let n = levels.len();
        let c0 = levels[0].channels;
        let b = Builder { config, temb: 4 * c0 };
        let encoder = Encoder::new(config, &vb)?;
        let mut up = Vec::with_capacity(n);
        let mut prev = levels[n - 1].channels;
        for i in 0..n {
            let level = &levels[n - 1 - i];
            let skip_in = levels[(n - 1 - i).saturating_sub(1)].channels;
            let vb = vb.pp(format!("up_blocks.{i}"));
            let count = config.layers_per_block + 1;
            let layers = (0..count)
                .map(|j| {
                    let from = if j == 0 { prev } else { level.channels };
                    let skip = if j + 1 == count { skip_in } else { level.channels };
                    b.layer(level, from + skip, level.channels, &vb, j)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < n { Some(Upsample::new(level.channels, vb.pp("upsamplers.0"))?) } else { None };
            up.push(UpBlock { layers, upsample });
            prev = level.channels;
        }
        Ok(Self {
            encoder,
            up,
            conv_norm_out: GroupNorm::new(config.norm_num_groups, c0, config.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3_same(c0, config.out_channels, vb.pp("conv_out"))?,
            config: config.clone(),
        })
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> candle_core::DType {
        self.encoder.dtype()
    }

    pub fn device(&self) -> candle_core::Device {
        self.encoder.conv_in.weight().device().clone()
    }

    /// Predicts the model output for `sample: (B, C, H, W)` at timestep `t`
    /// under `context: (B, L, D)`; LCM UNets also take `guidance: (B, d)`,
    /// the embedded guidance scale.
    pub fn forward(&self, sample: &Tensor, t: f32, context: &Tensor, guidance: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with(sample, t, context, guidance, None, None)
    }

    /// [`UNet::forward`] with SDXL's pooled text and size conditioning, which
    /// SDXL UNets require, and ControlNets' residuals added to the skip
    /// connections and the mid block's output.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        t: f32,
        context: &Tensor,
        guidance: Option<&Tensor>,
        text_time: Option<&TextTime>,
        control: Option<&Residuals>,
    ) -> Result<Tensor> {
        let temb = self.encoder.embed(sample, t, guidance, text_time)?;
        let (mut h, mut skips) = self.encoder.down_mid(self.encoder.conv_in(sample)?, &temb, context)?;
        if let Some(r) = control {
            if r.down.len() != skips.len() {
                candle_core::bail!("{} ControlNet residuals for {} skip connections", r.down.len(), skips.len());
            }
            for (skip, add) in skips.iter_mut().zip(&r.down) {
                *skip = skip.broadcast_add(add)?;
            }
            h = h.broadcast_add(&r.mid)?;
        }
        for block in &self.up {
            for layer in &block.layers {
                let skip = skips.pop().expect("one skip per up layer");
                h = layer.forward(&Tensor::cat(&[&h, &skip], 1)?, &temb, context)?;
            }
            if let Some(u) = &block.upsample {
                let (_, _, sh, sw) = skips.last().expect("skip after upsample").dims4()?;
                h = u.forward(&h, (sh, sw))?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// Sinusoidal features of `values`, `(N, dim)`, computed in f32 as
/// diffusers' `Timesteps` does (cosines first with `flip`).
pub fn sinusoids(values: &[f32], dim: usize, flip: bool, shift: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let ln_period = -(10000f64.ln() as f32);
    let denom = (half - shift) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (ln_period * i as f32 / denom).exp()).collect();
    let rows: Vec<f32> = values
        .iter()
        .flat_map(|&t| {
            let (sin, cos): (Vec<f32>, Vec<f32>) = freqs.iter().map(|f| ((t * f).sin(), (t * f).cos())).unzip();
            if flip {
                [cos, sin].concat()
            } else {
                [sin, cos].concat()
            }
        })
        .collect();
    Tensor::from_vec(rows, (values.len(), 2 * half), device)
}

/// The LCM guidance-scale embedding of `w` (diffusers' `get_guidance_scale_embedding`):
/// sinusoids of `1000·w`, computed in f32, `(1, dim)`.
pub fn guidance_embedding(w: f32, dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let args: Vec<f32> = (0..half).map(|i| w * 1000.0 * (i as f32 * -step).exp()).collect();
    let mut row: Vec<f32> = args.iter().map(|a| a.sin()).chain(args.iter().map(|a| a.cos())).collect();
    row.resize(dim, 0.0);
    Tensor::from_vec(row, (1, dim), device)
}
