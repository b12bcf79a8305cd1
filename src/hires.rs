//! Hires fix (A1111's txt2img "Hires. fix"): the second pass's size and
//! step count, its upscaler (a latent interpolation or an image upscaler),
//! and the latent interpolations exactly as torch's `interpolate` computes
//! them for the modes A1111 offers.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure};
use candle_core::{DType, Tensor};

use crate::request::Size;

/// torch's `interpolate` modes that A1111's latent upscalers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    Bilinear,
    Bicubic,
    Nearest,
    NearestExact,
}

/// A latent upscale mode: an interpolation, with or without antialiasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentMode {
    pub interpolation: Interpolation,
    pub antialias: bool,
}

/// sdgen's name, A1111's name, and the mode (A1111's `latent_upscale_modes`).
pub const LATENT_MODES: [(&str, &str, LatentMode); 6] = {
    use Interpolation::*;
    const fn m(interpolation: Interpolation, antialias: bool) -> LatentMode {
        LatentMode { interpolation, antialias }
    }
    [
        ("latent", "Latent", m(Bilinear, false)),
        ("latent-antialiased", "Latent (antialiased)", m(Bilinear, true)),
        ("latent-bicubic", "Latent (bicubic)", m(Bicubic, false)),
        ("latent-bicubic-antialiased", "Latent (bicubic antialiased)", m(Bicubic, true)),
        ("latent-nearest", "Latent (nearest)", m(Nearest, false)),
        ("latent-nearest-exact", "Latent (nearest-exact)", m(NearestExact, false)),
    ]
};

/// What enlarges the first pass.
#[derive(Debug, Clone, PartialEq)]
pub enum HiresUpscaler {
    /// Its latents, interpolated.
    Latent(LatentMode),
    /// Its decoded image, by an upscaler model (name or path) or the
    /// `lanczos`/`nearest` resampler, then encoded again.
    Image(String),
}

impl Default for HiresUpscaler {
    fn default() -> Self {
        HiresUpscaler::Latent(LATENT_MODES[0].2)
    }
}

impl HiresUpscaler {
    /// The upscaler model it names (a name or path to find), if it is
    /// neither a latent mode nor a resampler.
    pub fn model(&self) -> Option<&str> {
        match self {
            HiresUpscaler::Image(name) if crate::upscale::resampler(name).is_none() => Some(name),
            _ => None,
        }
    }
}

impl FromStr for HiresUpscaler {
    type Err = anyhow::Error;

    /// A latent mode by sdgen's or A1111's name (any case), else an image
    /// upscaler's name, found when the job runs.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        ensure!(!s.is_empty(), "the upscaler name is empty");
        let latent = LATENT_MODES
            .iter()
            .find(|(name, a1111, _)| s.eq_ignore_ascii_case(name) || s.eq_ignore_ascii_case(a1111))
            .map(|(_, _, mode)| HiresUpscaler::Latent(*mode));
        if latent.is_none() && s.to_ascii_lowercase().starts_with("latent") {
            let names: Vec<&str> = LATENT_MODES.iter().map(|(n, _, _)| *n).collect();
            bail!("{s:?} is not a latent upscale mode ({})", names.join(", "));
        }
        Ok(latent.unwrap_or_else(|| HiresUpscaler::Image(s.to_string())))
    }
}

impl fmt::Display for HiresUpscaler {
    /// A1111's name of a latent mode (what its `Hires upscaler` key holds),
    /// or the image upscaler's name as given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HiresUpscaler::Latent(mode) => {
                let (_, a1111, _) = LATENT_MODES.iter().find(|(_, _, m)| m == mode).expect("every mode is listed");
                f.write_str(a1111)
            }
            HiresUpscaler::Image(name) => f.write_str(name),
        }
    }
}

/// The size asked for: a factor of the first pass's, or a size (A1111's
/// "Resize width/height to"; 0 = from the other side and the aspect).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HiresTarget {
    Scale(f64),
    Resize(Size),
}

/// Where the second pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiresSize {
    /// What the first pass is upscaled to, a multiple of 8 pixels.
    pub upscale_to: Size,
    /// Latent cells cut away (left + right, top + bottom) when a resize
    /// target has another aspect than the first pass: A1111 covers the
    /// target, then crops the latents to it, centred.
    pub crop: (usize, usize),
}

impl HiresSize {
    /// A1111's `calculate_target_resolution` for a `width × height` first
    /// pass, sizes rounded down to a multiple of 8 pixels.
    pub fn of(width: usize, height: usize, target: HiresTarget) -> anyhow::Result<Self> {
        let max = crate::image_io::MAX_SIDE as usize;
        ensure!((1..=max).contains(&width) && (1..=max).contains(&height), "the first pass is {width}x{height}");
        if let HiresTarget::Resize(size) = target {
            ensure!(size.width.max(size.height) <= max, "--hires-size {size} is larger than {max} pixels on a side");
        }
        let (mut crop_x, mut crop_y) = (0i64, 0i64);
        let (w, h) = (width as i64, height as i64);
        let (to_w, to_h) = match target {
            HiresTarget::Scale(f) => {
                ensure!(f.is_finite() && f > 0.0, "--hires-scale must be a positive number, got {f}");
                ((width as f64 * f) as i64, (height as f64 * f) as i64)
            }
            HiresTarget::Resize(Size { width: 0, height: 0 }) => bail!("--hires-size 0x0 gives no size"),
            HiresTarget::Resize(Size { width: x, height: 0 }) => (x as i64, x as i64 * h / w),
            HiresTarget::Resize(Size { width: 0, height: y }) => (y as i64 * w / h, y as i64),
            HiresTarget::Resize(Size { width: x, height: y }) => {
                let (x, y) = (x as i64, y as i64);
                let (to_w, to_h) =
                    if (w as f64 / h as f64) < (x as f64 / y as f64) { (x, x * h / w) } else { (y * w / h, y) };
                (crop_x, crop_y) = ((to_w - x).div_euclid(8), (to_h - y).div_euclid(8));
                (to_w, to_h)
            }
        };
        let upscale_to = Size { width: (to_w.max(0) as usize) / 8 * 8, height: (to_h.max(0) as usize) / 8 * 8 };
        let size = HiresSize { upscale_to, crop: (crop_x.max(0) as usize, crop_y.max(0) as usize) };
        let out = size.output();
        ensure!(out.width > 0 && out.height > 0, "the hires fix's size {out} is less than 8 pixels on a side");
        Ok(size)
    }

    /// The second pass's image size.
    pub fn output(&self) -> Size {
        let cut = |n: usize, c: usize| (n / 8).saturating_sub(c) * 8;
        Size { width: cut(self.upscale_to.width, self.crop.0), height: cut(self.upscale_to.height, self.crop.1) }
    }

    /// `latents` (`upscale_to` / 8) cropped to the output, centred as A1111
    /// cuts them (the extra cell, if odd, from the end).
    pub fn crop_latents(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let (cx, cy) = self.crop;
        let (_, _, h, w) = latents.dims4()?;
        latents.narrow(2, cy / 2, h - cy)?.narrow(3, cx / 2, w - cx)
    }
}

/// The second pass's steps: `run` (0: the first pass's `steps`) steps, the
/// last ones of a schedule of ⌊run / min(denoise, 0.999)⌋ (A1111's
/// `setup_img2img_steps` when the steps are given). Returns (total, run).
pub fn steps(run: usize, steps: usize, denoise: f64) -> (usize, usize) {
    let run = if run == 0 { steps } else { run };
    ((run as f64 / denoise.min(0.999)) as usize, run)
}

/// `x` (N, C, H, W) resized to `height × width` as torch's
/// `F.interpolate(x, size, mode, antialias)` does, by a matrix per axis.
pub fn interpolate(x: &Tensor, height: usize, width: usize, mode: LatentMode) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let matrix = |n_in: usize, n_out: usize| -> candle_core::Result<Tensor> {
        let mut m = vec![0f32; n_out * n_in];
        for (o, taps) in axis_taps(n_in, n_out, mode).into_iter().enumerate() {
            for (i, weight) in taps {
                m[o * n_in + i] += weight;
            }
        }
        Tensor::from_vec(m, (n_out, n_in), x.device())
    };
    let x = x.to_dtype(DType::F32)?;
    let along_w = x.broadcast_matmul(&matrix(w, width)?.t()?)?;
    matrix(h, height)?.broadcast_matmul(&along_w)
}

/// Each output index's input indices and weights along one axis, as
/// torch's CPU kernels compute them (in f32 where they do).
fn axis_taps(n_in: usize, n_out: usize, mode: LatentMode) -> Vec<Vec<(usize, f32)>> {
    let scale = n_in as f32 / n_out as f32;
    let last = n_in - 1;
    let clamp = |i: i64| i.clamp(0, last as i64) as usize;
    (0..n_out)
        .map(|o| match (mode.interpolation, mode.antialias) {
            (Interpolation::Nearest, _) => {
                // torch's integer shortcuts for 1× and 2×, else ⌊o·scale⌋ in f32.
                let i = if n_out == n_in {
                    o
                } else if n_out == 2 * n_in {
                    o >> 1
                } else {
                    ((o as f32 * scale).floor() as usize).min(last)
                };
                vec![(i, 1.0)]
            }
            (Interpolation::NearestExact, _) => {
                let i = (((o as f64 + 0.5) * scale as f64) as f32).floor() as usize;
                vec![(i.min(last), 1.0)]
            }
            (Interpolation::Bilinear, false) => {
                let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(last);
                let l1 = (src - i0 as f32).clamp(0.0, 1.0);
                let i1 = if i0 < last { i0 + 1 } else { i0 };
                vec![(i0, 1.0 - l1), (i1, l1)]
            }
            (Interpolation::Bicubic, false) => {
                const A: f32 = -0.75;
                let src = scale * (o as f32 + 0.5) - 0.5;
                let i0 = (src.floor() as i64).min(last as i64);
                let t = (src - i0 as f32).clamp(0.0, 1.0);
                let coeffs = [cubic_far(t + 1.0, A), cubic_near(t, A), cubic_near(1.0 - t, A), cubic_far(2.0 - t, A)];
                coeffs.iter().enumerate().map(|(k, &c)| (clamp(i0 - 1 + k as i64), c)).collect()
            }
            (Interpolation::Bilinear | Interpolation::Bicubic, true) => antialiased_taps(o, n_in, scale, mode),
        })
        .collect()
}

/// torch's antialiased (Pillow-style) taps: the filter widened by the
/// scale when shrinking, weights over the inputs in range, normalised.
fn antialiased_taps(o: usize, n_in: usize, scale: f32, mode: LatentMode) -> Vec<(usize, f32)> {
    let (size, filter): (f64, fn(f32) -> f32) = match mode.interpolation {
        Interpolation::Bicubic => (4.0, |x| {
            // Keys' a = −0.5 here, as Pillow (not −0.75 as plain bicubic).
            let x = x.abs();
            match x {
                _ if x < 1.0 => cubic_near(x, -0.5),
                _ if x < 2.0 => cubic_far(x, -0.5),
                _ => 0.0,
            }
        }),
        _ => (2.0, |x| (1.0 - x.abs()).max(0.0)),
    };
    let (support, invscale) = if scale >= 1.0 { (size * 0.5 * scale as f64, 1.0 / scale) } else { (size * 0.5, 1.0) };
    let center = (scale as f64 * (o as f64 + 0.5)) as f32 as f64;
    let support = support as f32 as f64;
    let xmin = ((center - support + 0.5) as i64).max(0) as usize;
    let xmax = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
    let mut taps: Vec<(usize, f32)> =
        (xmin..xmax).map(|j| (j, filter((((j as f64) - center + 0.5) * invscale as f64) as f32))).collect();
    let total: f32 = taps.iter().map(|t| t.1).sum();
    if total != 0.0 {
        taps.iter_mut().for_each(|t| t.1 /= total);
    }
    taps
}

/// Keys' cubic convolution kernel for |x| ≤ 1.
fn cubic_near(x: f32, a: f32) -> f32 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

/// Keys' cubic convolution kernel for 1 < |x| < 2.
fn cubic_far(x: f32, a: f32) -> f32 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_a1111() {
        let s = |w, h| Size { width: w, height: h };
        let scaled = HiresSize::of(64, 56, HiresTarget::Scale(1.5)).unwrap();
        assert_eq!((scaled.upscale_to, scaled.output()), (s(96, 80), s(96, 80)));
        // int(600·1.75) = 1050 → 1048.
        assert_eq!(HiresSize::of(600, 512, HiresTarget::Scale(1.75)).unwrap().output(), s(1048, 896));
        assert_eq!(HiresSize::of(512, 768, HiresTarget::Resize(s(1024, 0))).unwrap().output(), s(1024, 1536));
        assert_eq!(HiresSize::of(512, 768, HiresTarget::Resize(s(0, 1024))).unwrap().output(), s(680, 1024));
        // Another aspect: cover 1024x1536, crop 64 latent rows to 1024x1024.
        let cover = HiresSize::of(512, 768, HiresTarget::Resize(s(1024, 1024))).unwrap();
        assert_eq!((cover.upscale_to, cover.crop, cover.output()), (s(1024, 1536), (0, 64), s(1024, 1024)));
        let latents = Tensor::zeros((1, 4, 192, 128), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert_eq!(cover.crop_latents(&latents).unwrap().dims4().unwrap(), (1, 4, 128, 128));
        assert!(HiresSize::of(64, 64, HiresTarget::Scale(0.05)).is_err());
        assert!(HiresSize::of(0, 64, HiresTarget::Resize(s(64, 0))).is_err());
        assert!(HiresSize::of(64, 64, HiresTarget::Resize(s(usize::MAX, 7))).is_err());
        assert!(HiresSize::of(64, 64, HiresTarget::Scale(1e300)).is_ok_and(|h| h.output().width > 1 << 40));
        assert!(HiresSize::of(64, 64, HiresTarget::Scale(f64::NAN)).is_err());
    }

    #[test]
    fn steps_run_the_tail_of_a_longer_schedule() {
        assert_eq!(steps(0, 6, 0.7), (8, 6));
        assert_eq!(steps(4, 5, 0.5), (8, 4));
        assert_eq!(steps(10, 20, 1.0), (10, 10));
    }

    #[test]
    fn upscaler_names() {
        let parse = |s: &str| s.parse::<HiresUpscaler>().unwrap();
        assert_eq!(parse("Latent (bicubic antialiased)"), parse("latent-bicubic-antialiased"));
        assert_eq!(parse("LATENT").to_string(), "Latent");
        assert_eq!(parse("4x-UltraSharp"), HiresUpscaler::Image("4x-UltraSharp".into()));
        let err = "latent-cubic".parse::<HiresUpscaler>().unwrap_err().to_string();
        assert!(err.contains("is not a latent upscale mode"), "{err}");
    }
}
