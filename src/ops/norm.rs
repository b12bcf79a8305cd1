//! GroupNorm, optionally followed by SiLU (every ResNet block's and output
//! head's pre-activation), in one pass per group after its statistics, with
//! the groups of all images in parallel.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::kernels::{assume_init, input_f32, mean_var, output, scale_shift, uninit, with_weight};

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
        if x.device().is_cpu() {
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
    fn run(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        if dims.len() < 2 {
            bail!("GroupNorm: expected (B, C, …), got {dims:?}");
        }
        let (c, groups) = (dims[1], self.norm.groups);
        if c != self.norm.weight.dim(0)? {
            bail!("GroupNorm: input has {c} channels, the weights {}", self.norm.weight.dim(0)?);
        }
        let x = input_f32(s, l)?;
        let x = &x[..l.shape().elem_count()];
        let spatial: usize = dims[2..].iter().product();
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

impl CustomOp1 for NormOp<'_> {
    fn name(&self) -> &'static str {
        "sdgen-group-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l)
    }
}
