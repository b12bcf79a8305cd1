//! What the fused ops share: f32 views of f32 or f16 inputs and weights,
//! output buffers without a zeroing pass, the GEMM call with strides, and
//! vectorisable element loops (exp, softmax weights, GroupNorm's affine + SiLU, GEGLU).

use std::borrow::Cow;
use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};
use half::f16;
use rayon::prelude::*;

/// A CPU op's input as f32 values from its layout's start offset: f32
/// storage is borrowed whatever its strides; f16 storage (contiguous layouts
/// only, see [`for_cpu`]) is converted, so that every kernel computes in f32.
pub fn input_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Cow<'a, [f32]>> {
    match s {
        CpuStorage::F32(v) => Ok(Cow::Borrowed(&v[l.start_offset()..])),
        CpuStorage::F16(v) => match l.contiguous_offsets() {
            Some((a, b)) => Ok(Cow::Owned(f16_to_f32(&v[a..b]))),
            None => bail!("fused op: a strided f16 input"),
        },
        other => bail!("fused ops run in f32 or f16, not {:?}", other.dtype()),
    }
}

/// A tensor as a CPU op takes it: f32 as it is (the ops read strides), f16
/// contiguous (converted to f32 in one pass).
pub fn for_cpu(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 || t.is_contiguous() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// An op's f32 result stored in `dtype` (its input's).
pub fn output(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    match dtype {
        DType::F32 => Ok(CpuStorage::F32(v)),
        DType::F16 => Ok(CpuStorage::F16(f32_to_f16(&v))),
        other => bail!("fused ops run in f32 or f16, not {other:?}"),
    }
}

/// Runs `f` over a small parameter's values (a bias, a norm's scale) as f32:
/// borrowed when stored in f32, converted when stored in f16.
pub fn with_weight<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("fused op weight is not on the CPU") };
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("fused op weight is not contiguous") };
    match cpu {
        CpuStorage::F32(v) => f(&v[start..end]),
        CpuStorage::F16(v) => f(&f16_to_f32(&v[start..end])),
        other => bail!("fused op weights in f32 or f16, not {:?}", other.dtype()),
    }
}

/// Columns of an f16 weight widened per GEMM: a block of up to 1280 rows
/// (5 MB) stays in cache between its conversion and its use; wider blocks
/// read longer runs of each row (measured: 1024 beats 256 by 3–5 %).
const WEIGHT_BLOCK_COLS: usize = 1024;

/// Columns `k0 .. k0 + k` of a weight matrix `(rows, K)` as f32, rows `rs` apart.
pub struct WeightBlock<'a> {
    pub k0: usize,
    pub k: usize,
    pub data: &'a [f32],
    pub rs: usize,
}

/// Runs `f` over a weight tensor, seen as the matrix `(dim 0, the rest)`, in
/// f32 column blocks: the whole stored matrix when it is f32; blocks widened
/// one at a time when it is f16, so that f16 weights cost their own memory
/// traffic only and the GEMM still runs in f32.
pub fn weight_blocks(t: &Tensor, mut f: impl FnMut(WeightBlock) -> Result<()>) -> Result<()> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("fused op weight is not on the CPU") };
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("fused op weight is not contiguous") };
    let rows = t.dim(0)?;
    let cols = (end - start) / rows;
    match cpu {
        CpuStorage::F32(v) => f(WeightBlock { k0: 0, k: cols, data: &v[start..end], rs: cols }),
        CpuStorage::F16(v) => {
            let v = &v[start..end];
            let mut buf = uninit::<f32>(rows * WEIGHT_BLOCK_COLS.min(cols));
            for k0 in (0..cols).step_by(WEIGHT_BLOCK_COLS) {
                let k = WEIGHT_BLOCK_COLS.min(cols - k0);
                let block = &mut buf[..rows * k];
                block.par_chunks_mut(k).enumerate().for_each(|(r, d)| widen(&v[r * cols + k0..][..k], d));
                // SAFETY: `widen` wrote all `rows × k` elements.
                let data = unsafe { std::slice::from_raw_parts(block.as_ptr() as *const f32, rows * k) };
                f(WeightBlock { k0, k, data, rs: k })?;
            }
            Ok(())
        }
        other => bail!("fused op weights in f32 or f16, not {:?}", other.dtype()),
    }
}

/// Conversion chunk: large enough to amortise a task, small enough to split.
const CONVERT_CHUNK: usize = 1 << 16;

fn f16_to_f32(src: &[f16]) -> Vec<f32> {
    let mut out = uninit(src.len());
    out.par_chunks_mut(CONVERT_CHUNK).zip(src.par_chunks(CONVERT_CHUNK)).for_each(|(d, s)| widen(s, d));
    // SAFETY: `widen` wrote every element.
    unsafe { assume_init(out) }
}

fn f32_to_f16(src: &[f32]) -> Vec<f16> {
    let mut out = uninit(src.len());
    out.par_chunks_mut(CONVERT_CHUNK).zip(src.par_chunks(CONVERT_CHUNK)).for_each(|(d, s)| narrow(s, d));
    // SAFETY: `narrow` wrote every element.
    unsafe { assume_init(out) }
}

/// f16 → f32 with the CPU's conversion instructions where it has them.
fn widen(src: &[f16], dst: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the features were detected at run time.
        return unsafe { widen_f16c(src, dst) };
    }
    dst.iter_mut().zip(src).for_each(|(d, s)| {
        d.write(s.to_f32());
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16c(src: &[f16], dst: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let tail = src.len() - src.len() % 8;
    let (src8, dst8) = (src.chunks_exact(8), dst.chunks_exact_mut(8));
    for (s, d) in src8.zip(dst8) {
        // SAFETY: 8 f16 values are read and 8 f32 values written, in bounds.
        unsafe {
            _mm256_storeu_ps(d.as_mut_ptr() as *mut f32, _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr() as *const __m128i)))
        };
    }
    dst[tail..].iter_mut().zip(&src[tail..]).for_each(|(d, s)| {
        d.write(s.to_f32());
    });
}

/// f32 → f16 (round to nearest even), with the CPU's conversion instructions where it has them.
fn narrow(src: &[f32], dst: &mut [MaybeUninit<f16>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the features were detected at run time.
        return unsafe { narrow_f16c(src, dst) };
    }
    dst.iter_mut().zip(src).for_each(|(d, s)| {
        d.write(f16::from_f32(*s));
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn narrow_f16c(src: &[f32], dst: &mut [MaybeUninit<f16>]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtps_ph, _mm256_loadu_ps, _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT};
    let tail = src.len() - src.len() % 8;
    let (src8, dst8) = (src.chunks_exact(8), dst.chunks_exact_mut(8));
    for (s, d) in src8.zip(dst8) {
        // SAFETY: 8 f32 values are read and 8 f16 values written, in bounds.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(s.as_ptr()));
            _mm_storeu_si128(d.as_mut_ptr() as *mut __m128i, h)
        };
    }
    dst[tail..].iter_mut().zip(&src[tail..]).for_each(|(d, s)| {
        d.write(f16::from_f32(*s));
    });
}

/// A buffer every element of which the caller writes before reading: no
/// zeroing pass over memory that the next instruction overwrites.
pub fn uninit<T: Copy>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(len) };
    v
}

/// # Safety
/// Every element of `v` has been written.
pub unsafe fn assume_init<T: Copy>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<T> has T's layout; the caller wrote every element.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// A matrix operand: a pointer and its row and column strides, in elements.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    pub fn new(ptr: *const f32, rs: usize, cs: usize) -> Self {
        Self { ptr, rs: rs as isize, cs: cs as isize }
    }
}

/// Worker threads for one GEMM: candle's count (`RAYON_NUM_THREADS`).
pub fn threads() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `dst (m×n) = [dst +] scale · lhs (m×k) · rhs (k×n)`, `dst` row-major with row
/// stride `dst_rs`. With `accumulate`, `dst` holds the initial value (a bias
/// or residual written by the caller).
///
/// # Safety
/// The operands must address valid memory for their shapes and strides, and
/// `dst` must not overlap them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller; gemm computes dst := alpha·dst + beta·lhs·rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `e^x` to within 2 ulp for the range softmax needs (x ≤ 0), written so the
/// compiler vectorises it: Cody–Waite range reduction and a degree-6
/// polynomial (Cephes' coefficients), no branches.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds x·log₂e to the nearest integer n in the low
    // mantissa bits (plain vector arithmetic, where `round` and a saturating
    // `as i32` would be scalar code); those bits then build 2ⁿ directly.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 0.166_666_65);
    let p = p.mul_add(r, 0.5);
    let e = p.mul_add(r * r, r) + 1.0;
    // t's bits are those of ROUND plus n; shifted by 23, only n + 127 remains.
    e * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

/// Defines `fn $name` that runs its body compiled for AVX-512 (with the
/// `avx512` feature) or AVX2+FMA when the CPU has them (detected at run
/// time), and for the baseline otherwise: the element loops of the ops
/// vectorise only with those features.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[cfg(feature = "avx512")]
                {
                    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
                    unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                        body($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the features were detected at run time.
                        return unsafe { avx512($($arg),*) };
                    }
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were detected at run time.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Folds `xs` in 16 independent lanes, then the lanes: a float reduction the
/// compiler may vectorise (a single accumulator fixes the order of additions).
#[inline(always)]
fn lane_fold(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let mut acc = [init; 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    acc.iter().fold(rest, |a, &x| f(a, x))
}

multiversion! {
    /// `row = exp(row − max(row))` in place; returns the sum: softmax's
    /// weights before their normalisation.
    pub fn exp_shifted(row: &mut [f32]) -> f32 {
        let max = lane_fold(row, f32::NEG_INFINITY, f32::max);
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *v = exp(*v - max);
                *a += *v;
            }
        }
        let rest: f32 = chunks.into_remainder().iter_mut().map(|v| {
            *v = exp(*v - max);
            *v
        }).sum();
        acc.iter().sum::<f32>() + rest
    }
}

multiversion! {
    /// `dst = a·src + b`, then SiLU if `silu`: one channel of a GroupNorm.
    pub fn scale_shift(dst: &mut [MaybeUninit<f32>], src: &[f32], a: f32, b: f32, silu: bool) {
        if silu {
            for (d, s) in dst.iter_mut().zip(src) {
                let y = s.mul_add(a, b);
                d.write(y / (1.0 + exp(-y)));
            }
        } else {
            for (d, s) in dst.iter_mut().zip(src) {
                d.write(s.mul_add(a, b));
            }
        }
    }
}

/// `erf(x)` to within 1.5·10⁻⁷ (Abramowitz & Stegun 7.1.26), branch-free so
/// that it vectorises.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let p = 1.061_405_4_f32;
    let p = p.mul_add(t, -1.453_152_1);
    let p = p.mul_add(t, 1.421_413_8);
    let p = p.mul_add(t, -0.284_496_74);
    let p = p.mul_add(t, 0.254_829_6);
    let y = 1.0 - p * t * exp(-a * a);
    y.copysign(x)
}

multiversion! {
    /// `dst = h ⊙ gelu(g)` with exact (erf) GELU.
    pub fn geglu_row(dst: &mut [MaybeUninit<f32>], h: &[f32], g: &[f32]) {
        for ((d, &h), &g) in dst.iter_mut().zip(h).zip(g) {
            d.write(h * (0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2))));
        }
    }
}

multiversion! {
    /// The mean and (biased) variance of `xs`, accumulated in f64 over two
    /// passes (the centred variance keeps precision for offset activations).
    pub fn mean_var(xs: &[f32]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = lanes_f64(xs, |x| x as f64) / n;
        (mean, lanes_f64(xs, |x| (x as f64 - mean).powi(2)) / n)
    }
}

/// `Σ f(x)` in 8 independent f64 lanes, so that the sum vectorises.
#[inline(always)]
fn lanes_f64(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f64>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_the_clamped_range() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max((ours - libm).abs() / libm);
        }
        assert!(worst < 2.5e-7, "relative error {worst:e}");
    }

    #[test]
    fn softmax_weights_sum_and_shift_like_the_definition() {
        let mut row: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let expected: Vec<f64> = row.iter().map(|&x| ((x - max) as f64).exp()).collect();
        let sum = exp_shifted(&mut row);
        assert!((sum as f64 - expected.iter().sum::<f64>()).abs() < 1e-5 * sum as f64);
        for (a, b) in row.iter().zip(&expected) {
            assert!((*a as f64 - b).abs() <= 3e-7 * b.max(1e-30), "{a} vs {b}");
        }
    }

    #[test]
    fn f16_widening_and_narrowing_match_the_half_crate() {
        // Every f16 bit pattern but NaNs, and f32 values around f16's range.
        let halves: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).filter(|h| !h.is_nan()).collect();
        let wide = f16_to_f32(&halves);
        assert!(halves.iter().zip(&wide).all(|(h, w)| h.to_f32() == *w));
        let floats: Vec<f32> = (0..100_003).map(|i| (i as f32 - 50_000.0) * 1.37).collect();
        let narrow = f32_to_f16(&floats);
        assert!(floats.iter().zip(&narrow).all(|(f, h)| f16::from_f32(*f) == *h));
    }
}
