//! A linear layer `y = x Wᵀ + b [+ residual]` as one GEMM that reads `x` with
//! its own strides (a permuted `(B, C, H·W)` feature map is a `(B, H·W, C)`
//! sequence without a copy) and `W` transposed in place, with the bias and
//! residual as the GEMM's initial value. With few rows (the UNet's coarse
//! levels) it computes `yᵀ` into a scratch instead: `gemm` runs at about
//! half speed writing a long row per input row, at full speed the other way.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
#[cfg(feature = "cuda")]
use candle_core::{CudaStorage, DType};
use candle_nn::VarBuilder;
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda;
use super::kernels::{
    assume_init, for_cpu, input_f32, matmul, output, threads, uninit, weight_blocks, with_weight, Mat,
};

/// Rows up to which the product is computed transposed (see `LinearOp::run`).
const FEW_ROWS: usize = 256;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: super::weight(&vb, (cout, cin))?, bias: Some(super::bias(&vb, cin, cout)?) })
    }

    pub fn no_bias(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: super::weight(&vb, (cout, cin))?, bias: None })
    }

    /// A 1×1 convolution's `(cout, cin, 1, 1)` weights as a linear layer.
    pub fn from_conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let weight = super::weight(&vb, (cout, cin, 1, 1))?.reshape((cout, cin))?;
        Ok(Self { weight, bias: Some(super::bias(&vb, cin, cout)?) })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !super::fused(x) {
            return self.reference(x, None);
        }
        Self::input(x)?.apply_op1_no_bwd(&LinearOp { linear: self })
    }

    /// `linear(x) + residual`.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if !super::fused(x) {
            return self.reference(x, Some(residual));
        }
        Self::input(x)?.apply_op2_no_bwd(&residual.contiguous()?, &LinearOp { linear: self })
    }

    /// `x` as the fused forwards read it: the CPU's any f32 layout; CUDA's
    /// (cuBLAS) rows or columns with a unit stride.
    fn input(x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() {
            return for_cpu(x);
        }
        let st = x.stride();
        let unit = st.last() == Some(&1) || (st.len() == 3 && st[1] == 1);
        if unit {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    }

    /// The unfused composition: other devices' path and the CPU op's reference in tests.
    pub fn reference(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let w = match x.rank() {
            3 => self.weight.broadcast_left(x.dim(0)?)?.t()?,
            _ => self.weight.t()?,
        };
        let mut y = x.contiguous()?.matmul(&w)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

struct LinearOp<'a> {
    linear: &'a Linear,
}

/// A linear layer's input as GEMM rows: `b` batches of `l` rows, with
/// strides between batches, rows and features; `cout` outputs per row.
struct Rows {
    cout: usize,
    b: usize,
    l: usize,
    sb: usize,
    sl: usize,
    sc: usize,
}

impl LinearOp<'_> {
    fn rows(&self, xl: &Layout, residual: Option<&Layout>) -> Result<Rows> {
        let (cout, cin) = self.linear.weight.dims2()?;
        let (dims, st) = (xl.dims(), xl.stride());
        let (b, l, sb, sl, sc) = match *dims {
            [l, c] if c == cin => (1, l, 0, st[0], st[1]),
            [b, l, c] if c == cin => (b, l, st[0], st[1], st[2]),
            _ => bail!("linear: input {dims:?} does not end in {cin} features"),
        };
        // One GEMM over all rows when the batches are stacked rows.
        let (b, l, sb) = if b > 1 && sb == l * sl { (1, b * l, 0) } else { (b, l, sb) };
        if let Some(rl) = residual {
            if rl.shape().elem_count() != b * l * cout || !rl.is_contiguous() {
                bail!("linear: residual {:?} does not match the output", rl.dims());
            }
        }
        Ok(Rows { cout, b, l, sb, sl, sc })
    }

    /// The output's shape: the input's with `cout` features.
    fn out_shape(xl: &Layout, cout: usize) -> Shape {
        let mut shape = xl.dims().to_vec();
        *shape.last_mut().expect("rank ≥ 2") = cout;
        Shape::from(shape)
    }

    fn run(&self, x: (&CpuStorage, &Layout), residual: Option<(&CpuStorage, &Layout)>) -> Result<(CpuStorage, Shape)> {
        let (xs, xl) = x;
        let Rows { cout, b, l, sb, sl, sc, .. } = self.rows(xl, residual.map(|r| r.1))?;
        let x = input_f32(xs, xl)?;
        let residual = residual.map(|(s, rl)| input_f32(s, rl)).transpose()?;
        let accumulate = self.linear.bias.is_some() || residual.is_some();
        let bias = match &self.linear.bias {
            Some(t) => with_weight(t, |v| Ok(v.to_vec()))?,
            None => vec![0.0; cout],
        };
        // The initial value of output row r.
        let init = |r: usize, row: &mut [MaybeUninit<f32>]| match residual.as_deref() {
            Some(res) => row.iter_mut().zip(&res[r * cout..]).zip(&bias).for_each(|((d, x), b)| {
                d.write(x + b);
            }),
            None => row.iter_mut().zip(&bias).for_each(|(d, b)| {
                d.write(*b);
            }),
        };
        let rows = b * l;
        let mut out = uninit::<f32>(rows * cout);
        if rows <= FEW_ROWS {
            // Few rows (the UNet's coarse levels): `gemm` runs at about half
            // speed writing outputs along the features, at full speed along
            // the rows; so `(cout, rows)` into a scratch, then transposed.
            let mut t = uninit::<f32>(cout * rows);
            if accumulate {
                let mut rows_init = uninit::<f32>(rows * cout);
                rows_init.par_chunks_mut(cout).enumerate().for_each(|(r, row)| init(r, row));
                // SAFETY: every row was written.
                let rows_init = unsafe { assume_init(rows_init) };
                t.par_chunks_mut(rows).enumerate().for_each(|(o, col)| {
                    col.iter_mut().enumerate().for_each(|(r, d)| {
                        d.write(rows_init[r * cout + o]);
                    })
                });
            }
            let t_ptr = t.as_mut_ptr() as *mut f32;
            weight_blocks(&self.linear.weight, |wb| {
                let lhs = Mat::new(wb.data.as_ptr(), wb.rs, 1);
                for bi in 0..b {
                    // xᵀ: element (i, r) of image bi is x[bi·sb + r·sl + i·sc].
                    let rhs = Mat::new(x[bi * sb + wb.k0 * sc..].as_ptr(), sc, sl);
                    let acc = accumulate || wb.k0 > 0;
                    // SAFETY: the strides come from the input's layout; the scratch holds `cout × rows`.
                    unsafe { matmul((cout, l, wb.k), t_ptr.wrapping_add(bi * l), rows, acc, lhs, rhs, 1.0, threads()) };
                }
                Ok(())
            })?;
            // SAFETY: every element was written by the initial value or the GEMM.
            let t = unsafe { assume_init(t) };
            // In blocks of 16 rows: each scratch cache line read serves 16 rows.
            out.par_chunks_mut(16 * cout).enumerate().for_each(|(blk, dst)| {
                let r0 = blk * 16;
                let n = dst.len() / cout;
                for o in 0..cout {
                    for (j, &v) in t[o * rows + r0..][..n].iter().enumerate() {
                        dst[j * cout + o].write(v);
                    }
                }
            });
        } else {
            if accumulate {
                out.par_chunks_mut(cout).enumerate().for_each(|(r, row)| init(r, row));
            }
            let out_ptr = out.as_mut_ptr() as *mut f32;
            weight_blocks(&self.linear.weight, |wb| {
                // Wᵀ as the right operand: element (i, o) is w[o·K + i].
                let rhs = Mat::new(wb.data.as_ptr(), 1, wb.rs);
                for bi in 0..b {
                    let lhs = Mat::new(x[bi * sb + wb.k0 * sc..].as_ptr(), sl, sc);
                    let dst = out_ptr.wrapping_add(bi * l * cout);
                    let acc = accumulate || wb.k0 > 0;
                    // SAFETY: the strides come from the input's layout; `dst` holds `l × cout` elements.
                    unsafe { matmul((l, cout, wb.k), dst, cout, acc, lhs, rhs, 1.0, threads()) };
                }
                Ok(())
            })?;
        }
        // SAFETY: every element was written by the initial value or the GEMM.
        let out = unsafe { assume_init(out) };
        Ok((output(out, xs.dtype())?, Self::out_shape(xl, cout)))
    }
}

#[cfg(feature = "cuda")]
impl LinearOp<'_> {
    fn cuda(
        &self,
        x: (&CudaStorage, &Layout),
        residual: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        match x.0.dtype() {
            DType::F32 => self.run_cuda::<f32>(x, residual),
            DType::F16 => self.run_cuda::<half::f16>(x, residual),
            dtype => bail!("linear: no CUDA kernel for {dtype:?}"),
        }
    }

    /// The initial value (bias, residual), then one cuBLAS product per batch
    /// of rows, reading rows or (a permuted feature map's) columns in place.
    fn run_cuda<T: cuda::Elem>(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        residual: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let Rows { cout, b, l, sb, sl, sc } = self.rows(xl, residual.map(|r| r.1))?;
        let (dev, cin) = (xs.device(), self.linear.weight.dim(1)?);
        let x = cuda::strided_view::<T>(xs, xl)?;
        // cuBLAS wants a leading dimension of at least the stored rows' length
        // even where a single row makes it unused.
        let a = match (sl, sc) {
            (_, 1) => cuda::Operand {
                data: &x,
                ld: if l == 1 { sl.max(cin) } else { sl },
                batch_stride: sb,
                transposed: false,
            },
            (1, _) => cuda::Operand {
                data: &x,
                ld: if cin == 1 { sc.max(l) } else { sc },
                batch_stride: sb,
                transposed: true,
            },
            _ => bail!("linear: the CUDA forward reads rows or columns in place, not strides {:?}", xl.stride()),
        };
        let residual = residual.map(|(s, rl)| cuda::view::<T>(s, rl)).transpose()?;
        // SAFETY: the initial value or the product (beta 0) writes every element.
        let mut out = unsafe { dev.alloc::<T>(b * l * cout)? };
        let bias = self.linear.bias.as_ref();
        let accumulate = bias.is_some() || residual.is_some();
        let rows = (b * l, cout, cout, false);
        match bias {
            Some(t) => cuda::with_weight::<T, _>(t, |v| {
                cuda::fill_initial(dev, &mut out, Some(&v), None, residual.as_ref(), rows)
            })?,
            None if accumulate => cuda::fill_initial(dev, &mut out, None, None, residual.as_ref(), rows)?,
            None => {}
        }
        cuda::with_weight::<T, _>(&self.linear.weight, |w| {
            let wt = cuda::Operand { data: &w, ld: cin, batch_stride: 0, transposed: true };
            let beta = if accumulate { 1.0 } else { 0.0 };
            cuda::gemm(dev, (l, cout, cin, b), a, wt, &mut out.slice_mut(..), (cout, l * cout), beta)
        })?;
        Ok((cuda::storage(out, dev), Self::out_shape(xl, cout)))
    }
}

impl CustomOp1 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "sdgen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), None)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda((s, l), None)
    }
}

impl CustomOp2 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "sdgen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), Some((s2, l2)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda((s, l), Some((s2, l2)))
    }
}
