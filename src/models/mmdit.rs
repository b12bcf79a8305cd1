//! SD 3's MMDiT (diffusers' `SD3Transformer2DModel`): the latents cut into
//! patches with a learned positional table cropped around its centre, the
//! text as a second token stream, joint-attention blocks modulated by the
//! timestep and pooled text (adaLN-Zero), SD 3.5 Medium's extra image-only
//! attention (MMDiT-X) and per-head RMS norms on queries and keys.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::blocks::{plain_layer_norm, RmsNorm};
use crate::ops::{attention, Conv2d, Linear};

#[derive(Debug, Clone, Deserialize)]
pub struct MmditConfig {
    #[serde(default = "super::value::<2>")]
    pub patch_size: usize,
    #[serde(default = "super::value::<16>")]
    pub in_channels: usize,
    #[serde(default = "super::value::<16>")]
    pub out_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub pos_embed_max_size: usize,
    /// Blocks with the second, image-only attention (SD 3.5 Medium).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `rms_norm` on each head's queries and keys (SD 3.5), or none (SD 3).
    #[serde(default)]
    pub qk_norm: Option<String>,
}

/// Width of the timestep's sinusoids.
const TIME_CHANNELS: usize = 256;
/// The norms' epsilon everywhere in the MMDiT.
const EPS: f64 = 1e-6;

/// `Linear → SiLU → Linear` (diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection`).
#[derive(Debug)]
struct Mlp {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp {
    fn new(cin: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(cin, dim, vb.pp("linear_1"))?,
            linear_2: Linear::new(dim, dim, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&candle_nn::ops::silu(&self.linear_1.forward(x)?)?)
    }
}

/// diffusers' `Attention` with the SD 3 joint processor: q/k/v of the image
/// tokens, of the text tokens too when `added` (`add_*_proj`), attended
/// together (image first), each stream projected back out.
#[derive(Debug)]
struct JointAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norms: Option<(RmsNorm, RmsNorm)>,
    added: Option<Added>,
    heads: usize,
}

/// The text stream's projections; the last block has no output one.
#[derive(Debug)]
struct Added {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Option<Linear>,
    norms: Option<(RmsNorm, RmsNorm)>,
}

impl JointAttention {
    fn new(c: &MmditConfig, added: bool, context_out: bool, vb: VarBuilder) -> Result<Self> {
        let (dim, d) = (c.num_attention_heads * c.attention_head_dim, c.attention_head_dim);
        let norms = |q: &str, k: &str| -> Result<Option<(RmsNorm, RmsNorm)>> {
            Ok(match c.qk_norm.as_deref() {
                Some(_) => Some((RmsNorm::new(d, EPS, vb.pp(q))?, RmsNorm::new(d, EPS, vb.pp(k))?)),
                None => None,
            })
        };
        let added = if added {
            Some(Added {
                q: Linear::new(dim, dim, vb.pp("add_q_proj"))?,
                k: Linear::new(dim, dim, vb.pp("add_k_proj"))?,
                v: Linear::new(dim, dim, vb.pp("add_v_proj"))?,
                out: if context_out { Some(Linear::new(dim, dim, vb.pp("to_add_out"))?) } else { None },
                norms: norms("norm_added_q", "norm_added_k")?,
            })
        } else {
            None
        };
        Ok(Self {
            to_q: Linear::new(dim, dim, vb.pp("to_q"))?,
            to_k: Linear::new(dim, dim, vb.pp("to_k"))?,
            to_v: Linear::new(dim, dim, vb.pp("to_v"))?,
            to_out: Linear::new(dim, dim, vb.pp("to_out.0"))?,
            norms: norms("norm_q", "norm_k")?,
            added,
            heads: c.num_attention_heads,
        })
    }

    /// RMS-normalises each head of `x: (B, L, H·d)`.
    fn per_head(x: Tensor, norm: Option<&RmsNorm>, heads: usize) -> Result<Tensor> {
        let Some(norm) = norm else { return Ok(x) };
        let (b, l, _) = x.dims3()?;
        norm.forward(&x.reshape((b, l, heads, ()))?)?.reshape((b, l, ()))
    }

    /// The image stream's output and, with `context`, the text stream's.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let h = self.heads;
        let (nq, nk) = (self.norms.as_ref().map(|n| &n.0), self.norms.as_ref().map(|n| &n.1));
        let mut q = Self::per_head(self.to_q.forward(x)?, nq, h)?;
        let mut k = Self::per_head(self.to_k.forward(x)?, nk, h)?;
        let mut v = self.to_v.forward(x)?;
        let n = x.dim(1)?;
        if let (Some(a), Some(ctx)) = (&self.added, context) {
            let (nq, nk) = (a.norms.as_ref().map(|n| &n.0), a.norms.as_ref().map(|n| &n.1));
            q = Tensor::cat(&[&q, &Self::per_head(a.q.forward(ctx)?, nq, h)?], 1)?;
            k = Tensor::cat(&[&k, &Self::per_head(a.k.forward(ctx)?, nk, h)?], 1)?;
            v = Tensor::cat(&[&v, &a.v.forward(ctx)?], 1)?;
        }
        let out = attention(&q, &k, &v, h, false, false)?;
        let image = self.to_out.forward(&out.narrow(1, 0, n)?)?;
        let text = match (&self.added, context) {
            (Some(Added { out: Some(proj), .. }), Some(ctx)) => {
                Some(proj.forward(&out.narrow(1, n, ctx.dim(1)?)?)?)
            }
            _ => None,
        };
        Ok((image, text))
    }
}

/// `Linear(4·dim) → tanh-GELU → Linear(dim)`.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj: Linear::new(dim, 4 * dim, vb.pp("net.0.proj"))?,
            out: Linear::new(4 * dim, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.proj.forward(x)?.gelu()?)
    }
}

/// `(B, D)` rows of modulation, `k` of them side by side in `m: (B, k·D)`.
fn chunks(m: &Tensor, k: usize) -> Result<Vec<Tensor>> {
    let d = m.dim(1)? / k;
    (0..k).map(|i| m.narrow(1, i * d, d)?.unsqueeze(1)).collect()
}

/// `norm(x) · (1 + scale) + shift`, the modulation broadcast over tokens.
fn modulate(normed: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    normed.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// diffusers' `JointTransformerBlock`.
#[derive(Debug)]
struct Block {
    /// adaLN-Zero: 6 (or 9 with the second attention) modulations of the image stream.
    norm1: Linear,
    /// The text stream's: 6, or for the last block 2 (scale, shift of its
    /// attention input only: its text output is not used).
    norm1_context: Linear,
    attn: JointAttention,
    attn2: Option<JointAttention>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
}

impl Block {
    fn new(c: &MmditConfig, last: bool, dual: bool, vb: VarBuilder) -> Result<Self> {
        let dim = c.num_attention_heads * c.attention_head_dim;
        Ok(Self {
            norm1: Linear::new(dim, if dual { 9 } else { 6 } * dim, vb.pp("norm1.linear"))?,
            norm1_context: Linear::new(dim, if last { 2 } else { 6 } * dim, vb.pp("norm1_context.linear"))?,
            attn: JointAttention::new(c, true, !last, vb.pp("attn"))?,
            attn2: if dual { Some(JointAttention::new(c, false, false, vb.pp("attn2"))?) } else { None },
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            ff_context: if last { None } else { Some(FeedForward::new(dim, vb.pp("ff_context"))?) },
        })
    }

    /// The image and (except after the last block) text streams after the
    /// block, for `silu_temb` = SiLU of the conditioning embedding.
    fn forward(&self, x: &Tensor, ctx: &Tensor, silu_temb: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let m = chunks(&self.norm1.forward(silu_temb)?, if self.attn2.is_some() { 9 } else { 6 })?;
        let normed = plain_layer_norm(x, EPS)?;
        let h = modulate(&normed, &m[0], &m[1])?;
        let ctx_in = match &self.ff_context {
            Some(_) => {
                let cm = chunks(&self.norm1_context.forward(silu_temb)?, 6)?;
                let h = modulate(&plain_layer_norm(ctx, EPS)?, &cm[0], &cm[1])?;
                (h, Some(cm))
            }
            None => {
                // AdaLayerNormContinuous: scale first, then shift.
                let cm = chunks(&self.norm1_context.forward(silu_temb)?, 2)?;
                (modulate(&plain_layer_norm(ctx, EPS)?, &cm[1], &cm[0])?, None)
            }
        };
        let (attn, ctx_attn) = self.attn.forward(&h, Some(&ctx_in.0))?;
        let mut x = (x + attn.broadcast_mul(&m[2])?)?;
        if let Some(attn2) = &self.attn2 {
            // The second attention reads the same normalised input, modulated by its own shift and scale.
            let (out, _) = attn2.forward(&modulate(&normed, &m[6], &m[7])?, None)?;
            x = (x + out.broadcast_mul(&m[8])?)?;
        }
        let ff = self.ff.forward(&modulate(&plain_layer_norm(&x, EPS)?, &m[3], &m[4])?)?;
        let x = (x + ff.broadcast_mul(&m[5])?)?;
        let ctx = match (ctx_in.1, ctx_attn, &self.ff_context) {
            (Some(cm), Some(ctx_attn), Some(ff_context)) => {
                let ctx = (ctx + ctx_attn.broadcast_mul(&cm[2])?)?;
                let ff = ff_context.forward(&modulate(&plain_layer_norm(&ctx, EPS)?, &cm[3], &cm[4])?)?;
                Some((ctx + ff.broadcast_mul(&cm[5])?)?)
            }
            _ => None,
        };
        Ok((x, ctx))
    }
}

#[derive(Debug)]
pub struct Mmdit {
    patch: Conv2d,
    /// `(1, S·S, D)`: the positional table over an S × S grid of patches.
    pos_embed: Tensor,
    timestep_embedder: Mlp,
    text_embedder: Mlp,
    context_embedder: Linear,
    blocks: Vec<Block>,
    norm_out: Linear,
    proj_out: Linear,
    pub config: MmditConfig,
}

impl Mmdit {
    pub fn new(c: &MmditConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let dim = c.num_attention_heads * c.attention_head_dim;
        if c.caption_projection_dim != dim {
            anyhow::bail!("caption_projection_dim {} differs from the inner width {dim}", c.caption_projection_dim);
        }
        if c.patch_size == 0 || c.num_attention_heads == 0 || c.attention_head_dim == 0 || c.pos_embed_max_size == 0 {
            anyhow::bail!(
                "patch_size, num_attention_heads, attention_head_dim and pos_embed_max_size must be positive"
            );
        }
        if let Some(norm) = c.qk_norm.as_deref().filter(|n| *n != "rms_norm") {
            anyhow::bail!("qk_norm {norm:?} is not supported (SD 3.5 uses rms_norm)");
        }
        let p = c.patch_size;
        let s = c.pos_embed_max_size;
        let blocks = (0..c.num_layers)
            .map(|i| {
                Block::new(
                    c,
                    i + 1 == c.num_layers,
                    c.dual_attention_layers.contains(&i),
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<_>>()?;
        let tt = vb.pp("time_text_embed");
        Ok(Self {
            patch: Conv2d::new(c.in_channels, dim, p, p, 0, vb.pp("pos_embed.proj"))?,
            pos_embed: vb.get((1, s * s, dim), "pos_embed.pos_embed")?,
            timestep_embedder: Mlp::new(TIME_CHANNELS, dim, tt.pp("timestep_embedder"))?,
            text_embedder: Mlp::new(c.pooled_projection_dim, dim, tt.pp("text_embedder"))?,
            context_embedder: Linear::new(c.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            blocks,
            norm_out: Linear::new(dim, 2 * dim, vb.pp("norm_out.linear"))?,
            proj_out: Linear::new(dim, p * p * c.out_channels, vb.pp("proj_out"))?,
            config: c.clone(),
        })
    }

    pub fn dtype(&self) -> candle_core::DType {
        self.pos_embed.dtype()
    }

    pub fn device(&self) -> candle_core::Device {
        self.pos_embed.device().clone()
    }

    /// The positional table's centre `h × w` patches, `(1, h·w, D)`
    /// (diffusers' `cropped_pos_embed`: offsets rounded down).
    fn cropped_pos_embed(&self, h: usize, w: usize) -> Result<Tensor> {
        let s = self.config.pos_embed_max_size;
        if h > s || w > s {
            candle_core::bail!(
                "{h}×{w} patches exceed the positional table's {s}×{s}: the image is too large for this model"
            );
        }
        let (top, left) = ((s - h) / 2, (s - w) / 2);
        let grid = self.pos_embed.reshape((s, s, ()))?;
        grid.narrow(0, top, h)?.narrow(1, left, w)?.reshape((1, h * w, ()))
    }

    /// The velocity for `sample: (B, C, H, W)` at timestep `t` (σ·1000)
    /// under `context: (B, L, joint_attention_dim)` and `pooled: (B, P)`.
    pub fn forward(&self, sample: &Tensor, t: f32, context: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let (b, _, height, width) = sample.dims4()?;
        let p = self.config.patch_size;
        let (h, w) = (height / p, width / p);
        let x = self.patch.forward(sample)?.flatten_from(2)?.transpose(1, 2)?;
        let x = x.broadcast_add(&self.cropped_pos_embed(h, w)?)?;
        let feats = super::unet::sinusoids(&[t], TIME_CHANNELS, true, 0, sample.device())?.repeat((b, 1))?;
        let temb = (self.timestep_embedder.forward(&feats.to_dtype(pooled.dtype())?)?
            + self.text_embedder.forward(pooled)?)?;
        let silu_temb = candle_nn::ops::silu(&temb)?;
        let mut ctx = self.context_embedder.forward(context)?;
        let mut x = x.contiguous()?;
        for block in &self.blocks {
            let (nx, nctx) = block.forward(&x, &ctx, &silu_temb)?;
            x = nx;
            if let Some(c) = nctx {
                ctx = c;
            }
        }
        // AdaLayerNormContinuous: scale first, then shift.
        let m = chunks(&self.norm_out.forward(&silu_temb)?, 2)?;
        let x = self.proj_out.forward(&modulate(&plain_layer_norm(&x, EPS)?, &m[1], &m[0])?)?;
        let c = self.config.out_channels;
        x.reshape(vec![b, h, w, p, p, c])?.permute(vec![0, 5, 1, 3, 2, 4])?.reshape((b, c, h * p, w * p))
    }
}
