//! The CLIP text encoder (transformers' `CLIPTextModel`): token and position
//! embeddings, pre-norm transformer layers with causal attention, final norm.

use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use crate::ops::{attention, Linear};

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · σ(1.702 x)`, OpenAI CLIP ViT-L (SD 1.x).
    QuickGelu,
    /// Exact (erf) GELU, OpenCLIP encoders.
    Gelu,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "ln_eps")]
    pub layer_norm_eps: f64,
    /// The pooled output's width (`CLIPTextModelWithProjection`).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn seventy_seven() -> usize {
    77
}
fn quick_gelu() -> Activation {
    Activation::QuickGelu
}
fn ln_eps() -> f64 {
    1e-5
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(c: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: Linear::new(d, d, attn.pp("q_proj"))?,
            k_proj: Linear::new(d, d, attn.pp("k_proj"))?,
            v_proj: Linear::new(d, d, attn.pp("v_proj"))?,
            out_proj: Linear::new(d, d, attn.pp("out_proj"))?,
            layer_norm2: layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: Linear::new(d, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: Linear::new(c.intermediate_size, d, vb.pp("mlp.fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor, heads: usize, act: Activation) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let (q, k, v) = (self.q_proj.forward(&h)?, self.k_proj.forward(&h)?, self.v_proj.forward(&h)?);
        let x = self.out_proj.forward_add(&attention(&q, &k, &v, heads, true, false)?, x)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = match act {
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        self.fc2.forward_add(&h, &x)
    }
}

#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    pub config: ClipConfig,
}

impl ClipTextModel {
    pub fn new(c: &ClipConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            anyhow::bail!("hidden_size {} is not divisible into {} heads", c.hidden_size, c.num_attention_heads);
        }
        let emb = vb.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(c, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding: embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: embedding(c.max_position_embeddings, c.hidden_size, emb.pp("position_embedding"))?,
            layers,
            final_layer_norm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?,
            config: c.clone(),
        })
    }

    /// `ids: (B, L)` (u32) → the last hidden state after the final layer norm, `(B, L, D)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, last) = self.hidden_states(ids, self.layers.len())?;
        self.final_layer_norm.forward(&last)
    }

    /// The final layer norm, applied to any hidden state (SD 1.x/2.x with clip skip).
    pub fn final_norm(&self, states: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(states)
    }

    /// The hidden state after the first `keep` layers (no final norm: what
    /// SDXL conditions on, with `keep` = all but the last) and after all of
    /// them, both `(B, L, D)`.
    pub fn hidden_states(&self, ids: &Tensor, keep: usize) -> Result<(Tensor, Tensor)> {
        self.hidden_states_with(ids, keep, &[])
    }

    /// [`ClipTextModel::hidden_states`] of one row of `ids` whose token
    /// embeddings from each `(position, (n, D) vectors)` on are replaced
    /// (textual inversion).
    pub fn hidden_states_with(&self, ids: &Tensor, keep: usize, fixes: &[(usize, Tensor)]) -> Result<(Tensor, Tensor)> {
        let len = ids.dim(1)?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?;
        let mut tokens = self.token_embedding.forward(ids)?;
        for (pos, vectors) in fixes {
            let n = vectors.dim(0)?.min(len.saturating_sub(*pos));
            let vectors =
                vectors.narrow(0, 0, n)?.to_dtype(tokens.dtype())?.to_device(tokens.device())?.unsqueeze(0)?;
            let mut parts = vec![tokens.narrow(1, 0, *pos)?, vectors];
            if pos + n < len {
                parts.push(tokens.narrow(1, pos + n, len - pos - n)?);
            }
            tokens = Tensor::cat(&parts, 1)?;
        }
        let mut x = tokens.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mut kept = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, self.config.num_attention_heads, self.config.hidden_act)?;
            if i + 1 == keep {
                kept = x.clone();
            }
        }
        Ok((kept, x))
    }

    /// The pooled text embedding `(B, P)` of transformers'
    /// `CLIPTextModelWithProjection` (SDXL's second encoder): the final-normed
    /// `last` hidden state at each row's end token — the first largest id, as
    /// transformers does for these configs — through `projection` (none:
    /// SD 3's CLIP-L, whose projection is the identity).
    pub fn pooled(&self, last: &Tensor, ids: &Tensor, projection: Option<&candle_nn::Linear>) -> Result<Tensor> {
        let rows: Vec<Vec<u32>> = ids.to_dtype(candle_core::DType::U32)?.to_vec2()?;
        let normed = self.final_layer_norm.forward(last)?;
        let picked = rows
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let end = row.iter().enumerate().fold(0, |best, (i, &id)| if id > row[best] { i } else { best });
                normed.get(b)?.get(end)?.unsqueeze(0)
            })
            .collect::<Result<Vec<_>>>()?;
        let picked = Tensor::cat(&picked, 0)?;
        match projection {
            Some(p) => p.forward(&picked),
            None => Ok(picked),
        }
    }
}
