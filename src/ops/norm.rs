//! GroupNorm, optionally followed by SiLU (every ResNet block's and output
//! head's pre-activation), in one pass per group after its statistics, with
//! the groups of all images in parallel.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda;
use super::kernels::{assume_init, input_f32, mean_var, output, scale_shift, uninit, with_weight};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            bail!("GroupNorm: {channels} channels do not split into {groups} groups");
        }
        // candle-nn's init hints (random models follow them): unit scale, zero shift.
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// `silu(group_norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if super::fused(x) {
            x.contiguous()?.apply_op1_no_bwd(&NormOp { norm: self, silu })
        } else {
            self.reference(x, silu)
        }
    }

    /// The unfused composition (statistics in f32 for f16 inputs): other
    /// devices' path and the CPU op's reference in tests.
    pub fn reference(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        let g = x.to_dtype(DType::F32)?.reshape((b, self.groups, ()))?;
        let centred = g.broadcast_sub(&g.mean_keepdim(2)?)?;
        let var = centred.sqr()?.mean_keepdim(2)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?.reshape(x.shape())?;
        let mut shape = vec![1, c];
        shape.resize(x.rank(), 1);
        let w = self.weight.to_dtype(DType::F32)?.reshape(shape.as_slice())?;
        let bias = self.bias.to_dtype(DType::F32)?.reshape(shape.as_slice())?;
        let y = normed.broadcast_mul(&w)?.broadcast_add(&bias)?;
        let y = if silu { candle_nn::ops::silu(&y)? } else { y };
        y.to_dtype(dtype)
    }
}

struct NormOp<'a> {
    norm: &'a GroupNorm,
    silu: bool,
}

impl NormOp<'_> {
    /// The input's channels and elements per channel, checked against the weights.
    fn dims(&self, l: &Layout) -> Result<(usize, usize)> {
        let dims = l.dims();
        if dims.len() < 2 {
            bail!("GroupNorm: expected (B, C, …), got {dims:?}");
        }
        if dims[1] != self.norm.weight.dim(0)? {
            bail!("GroupNorm: input has {} channels, the weights {}", dims[1], self.norm.weight.dim(0)?);
        }
        Ok((dims[1], dims[2..].iter().product()))
    }

    fn run(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (c, spatial) = self.dims(l)?;
        let groups = self.norm.groups;
        let x = input_f32(s, l)?;
        let x = &x[..l.shape().elem_count()];
        let per_group = c / groups * spatial;
        let weight = with_weight(&self.norm.weight, |v| Ok(v.to_vec()))?;
        let bias = with_weight(&self.norm.bias, |v| Ok(v.to_vec()))?;
        let mut out = uninit::<f32>(x.len());
        let (eps, silu) = (self.norm.eps, self.silu);
        out.par_chunks_mut(per_group.max(1)).zip(x.par_chunks(per_group.max(1))).enumerate().for_each(
            |(i, (dst, src))| {
                let (mean, var) = mean_var(src);
                let rstd = 1.0 / (var + eps).sqrt();
                let first = i % groups * (c / groups);
                for (j, (d, s)) in dst.chunks_mut(spatial).zip(src.chunks(spatial)).enumerate() {
                    let a = (rstd * weight[first + j] as f64) as f32;
                    let b0 = bias[first + j] - (mean * a as f64) as f32;
                    scale_shift(d, s, a, b0, silu);
                }
            },
        );
        // SAFETY: the groups cover the whole output and every element was written.
        let out = unsafe { assume_init(out) };
        Ok((output(out, s.dtype())?, l.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
impl NormOp<'_> {
    /// Partial statistics of up to 32 chunks per group (enough blocks for a
    /// GPU when the groups are few and long: the VAE's), then one pass.
    fn run_cuda<T: cuda::Elem>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use candle_core::cuda::WrapErr;
        let (c, spatial) = self.dims(l)?;
        let (dev, groups, b) = (s.device(), self.norm.groups, l.dims()[0]);
        let x = cuda::view::<T>(s, l)?;
        let group_len = c / groups * spatial;
        let chunks = (group_len / 8192).clamp(1, 32);
        // SAFETY: every block writes its chunk's entry before the second kernel reads it.
        let mut partial = unsafe { dev.alloc::<f32>(b * groups * chunks * 3)? };
        let func = cuda::function(dev, &cuda::NORM, &format!("group_stats_{}", T::SUFFIX))?;
        let (len, n) = (group_len as i64, chunks as i32);
        let mut args = func.builder();
        args.arg(&x).arg(&mut partial).arg(&len).arg(&n);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { args.launch(cuda::grid(chunks, b * groups, 1, 256)?) }.w()?;

        // SAFETY: the second kernel writes every element.
        let mut y = unsafe { dev.alloc::<T>(l.shape().elem_count())? };
        let func = cuda::function(dev, &cuda::NORM, &format!("group_apply_{}", T::SUFFIX))?;
        let (channels, groups_i, spatial_i) = (c as i32, groups as i32, spatial as i64);
        let (eps, silu) = (self.norm.eps as f32, self.silu as i32);
        cuda::with_weight::<T, _>(&self.norm.weight, |w| {
            cuda::with_weight::<T, _>(&self.norm.bias, |bias| {
                let mut args = func.builder();
                args.arg(&x).arg(&partial).arg(&w).arg(&bias).arg(&mut y);
                args.arg(&channels).arg(&groups_i).arg(&spatial_i).arg(&n).arg(&eps).arg(&silu);
                // SAFETY: the arguments match the kernel's signature; B·C ≤ 65535 rows is checked by grid().
                unsafe { args.launch(cuda::grid(cuda::row_blocks(spatial, 256), b * c, 1, 256)?) }.w()?;
                Ok(())
            })
        })?;
        Ok((cuda::storage(y, dev), l.shape().clone()))
    }
}

impl CustomOp1 for NormOp<'_> {
    fn name(&self) -> &'static str {
        "sdgen-group-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.run_cuda::<f32>(s, l),
            DType::F16 => self.run_cuda::<half::f16>(s, l),
            dtype => bail!("GroupNorm: no CUDA kernel for {dtype:?}"),
        }
    }
}
