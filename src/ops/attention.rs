//! Scaled dot-product attention. The CPU forward works per image, head and
//! block of query rows: it reads each head's columns of `q`, `k` and `v` in
//! their `(B, L, H·d)` layout through GEMM strides and writes its rows of the
//! output in place, so no head is transposed or copied and at most one
//! block's scores per thread exist at a time.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda;
use super::kernels::{assume_init, exp_shifted, for_cpu, input_f32, matmul, output, uninit, Mat};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// Query rows per CPU task: enough to amortise gemm's packing of the head's
/// keys (repeated per task), few enough that a task's scores stay small.
const QUERY_BLOCK: usize = 256;

/// Upper bound on the bytes of one chunk's f32 score matrix in the
/// composition, which materialises all heads' scores of a chunk at once:
/// a 1024² VAE's 16384 tokens take four chunks, not one 16384² matrix.
const GPU_SCORE_BUDGET_BYTES: usize = 256 << 20;

/// `softmax(q kᵀ / √d) v` for `q: (B, Lq, H·d)`, `k, v: (B, Lk, H·d)`, split into
/// `heads` heads; returns `(B, Lq, H·d)`. With `causal`, query `i` sees keys `≤ i`
/// (CLIP's text encoder). With `upcast`, scores and softmax are computed in f32
/// whatever the inputs' dtype (diffusers' `upcast_attention`, for SD 2.1).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool, upcast: bool) -> Result<Tensor> {
    if !q.device().is_cpu() {
        if cfg!(feature = "cuda") && flash_runs(q, k, v, heads)? {
            return q.apply_op3_no_bwd(k, v, &AttentionOp { heads, causal });
        }
        return attention_reference(q, k, v, heads, causal, upcast);
    }
    // The CPU kernel computes in f32 whatever the storage: `upcast` always holds.
    let prepare = |t: &Tensor| {
        let t = for_cpu(t)?;
        if t.stride().last() == Some(&1) {
            Ok(t)
        } else {
            t.contiguous()
        }
    };
    prepare(q)?.apply_op3_no_bwd(&prepare(k)?, &prepare(v)?, &AttentionOp { heads, causal })
}

/// The candle composition, chunked over query rows so that a large image's
/// score matrix never exists all at once: other devices' path and the CPU
/// op's reference in tests.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    upcast: bool,
) -> Result<Tensor> {
    let out_dtype = v.dtype();
    let (q, k) = if upcast { (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?) } else { (q.clone(), k.clone()) };
    let (b, lq, inner) = q.dims3()?;
    let lk = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, l: usize| -> Result<Tensor> { t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous() };
    let q = (split(&q, lq)? * (1.0 / (d as f64).sqrt()))?;
    let kt = split(&k, lk)?.transpose(2, 3)?.contiguous()?;
    let v = split(v, lk)?;
    let rows = (GPU_SCORE_BUDGET_BYTES / (4 * b * heads * lk)).clamp(1, lq);
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
        // The softmax's maximum and sum in f32, whatever the scores' dtype.
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(out_dtype)?;
        outs.push(probs.matmul(&v)?);
        start += n;
    }
    let out = if outs.len() == 1 { outs.pop().expect("one chunk") } else { Tensor::cat(&outs, 2)? };
    out.transpose(1, 2)?.reshape((b, lq, inner))
}

struct AttentionOp {
    heads: usize,
    causal: bool,
}

/// The head widths the CUDA kernel is instantiated for (`flash_attention_d*`):
/// a head is zero-padded to the next one.
const FLASH_HEAD_DIMS: [usize; 7] = [32, 48, 64, 80, 96, 128, 160];

/// Whether the CUDA kernel takes these operands: f16 on a CUDA device,
/// heads of up to 160 features (the VAE's one 512-wide head takes the
/// composition), unit feature strides, and pairs of halves word-aligned
/// (even batch and row strides and offsets). Scores are f32 in the kernel,
/// so `upcast` holds.
fn flash_runs(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<bool> {
    let fits = |t: &Tensor| {
        let st = t.stride();
        t.device().is_cuda()
            && t.dtype() == DType::F16
            && st.len() == 3
            && st[2] == 1
            && st[..2].iter().all(|s| s.is_multiple_of(2))
            && t.layout().start_offset().is_multiple_of(2)
    };
    let inner = q.dim(D::Minus1)?;
    Ok([q, k, v].into_iter().all(fits)
        && heads > 0
        && inner.is_multiple_of(heads)
        && flash_head_dim(inner / heads).is_some())
}

/// The kernel instance for heads of `d` features (even: pairs load as words).
fn flash_head_dim(d: usize) -> Option<usize> {
    FLASH_HEAD_DIMS.into_iter().find(|&p| p >= d).filter(|_| d > 0 && d.is_multiple_of(2))
}

/// Checks a `(B, L, H·d)` operand's shape; returns its length L.
fn seq_len(l: &Layout, b: usize, inner: usize, what: &str) -> Result<usize> {
    let (dims, st) = (l.dims(), l.stride());
    if dims.len() != 3 || dims[0] != b || dims[2] != inner || st[2] != 1 {
        bail!("attention: {what} has shape {dims:?} and strides {st:?}, expected ({b}, L, {inner}) with unit feature stride");
    }
    Ok(dims[1])
}

/// A `(B, L, H·d)` operand as f32: its elements and its batch and row strides.
struct Seq<'a> {
    data: Cow<'a, [f32]>,
    len: usize,
    sb: usize,
    sl: usize,
}

impl<'a> Seq<'a> {
    fn new(s: &'a CpuStorage, l: &Layout, b: usize, inner: usize, what: &str) -> Result<Self> {
        let len = seq_len(l, b, inner, what)?;
        Ok(Self { data: input_f32(s, l)?, len, sb: l.stride()[0], sl: l.stride()[1] })
    }

    /// Head `h` of image `b` from row `r`: a matrix with rows `sl` apart.
    fn head(&self, b: usize, h: usize, d: usize, r: usize) -> Mat {
        Mat::new(self.data[b * self.sb + r * self.sl + h * d..].as_ptr(), self.sl, 1)
    }
}

impl AttentionOp {
    /// The batch and feature width of `q`, checked against the heads.
    fn batch_and_width(&self, q: &Layout) -> Result<(usize, usize)> {
        let &[b, _, inner] = q.dims() else { bail!("attention: q must be (B, L, H·d), got {:?}", q.dims()) };
        if self.heads == 0 || !inner.is_multiple_of(self.heads) {
            bail!("attention: {inner} features do not split into {} heads", self.heads);
        }
        Ok((b, inner))
    }

    fn run(
        &self,
        q: (&CpuStorage, &Layout),
        k: (&CpuStorage, &Layout),
        v: (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let dtype = q.0.dtype();
        let (b, inner) = self.batch_and_width(q.1)?;
        let (q, k, v) = (
            Seq::new(q.0, q.1, b, inner, "q")?,
            Seq::new(k.0, k.1, b, inner, "k")?,
            Seq::new(v.0, v.1, b, inner, "v")?,
        );
        if k.len != v.len {
            bail!("attention: {} keys but {} values", k.len, v.len);
        }
        let (heads, d, lq, lk) = (self.heads, inner / self.heads, q.len, k.len);
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = uninit::<f32>(b * lq * inner);
        let blocks = lq.div_ceil(QUERY_BLOCK);
        let out_ptr = out.as_mut_ptr() as usize;
        (0..b * heads * blocks).into_par_iter().for_each_init(
            || vec![0f32; QUERY_BLOCK * lk],
            |scores, task| {
                let (bi, h, blk) = (task / (heads * blocks), task / blocks % heads, task % blocks);
                let r0 = blk * QUERY_BLOCK;
                let n = QUERY_BLOCK.min(lq - r0);
                let scores = &mut scores[..n * lk];
                // scores (n × lk) = scale · q_h (n × d) · k_hᵀ (d × lk).
                let km = k.head(bi, h, d, 0);
                let kt = Mat { ptr: km.ptr, rs: km.cs, cs: km.rs };
                // SAFETY: the head views address rows r0..r0+n and 0..lk of valid operands.
                unsafe {
                    let qm = q.head(bi, h, d, r0);
                    matmul((n, lk, d), scores.as_mut_ptr(), lk, false, qm, kt, scale, gemm::Parallelism::None)
                };
                // Unnormalised softmax weights; each output row is divided by
                // its row's sum after the value product (d values, not lk).
                let mut sums = [0f32; QUERY_BLOCK];
                for ((i, row), sum) in scores.chunks_mut(lk).enumerate().zip(&mut sums) {
                    // Causal: keys after the query are excluded exactly (zero weight).
                    let seen = if self.causal { (r0 + i + 1).min(lk) } else { lk };
                    *sum = exp_shifted(&mut row[..seen]);
                    row[seen..].iter_mut().for_each(|p| *p = 0.0);
                }
                let dst = (out_ptr as *mut f32).wrapping_add(bi * lq * inner + r0 * inner + h * d);
                let pm = Mat::new(scores.as_ptr(), lk, 1);
                // SAFETY: each task writes its own rows r0..r0+n of head h's columns.
                unsafe { matmul((n, d, lk), dst, inner, false, pm, v.head(bi, h, d, 0), 1.0, gemm::Parallelism::None) };
                for (i, sum) in sums[..n].iter().enumerate() {
                    // SAFETY: row i of this task's block, head h's d columns.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.add(i * inner), d) };
                    row.iter_mut().for_each(|x| *x /= sum);
                }
            },
        );
        // SAFETY: the tasks cover every (image, head, row) of the output.
        let out = unsafe { assume_init(out) };
        Ok((output(out, dtype)?, Shape::from((b, lq, inner))))
    }
}

#[cfg(feature = "cuda")]
impl AttentionOp {
    /// The flash kernel (f16 only; `attention` routes everything else to the composition).
    fn run_cuda(
        &self,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use candle_core::cuda::WrapErr;
        use half::f16;
        let (b, inner) = self.batch_and_width(ql)?;
        let (lq, lk, lv) = (seq_len(ql, b, inner, "q")?, seq_len(kl, b, inner, "k")?, seq_len(vl, b, inner, "v")?);
        if lk != lv {
            bail!("attention: {lk} keys but {lv} values");
        }
        let d = inner / self.heads;
        let Some(dp) = flash_head_dim(d) else { bail!("attention: no CUDA kernel for heads of {d} features") };
        let dev = qs.device();
        let (q, k, v) = (
            cuda::strided_view::<f16>(qs, ql)?,
            cuda::strided_view::<f16>(ks, kl)?,
            cuda::strided_view::<f16>(vs, vl)?,
        );
        // SAFETY: the kernel writes every (row, feature) of the output.
        let mut out = unsafe { dev.alloc::<f16>(b * lq * inner)? };
        let func = cuda::function(dev, &cuda::ATTENTION, &format!("flash_attention_d{dp}"))?;
        let ints = [lq, lk, self.heads, d].map(|v| v as i32);
        let strides = [ql, kl, vl].map(|l| [l.stride()[0] as i64, l.stride()[1] as i64]);
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let causal = self.causal as i32;
        let mut args = func.builder();
        args.arg(&q).arg(&k).arg(&v).arg(&mut out);
        for i in &ints {
            args.arg(i);
        }
        for s in strides.iter().flatten() {
            args.arg(s);
        }
        args.arg(&scale_log2).arg(&causal);
        // SAFETY: the arguments match the kernel's signature; 64 query rows per block, 4 warps.
        unsafe { args.launch(cuda::grid(lq.div_ceil(64), b * self.heads, 1, 128)?) }.w()?;
        Ok((cuda::storage(out, dev), Shape::from((b, lq, inner))))
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sdgen-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), (s3, l3))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run_cuda((s1, l1), (s2, l2), (s3, l3))
    }
}
