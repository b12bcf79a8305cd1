//! Text conditioning: prompts → what a backbone attends to. The
//! [`TextConditioner`] seam hides the text encoders of a family (one or two
//! CLIP encoders; SD 3's CLIP pair and T5); the A1111 padding of prompts and
//! negative prompts to a common length works over any of them.

use candle_core::{DType, Device, Tensor};

use crate::loading::embeddings::Embedding;
use crate::models::clip::ClipTextModel;
use crate::models::t5::T5Encoder;
use crate::prompt::{self, Chunk};
use crate::request::{Request, TextOptions};
use crate::sampling::denoiser::TextEmbedding;
use crate::tokenizer::ClipTokenizer;

/// A family's text encoders: a prompt's conditioning.
pub trait TextConditioner {
    /// The conditioning of `text`, `(1, L, D)` with `L` a whole number of
    /// chunks, using `embeddings` where the prompt names them; also what
    /// the prompt parser warned about.
    fn encode(
        &self,
        text: &str,
        opts: &TextOptions,
        embeddings: &[Embedding],
        device: &Device,
    ) -> anyhow::Result<(TextEmbedding, Vec<String>)>;

    /// Whether an empty negative prompt conditions on zeros instead of the
    /// encoded "" (diffusers' `force_zeros_for_empty_prompt`).
    fn zero_empty_negative(&self) -> bool;

    /// Tokens at the end of every context that do not come in chunks (SD 3's
    /// T5 states): padding to a common length goes before them.
    fn trailing_tokens(&self) -> usize {
        0
    }
}

/// A text encoder whose pooled, projected output also conditions the UNet
/// (SDXL's second).
pub struct PooledTextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
    pub projection: candle_nn::Linear,
}

/// One CLIP text encoder (SD 1.x, 2.x) or two, the second pooled (SDXL).
pub struct ClipText {
    pub tokenizer: ClipTokenizer,
    pub encoder: ClipTextModel,
    pub pooled: Option<PooledTextEncoder>,
    /// True for SDXL (A1111 does the same).
    pub zero_empty_negative: bool,
    /// SD 3: the first encoder's pooled output (unprojected) comes before
    /// the second's.
    pub pool_both: bool,
}

impl ClipText {
    /// The widths of the encoders' token embeddings, in order.
    pub fn widths(&self) -> Vec<usize> {
        let mut widths = vec![self.encoder.config.hidden_size];
        widths.extend(self.pooled.as_ref().map(|e| e.model.config.hidden_size));
        widths
    }
}

impl TextConditioner for ClipText {
    /// Per chunk the text encoder's final-normed hidden state (the last
    /// layer, or `clip_skip − 1` earlier); for SDXL both encoders' states
    /// one layer earlier without the norm, side by side, and the second
    /// encoder's pooled output of the first chunk. Weighted tokens are
    /// scaled, then each chunk is rescaled to its unweighted mean (A1111's
    /// emphasis).
    fn encode(
        &self,
        text: &str,
        opts: &TextOptions,
        embeddings: &[Embedding],
        device: &Device,
    ) -> anyhow::Result<(TextEmbedding, Vec<String>)> {
        let chunk_of = |tokenizer: &ClipTokenizer| {
            let names: Vec<(Vec<u32>, usize)> =
                embeddings.iter().map(|e| (tokenizer.encode(&e.name), e.len())).collect();
            prompt::chunk_with(tokenizer, text, opts.syntax, &names)
        };
        let first = chunk_of(&self.tokenizer);
        let second = self.pooled.as_ref().map(|enc| (enc, chunk_of(&enc.tokenizer)));
        let skip = opts.clip_skip.max(1);
        // Layers kept: SD 1.x/2.x end `clip_skip − 1` layers early (then the
        // final norm), SDXL one more (no norm), as diffusers' `clip_skip`.
        let keep = |model: &ClipTextModel, extra: usize| -> anyhow::Result<usize> {
            let layers = model.config.num_hidden_layers;
            (layers + 1)
                .checked_sub(skip + extra)
                .ok_or_else(|| anyhow::anyhow!("--clip-skip {skip} is more than this text encoder's {layers} layers"))
        };
        let ids_of = |c: &Chunk| -> candle_core::Result<Tensor> { Tensor::new(c.ids.as_slice(), device)?.unsqueeze(0) };
        let mut contexts = Vec::new();
        let mut pooled = None;
        // Each embedding's vectors for text encoder `encoder`, where a chunk uses them.
        let fixes = |c: &Chunk, encoder: usize| -> Vec<(usize, Tensor)> {
            c.fixes.iter().map(|&(p, e)| (p, embeddings[e].vectors[encoder].clone())).collect()
        };
        for (i, chunk) in first.chunks.iter().enumerate() {
            let ids = ids_of(chunk)?;
            let context = match &second {
                None => {
                    let keep = keep(&self.encoder, 0)?;
                    let (states, _) = self.encoder.hidden_states_with(&ids, keep, &fixes(chunk, 0))?;
                    emphasize(&self.encoder.final_norm(&states)?, &chunk.weights)?
                }
                Some((enc, chunked)) => {
                    let Some(chunk2) = chunked.chunks.get(i) else {
                        anyhow::bail!("the two tokenizers split the prompt differently");
                    };
                    let keep1 = keep(&self.encoder, 1)?;
                    let (a, last1) = self.encoder.hidden_states_with(&ids, keep1, &fixes(chunk, 0))?;
                    let ids2 = ids_of(chunk2)?;
                    let (b, last) = enc.model.hidden_states_with(&ids2, keep(&enc.model, 1)?, &fixes(chunk2, 1))?;
                    if i == 0 {
                        let second = enc.model.pooled(&last, &ids2, Some(&enc.projection))?;
                        pooled = Some(if self.pool_both {
                            Tensor::cat(&[&self.encoder.pooled(&last1, &ids, None)?, &second], 1)?
                        } else {
                            second
                        });
                    }
                    Tensor::cat(&[emphasize(&a, &chunk.weights)?, emphasize(&b, &chunk2.weights)?], 2)?
                }
            };
            contexts.push(context);
        }
        Ok((TextEmbedding { context: Tensor::cat(&contexts, 1)?, pooled }, first.warnings))
    }

    fn zero_empty_negative(&self) -> bool {
        self.zero_empty_negative
    }
}

/// The text conditioning of a batch: the prompts' and, when `guided`, the
/// negative prompts'. Shorter ones get empty-prompt chunks appended up to
/// the longest (A1111's padding of prompt and negative prompt). `warn`
/// receives what the prompt parser warned about.
pub fn encode_prompts(
    text: &dyn TextConditioner,
    embeddings: &[Embedding],
    reqs: &[Request],
    guided: bool,
    device: &Device,
    warn: &mut dyn FnMut(String),
) -> anyhow::Result<(TextEmbedding, Option<TextEmbedding>)> {
    let mut encode = |prompt: &str, opts: &TextOptions| -> anyhow::Result<TextEmbedding> {
        let (embedding, warnings) = text.encode(prompt, opts, embeddings, device)?;
        warnings.into_iter().for_each(&mut *warn);
        Ok(embedding)
    };
    let mut encoded = Vec::new();
    for r in reqs {
        let cond = encode(&r.prompt, &r.text)?;
        let uncond = if guided { Some(encode(&r.negative_prompt, &r.text)?) } else { None };
        encoded.push((cond, uncond));
    }
    // Prompts of fewer chunks than the longest (of the batch, negative
    // prompts included) get empty-prompt chunks appended, as in A1111.
    let longest = encoded.iter().flat_map(|(c, u)| [Some(c), u.as_ref()]).flatten().map(|e| e.context.dim(1));
    let longest = longest.collect::<candle_core::Result<Vec<_>>>()?.into_iter().max().unwrap_or(0);
    let mut conds = Vec::new();
    let mut unconds = Vec::new();
    for (r, (cond, uncond)) in reqs.iter().zip(encoded) {
        let tail = text.trailing_tokens();
        let mut pad = |e: TextEmbedding| -> anyhow::Result<TextEmbedding> {
            let mut context = e.context;
            while context.dim(1)? < longest {
                let empty = encode("", &r.text)?.context;
                let (len, empty_len) = (context.dim(1)? - tail, empty.dim(1)? - tail);
                let parts = [context.narrow(1, 0, len)?, empty.narrow(1, 0, empty_len)?, context.narrow(1, len, tail)?];
                context = Tensor::cat(&parts, 1)?;
            }
            Ok(TextEmbedding { context, pooled: e.pooled })
        };
        conds.push(pad(cond)?);
        if let Some(u) = uncond {
            let u = pad(u)?;
            unconds.push(if text.zero_empty_negative() && r.negative_prompt.is_empty() {
                TextEmbedding {
                    context: u.context.zeros_like()?,
                    pooled: u.pooled.map(|p| p.zeros_like()).transpose()?,
                }
            } else {
                u
            });
        }
    }
    let uncond = if guided { Some(TextEmbedding::cat(&unconds)?) } else { None };
    Ok((TextEmbedding::cat(&conds)?, uncond))
}

/// A1111's emphasis: each token's state × its weight, then the chunk
/// rescaled so that its mean is the unweighted one.
fn emphasize(z: &Tensor, weights: &[f32]) -> anyhow::Result<Tensor> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(z.clone());
    }
    let dtype = z.dtype();
    let z = z.to_dtype(DType::F32)?;
    let w = Tensor::new(weights, z.device())?.reshape((1, weights.len(), 1))?;
    let weighted = z.broadcast_mul(&w)?;
    let before = z.mean_all()?.to_scalar::<f32>()?;
    let after = weighted.mean_all()?.to_scalar::<f32>()?;
    Ok((weighted * (before / after) as f64)?.to_dtype(dtype)?)
}

/// SD 3's T5 with its tokenizer (`tokenizer.json`).
pub struct T5Text {
    pub tokenizer: tokenizers::Tokenizer,
    pub model: T5Encoder,
}

impl T5Text {
    /// The encoder's states of `text`, `(1, max_length, D)`: its ids with
    /// `</s>`, truncated and padded with 0 to `max_length`, no attention
    /// mask (diffusers' SD 3 pipelines).
    fn encode(&self, text: &str, max_length: usize, device: &Device) -> anyhow::Result<Tensor> {
        let encoding = self.tokenizer.encode(text, true).map_err(|e| anyhow::anyhow!("T5 tokenizer: {e}"))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > max_length {
            // Keep the end-of-text token, as truncation with special tokens does.
            let eos = *ids.last().expect("not empty");
            ids.truncate(max_length - 1);
            ids.push(eos);
        }
        ids.resize(max_length, 0);
        Ok(self.model.forward(&Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?)?)
    }
}

/// SD 3's text encoders: CLIP-L and OpenCLIP-G as SDXL's pair (penultimate
/// states side by side, zero-padded to T5's width), then T5's states (256
/// zero tokens without T5); pooled: CLIP-L's (unprojected) then CLIP-G's.
/// An empty negative prompt is encoded, not zeroed.
pub struct Sd3Text {
    pub clip: ClipText,
    pub t5: Option<T5Text>,
    /// T5's width (the MMDiT's `joint_attention_dim`).
    pub width: usize,
    /// T5's tokens (diffusers' `max_sequence_length`).
    pub max_length: usize,
}

impl TextConditioner for Sd3Text {
    fn encode(
        &self,
        text: &str,
        opts: &TextOptions,
        embeddings: &[Embedding],
        device: &Device,
    ) -> anyhow::Result<(TextEmbedding, Vec<String>)> {
        let (clip, warnings) = self.clip.encode(text, opts, embeddings, device)?;
        let (b, l, w) = clip.context.dims3()?;
        if w > self.width {
            anyhow::bail!("the CLIP states ({w} wide) are wider than T5's {}", self.width);
        }
        let dtype = clip.context.dtype();
        let padded = Tensor::cat(&[clip.context.clone(), Tensor::zeros((b, l, self.width - w), dtype, device)?], 2)?;
        let t5 = match &self.t5 {
            Some(t5) => t5.encode(&prompt::plain_text(text, opts.syntax), self.max_length, device)?.to_dtype(dtype)?,
            None => Tensor::zeros((1, self.max_length, self.width), dtype, device)?,
        };
        Ok((TextEmbedding { context: Tensor::cat(&[padded, t5], 1)?, pooled: clip.pooled }, warnings))
    }

    fn zero_empty_negative(&self) -> bool {
        false
    }

    fn trailing_tokens(&self) -> usize {
        self.max_length
    }
}

/// A model's text encoders.
pub enum Text {
    Clip(Box<ClipText>),
    Sd3(Box<Sd3Text>),
}

impl Text {
    /// The CLIP encoders (every family has them).
    pub fn clip(&self) -> &ClipText {
        match self {
            Text::Clip(c) => c,
            Text::Sd3(s) => &s.clip,
        }
    }

    pub fn clip_mut(&mut self) -> &mut ClipText {
        match self {
            Text::Clip(c) => c,
            Text::Sd3(s) => &mut s.clip,
        }
    }

    fn conditioner(&self) -> &dyn TextConditioner {
        match self {
            Text::Clip(c) => c.as_ref(),
            Text::Sd3(s) => s.as_ref(),
        }
    }
}

impl TextConditioner for Text {
    fn encode(
        &self,
        text: &str,
        opts: &TextOptions,
        embeddings: &[Embedding],
        device: &Device,
    ) -> anyhow::Result<(TextEmbedding, Vec<String>)> {
        self.conditioner().encode(text, opts, embeddings, device)
    }

    fn zero_empty_negative(&self) -> bool {
        self.conditioner().zero_empty_negative()
    }

    fn trailing_tokens(&self) -> usize {
        self.conditioner().trailing_tokens()
    }
}
