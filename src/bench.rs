//! Timing tools for benchmarks and profiling (`sdgen dev …`, which
//! `scripts/bench` and `scripts/gpu-check.sh` call): each prints one JSON
//! object.

use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use candle_core::{DType, Device, Tensor};

use crate::device::{dtype_on, DeviceSpec, Precision};
use crate::loading::Model;

/// Median seconds of `repeat` runs of `f` after one warm-up, waiting for the
/// device after each.
fn time_median(device: &Device, repeat: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    device.synchronize()?;
    let mut times: Vec<f64> = (0..repeat.max(1))
        .map(|_| {
            let t = Instant::now();
            f()?;
            device.synchronize()?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect::<anyhow::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn device_and_dtype(device: DeviceSpec, dtype: Option<Precision>) -> anyhow::Result<(Device, DType)> {
    let device = device.open()?;
    let dtype = dtype_on(dtype, &device)?;
    Ok((device, dtype))
}

/// UNet passes (random latents, a zero text context) and the VAE decode of
/// one image alone, without text encoding or sampling.
pub fn unet(
    model: &Path,
    size: usize,
    batch: usize,
    passes: usize,
    decode: bool,
    device: DeviceSpec,
    dtype: Option<Precision>,
) -> anyhow::Result<serde_json::Value> {
    if size == 0 || !size.is_multiple_of(8) || size > crate::image_io::MAX_SIDE as usize {
        bail!("--size must be a multiple of 8 between 8 and {}, got {size}", crate::image_io::MAX_SIDE);
    }
    if !(1..=64).contains(&batch) {
        bail!("--batch must be between 1 and 64, got {batch}");
    }
    let (device, dtype) = device_and_dtype(device, dtype)?;
    let m = Model::load(model, &device, dtype)?;
    let Some(unet) = m.backbone.unet() else { bail!("unet-bench times UNets; this is {}", m.family.name()) };
    let side = size / m.vae.config.downscale();
    let latents = Tensor::randn(0f32, 1.0, (batch, unet.config.in_channels, side, side), &device)?.to_dtype(dtype)?;
    let context = Tensor::zeros((batch, 77, unet.config.cross_attention_dim), dtype, &device)?;
    let unet_s = time_median(&device, passes, || Ok(unet.forward(&latents, 500.0, &context, None).map(|_| ())?))?;
    let decode_s = if decode {
        let one = latents.narrow(0, 0, 1)?.narrow(1, 0, m.vae.config.latent_channels)?.to_dtype(DType::F32)?;
        Some(time_median(&device, 1, || Ok(m.vae.decode(&one).map(|_| ())?))?)
    } else {
        None
    };
    Ok(serde_json::json!({"device": format!("{:?}", device.location()), "dtype": format!("{dtype:?}").to_lowercase(),
        "size": size, "batch": batch, "unet_pass_s": unet_s, "vae_decode_s": decode_s}))
}

/// The rate of `size³` matrix products on the device after one warm-up:
/// the peak that benchmarks compare achieved GFLOP/s against.
pub fn matmul_peak(
    size: usize,
    repeat: usize,
    device: DeviceSpec,
    dtype: Option<Precision>,
) -> anyhow::Result<serde_json::Value> {
    if !(1..=32768).contains(&size) {
        bail!("--size must be between 1 and 32768, got {size}");
    }
    let (device, dtype) = device_and_dtype(device, dtype)?;
    let a = Tensor::randn(0f32, 1.0, (size, size), &device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (size, size), &device)?.to_dtype(dtype)?;
    let median = time_median(&device, repeat, || Ok(a.matmul(&b).map(|_| ())?))?;
    let gflops = 2.0 * (size as f64).powi(3) / median / 1e9;
    Ok(serde_json::json!({"device": format!("{:?}", device.location()), "size": size,
        "dtype": format!("{dtype:?}").to_lowercase(), "median_s": median,
        "gflops": gflops, "threads": candle_core::utils::get_num_threads()}))
}

/// Each fused op on `device` against its CPU forward, on every layer shape
/// of SD 1.5's UNet (guidance batch) and VAE at `size`², with random inputs:
/// the relative error of each case (to stderr as it goes) and a JSON summary
/// with the worst per kind. Fails when a case is beyond the bound (f32: GEMM
/// summation order; f16: one storage rounding of ~2⁻¹¹ at different points).
pub fn ops_check(size: usize, device: DeviceSpec, dtype: Option<Precision>) -> anyhow::Result<serde_json::Value> {
    use crate::ops::cases::{relative_error, Case};
    if size == 0 || !size.is_multiple_of(64) {
        bail!("--size must be a positive multiple of 64, got {size}");
    }
    let (device, dtype) = device_and_dtype(device, dtype)?;
    let bound = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
    let mut worst: std::collections::BTreeMap<String, (f32, String)> = Default::default();
    let mut failures = Vec::new();
    let cases = Case::sd15(size, 2);
    for case in &cases {
        let p = case.prepare(dtype)?;
        let theirs = case.run(&p, &Device::Cpu, dtype)?;
        let ours = case.run(&p, &device, dtype)?;
        let err = relative_error(&ours, &theirs)?;
        let what = format!("{case:?}");
        eprintln!("{what}: relative error {err:.2e}");
        // A NaN error fails too.
        if err.is_nan() || err > bound {
            failures.push(what.clone());
        }
        let kind = what.split([' ', '(']).next().unwrap_or_default().to_string();
        let entry = worst.entry(kind).or_insert((f32::NEG_INFINITY, String::new()));
        if err.is_nan() || err > entry.0 {
            *entry = (err, what);
        }
    }
    let summary = serde_json::json!({"device": format!("{:?}", device.location()),
        "dtype": format!("{dtype:?}").to_lowercase(), "size": size, "cases": cases.len(), "bound": bound,
        "worst": worst.iter().map(|(k, (e, c))| (k.clone(), serde_json::json!({"error": e, "case": c})))
            .collect::<serde_json::Map<_, _>>(),
        "failures": failures});
    if !failures.is_empty() {
        bail!("{} of {} cases beyond {bound:e}: {summary}", failures.len(), cases.len());
    }
    Ok(summary)
}
