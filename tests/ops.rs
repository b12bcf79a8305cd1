//! The fused CPU ops against the unfused candle compositions they replace,
//! on every layer shape of the SD 1.5 UNet (CFG batch 2) and VAE (batch 1)
//! at 256² (`sdgen::ops::cases`), with random inputs and weights; the tiny
//! fixtures' 32/64 channels never reach the real GEMM blocking paths. Bound:
//! relative error (max |Δ| over max |expected|) below [`F32_BOUND`] in f32,
//! and below [`F16_BOUND`] for f16 runs against the f32 composition.

mod common;

use candle_core::{DType, Device};
use common::relative_error;
use sdgen::ops::cases::{Case, ConvCase};

/// GEMMs over up to 11 520 products summed in another order than candle's.
const F32_BOUND: f32 = 1e-5;
/// f16 storage of inputs, weights and outputs: ~2⁻¹¹ relative per value.
const F16_BOUND: f32 = 5e-3;

/// Our forward in `dtype` against the f32 composition, on the same inputs.
fn check(case: Case, dtype: DType) {
    let p = case.prepare(dtype).unwrap();
    let ours = case.run(&p, &Device::Cpu, dtype).unwrap();
    let err = relative_error(&ours, &case.reference(&p).unwrap());
    let bound = if dtype == DType::F32 { F32_BOUND } else { F16_BOUND };
    eprintln!("{case:?} {dtype:?}: relative error {err:.2e}");
    assert!(err < bound, "{case:?} {dtype:?}: relative error {err:e} ≥ {bound:e}");
}

/// Every SD 1.5 case of one kind, in f32.
fn check_all(kind: fn(&Case) -> bool) {
    let cases: Vec<Case> = Case::sd15(256, 2).into_iter().filter(kind).collect();
    eprintln!("{} cases", cases.len());
    assert!(!cases.is_empty());
    for case in cases {
        check(case, DType::F32);
    }
}

#[test]
fn convolutions_match_candle_on_every_sd15_layer_shape() {
    check_all(|c| matches!(c, Case::Conv(_)));
}

#[test]
fn group_norms_match_candle_on_every_sd15_layer_shape() {
    check_all(|c| matches!(c, Case::Norm { .. }));
}

#[test]
fn linear_layers_match_candle_on_every_sd15_layer_shape() {
    check_all(|c| matches!(c, Case::Linear { .. }));
}

#[test]
fn attention_matches_candle_on_every_sd15_layer_shape_and_clip() {
    check_all(|c| matches!(c, Case::Attention { .. }));
}

#[test]
fn resized_convolutions_match_candle_on_every_sd15_upsampler() {
    check_all(|c| matches!(c, Case::Upsampler { .. }));
    // An odd UNet latent's upsampler (5 → 9 rows and 5 → 10 columns).
    check(Case::Upsampler { batch: 2, channels: 64, from: 5, h: 9, w: 10 }, DType::F32);
}

#[test]
fn geglu_matches_candle_on_every_sd15_layer_shape() {
    check_all(|c| matches!(c, Case::Gate { .. }));
}

/// f16 storage through the same ops, against the f32 composition: one shape
/// of each kind of path.
#[test]
fn f16_ops_match_the_f32_composition() {
    let conv = |cin, k, stride, side, offset, residual, bottom_right| {
        Case::Conv(ConvCase { batch: 2, cin, cout: cin, k, stride, side, bottom_right, offset, residual })
    };
    let cases = [
        conv(640, 3, 1, 16, true, false, false),
        conv(320, 1, 1, 32, false, true, false),
        conv(128, 3, 2, 64, false, false, true),
        // Linear layers with weights wider than one f16 block, few rows and many.
        Case::Linear { batch: 2, rows: 64, cin: 5120, cout: 1280, strided: false, residual: true },
        Case::Linear { batch: 2, rows: 1024, cin: 1280, cout: 320, strided: false, residual: true },
        Case::Norm { batch: 2, channels: 640, side: 16, silu: true },
        Case::Attention { batch: 2, queries: 256, keys: 77, features: 640, heads: 8, causal: false },
    ];
    for case in cases {
        check(case, DType::F16);
    }
}
