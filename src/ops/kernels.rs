//! What the fused ops share: the element types they run in, output buffers
//! without a zeroing pass, the GEMM call with strides, and a vectorisable exp.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};
use half::f16;

/// An element type of the CPU forwards: f32, or f16 computed through f32 in
/// everything but the GEMM (which `gemm` runs in f16 storage).
pub trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn slice(s: &CpuStorage) -> Result<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn slice(s: &CpuStorage) -> Result<&[Self]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            other => bail!("expected f32 storage, got {:?}", BackendStorage::dtype(other)),
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn slice(s: &CpuStorage) -> Result<&[Self]> {
        match s {
            CpuStorage::F16(v) => Ok(v),
            other => bail!("expected f16 storage, got {:?}", BackendStorage::dtype(other)),
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F16(v)
    }
}

/// Runs `$body` with `$t` bound to the element type of `$storage`.
macro_rules! with_elem {
    ($storage:expr, $t:ident => $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F16(_) => {
                type $t = half::f16;
                $body
            }
            other => candle_core::bail!(
                "fused ops run in f32 or f16, not {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
pub(crate) use with_elem;

/// The elements of a CPU tensor's storage from its layout's start offset.
pub fn cpu_slice<'a, T: Elem>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    Ok(&T::slice(storage)?[layout.start_offset()..])
}

/// Runs `f` over a weight tensor's CPU elements (contiguous, as loaded).
pub fn with_weight<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("fused op weight is not on the CPU") };
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("fused op weight is not contiguous") };
    f(&T::slice(cpu)?[start..end])
}

/// A buffer every element of which the caller writes before reading: no
/// zeroing pass over memory that the next instruction overwrites.
pub fn uninit<T: Elem>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(len) };
    v
}

/// # Safety
/// Every element of `v` has been written.
pub unsafe fn assume_init<T: Elem>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<T> has T's layout; the caller wrote every element.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// A matrix operand: a pointer and its row and column strides, in elements.
#[derive(Clone, Copy)]
pub struct Mat<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> Mat<T> {
    pub fn new(ptr: *const T, rs: usize, cs: usize) -> Self {
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
pub unsafe fn matmul<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
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
            T::from_f32(1.0),
            T::from_f32(scale),
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
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer with plain
    // vector arithmetic (`f32::round` is a library call).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 0.166_666_65);
    let p = p.mul_add(r, 0.5);
    let e = p.mul_add(r * r, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Defines `fn $name` that runs its body compiled for AVX-512 or AVX2+FMA
/// when the CPU has them (detected at run time), and for the baseline
/// otherwise: the element loops of the ops vectorise only with those features.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident$(<$g:ident: $b:path>)?($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name$(<$g: $b>)?($($arg: $ty),*) {
            #[inline(always)]
            fn body$(<$g: $b>)?($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma,f16c")]
                unsafe fn avx512$(<$g: $b>)?($($arg: $ty),*) {
                    body$(::<$g>)?($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2$(<$g: $b>)?($($arg: $ty),*) {
                    body$(::<$g>)?($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the features were detected at run time.
                    return unsafe { avx512$(::<$g>)?($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were detected at run time.
                    return unsafe { avx2$(::<$g>)?($($arg),*) };
                }
            }
            body$(::<$g>)?($($arg),*)
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
    /// `row = softmax(row)` in place, over f32 values.
    pub fn softmax(row: &mut [f32]) {
        let max = lane_fold(row, f32::NEG_INFINITY, f32::max);
        for v in row.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / lane_fold(row, 0.0, |a, b| a + b);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion! {
    /// `dst = a·src + b`, then SiLU if `silu`: one channel of a GroupNorm.
    pub fn scale_shift<T: Elem>(dst: &mut [MaybeUninit<T>], src: &[T], a: f32, b: f32, silu: bool) {
        if silu {
            for (d, s) in dst.iter_mut().zip(src) {
                let y = s.to_f32().mul_add(a, b);
                d.write(T::from_f32(y / (1.0 + exp(-y))));
            }
        } else {
            for (d, s) in dst.iter_mut().zip(src) {
                d.write(T::from_f32(s.to_f32().mul_add(a, b)));
            }
        }
    }
}
