//! The T5 v1.1 encoder (transformers' `T5EncoderModel`), SD 3.5's third text
//! encoder: token embeddings, pre-norm layers of unscaled self-attention
//! with a bucketed relative-position bias (computed by the first layer,
//! shared by all) and a gated-GELU feed-forward, RMS norms, no biases.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::Deserialize;

use super::blocks::RmsNorm;
use crate::ops::Linear;

#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    /// T5 v1.1: `gated-gelu` (tanh-approximated GELU on the gate).
    #[serde(default = "gated_gelu")]
    pub feed_forward_proj: String,
}

fn buckets() -> usize {
    32
}
fn max_distance() -> usize {
    128
}
fn eps() -> f64 {
    1e-6
}
fn gated_gelu() -> String {
    "gated-gelu".into()
}

#[derive(Debug)]
struct Layer {
    norm1: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm2: RmsNorm,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

impl Layer {
    fn new(c: &T5Config, vb: VarBuilder) -> Result<Self> {
        let inner = c.num_heads * c.d_kv;
        let (attn, ff) = (vb.pp("layer.0.SelfAttention"), vb.pp("layer.1.DenseReluDense"));
        Ok(Self {
            norm1: RmsNorm::new(c.d_model, c.layer_norm_epsilon, vb.pp("layer.0.layer_norm"))?,
            q: Linear::no_bias(c.d_model, inner, attn.pp("q"))?,
            k: Linear::no_bias(c.d_model, inner, attn.pp("k"))?,
            v: Linear::no_bias(c.d_model, inner, attn.pp("v"))?,
            o: Linear::no_bias(inner, c.d_model, attn.pp("o"))?,
            norm2: RmsNorm::new(c.d_model, c.layer_norm_epsilon, vb.pp("layer.1.layer_norm"))?,
            wi_0: Linear::no_bias(c.d_model, c.d_ff, ff.pp("wi_0"))?,
            wi_1: Linear::no_bias(c.d_model, c.d_ff, ff.pp("wi_1"))?,
            wo: Linear::no_bias(c.d_ff, c.d_model, ff.pp("wo"))?,
        })
    }

    /// `bias`: `(1, H, L, L)`, added to the unscaled scores.
    fn forward(&self, x: &Tensor, bias: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let h = self.norm1.forward(x)?;
        let split = |t: Tensor| t.reshape((b, l, heads, ()))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(self.q.forward(&h)?)?, split(self.k.forward(&h)?)?, split(self.v.forward(&h)?)?);
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let attended = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, l, ()))?;
        let x = self.o.forward_add(&attended, x)?;
        let h = self.norm2.forward(&x)?;
        let gated = (self.wi_0.forward(&h)?.gelu()? * self.wi_1.forward(&h)?)?;
        self.wo.forward_add(&gated, &x)
    }
}

#[derive(Debug)]
pub struct T5Encoder {
    embed: Embedding,
    /// `(buckets, heads)`: the first layer's relative-position bias table.
    relative_bias: Embedding,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    pub config: T5Config,
}

impl T5Encoder {
    /// `vb` at the model's root (`encoder.*`, and `shared` for the tokens).
    pub fn new(c: &T5Config, vb: VarBuilder) -> anyhow::Result<Self> {
        // Half the buckets per direction, half of those exact, the rest
        // logarithmic up to the max distance: fewer than 4 leaves none.
        let exact = c.relative_attention_num_buckets / 4;
        if exact == 0 || c.relative_attention_max_distance <= exact || c.num_heads == 0 || c.d_kv == 0 {
            anyhow::bail!(
                "T5 config: {} relative-position buckets up to distance {}, {} heads of {}: unsupported",
                c.relative_attention_num_buckets,
                c.relative_attention_max_distance,
                c.num_heads,
                c.d_kv
            );
        }
        if c.feed_forward_proj != "gated-gelu" {
            anyhow::bail!("T5 feed_forward_proj {:?} is not supported (T5 v1.1 is gated-gelu)", c.feed_forward_proj);
        }
        let enc = vb.pp("encoder");
        // Files keep the token table as `shared` or `encoder.embed_tokens` (or both).
        let tokens = if vb.contains_tensor("shared.weight") { vb.pp("shared") } else { enc.pp("embed_tokens") };
        let block = |i: usize| enc.pp(format!("block.{i}"));
        Ok(Self {
            embed: embedding(c.vocab_size, c.d_model, tokens)?,
            relative_bias: embedding(
                c.relative_attention_num_buckets,
                c.num_heads,
                block(0).pp("layer.0.SelfAttention.relative_attention_bias"),
            )?,
            layers: (0..c.num_layers).map(|i| Layer::new(c, block(i))).collect::<Result<_>>()?,
            final_norm: RmsNorm::new(c.d_model, c.layer_norm_epsilon, enc.pp("final_layer_norm"))?,
            config: c.clone(),
        })
    }

    /// The last hidden states `(B, L, D)` of token ids `(B, L)`, no mask.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let l = ids.dim(1)?;
        let buckets = relative_buckets(l, &self.config, ids.device())?;
        let bias = self.relative_bias.forward(&buckets)?.permute((2, 0, 1))?.unsqueeze(0)?;
        let mut x = self.embed.forward(ids)?;
        let bias = bias.to_dtype(x.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias, self.config.num_heads)?;
        }
        self.final_norm.forward(&x)
    }
}

/// transformers' bidirectional `_relative_position_bucket` of key − query
/// for every pair of `l` positions, `(L, L)`: half the buckets per sign,
/// exact below a quarter of them, then logarithmic up to the max distance
/// (computed in f32 as torch does).
fn relative_buckets(l: usize, c: &T5Config, device: &Device) -> Result<Tensor> {
    let half = (c.relative_attention_num_buckets / 2) as i64;
    let exact = half / 2;
    let log_span = ((c.relative_attention_max_distance as f64) / exact as f64).ln() as f32;
    let bucket = |rel: i64| -> u32 {
        let sign = if rel > 0 { half } else { 0 };
        let n = rel.abs();
        let b = if n < exact {
            n
        } else {
            let large = exact + ((n as f32 / exact as f32).ln() / log_span * (half - exact) as f32) as i64;
            large.min(half - 1)
        };
        (sign + b) as u32
    };
    let values: Vec<u32> = (0..l as i64).flat_map(|q| (0..l as i64).map(move |k| bucket(k - q))).collect();
    Tensor::from_vec(values, (l, l), device)
}
