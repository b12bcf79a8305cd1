//! Control-image preprocessors for ControlNet.
//!
//! `none` feeds the control image to the ControlNet as given; `canny` turns it into an edge map first, the way
//! diffusers' and A1111's ControlNet examples do with `cv2.Canny(image, low, high)`. The Canny detector here
//! reproduces OpenCV's (aperture 3, L1 gradient) bit for bit, so an edge map made here matches one made in Python.

use crate::image_io::Image;

/// tan(22.5°) in OpenCV's fixed point with 15 fractional bits: `(int)(0.41421356… * (1 << 15) + 0.5)`.
const TG22: i32 = 13573;

/// Canny edge map of an RGB image, bit-exact with OpenCV's `cv2.Canny(rgb, low, high)` on a 3-channel `uint8`
/// array (aperture 3, `L2gradient=False`).
///
/// `rgb` is row-major interleaved RGB and must hold exactly `width * height` pixels. The result has the same
/// layout: 255 on edges and 0 elsewhere, replicated to the three channels, so it can be used as the control image.
/// As in OpenCV, reversed thresholds are swapped and both are floored to integers.
pub fn canny(rgb: &[u8], width: usize, height: usize, low: f64, high: f64) -> Vec<u8> {
    debug_assert_eq!(rgb.len(), width * height * 3, "canny: rgb must hold width * height RGB pixels");
    if width == 0 || height == 0 {
        return Vec::new();
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    // OpenCV's cvFloor; the magnitudes compared against them are integers.
    let (low, high) = (low.floor() as i32, high.floor() as i32);

    // Per-pixel buffers with a one-pixel frame, so the neighbours of border pixels can be read without checks.
    // OpenCV reads magnitude 0 outside the image (not the replicated border that the Sobel filter uses).
    let stride = width + 2;
    let padded = stride * (height + 2);
    let mut mag = vec![0i32; padded];
    let mut grad = vec![(0i32, 0i32); padded];
    let at = |x: usize, y: usize, c: usize| i32::from(rgb[(y * width + x) * 3 + c]);
    for y in 0..height {
        // 3x3 Sobel with BORDER_REPLICATE: out-of-image rows and columns repeat the edge ones.
        let (up, down) = (y.saturating_sub(1), (y + 1).min(height - 1));
        for x in 0..width {
            let (left, right) = (x.saturating_sub(1), (x + 1).min(width - 1));
            // OpenCV keeps the channel with the largest |dx| + |dy|, the first one on ties.
            let mut best = (-1, 0, 0);
            for c in 0..3 {
                let dx = at(right, up, c) + 2 * at(right, y, c) + at(right, down, c)
                    - at(left, up, c)
                    - 2 * at(left, y, c)
                    - at(left, down, c);
                let dy = at(left, down, c) + 2 * at(x, down, c) + at(right, down, c)
                    - at(left, up, c)
                    - 2 * at(x, up, c)
                    - at(right, up, c);
                let m = dx.abs() + dy.abs();
                if m > best.0 {
                    best = (m, dx, dy);
                }
            }
            let i = (y + 1) * stride + x + 1;
            mag[i] = best.0;
            grad[i] = (best.1, best.2);
        }
    }

    // Non-maximum suppression into OpenCV's map states: 0 may be an edge, 1 is not, 2 is. The frame stays 1 so
    // hysteresis never leaves the image.
    let mut map = vec![1u8; padded];
    let mut stack = Vec::new();
    for y in 1..=height {
        for i in y * stride + 1..y * stride + 1 + width {
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (dx, dy) = grad[i];
            // OpenCV's integer sector test: compare |dy| against |dx| * tan(22.5°) and |dx| * tan(67.5°), where
            // tan(67.5°) = tan(22.5°) + 2. One side of the pair uses `>=` so plateaus keep one pixel.
            let (ax, ay) = (dx.abs(), dy.abs() << 15);
            let tg22x = ax * TG22;
            let is_max = if ay < tg22x {
                m > mag[i - 1] && m >= mag[i + 1]
            } else if ay > tg22x + (ax << 16) {
                m > mag[i - stride] && m >= mag[i + stride]
            } else if (dx ^ dy) < 0 {
                // Opposite signs: the gradient runs along the up-right / down-left diagonal.
                m > mag[i - stride + 1] && m > mag[i + stride - 1]
            } else {
                m > mag[i - stride - 1] && m > mag[i + stride + 1]
            };
            if is_max {
                if m > high {
                    map[i] = 2;
                    stack.push(i);
                } else {
                    map[i] = 0;
                }
            }
        }
    }

    // Hysteresis: weak candidates 8-connected to a strong edge become edges.
    while let Some(i) = stack.pop() {
        let (above, below) = (i - stride, i + stride);
        for n in [above - 1, above, above + 1, i - 1, i + 1, below - 1, below, below + 1] {
            if map[n] == 0 {
                map[n] = 2;
                stack.push(n);
            }
        }
    }

    map.chunks_exact(stride)
        .skip(1)
        .take(height)
        .flat_map(|row| &row[1..=width])
        .flat_map(|&state| [if state == 2 { 255 } else { 0 }; 3])
        .collect()
}

/// What is done to a control image before a ControlNet sees it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Preprocess {
    /// The image already is a control map (edges, depth, pose …).
    #[default]
    None,
    /// OpenCV's Canny edges with these hysteresis thresholds.
    Canny { low: f64, high: f64 },
}

/// diffusers' and A1111's Canny thresholds.
const CANNY_THRESHOLDS: (f64, f64) = (100.0, 200.0);

/// `none`, `canny` or `canny:LOW:HIGH`.
impl std::str::FromStr for Preprocess {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let bad = || anyhow::anyhow!("{s:?} is not a control preprocessor: use none, canny or canny:LOW:HIGH");
        let mut parts = s.trim().split(':');
        match (parts.next().map(str::to_ascii_lowercase).as_deref(), parts.next(), parts.next(), parts.next()) {
            (Some("none"), None, ..) => Ok(Preprocess::None),
            (Some("canny"), None, ..) => Ok(Preprocess::Canny { low: CANNY_THRESHOLDS.0, high: CANNY_THRESHOLDS.1 }),
            (Some("canny"), Some(low), Some(high), None) => {
                let number = |v: &str| v.trim().parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0);
                match (number(low), number(high)) {
                    (Some(low), Some(high)) => Ok(Preprocess::Canny { low, high }),
                    _ => Err(anyhow::anyhow!("{s:?}: Canny thresholds must be numbers ≥ 0")),
                }
            }
            _ => Err(bad()),
        }
    }
}

impl Preprocess {
    /// The name A1111's ControlNet extension gives it ("Module").
    pub fn module(self) -> &'static str {
        match self {
            Preprocess::None => "none",
            Preprocess::Canny { .. } => "canny",
        }
    }

    /// A control image as a ControlNet sees it at `width` × `height`:
    /// stretched to that size with Pillow's Lanczos (as diffusers' control
    /// image processor does, without cropping), then preprocessed.
    pub fn control_image(self, image: &Image, width: usize, height: usize) -> Image {
        let image = if (image.width, image.height) == (width, height) {
            image.clone()
        } else {
            crate::editing::resize(image, width, height)
        };
        match self {
            Preprocess::None => image,
            Preprocess::Canny { low, high } => Image { rgb: canny(&image.rgb, width, height, low, high), ..image },
        }
    }
}

/// A control image as diffusers' control image processor gives it:
/// `(1, 3, H, W)`, each level / 255 in f32.
pub fn to_tensor(image: &Image, device: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
    crate::editing::planes(image, None, |v| v as f32 / 255.0, device)
}
