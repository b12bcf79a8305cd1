//! The fused CPU ops against the unfused candle compositions they replace,
//! on every layer shape of the SD 1.5 UNet (CFG batch 2) and VAE (batch 1)
//! at 256², with random inputs and weights; the tiny fixtures' 32/64
//! channels never reach the real GEMM blocking paths. Bound: relative error
//! (max |Δ| over max |expected|) below [`F32_BOUND`] in f32, and below
//! [`F16_BOUND`] for f16 runs against the f32 composition.

mod common;

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::relative_error;
use sdgen::ops::{attention, attention_reference, geglu, geglu_reference, Conv2d, GroupNorm, Linear};

/// GEMMs over up to 11 520 products summed in another order than candle's.
const F32_BOUND: f32 = 1e-5;
/// f16 storage of inputs, weights and outputs: ~2⁻¹¹ relative per value.
const F16_BOUND: f32 = 5e-3;

const UNET_CHANNELS: [usize; 4] = [320, 640, 1280, 1280];
const UNET_LATENT: usize = 32; // 256² / 8
const UNET_BATCH: usize = 2; // one image with classifier-free guidance
const CONTEXT: (usize, usize) = (77, 768);
const VAE_CHANNELS: [usize; 4] = [128, 256, 512, 512];
const VAE_IMAGE: usize = 256;

/// A convolution shape: batch, cin, cout, kernel, stride, side, padding
/// (symmetric, or bottom/right only), and what rides in its GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ConvCase {
    batch: usize,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    side: usize,
    bottom_right: bool,
    offset: bool,
    residual: bool,
}

#[derive(Default)]
struct Shapes {
    convs: BTreeSet<ConvCase>,
    /// (batch, channels, side, silu)
    norms: BTreeSet<(usize, usize, usize, bool)>,
    /// (batch, rows, cin, cout, strided input, residual)
    linears: BTreeSet<(usize, usize, usize, usize, bool, bool)>,
    /// (batch, query rows, key rows, features, heads)
    attentions: BTreeSet<(usize, usize, usize, usize, usize)>,
    /// (batch, rows, gated features)
    gates: BTreeSet<(usize, usize, usize)>,
    /// Upsamplers' convolutions of a nearest 2× resize: (batch, channels, output side)
    upsamplers: BTreeSet<(usize, usize, usize)>,
}

impl Shapes {
    fn conv(&mut self, batch: usize, cin: usize, cout: usize, k: usize, side: usize) {
        let c = ConvCase { batch, cin, cout, k, stride: 1, side, bottom_right: false, offset: false, residual: false };
        self.convs.insert(c);
    }

    fn resnet(&mut self, batch: usize, cin: usize, cout: usize, side: usize, temb: bool) {
        self.norms.insert((batch, cin, side, true));
        self.norms.insert((batch, cout, side, true));
        let c =
            ConvCase { batch, cin, cout, k: 3, stride: 1, side, bottom_right: false, offset: temb, residual: false };
        self.convs.insert(c);
        self.convs.insert(ConvCase { cin: cout, offset: false, residual: true, ..c });
        if cin != cout {
            self.conv(batch, cin, cout, 1, side);
        }
        if temb {
            self.linears.insert((batch, 1, 1280, cout, false, false));
        }
    }

    fn downsample(&mut self, batch: usize, c: usize, side: usize, bottom_right: bool) {
        let case =
            ConvCase { batch, cin: c, cout: c, k: 3, stride: 2, side, bottom_right, offset: false, residual: false };
        self.convs.insert(case);
    }

    /// A spatial transformer (UNet) over `c` channels at `side`.
    fn transformer(&mut self, c: usize, side: usize) {
        let (b, l) = (UNET_BATCH, side * side);
        self.norms.insert((b, c, side, false));
        self.linears.insert((b, l, c, c, true, false)); // proj_in reads the feature map in place
        self.linears.insert((b, l, c, c, false, false)); // to_q
        self.linears.insert((b, CONTEXT.0, CONTEXT.1, c, false, false)); // to_k, to_v
        self.linears.insert((b, l, c, c, false, true)); // to_out + residual
        self.linears.insert((b, l, c, 8 * c, false, false)); // GEGLU projection
        self.gates.insert((b, l, 4 * c));
        self.linears.insert((b, l, 4 * c, c, false, true)); // ff out + residual
        self.attentions.insert((b, l, l, c, 8));
        self.attentions.insert((b, l, CONTEXT.0, c, 8));
        self.output_projection(b, c, side);
    }

    /// An attention's output projection: a 1×1 convolution reading the
    /// sequence as a feature map, + residual.
    fn output_projection(&mut self, batch: usize, c: usize, side: usize) {
        let case = ConvCase {
            batch,
            cin: c,
            cout: c,
            k: 1,
            stride: 1,
            side,
            bottom_right: false,
            offset: false,
            residual: true,
        };
        self.convs.insert(case);
    }

    /// The VAE's mid-block attention over `c` channels at `side`.
    fn vae_attention(&mut self, c: usize, side: usize) {
        self.norms.insert((1, c, side, false));
        self.linears.insert((1, side * side, c, c, true, false));
        self.attentions.insert((1, side * side, side * side, c, 1));
        self.output_projection(1, c, side);
    }
}

/// Every layer shape of SD 1.5's UNet at 256², walked as diffusers builds it.
fn unet_shapes(s: &mut Shapes) {
    let b = UNET_BATCH;
    let mut side = UNET_LATENT;
    s.conv(b, 4, UNET_CHANNELS[0], 3, side);
    let mut skips = vec![UNET_CHANNELS[0]];
    let mut prev = UNET_CHANNELS[0];
    for (i, &c) in UNET_CHANNELS.iter().enumerate() {
        for _ in 0..2 {
            s.resnet(b, prev, c, side, true);
            if i < 3 {
                s.transformer(c, side);
            }
            skips.push(c);
            prev = c;
        }
        if i < 3 {
            s.downsample(b, c, side, false);
            skips.push(c);
            side /= 2;
        }
    }
    s.resnet(b, prev, prev, side, true);
    s.transformer(prev, side);
    for (i, &c) in UNET_CHANNELS.iter().rev().enumerate() {
        for _ in 0..3 {
            let skip = skips.pop().expect("a skip per resnet");
            s.resnet(b, prev + skip, c, side, true);
            if i > 0 {
                s.transformer(c, side);
            }
            prev = c;
        }
        if i < 3 {
            side *= 2;
            s.upsamplers.insert((b, c, side));
        }
    }
    s.norms.insert((b, prev, side, true));
    s.conv(b, prev, 4, 3, side);
}

/// Every layer shape of SD 1.5's VAE (decoder, and encoder for img2img) at 256².
fn vae_shapes(s: &mut Shapes) {
    let latent = VAE_IMAGE / 8;
    // Decoder.
    s.conv(1, 4, 4, 1, latent); // post_quant_conv
    let top = VAE_CHANNELS[3];
    s.conv(1, 4, top, 3, latent);
    let mid = |s: &mut Shapes, c: usize, side: usize| {
        s.resnet(1, c, c, side, false);
        s.vae_attention(c, side);
    };
    mid(s, top, latent);
    let (mut side, mut prev) = (latent, top);
    for (i, &c) in VAE_CHANNELS.iter().rev().enumerate() {
        for _ in 0..3 {
            s.resnet(1, prev, c, side, false);
            prev = c;
        }
        if i < 3 {
            side *= 2;
            s.upsamplers.insert((1, c, side));
        }
    }
    s.norms.insert((1, prev, side, true));
    s.conv(1, prev, 3, 3, side);
    // Encoder.
    let (mut side, mut prev) = (VAE_IMAGE, VAE_CHANNELS[0]);
    s.conv(1, 3, prev, 3, side);
    for (i, &c) in VAE_CHANNELS.iter().enumerate() {
        for _ in 0..2 {
            s.resnet(1, prev, c, side, false);
            prev = c;
        }
        if i < 3 {
            s.downsample(1, c, side, true);
            side /= 2;
        }
    }
    mid(s, prev, side);
    s.norms.insert((1, prev, side, true));
    s.conv(1, prev, 8, 3, side);
    s.conv(1, 8, 8, 1, side); // quant_conv
}

fn all_shapes() -> Shapes {
    let mut s = Shapes::default();
    unet_shapes(&mut s);
    vae_shapes(&mut s);
    s
}

fn randn(shape: &[usize], std: f64) -> Tensor {
    Tensor::randn(0f32, std as f32, shape, &Device::Cpu).unwrap()
}

fn weights(tensors: Vec<(&str, Tensor)>, dtype: DType) -> VarBuilder<'static> {
    let map: HashMap<String, Tensor> = tensors.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
    VarBuilder::from_tensors(map, dtype, &Device::Cpu)
}

fn to(t: &Tensor, dtype: DType) -> Tensor {
    t.to_dtype(dtype).unwrap()
}

/// Checks `ours` (in `dtype`) against the f32 reference and reports the error.
fn check(what: &str, ours: &Tensor, reference: &Tensor, dtype: DType) {
    let err = relative_error(&to(ours, DType::F32), reference);
    let bound = if dtype == DType::F32 { F32_BOUND } else { F16_BOUND };
    eprintln!("{what} {dtype:?}: relative error {err:.2e}");
    assert!(err < bound, "{what} {dtype:?}: relative error {err:e} ≥ {bound:e}");
}

/// Values representable in `dtype`, as f32: both sides then start from the same numbers.
fn representable(t: Tensor, dtype: DType) -> Tensor {
    to(&to(&t, dtype), DType::F32)
}

fn conv_case(c: ConvCase, dtype: DType) {
    let ConvCase { batch, cin, cout, k, stride, side, bottom_right, offset, residual } = c;
    let w = representable(randn(&[cout, cin, k, k], (1.0 / (cin * k * k) as f64).sqrt()), dtype);
    let bias = representable(randn(&[cout], 0.1), dtype);
    let pad = if k == 3 && !bottom_right { 1 } else { 0 };
    let make = |dtype| {
        let conv =
            Conv2d::new(cin, cout, k, stride, pad, weights(vec![("weight", w.clone()), ("bias", bias.clone())], dtype));
        let conv = conv.unwrap();
        if bottom_right {
            conv.with_bottom_right_padding(1)
        } else {
            conv
        }
    };
    // 1×1 convolutions with a residual read a (B, H·W, C) sequence as a
    // feature map in place, as the transformers' output projections do.
    let x = if k == 1 && residual {
        randn(&[batch, side, side, cin], 1.0).permute((0, 3, 1, 2)).unwrap()
    } else {
        randn(&[batch, cin, side, side], 1.0)
    };
    let x = representable(x, dtype);
    let out_side = (side + 2 * pad + bottom_right as usize - k) / stride + 1;
    let off = offset.then(|| representable(randn(&[batch, cout], 1.0), dtype));
    let res = residual.then(|| representable(randn(&[batch, cout, out_side, out_side], 1.0), dtype));
    let (xd, offd, resd) = (to(&x, dtype), off.as_ref().map(|t| to(t, dtype)), res.as_ref().map(|t| to(t, dtype)));
    let ours = make(dtype).forward_with(&xd, offd.as_ref(), resd.as_ref()).unwrap();
    let reference = make(DType::F32).reference(&x, off.as_ref(), res.as_ref()).unwrap();
    check(&format!("{c:?}"), &ours, &reference, dtype);
}

#[test]
fn convolutions_match_candle_on_every_sd15_layer_shape() {
    let shapes = all_shapes();
    eprintln!("{} convolution shapes", shapes.convs.len());
    for &c in &shapes.convs {
        conv_case(c, DType::F32);
    }
}

#[test]
fn group_norms_match_candle_on_every_sd15_layer_shape() {
    let shapes = all_shapes();
    eprintln!("{} group norm shapes", shapes.norms.len());
    for &(b, c, side, silu) in &shapes.norms {
        let make = |dtype| {
            let vb = weights(vec![("weight", randn(&[c], 1.0)), ("bias", randn(&[c], 1.0))], dtype);
            GroupNorm::new(32, c, 1e-6, vb).unwrap()
        };
        // An offset mean, as activations have, tests the centred variance.
        let x = (randn(&[b, c, side, side], 2.0) + 3.0).unwrap();
        let norm = make(DType::F32);
        let ours = if silu { norm.forward_silu(&x) } else { norm.forward(&x) }.unwrap();
        check(
            &format!("group norm {b}×{c}×{side}² silu={silu}"),
            &ours,
            &norm.reference(&x, silu).unwrap(),
            DType::F32,
        );
    }
}

#[test]
fn linear_layers_match_candle_on_every_sd15_layer_shape() {
    let shapes = all_shapes();
    eprintln!("{} linear shapes", shapes.linears.len());
    for &(b, l, cin, cout, strided, residual) in &shapes.linears {
        let vb = weights(
            vec![("weight", randn(&[cout, cin], (1.0 / cin as f64).sqrt())), ("bias", randn(&[cout], 0.1))],
            DType::F32,
        );
        let lin = Linear::new(cin, cout, vb).unwrap();
        let x = if strided { randn(&[b, cin, l], 1.0).transpose(1, 2).unwrap() } else { randn(&[b, l, cin], 1.0) };
        let what = format!("linear {b}×{l}×{cin}→{cout} strided={strided} residual={residual}");
        if residual {
            let r = randn(&[b, l, cout], 1.0);
            check(&what, &lin.forward_add(&x, &r).unwrap(), &lin.reference(&x, Some(&r)).unwrap(), DType::F32);
        } else {
            check(&what, &lin.forward(&x).unwrap(), &lin.reference(&x, None).unwrap(), DType::F32);
        }
    }
}

#[test]
fn attention_matches_candle_on_every_sd15_layer_shape_and_clip() {
    let shapes = all_shapes();
    // CLIP ViT-L's causal self-attention over the 77 tokens.
    let cases = shapes.attentions.iter().map(|&c| (c, false)).chain([((1, 77, 77, 768, 12), true)]);
    for ((b, lq, lk, c, heads), causal) in cases {
        let (q, k, v) = (randn(&[b, lq, c], 1.0), randn(&[b, lk, c], 1.0), randn(&[b, lk, c], 1.0));
        let ours = attention(&q, &k, &v, heads, causal, false).unwrap();
        let reference = attention_reference(&q, &k, &v, heads, causal, false).unwrap();
        check(&format!("attention {b}×{lq}×{lk}×{c}/{heads} causal={causal}"), &ours, &reference, DType::F32);
    }
}

#[test]
fn resized_convolutions_match_candle_on_every_sd15_upsampler() {
    let shapes = all_shapes();
    // (batch, channels, input side, output rows, output columns); the last
    // is an odd UNet latent's upsampler (5 → 9 and 5 → 10).
    let cases = shapes.upsamplers.iter().map(|&(b, c, side)| (b, c, side / 2, side, side)).chain([(2, 64, 5, 9, 10)]);
    for (b, c, from, h, w) in cases {
        let vb = weights(
            vec![("weight", randn(&[c, c, 3, 3], (1.0 / (9 * c) as f64).sqrt())), ("bias", randn(&[c], 0.1))],
            DType::F32,
        );
        let conv = Conv2d::new(c, c, 3, 1, 1, vb).unwrap();
        let x = randn(&[b, c, from, from], 1.0);
        let reference = conv.reference(&x.upsample_nearest2d(h, w).unwrap(), None, None).unwrap();
        check(
            &format!("upsampler {b}×{c}×{from}² → {h}×{w}"),
            &conv.forward_resized(&x, (h, w)).unwrap(),
            &reference,
            DType::F32,
        );
    }
}

#[test]
fn geglu_matches_candle_on_every_sd15_layer_shape() {
    for &(b, l, inner) in &all_shapes().gates {
        // Wide inputs reach erf's tails and GELU's negative dip.
        let x = randn(&[b, l, 2 * inner], 3.0);
        check(&format!("geglu {b}×{l}×{inner}"), &geglu(&x).unwrap(), &geglu_reference(&x).unwrap(), DType::F32);
    }
}

/// f16 storage through the same ops, against the f32 composition: one shape
/// of each kind of path.
#[test]
fn f16_ops_match_the_f32_composition() {
    let cases = [
        ConvCase {
            batch: 2,
            cin: 640,
            cout: 640,
            k: 3,
            stride: 1,
            side: 16,
            bottom_right: false,
            offset: true,
            residual: false,
        },
        ConvCase {
            batch: 2,
            cin: 320,
            cout: 320,
            k: 1,
            stride: 1,
            side: 32,
            bottom_right: false,
            offset: false,
            residual: true,
        },
        ConvCase {
            batch: 1,
            cin: 128,
            cout: 128,
            k: 3,
            stride: 2,
            side: 64,
            bottom_right: true,
            offset: false,
            residual: false,
        },
    ];
    for c in cases {
        conv_case(c, DType::F16);
    }
    let f16 = |t: Tensor| representable(t, DType::F16);
    // Linear layers with weights wider than one f16 block, few rows and many.
    for (b, l, cin, cout) in [(2, 64, 5120, 1280), (2, 1024, 1280, 320)] {
        let (w, bias) = (f16(randn(&[cout, cin], (1.0 / cin as f64).sqrt())), f16(randn(&[cout], 0.1)));
        let lin = |dtype| {
            Linear::new(cin, cout, weights(vec![("weight", w.clone()), ("bias", bias.clone())], dtype)).unwrap()
        };
        let (x, r) = (f16(randn(&[b, l, cin], 1.0)), f16(randn(&[b, l, cout], 1.0)));
        let ours = lin(DType::F16).forward_add(&to(&x, DType::F16), &to(&r, DType::F16)).unwrap();
        check(
            &format!("linear {b}×{l}×{cin}→{cout}"),
            &ours,
            &lin(DType::F32).reference(&x, Some(&r)).unwrap(),
            DType::F16,
        );
    }
    let x = f16(randn(&[2, 640, 16, 16], 1.0));
    let (w, b) = (f16(randn(&[640], 1.0)), f16(randn(&[640], 1.0)));
    let norm = |dtype| {
        GroupNorm::new(32, 640, 1e-5, weights(vec![("weight", w.clone()), ("bias", b.clone())], dtype)).unwrap()
    };
    let reference = norm(DType::F32).reference(&x, true).unwrap();
    let ours = norm(DType::F16).forward_silu(&to(&x, DType::F16)).unwrap();
    check("group norm 2×640×16² silu", &ours, &reference, DType::F16);
    let (q, k, v) = (f16(randn(&[2, 256, 640], 1.0)), f16(randn(&[2, 77, 640], 1.0)), f16(randn(&[2, 77, 640], 1.0)));
    let reference = attention_reference(&q, &k, &v, 8, false, false).unwrap();
    let ours = attention(&to(&q, DType::F16), &to(&k, DType::F16), &to(&v, DType::F16), 8, false, false).unwrap();
    check("attention 2×256×77×640/8", &ours, &reference, DType::F16);
}
