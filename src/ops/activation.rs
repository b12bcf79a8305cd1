//! GEGLU, the gate of the transformers' feed-forward layers: `h ⊙ gelu(g)`
//! for `[h, g]` the two halves of the projection's features, with exact
//! (erf) GELU as diffusers uses, in one pass over the projection.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
#[cfg(feature = "cuda")]
use candle_core::{CudaStorage, DType};
use rayon::prelude::*;

use super::kernels::{assume_init, geglu_row, input_f32, output, uninit};

/// `h ⊙ gelu_erf(g)` where `[h, g]` splits the last dimension of `x` in two.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    if super::fused(x) {
        x.contiguous()?.apply_op1_no_bwd(&Geglu)
    } else {
        geglu_reference(x)
    }
}

/// The candle composition: other devices' path and the CPU op's reference in tests.
pub fn geglu_reference(x: &Tensor) -> Result<Tensor> {
    let inner = x.dim(D::Minus1)? / 2;
    x.narrow(D::Minus1, 0, inner)? * x.narrow(D::Minus1, inner, inner)?.gelu_erf()?
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "sdgen-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (features, shape) = gated(l)?;
        let inner = features / 2;
        let x = input_f32(s, l)?;
        let x = &x[..l.shape().elem_count()];
        let mut out = uninit::<f32>(x.len() / 2);
        out.par_chunks_mut(inner).zip(x.par_chunks(features)).for_each(|(d, row)| {
            let (h, g) = row.split_at(inner);
            geglu_row(d, h, g);
        });
        // SAFETY: every row of the output was written.
        let out = unsafe { assume_init(out) };
        Ok((output(out, s.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::F32 => geglu_cuda::<f32>(s, l),
            DType::F16 => geglu_cuda::<half::f16>(s, l),
            dtype => bail!("geglu: no CUDA kernel for {dtype:?}"),
        }
    }
}

/// The projection's width (even) and the gate's output shape.
fn gated(l: &Layout) -> Result<(usize, Shape)> {
    let dims = l.dims();
    let Some(&features) = dims.last().filter(|f| **f % 2 == 0) else {
        bail!("geglu: the last dimension of {dims:?} is not even");
    };
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("checked above") = features / 2;
    Ok((features, Shape::from(shape)))
}

#[cfg(feature = "cuda")]
fn geglu_cuda<T: super::cuda::Elem>(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    use super::cuda;
    use candle_core::cuda::cudarc::driver::PushKernelArg;
    use candle_core::cuda::WrapErr;
    let (features, shape) = gated(l)?;
    let dev = s.device();
    let x = cuda::view::<T>(s, l)?;
    let rows = l.shape().elem_count() / features.max(1);
    // SAFETY: the kernel writes every element.
    let mut y = unsafe { dev.alloc::<T>(rows * features / 2)? };
    let func = cuda::function(dev, &cuda::ACTIVATION, &format!("geglu_{}", T::SUFFIX))?;
    let (n, inner) = (rows as i64, (features / 2) as i64);
    let mut args = func.builder();
    args.arg(&x).arg(&mut y).arg(&n).arg(&inner);
    // SAFETY: the arguments match the kernel's signature.
    unsafe { args.launch(cuda::grid(cuda::row_blocks(features / 2, 256), cuda::grid_rows(rows), 1, 256)?) }.w()?;
    Ok((cuda::storage(y, dev), shape))
}
