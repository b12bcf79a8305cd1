//! A linear layer `y = x Wᵀ + b [+ residual]` as one GEMM that reads `x` with
//! its own strides (a permuted `(B, C, H·W)` feature map is a `(B, H·W, C)`
//! sequence without a copy) and `W` transposed in place, with the bias and
//! residual as the GEMM's initial value. With few rows (the UNet's coarse
//! levels) it computes `yᵀ` into a scratch instead: `gemm` runs at about
//! half speed writing a long row per input row, at full speed the other way.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

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
        if !x.device().is_cpu() {
            return self.reference(x, None);
        }
        for_cpu(x)?.apply_op1_no_bwd(&LinearOp { linear: self })
    }

    /// `linear(x) + residual`.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            return self.reference(x, Some(residual));
        }
        for_cpu(x)?.apply_op2_no_bwd(&residual.contiguous()?, &LinearOp { linear: self })
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

impl LinearOp<'_> {
    fn run(&self, x: (&CpuStorage, &Layout), residual: Option<(&CpuStorage, &Layout)>) -> Result<(CpuStorage, Shape)> {
        let (xs, xl) = x;
        let (cout, cin) = self.linear.weight.dims2()?;
        let (dims, st) = (xl.dims(), xl.stride());
        // (batches, rows, cin) with strides (batch, row, col).
        let (b, l, sb, sl, sc) = match *dims {
            [l, c] if c == cin => (1, l, 0, st[0], st[1]),
            [b, l, c] if c == cin => (b, l, st[0], st[1], st[2]),
            _ => bail!("linear: input {dims:?} does not end in {cin} features"),
        };
        // One GEMM over all rows when the batches are stacked rows.
        let (b, l, sb) = if b > 1 && sb == l * sl { (1, b * l, 0) } else { (b, l, sb) };
        let x = input_f32(xs, xl)?;
        let residual = match residual {
            Some((s, rl)) => {
                if rl.shape().elem_count() != b * l * cout || !rl.is_contiguous() {
                    bail!("linear: residual {:?} does not match the output", rl.dims());
                }
                Some(input_f32(s, rl)?)
            }
            None => None,
        };
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
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank ≥ 2") = cout;
        Ok((output(out, xs.dtype())?, Shape::from(shape)))
    }
}

impl CustomOp1 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "sdgen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), None)
    }
}

impl CustomOp2 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "sdgen-linear"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), Some((s2, l2)))
    }
}
