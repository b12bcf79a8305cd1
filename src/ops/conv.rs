//! 2-D convolution as GEMMs: `out (Cout, P) = W (Cout, Cin·k²) · col
//! (Cin·k², P)`. The weight's stored layout is already the GEMM's row-major
//! left operand, so nothing is repacked per call; a 1×1 convolution reads its
//! input in place (any layout whose pixels form one stride), and a k×k one
//! builds the column matrix of all images in parallel, in pixel chunks that
//! bound its memory, and runs one GEMM for the batch. The bias, per-image
//! channel offsets (a ResNet's time embedding) and a residual are the GEMM's
//! initial value, so none of them costs a pass of its own; a nearest-neighbour
//! resize before the convolution (upsamplers) happens in the column gather.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::kernels::{assume_init, input_f32, matmul, output, threads, uninit, weight_blocks, with_weight, Mat};

/// Upper bound on one chunk's column matrix: the VAE's full-resolution
/// convolutions would otherwise need gigabytes.
const COLUMN_BUDGET_BYTES: usize = 32 << 20;

#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    /// Zero padding: top, bottom, left, right.
    padding: [usize; 4],
}

impl Conv2d {
    /// A `k×k` convolution with `padding` on every side, weights
    /// `(cout, cin, k, k)` and a bias, as diffusers' `nn.Conv2d`.
    pub fn new(cin: usize, cout: usize, k: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let weight = super::weight(&vb, (cout, cin, k, k))?;
        let bias = super::bias(&vb, cin, cout)?;
        Ok(Self { weight, bias, kernel: k, stride, padding: [padding; 4] })
    }

    /// A 1×1 convolution stored as a linear layer's `(cout, cin)` weights.
    pub fn from_linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let weight = super::weight(&vb, (cout, cin))?.reshape((cout, cin, 1, 1))?;
        let bias = super::bias(&vb, cin, cout)?;
        Ok(Self { weight, bias, kernel: 1, stride: 1, padding: [0; 4] })
    }

    /// Pads bottom and right only (the VAE encoder's stride-2 downsampler).
    pub fn with_bottom_right_padding(mut self, p: usize) -> Self {
        self.padding = [0, p, 0, p];
        self
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, None)
    }

    /// `conv(x) + offset[b, c] + residual`: `offset` is `(B, Cout)`, `residual`
    /// the output's shape.
    pub fn forward_with(&self, x: &Tensor, offset: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        self.run(x, None, offset, residual)
    }

    /// `conv(nearest_resize(x, size))`: the resize happens as the columns
    /// are gathered, so the resized input never exists (the decoder's
    /// upsamplers would otherwise write 4× their input first).
    pub fn forward_resized(&self, x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
        self.run(x, Some(size), None, None)
    }

    fn run(
        &self,
        x: &Tensor,
        resize: Option<(usize, usize)>,
        offset: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if !x.device().is_cpu() {
            let x = match resize {
                Some((h, w)) => x.upsample_nearest2d(h, w)?,
                None => x.clone(),
            };
            return self.reference(&x, offset, residual);
        }
        // A 1×1 convolution reads an f32 input in place when its pixels are
        // one stride apart; everything else gathers columns from a contiguous input.
        let in_place = x.dtype() == candle_core::DType::F32 && resize.is_none() && self.reads_in_place(x);
        let x = if in_place { x.clone() } else { x.contiguous()? };
        let op = ConvOp { conv: self, in_place, resize, offset: offset.is_some(), residual: residual.is_some() };
        let residual = residual.map(Tensor::contiguous).transpose()?;
        let offset = offset.map(Tensor::contiguous).transpose()?;
        match (offset, residual) {
            (None, None) => x.apply_op1_no_bwd(&op),
            (Some(e), None) | (None, Some(e)) => x.apply_op2_no_bwd(&e, &op),
            (Some(o), Some(r)) => x.apply_op3_no_bwd(&o, &r, &op),
        }
    }

    /// The unfused candle composition: other devices' path and the CPU op's
    /// reference in tests.
    pub fn reference(&self, x: &Tensor, offset: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Tensor> {
        let [t, b, l, r] = self.padding;
        let symmetric = t == b && l == r && t == l;
        let (x, p) =
            if symmetric { (x.contiguous()?, t) } else { (x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?, 0) };
        let mut y =
            x.conv2d(&self.weight, p, self.stride, 1, 1)?.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        if let Some(o) = offset {
            y = y.broadcast_add(&o.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }

    /// Whether `x` is a 1×1 convolution's input whose pixels are one stride apart.
    fn reads_in_place(&self, x: &Tensor) -> bool {
        let pointwise = self.kernel == 1 && self.stride == 1 && self.padding == [0; 4];
        let st = x.stride();
        pointwise && st.len() == 4 && st[2] == x.dims()[3] * st[3]
    }

    fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let [t, b, l, r] = self.padding;
        let (hp, wp) = (h + t + b, w + l + r);
        if hp < self.kernel || wp < self.kernel {
            bail!("conv2d: input {h}×{w} is smaller than the {k}×{k} kernel", k = self.kernel);
        }
        Ok(((hp - self.kernel) / self.stride + 1, (wp - self.kernel) / self.stride + 1))
    }
}

struct ConvOp<'a> {
    conv: &'a Conv2d,
    /// The input is read as the GEMM's right operand, with its own strides.
    in_place: bool,
    /// The size the input is nearest-resized to before the convolution.
    resize: Option<(usize, usize)>,
    offset: bool,
    residual: bool,
}

impl ConvOp<'_> {
    fn run(&self, (xs, xl): (&CpuStorage, &Layout), extra: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let c = self.conv;
        let (cout, cin, k, _) = c.weight.dims4()?;
        let &[b, xc, hi, wi] = xl.dims() else { bail!("conv2d: expected a 4-D input, got {:?}", xl.dims()) };
        if xc != cin {
            bail!("conv2d: input has {xc} channels, the weights expect {cin}");
        }
        if hi == 0 || wi == 0 {
            bail!("conv2d: an empty {hi}×{wi} input");
        }
        // The convolved input's size, and for a resized one the stored row
        // and column each of its rows and columns reads.
        let (h, w) = self.resize.unwrap_or((hi, wi));
        let maps = self.resize.map(|(h, w)| (nearest(hi, h), nearest(wi, w)));
        let (ho, wo) = c.out_size(h, w)?;
        let p = ho * wo;
        let offset = if self.offset { Some(extra_input(extra[0], b * cout, "offset")?) } else { None };
        let residual = if self.residual {
            Some(extra_input(extra[self.offset as usize], b * cout * p, "residual")?)
        } else {
            None
        };
        let xdata = input_f32(xs, xl)?;
        let st = xl.stride();
        let mut out = uninit::<f32>(b * cout * p);
        // The GEMM's initial value: bias + offset [+ residual].
        let bias = with_weight(&c.bias, |v| Ok(v.to_vec()))?;
        let (offset, residual) = (offset.as_deref(), residual.as_deref());
        out.par_chunks_mut(p).enumerate().for_each(|(i, row)| {
            let (bi, co) = (i / cout, i % cout);
            let add = bias[co] + offset.map_or(0.0, |o| o[bi * cout + co]);
            match residual {
                Some(r) => row.iter_mut().zip(&r[i * p..][..p]).for_each(|(d, r)| {
                    d.write(r + add);
                }),
                None => row.iter_mut().for_each(|d| {
                    d.write(add);
                }),
            }
        });
        // An address, not a pointer, so that parallel tasks may share it.
        let out_ptr = out.as_mut_ptr() as usize;
        let dst = |bi: usize, y0: usize| (out_ptr as *mut f32).wrapping_add(bi * cout * p + y0 * wo);
        if self.in_place {
            weight_blocks(&c.weight, |wb| {
                for bi in 0..b {
                    let lhs = Mat::new(wb.data.as_ptr(), wb.rs, 1);
                    let rhs = Mat::new(xdata[bi * st[0] + wb.k0 * st[1]..].as_ptr(), st[1], st[3]);
                    // SAFETY: the strides address the input and output within bounds.
                    unsafe { matmul((cout, p, wb.k), dst(bi, 0), p, true, lhs, rhs, 1.0, threads()) };
                }
                Ok(())
            })?;
        } else {
            if !xl.is_contiguous() {
                bail!("conv2d: a {k}×{k} convolution needs a contiguous input");
            }
            // One column matrix `(cin·k², b·n)` holds every image's columns
            // for a chunk of `n` output pixels side by side, so that one GEMM
            // serves the whole batch and its weights are read once; with
            // several images that GEMM writes `(cout, b·n)` to a scratch
            // whose rows are then moved into each image's output.
            let kk = cin * k * k;
            let rows = (COLUMN_BUDGET_BYTES / (b * kk * wo * 4)).clamp(1, ho);
            let mut col = uninit::<f32>(kk * b * rows * wo);
            let mut scratch = uninit::<f32>(if b > 1 { cout * b * rows * wo } else { 0 });
            let scratch_ptr = scratch.as_mut_ptr() as usize;
            let mut y0 = 0;
            while y0 < ho {
                let n = rows.min(ho - y0) * wo;
                let bn = b * n;
                let col = &mut col[..kk * bn];
                col.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
                    let (r, bi) = (i / b, i % b);
                    let (ci, ky, kx) = (r / (k * k), r / k % k, r % k);
                    let plane = &xdata[bi * st[0] + ci * hi * wi..][..hi * wi];
                    let tap = Tap { ky, kx, stride: c.stride, top: c.padding[0], left: c.padding[2] };
                    match &maps {
                        None => im2col_row(plane, (h, w), wo, (y0, n / wo), tap, row),
                        Some((ys, xs)) => im2col_row_resized(plane, wi, (ys, xs), wo, (y0, n / wo), tap, row),
                    }
                });
                // Moves image rows between the output and the scratch (`gather`: into the scratch).
                let shuffle = |gather: bool| {
                    (0..cout).into_par_iter().for_each(|co| {
                        for bi in 0..b {
                            let o = dst(bi, y0).wrapping_add(co * p);
                            let s = (scratch_ptr as *mut f32).wrapping_add(co * bn + bi * n);
                            let (from, to) = if gather { (o, s) } else { (s, o) };
                            // SAFETY: `n` elements in bounds of both buffers; tasks touch disjoint rows.
                            unsafe { std::ptr::copy_nonoverlapping(from, to, n) };
                        }
                    })
                };
                let (target, target_rs) = if b == 1 {
                    (dst(0, y0), p)
                } else {
                    shuffle(true);
                    (scratch_ptr as *mut f32, bn)
                };
                let col = col.as_ptr() as *const f32;
                weight_blocks(&c.weight, |wb| {
                    let lhs = Mat::new(wb.data.as_ptr(), wb.rs, 1);
                    let rhs = Mat::new(col.wrapping_add(wb.k0 * bn), bn, 1);
                    // SAFETY: `col` holds this chunk's written columns; the target holds `cout × b·n`.
                    unsafe { matmul((cout, bn, wb.k), target, target_rs, true, lhs, rhs, 1.0, threads()) };
                    Ok(())
                })?;
                if b > 1 {
                    shuffle(false);
                }
                y0 += n / wo;
            }
        }
        // SAFETY: every output element was written with the initial value.
        let out = unsafe { assume_init(out) };
        Ok((output(out, xs.dtype())?, Shape::from((b, cout, ho, wo))))
    }
}

/// A contiguous extra input of `len` elements, as f32.
fn extra_input<'a>((s, l): (&'a CpuStorage, &Layout), len: usize, what: &str) -> Result<std::borrow::Cow<'a, [f32]>> {
    if l.shape().elem_count() != len || !l.is_contiguous() {
        bail!("conv2d: {what} of shape {:?} does not match the output", l.dims());
    }
    input_f32(s, l)
}

/// A kernel tap and the geometry that places it on the input.
#[derive(Clone, Copy)]
struct Tap {
    ky: usize,
    kx: usize,
    stride: usize,
    top: usize,
    left: usize,
}

impl Tap {
    /// The input row (or column) output row `o` reads at offset `k`, if inside.
    fn source(&self, o: usize, k: usize, pad: usize, len: usize) -> Option<usize> {
        Some((o * self.stride + k).wrapping_sub(pad)).filter(|&i| i < len)
    }
}

/// For each of `to` positions, the source position of a nearest resize from
/// `from` (the index rule of `upsample_nearest2d`).
fn nearest(from: usize, to: usize) -> Vec<usize> {
    let scale = from as f64 / to as f64;
    (0..to).map(|i| ((i as f64 * scale) as usize).min(from - 1)).collect()
}

/// One row of the column matrix: input channel plane `plane` shifted by
/// kernel tap `t`, for output rows `y0..y0 + rows`, zero outside the image.
fn im2col_row(
    plane: &[f32],
    (h, w): (usize, usize),
    wo: usize,
    (y0, rows): (usize, usize),
    t: Tap,
    row: &mut [MaybeUninit<f32>],
) {
    for (oy, dst) in (y0..y0 + rows).zip(row.chunks_mut(wo)) {
        let Some(iy) = t.source(oy, t.ky, t.top, h) else {
            dst.iter_mut().for_each(|d| {
                d.write(0.0);
            });
            continue;
        };
        let src = &plane[iy * w..][..w];
        if t.stride == 1 {
            // Output column ox reads input column ox + kx − left.
            let lo = t.left.saturating_sub(t.kx).min(wo);
            let hi = (w + t.left).saturating_sub(t.kx).clamp(lo, wo);
            dst[..lo].iter_mut().for_each(|d| {
                d.write(0.0);
            });
            for (d, s) in dst[lo..hi].iter_mut().zip(&src[lo + t.kx - t.left..]) {
                d.write(*s);
            }
            dst[hi..].iter_mut().for_each(|d| {
                d.write(0.0);
            });
        } else {
            for (ox, d) in dst.iter_mut().enumerate() {
                d.write(t.source(ox, t.kx, t.left, w).map_or(0.0, |ix| src[ix]));
            }
        }
    }
}

/// [`im2col_row`] of the nearest-resized input whose rows and columns read
/// stored rows `ys` and columns `xs` of `plane` (stored width `wi`).
fn im2col_row_resized(
    plane: &[f32],
    wi: usize,
    (ys, xs): (&[usize], &[usize]),
    wo: usize,
    (y0, rows): (usize, usize),
    t: Tap,
    row: &mut [MaybeUninit<f32>],
) {
    for (oy, dst) in (y0..y0 + rows).zip(row.chunks_mut(wo)) {
        let Some(iy) = t.source(oy, t.ky, t.top, ys.len()) else {
            dst.iter_mut().for_each(|d| {
                d.write(0.0);
            });
            continue;
        };
        let src = &plane[ys[iy] * wi..][..wi];
        for (ox, d) in dst.iter_mut().enumerate() {
            d.write(t.source(ox, t.kx, t.left, xs.len()).map_or(0.0, |ix| src[xs[ix]]));
        }
    }
}

impl CustomOp1 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "sdgen-conv2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), &[])
    }
}

impl CustomOp2 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "sdgen-conv2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), &[(s2, l2)])
    }
}

impl CustomOp3 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "sdgen-conv2d"
    }
    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), &[(s2, l2), (s3, l3)])
    }
}
