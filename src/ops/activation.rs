//! GEGLU, the gate of the transformers' feed-forward layers: `h ⊙ gelu(g)`
//! for `[h, g]` the two halves of the projection's features, with exact
//! (erf) GELU as diffusers uses, in one pass over the projection.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::kernels::{assume_init, geglu_row, input_f32, output, uninit};

/// `h ⊙ gelu_erf(g)` where `[h, g]` splits the last dimension of `x` in two.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
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
        let dims = l.dims();
        let Some(&features) = dims.last().filter(|f| **f % 2 == 0) else {
            bail!("geglu: the last dimension of {dims:?} is not even");
        };
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
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = inner;
        Ok((output(out, s.dtype())?, Shape::from(shape)))
    }
}
