//! Every layer shape of SD 1.5's UNet and VAE (and CLIP's causal attention)
//! as op cases with random inputs and weights: what `tests/ops.rs` checks
//! the CPU forwards on against the candle compositions, and what `sdgen dev
//! ops-check` checks the CUDA forwards on against the CPU ones.

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::{attention, attention_reference, geglu, geglu_reference, Conv2d, GroupNorm, Linear};

const UNET_CHANNELS: [usize; 4] = [320, 640, 1280, 1280];
const VAE_CHANNELS: [usize; 4] = [128, 256, 512, 512];
const CONTEXT: (usize, usize) = (77, 768);
const TIME_EMBEDDING: usize = 1280;

/// A convolution: batch, channels in and out, kernel, stride, input side,
/// padding (symmetric `k / 2`, or bottom/right only) and what rides in its
/// GEMM. A 1×1 convolution with a residual reads a `(B, H·W, C)` sequence as
/// a feature map, as the transformers' output projections do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConvCase {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub side: usize,
    pub bottom_right: bool,
    pub offset: bool,
    pub residual: bool,
}

/// One op at one shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Case {
    Conv(ConvCase),
    Norm {
        batch: usize,
        channels: usize,
        side: usize,
        silu: bool,
    },
    /// `strided`: the input is a feature map read as a sequence in place.
    Linear {
        batch: usize,
        rows: usize,
        cin: usize,
        cout: usize,
        strided: bool,
        residual: bool,
    },
    Attention {
        batch: usize,
        queries: usize,
        keys: usize,
        features: usize,
        heads: usize,
        causal: bool,
    },
    Gate {
        batch: usize,
        rows: usize,
        features: usize,
    },
    /// A 3×3 convolution of a nearest resize from `from`² to `h × w`.
    Upsampler {
        batch: usize,
        channels: usize,
        from: usize,
        h: usize,
        w: usize,
    },
}

/// The inputs of a case (f32, on the CPU, representable in the dtype they
/// were made for) and its layer.
pub struct Prepared {
    inputs: Vec<Tensor>,
    weights: HashMap<String, Tensor>,
}

impl Case {
    /// The layers of SD 1.5's UNet (`unet_batch`: 2 for one image with
    /// guidance) and VAE (batch 1, decoder and encoder) for `image`² images,
    /// plus CLIP ViT-L's causal self-attention; each shape once.
    pub fn sd15(image: usize, unet_batch: usize) -> Vec<Case> {
        let mut w = Walk { b: unet_batch, cases: BTreeSet::new() };
        w.unet(image / 8);
        w.vae(image);
        w.cases.insert(Case::Attention { batch: 1, queries: 77, keys: 77, features: 768, heads: 12, causal: true });
        w.cases.into_iter().collect()
    }

    /// Random inputs and weights, with values representable in `dtype`.
    pub fn prepare(&self, dtype: DType) -> Result<Prepared> {
        let randn = |shape: &[usize], std: f64| -> Result<Tensor> {
            Tensor::randn(0f32, std as f32, shape, &Device::Cpu)?.to_dtype(dtype)?.to_dtype(DType::F32)
        };
        let (inputs, weights) = match *self {
            Case::Conv(c) => {
                let x = if c.k == 1 && c.residual {
                    randn(&[c.batch, c.side, c.side, c.cin], 1.0)?.permute((0, 3, 1, 2))?
                } else {
                    randn(&[c.batch, c.cin, c.side, c.side], 1.0)?
                };
                let mut inputs = vec![x];
                if c.offset {
                    inputs.push(randn(&[c.batch, c.cout], 1.0)?);
                }
                if c.residual {
                    let o = c.out_side();
                    inputs.push(randn(&[c.batch, c.cout, o, o], 1.0)?);
                }
                let w = randn(&[c.cout, c.cin, c.k, c.k], (1.0 / (c.cin * c.k * c.k) as f64).sqrt())?;
                (inputs, vec![("weight", w), ("bias", randn(&[c.cout], 0.1)?)])
            }
            Case::Norm { batch, channels, side, .. } => {
                // An offset mean, as activations have, tests the centred variance.
                let x = (randn(&[batch, channels, side, side], 2.0)? + 3.0)?;
                (vec![x], vec![("weight", randn(&[channels], 1.0)?), ("bias", randn(&[channels], 1.0)?)])
            }
            Case::Linear { batch, rows, cin, cout, strided, residual } => {
                let x = if strided {
                    randn(&[batch, cin, rows], 1.0)?.transpose(1, 2)?
                } else {
                    randn(&[batch, rows, cin], 1.0)?
                };
                let mut inputs = vec![x];
                if residual {
                    inputs.push(randn(&[batch, rows, cout], 1.0)?);
                }
                let w = randn(&[cout, cin], (1.0 / cin as f64).sqrt())?;
                (inputs, vec![("weight", w), ("bias", randn(&[cout], 0.1)?)])
            }
            Case::Attention { batch, queries, keys, features, .. } => {
                let inputs = vec![
                    randn(&[batch, queries, features], 1.0)?,
                    randn(&[batch, keys, features], 1.0)?,
                    randn(&[batch, keys, features], 1.0)?,
                ];
                (inputs, vec![])
            }
            // Wide inputs reach erf's tails and GELU's negative dip.
            Case::Gate { batch, rows, features } => (vec![randn(&[batch, rows, 2 * features], 3.0)?], vec![]),
            Case::Upsampler { batch, channels, from, .. } => {
                let w = randn(&[channels, channels, 3, 3], (1.0 / (9 * channels) as f64).sqrt())?;
                (
                    vec![randn(&[batch, channels, from, from], 1.0)?],
                    vec![("weight", w), ("bias", randn(&[channels], 0.1)?)],
                )
            }
        };
        Ok(Prepared { inputs, weights: weights.into_iter().map(|(n, t)| (n.to_string(), t)).collect() })
    }

    /// Our fused forward on `device` in `dtype`; the result as f32 on the CPU.
    pub fn run(&self, p: &Prepared, device: &Device, dtype: DType) -> Result<Tensor> {
        let vb = VarBuilder::from_tensors(p.weights.clone(), dtype, device);
        // Inputs keep their strides on the device (the strided cases test that).
        let inputs: Vec<Tensor> = p
            .inputs
            .iter()
            .map(|t| {
                let moved = t.to_dtype(dtype)?.to_device(device)?;
                if t.is_contiguous() {
                    Ok(moved)
                } else {
                    strided_like(t, &moved)
                }
            })
            .collect::<Result<_>>()?;
        let out = self.forward(vb, &inputs, false)?;
        out.to_device(&Device::Cpu)?.to_dtype(DType::F32)
    }

    /// The unfused candle composition in f32 on the CPU.
    pub fn reference(&self, p: &Prepared) -> Result<Tensor> {
        let vb = VarBuilder::from_tensors(p.weights.clone(), DType::F32, &Device::Cpu);
        self.forward(vb, &p.inputs, true)
    }

    fn forward(&self, vb: VarBuilder, x: &[Tensor], reference: bool) -> Result<Tensor> {
        match *self {
            Case::Conv(c) => {
                let pad = if c.k == 3 && !c.bottom_right { 1 } else { 0 };
                let mut conv = Conv2d::new(c.cin, c.cout, c.k, c.stride, pad, vb)?;
                if c.bottom_right {
                    conv = conv.with_bottom_right_padding(1);
                }
                let offset = c.offset.then(|| &x[1]);
                let residual = c.residual.then(|| &x[1 + c.offset as usize]);
                if reference {
                    conv.reference(&x[0], offset, residual)
                } else {
                    conv.forward_with(&x[0], offset, residual)
                }
            }
            Case::Norm { channels, silu, .. } => {
                let norm = GroupNorm::new(32, channels, 1e-6, vb)?;
                match (reference, silu) {
                    (true, _) => norm.reference(&x[0], silu),
                    (false, true) => norm.forward_silu(&x[0]),
                    (false, false) => norm.forward(&x[0]),
                }
            }
            Case::Linear { cin, cout, residual, .. } => {
                let lin = Linear::new(cin, cout, vb)?;
                let r = residual.then(|| &x[1]);
                match (reference, r) {
                    (true, r) => lin.reference(&x[0], r),
                    (false, Some(r)) => lin.forward_add(&x[0], r),
                    (false, None) => lin.forward(&x[0]),
                }
            }
            Case::Attention { heads, causal, .. } => {
                let f = if reference { attention_reference } else { attention };
                f(&x[0], &x[1], &x[2], heads, causal, false)
            }
            Case::Gate { .. } => {
                if reference {
                    geglu_reference(&x[0])
                } else {
                    geglu(&x[0])
                }
            }
            Case::Upsampler { channels, h, w, .. } => {
                let conv = Conv2d::new(channels, channels, 3, 1, 1, vb)?;
                if reference {
                    conv.reference(&x[0].upsample_nearest2d(h, w)?, None, None)
                } else {
                    conv.forward_resized(&x[0], (h, w))
                }
            }
        }
    }
}

/// Max |a − b| relative to the expected tensor's largest magnitude.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> Result<f32> {
    if actual.dims() != expected.dims() {
        candle_core::bail!("shapes differ: {:?} and {:?}", actual.dims(), expected.dims());
    }
    let diff = (actual - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
    Ok(diff / scale)
}

impl ConvCase {
    pub fn out_side(&self) -> usize {
        let pad = if self.k == 3 && !self.bottom_right { 2 } else { self.bottom_right as usize };
        (self.side + pad - self.k) / self.stride + 1
    }
}

/// `moved` (a copy of `t`, in whatever layout a dtype or device change
/// left) with `t`'s storage order: the cases' strided inputs are permutes of
/// contiguous tensors.
fn strided_like(t: &Tensor, moved: &Tensor) -> Result<Tensor> {
    let st = t.stride();
    // The dimension order in which `t`'s strides decrease is its storage order.
    let mut order: Vec<usize> = (0..st.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(st[i]));
    let stored = moved.permute(order.clone())?.contiguous()?;
    let mut inverse = vec![0; order.len()];
    for (pos, &i) in order.iter().enumerate() {
        inverse[i] = pos;
    }
    stored.permute(inverse)
}

/// Walks the models as diffusers builds them, collecting each layer's case.
struct Walk {
    /// The UNet's batch.
    b: usize,
    cases: BTreeSet<Case>,
}

impl Walk {
    fn add(&mut self, c: Case) {
        self.cases.insert(c);
    }

    fn conv(&mut self, batch: usize, cin: usize, cout: usize, k: usize, side: usize) {
        let c = ConvCase { batch, cin, cout, k, stride: 1, side, bottom_right: false, offset: false, residual: false };
        self.add(Case::Conv(c));
    }

    fn norm(&mut self, batch: usize, channels: usize, side: usize, silu: bool) {
        self.add(Case::Norm { batch, channels, side, silu });
    }

    fn linear(&mut self, batch: usize, rows: usize, cin: usize, cout: usize, strided: bool, residual: bool) {
        self.add(Case::Linear { batch, rows, cin, cout, strided, residual });
    }

    fn resnet(&mut self, batch: usize, cin: usize, cout: usize, side: usize, temb: bool) {
        self.norm(batch, cin, side, true);
        self.norm(batch, cout, side, true);
        let c =
            ConvCase { batch, cin, cout, k: 3, stride: 1, side, bottom_right: false, offset: temb, residual: false };
        self.add(Case::Conv(c));
        self.add(Case::Conv(ConvCase { cin: cout, offset: false, residual: true, ..c }));
        if cin != cout {
            self.conv(batch, cin, cout, 1, side);
        }
        if temb {
            self.linear(batch, 1, TIME_EMBEDDING, cout, false, false);
        }
    }

    fn downsample(&mut self, batch: usize, c: usize, side: usize, bottom_right: bool) {
        let case =
            ConvCase { batch, cin: c, cout: c, k: 3, stride: 2, side, bottom_right, offset: false, residual: false };
        self.add(Case::Conv(case));
    }

    fn upsample(&mut self, batch: usize, channels: usize, side: usize) {
        self.add(Case::Upsampler { batch, channels, from: side / 2, h: side, w: side });
    }

    /// A spatial transformer (UNet) over `c` channels at `side`.
    fn transformer(&mut self, c: usize, side: usize) {
        let (b, l) = (self.b, side * side);
        self.norm(b, c, side, false);
        self.linear(b, l, c, c, true, false); // proj_in reads the feature map in place
        self.linear(b, l, c, c, false, false); // to_q
        self.linear(b, CONTEXT.0, CONTEXT.1, c, false, false); // to_k, to_v
        self.linear(b, l, c, c, false, true); // to_out + residual
        self.linear(b, l, c, 8 * c, false, false); // GEGLU projection
        self.add(Case::Gate { batch: b, rows: l, features: 4 * c });
        self.linear(b, l, 4 * c, c, false, true); // ff out + residual
        self.add(Case::Attention { batch: b, queries: l, keys: l, features: c, heads: 8, causal: false });
        self.add(Case::Attention { batch: b, queries: l, keys: CONTEXT.0, features: c, heads: 8, causal: false });
        self.output_projection(b, c, side);
    }

    /// An attention's output projection: a 1×1 convolution reading the
    /// sequence as a feature map, + residual.
    fn output_projection(&mut self, batch: usize, c: usize, side: usize) {
        let k = 1;
        let case =
            ConvCase { batch, cin: c, cout: c, k, stride: 1, side, bottom_right: false, offset: false, residual: true };
        self.add(Case::Conv(case));
    }

    /// The VAE's mid-block attention over `c` channels at `side`.
    fn vae_attention(&mut self, c: usize, side: usize) {
        self.norm(1, c, side, false);
        self.linear(1, side * side, c, c, true, false);
        let l = side * side;
        self.add(Case::Attention { batch: 1, queries: l, keys: l, features: c, heads: 1, causal: false });
        self.output_projection(1, c, side);
    }

    fn unet(&mut self, latent: usize) {
        let b = self.b;
        let mut side = latent;
        self.conv(b, 4, UNET_CHANNELS[0], 3, side);
        let mut skips = vec![UNET_CHANNELS[0]];
        let mut prev = UNET_CHANNELS[0];
        for (i, &c) in UNET_CHANNELS.iter().enumerate() {
            for _ in 0..2 {
                self.resnet(b, prev, c, side, true);
                if i < 3 {
                    self.transformer(c, side);
                }
                skips.push(c);
                prev = c;
            }
            if i < 3 {
                self.downsample(b, c, side, false);
                skips.push(c);
                side /= 2;
            }
        }
        self.resnet(b, prev, prev, side, true);
        self.transformer(prev, side);
        for (i, &c) in UNET_CHANNELS.iter().rev().enumerate() {
            for _ in 0..3 {
                let skip = skips.pop().expect("a skip per resnet");
                self.resnet(b, prev + skip, c, side, true);
                if i > 0 {
                    self.transformer(c, side);
                }
                prev = c;
            }
            if i < 3 {
                side *= 2;
                self.upsample(b, c, side);
            }
        }
        self.norm(b, prev, side, true);
        self.conv(b, prev, 4, 3, side);
    }

    /// The decoder, and the encoder for img2img.
    fn vae(&mut self, image: usize) {
        let latent = image / 8;
        self.conv(1, 4, 4, 1, latent); // post_quant_conv
        let top = VAE_CHANNELS[3];
        self.conv(1, 4, top, 3, latent);
        let mid = |w: &mut Self, c: usize, side: usize| {
            w.resnet(1, c, c, side, false);
            w.vae_attention(c, side);
        };
        mid(self, top, latent);
        let (mut side, mut prev) = (latent, top);
        for (i, &c) in VAE_CHANNELS.iter().rev().enumerate() {
            for _ in 0..3 {
                self.resnet(1, prev, c, side, false);
                prev = c;
            }
            if i < 3 {
                side *= 2;
                self.upsample(1, c, side);
            }
        }
        self.norm(1, prev, side, true);
        self.conv(1, prev, 3, 3, side);
        let (mut side, mut prev) = (image, VAE_CHANNELS[0]);
        self.conv(1, 3, prev, 3, side);
        for (i, &c) in VAE_CHANNELS.iter().enumerate() {
            for _ in 0..2 {
                self.resnet(1, prev, c, side, false);
                prev = c;
            }
            if i < 3 {
                self.downsample(1, c, side, true);
                side /= 2;
            }
        }
        mid(self, prev, side);
        self.norm(1, prev, side, true);
        self.conv(1, prev, 8, 3, side);
        self.conv(1, 8, 8, 1, side); // quant_conv
    }
}
