//! Scaled dot-product attention, chunked over queries so that the score
//! matrix of a large image never has to exist in memory all at once.

use candle_core::{DType, Result, Tensor};

/// Upper bound on the bytes of one chunk's f32 score matrix: on the CPU small
/// chunks stay in cache-friendly sizes; GPUs want few, large launches.
const CPU_SCORE_BUDGET_BYTES: usize = 256 << 20;
const GPU_SCORE_BUDGET_BYTES: usize = 2 << 30;

/// `softmax(q kᵀ / √d) v` for `q: (B, Lq, H·d)`, `k, v: (B, Lk, H·d)`, split into
/// `heads` heads; returns `(B, Lq, H·d)`. With `causal`, query `i` sees keys `≤ i`
/// (CLIP's text encoder). With `upcast`, scores and softmax are computed in f32
/// whatever the inputs' dtype (diffusers' `upcast_attention`, for SD 2.1).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool, upcast: bool) -> Result<Tensor> {
    let out_dtype = v.dtype();
    let (q, k) = if upcast { (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?) } else { (q.clone(), k.clone()) };
    let (b, lq, inner) = q.dims3()?;
    let lk = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, l: usize| -> Result<Tensor> { t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous() };
    let q = (split(&q, lq)? * (1.0 / (d as f64).sqrt()))?;
    let kt = split(&k, lk)?.transpose(2, 3)?.contiguous()?;
    let v = split(v, lk)?;
    let budget = if q.device().is_cpu() { CPU_SCORE_BUDGET_BYTES } else { GPU_SCORE_BUDGET_BYTES };
    let rows = (budget / (4 * b * heads * lk)).clamp(1, lq);
    let mut outs = Vec::with_capacity(lq.div_ceil(rows));
    let mut start = 0;
    while start < lq {
        let n = rows.min(lq - start);
        let mut scores = q.narrow(2, start, n)?.matmul(&kt)?;
        if causal {
            let mask: Vec<f32> = (start..start + n)
                .flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (n, lk), q.device())?.to_dtype(q.dtype())?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(out_dtype)?;
        outs.push(probs.matmul(&v)?);
        start += n;
    }
    let out = if outs.len() == 1 { outs.pop().expect("one chunk") } else { Tensor::cat(&outs, 2)? };
    out.transpose(1, 2)?.reshape((b, lq, inner))
}
