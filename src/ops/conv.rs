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
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda;
use super::kernels::{assume_init, input_f32, matmul, output, threads, uninit, weight_blocks, with_weight, Mat};

/// Upper bound on one chunk's column matrix: the VAE's full-resolution
/// convolutions would otherwise need gigabytes.
const COLUMN_BUDGET_BYTES: usize = 32 << 20;
/// The same bound on a GPU, where bigger GEMMs pay.
#[cfg(feature = "cuda")]
const GPU_COLUMN_BUDGET_BYTES: usize = 128 << 20;

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
        if !super::fused(x) {
            let x = match resize {
                Some((h, w)) => x.upsample_nearest2d(h, w)?,
                None => x.clone(),
            };
            return self.reference(&x, offset, residual);
        }
        // On the CPU a 1×1 convolution reads an f32 input in place when its
        // pixels are one stride apart; everything else reads a contiguous input.
        let in_place = x.device().is_cpu() && x.dtype() == DType::F32 && resize.is_none() && self.reads_in_place(x);
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

/// A convolution's sizes for one input.
struct Geometry {
    b: usize,
    cin: usize,
    cout: usize,
    k: usize,
    /// The stored input's size.
    hi: usize,
    wi: usize,
    /// The convolved input's size (after the resize, if any).
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    /// For a resized input, the stored row and column each convolved row and column reads.
    maps: Option<(Vec<usize>, Vec<usize>)>,
}

impl ConvOp<'_> {
    /// Checks the input and extra inputs' shapes against the weights.
    fn geometry(&self, xl: &Layout, extra: &[&Layout]) -> Result<Geometry> {
        let c = self.conv;
        let (cout, cin, k, _) = c.weight.dims4()?;
        let &[b, xc, hi, wi] = xl.dims() else { bail!("conv2d: expected a 4-D input, got {:?}", xl.dims()) };
        if xc != cin {
            bail!("conv2d: input has {xc} channels, the weights expect {cin}");
        }
        if hi == 0 || wi == 0 {
            bail!("conv2d: an empty {hi}×{wi} input");
        }
        let (h, w) = self.resize.unwrap_or((hi, wi));
        let maps = self.resize.map(|(h, w)| (nearest(hi, h), nearest(wi, w)));
        let (ho, wo) = c.out_size(h, w)?;
        let mut lens = Vec::new();
        if self.offset {
            lens.push((b * cout, "offset"));
        }
        if self.residual {
            lens.push((b * cout * ho * wo, "residual"));
        }
        for (l, (len, what)) in extra.iter().zip(lens) {
            if l.shape().elem_count() != len || !l.is_contiguous() {
                bail!("conv2d: {what} of shape {:?} does not match the output", l.dims());
            }
        }
        Ok(Geometry { b, cin, cout, k, hi, wi, h, w, ho, wo, maps })
    }

    fn run(&self, (xs, xl): (&CpuStorage, &Layout), extra: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let c = self.conv;
        let layouts: Vec<&Layout> = extra.iter().map(|e| e.1).collect();
        let Geometry { b, cin, cout, k, hi, wi, h, w, ho, wo, maps } = self.geometry(xl, &layouts)?;
        let p = ho * wo;
        let offset = if self.offset { Some(input_f32(extra[0].0, extra[0].1)?) } else { None };
        let residual = if self.residual {
            let (s, l) = extra[self.offset as usize];
            Some(input_f32(s, l)?)
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

#[cfg(feature = "cuda")]
impl ConvOp<'_> {
    fn cuda(&self, x: (&CudaStorage, &Layout), extra: &[(&CudaStorage, &Layout)]) -> Result<(CudaStorage, Shape)> {
        match x.0.dtype() {
            DType::F32 => self.run_cuda::<f32>(x, extra),
            DType::F16 => self.run_cuda::<half::f16>(x, extra),
            dtype => bail!("conv2d: no CUDA kernel for {dtype:?}"),
        }
    }

    /// The initial value, then cuBLAS: a pointwise convolution is one GEMM
    /// per image over its `(cin, pixels)` input as it lies; a k×k one
    /// gathers columns (of whole images when they fit the budget, else of
    /// output rows of one image) and multiplies each chunk.
    fn run_cuda<T: cuda::Elem>(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        extra: &[(&CudaStorage, &Layout)],
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use candle_core::cuda::WrapErr;
        let c = self.conv;
        let layouts: Vec<&Layout> = extra.iter().map(|e| e.1).collect();
        let Geometry { b, cin, cout, k, hi, wi, h, w, ho, wo, maps } = self.geometry(xl, &layouts)?;
        let (dev, p, kk) = (xs.device(), ho * wo, cin * k * k);
        let x = cuda::view::<T>(xs, xl)?;
        let offset = if self.offset { Some(cuda::view::<T>(extra[0].0, extra[0].1)?) } else { None };
        let residual = if self.residual {
            let (s, l) = extra[self.offset as usize];
            Some(cuda::view::<T>(s, l)?)
        } else {
            None
        };
        // SAFETY: the initial value fills every element.
        let mut out = unsafe { dev.alloc::<T>(b * cout * p)? };
        cuda::with_weight::<T, _>(&c.bias, |bias| {
            cuda::fill_initial(
                dev,
                &mut out,
                Some(&bias),
                offset.as_ref(),
                residual.as_ref(),
                (b * cout, p, cout, true),
            )
        })?;
        cuda::with_weight::<T, _>(&c.weight, |weight| {
            let lhs = || cuda::Operand { data: &weight, ld: kk, batch_stride: 0, transposed: false };
            if k == 1 && c.stride == 1 && c.padding == [0; 4] && maps.is_none() {
                let rhs = cuda::Operand { data: &x, ld: p, batch_stride: cin * p, transposed: false };
                return cuda::gemm(dev, (cout, p, cin, b), lhs(), rhs, &mut out.slice_mut(..), (p, cout * p), 1.0);
            }
            let per_row = kk * wo * std::mem::size_of::<T>();
            let rows = (GPU_COLUMN_BUDGET_BYTES / per_row).clamp(1, ho);
            let images = if rows == ho { (GPU_COLUMN_BUDGET_BYTES / (per_row * ho)).clamp(1, b) } else { 1 };
            // SAFETY: each chunk's gather writes the columns its GEMM reads.
            let mut col = unsafe { dev.alloc::<T>(kk * images * rows * wo)? };
            let stream = dev.cuda_stream();
            let upload = |m: &[usize]| stream.clone_htod(&m.iter().map(|&i| i as i32).collect::<Vec<_>>()).w();
            let maps =
                maps.as_ref().map(|(ys, xs)| Ok::<_, candle_core::Error>((upload(ys)?, upload(xs)?))).transpose()?;
            let (row_map, col_map) = match &maps {
                Some((ys, xs)) => (Some(ys.slice(..)), Some(xs.slice(..))),
                None => (None, None),
            };
            let (row_map, col_map) = (cuda::Ptr::of(row_map.as_ref()), cuda::Ptr::of(col_map.as_ref()));
            let im2col = cuda::function(dev, &cuda::CONV, &format!("im2col_{}", T::SUFFIX))?;
            let geometry = [cin, h, w, hi, wi, k, c.stride, c.padding[0], c.padding[2]].map(|v| v as i32);
            let threads = wo.next_multiple_of(32).min(256);
            for b0 in (0..b).step_by(images) {
                let nb = images.min(b - b0);
                for y0 in (0..ho).step_by(rows) {
                    let (nr, first, width) = (rows.min(ho - y0), y0 as i32, wo as i32);
                    let n = nr * wo;
                    let xv = x.slice(b0 * cin * hi * wi..);
                    let mut args = im2col.builder();
                    args.arg(&xv).arg(&mut col);
                    row_map.push(&mut args);
                    col_map.push(&mut args);
                    for g in &geometry {
                        args.arg(g);
                    }
                    args.arg(&first).arg(&width);
                    // SAFETY: the arguments match the kernel's signature; the grid covers the chunk.
                    unsafe { args.launch(cuda::grid(nr, kk, nb, threads)?) }.w()?;
                    let colv = col.slice(..);
                    let rhs = cuda::Operand { data: &colv, ld: n, batch_stride: kk * n, transposed: false };
                    let mut target = out.slice_mut(b0 * cout * p + y0 * wo..);
                    cuda::gemm(dev, (cout, n, kk, nb), lhs(), rhs, &mut target, (p, cout * p), 1.0)?;
                }
            }
            Ok(())
        })?;
        Ok((cuda::storage(out, dev), Shape::from((b, cout, ho, wo))))
    }
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
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda((s, l), &[])
    }
}

impl CustomOp2 for ConvOp<'_> {
    fn name(&self) -> &'static str {
        "sdgen-conv2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), &[(s2, l2)])
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda((s, l), &[(s2, l2)])
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
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda((s, l), &[(s2, l2), (s3, l3)])
    }
}
