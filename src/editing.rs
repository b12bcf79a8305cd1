//! Pixel-side work of image editing: binary masks and their latent-size
//! version, outpainting canvases, the final overlay of original pixels, and
//! the conversion of images to the VAE's `[-1, 1]` tensors.

use anyhow::bail;
use candle_core::{Device, Tensor};

use crate::image_io::Image;
use crate::request::Overlay;

/// A binary mask, row-major; `true` marks pixels to repaint.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub bits: Vec<bool>,
}

impl Mask {
    /// Binarises gray levels at 0.5 (`level / 255 ≥ 0.5`), as diffusers'
    /// mask processor does.
    pub fn from_levels(width: usize, height: usize, levels: &[u8]) -> Self {
        Self { width, height, bits: levels.iter().map(|&v| v >= 128).collect() }
    }

    /// The mask at latent resolution as `(1, 1, H/f, W/f)` f32: latent pixel
    /// (i, j) takes image pixel (f·i, f·j), like torch's nearest interpolation.
    pub fn latent(&self, factor: usize, device: &Device) -> candle_core::Result<Tensor> {
        let (h, w) = (self.height / factor, self.width / factor);
        let values: Vec<f32> = (0..h)
            .flat_map(|i| (0..w).map(move |j| (i, j)))
            .map(|(i, j)| if self.bits[i * factor * self.width + j * factor] { 1.0 } else { 0.0 })
            .collect();
        Tensor::from_vec(values, (1, 1, h, w), device)
    }

    pub fn is_empty(&self) -> bool {
        !self.bits.iter().any(|b| *b)
    }
}

/// Pixels in `[0, 255]` → `(1, 3, H, W)` in `[-1, 1]`, as diffusers'
/// image processor computes it in f32. Pixels under `mask` become 0.
pub fn to_tensor(image: &Image, mask: Option<&Mask>, device: &Device) -> candle_core::Result<Tensor> {
    planes(image, mask, |v| (v as f32 / 255.0) * 2.0 - 1.0, device)
}

/// `(1, 3, H, W)` of `value` of each level; pixels under `mask` are 0.
pub fn planes(
    image: &Image,
    mask: Option<&Mask>,
    value: fn(u8) -> f32,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (h, w) = (image.height, image.width);
    let mut chw = vec![0f32; 3 * h * w];
    for (p, px) in image.rgb.chunks_exact(3).enumerate() {
        if mask.is_some_and(|m| m.bits[p]) {
            continue;
        }
        for c in 0..3 {
            chw[c * h * w + p] = value(px[c]);
        }
    }
    Tensor::from_vec(chw, (1, 3, h, w), device)
}

/// Extra pixels on each side of an outpainted image.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pads {
    pub left: usize,
    pub right: usize,
    pub top: usize,
    pub bottom: usize,
}

/// The outpainting canvas: `image` extended by replicating its edge pixels,
/// and the mask of the added area.
pub fn outpaint_canvas(image: &Image, pads: Pads) -> anyhow::Result<(Image, Mask)> {
    for (side, v) in [("left", pads.left), ("right", pads.right), ("top", pads.top), ("bottom", pads.bottom)] {
        if v % 8 != 0 {
            bail!("--pad-{side} must be a multiple of 8, got {v}");
        }
    }
    if pads == Pads::default() {
        bail!("outpaint needs at least one non-zero --pad");
    }
    let (w, h) = (image.width + pads.left + pads.right, image.height + pads.top + pads.bottom);
    let limit = crate::image_io::MAX_SIDE as usize;
    if w > limit || h > limit {
        bail!("the outpainted canvas would be {w}x{h}; sides are limited to {limit} pixels");
    }
    let mut rgb = Vec::with_capacity(3 * w * h);
    let mut bits = Vec::with_capacity(w * h);
    for y in 0..h {
        let sy = y.saturating_sub(pads.top).min(image.height - 1);
        for x in 0..w {
            let sx = x.saturating_sub(pads.left).min(image.width - 1);
            let s = 3 * (sy * image.width + sx);
            rgb.extend_from_slice(&image.rgb[s..s + 3]);
            let inside =
                (pads.top..pads.top + image.height).contains(&y) && (pads.left..pads.left + image.width).contains(&x);
            bits.push(!inside);
        }
    }
    Ok((Image { width: w, height: h, rgb }, Mask { width: w, height: h, bits }))
}

/// Puts the original pixels back outside the mask (A1111's overlay), so
/// nothing there changes by even one level. With a feather of `blur > 0`
/// the generated pixels fade in from the mask's edge over about `blur`
/// pixels, inward only: outside the mask the original stays exact; an
/// alpha blends as it says.
pub fn overlay(generated: &Image, original: &Image, mask: &Mask, how: &Overlay) -> Image {
    match how {
        Overlay::Feather(blur) => blend(generated, original, &feather(mask, *blur)),
        Overlay::Alpha(alpha) => blend(generated, original, alpha),
    }
}

/// `generated` over `original` with each pixel's weight `alpha` (0 to 1).
pub fn blend(generated: &Image, original: &Image, alpha: &[f32]) -> Image {
    let rgb = generated
        .rgb
        .iter()
        .zip(&original.rgb)
        .enumerate()
        .map(|(i, (&g, &o))| {
            let a = alpha[i / 3];
            if a <= 0.0 {
                o
            } else if a >= 1.0 {
                g
            } else {
                (o as f32 + (g as f32 - o as f32) * a).round() as u8
            }
        })
        .collect();
    Image { width: generated.width, height: generated.height, rgb }
}

/// Per-pixel weight of the generated image: 0 outside the mask, rising to 1
/// inside it over `blur` pixels (a Gaussian-blurred mask, remapped so its
/// edge value 0.5 becomes 0).
fn feather(mask: &Mask, blur: f32) -> Vec<f32> {
    let hard: Vec<f32> = mask.bits.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
    if blur <= 0.0 {
        return hard;
    }
    let radius = (3.0 * blur).ceil() as isize;
    let kernel: Vec<f32> = (-radius..=radius).map(|d| (-(d * d) as f32 / (2.0 * blur * blur)).exp()).collect();
    let total: f32 = kernel.iter().sum();
    let (w, h) = (mask.width as isize, mask.height as isize);
    // Separable blur, clamping at the borders.
    let pass = |src: &[f32], horizontal: bool| -> Vec<f32> {
        (0..h * w)
            .map(|p| {
                let (y, x) = (p / w, p % w);
                kernel
                    .iter()
                    .enumerate()
                    .map(|(k, wt)| {
                        let d = k as isize - radius;
                        let (yy, xx) =
                            if horizontal { (y, (x + d).clamp(0, w - 1)) } else { ((y + d).clamp(0, h - 1), x) };
                        wt * src[(yy * w + xx) as usize]
                    })
                    .sum::<f32>()
                    / total
            })
            .collect()
    };
    let blurred = pass(&pass(&hard, true), false);
    hard.iter().zip(blurred).map(|(m, b)| m * (2.0 * b - 1.0).clamp(0.0, 1.0)).collect()
}

/// Pillow's `resize(…, LANCZOS)` of an 8-bit image, exactly (diffusers
/// resizes inputs with it): two passes, each with Pillow's fixed-point
/// weights and rounding back to 8 bits, a pass skipped where its side does
/// not change; to the same size, a copy. Pillow 13 runs the vertical pass
/// first when the height shrinks by more than twice the pixels the width
/// does (found by comparing with both orders on random sizes), else the
/// horizontal one.
pub fn resize(image: &Image, width: usize, height: usize) -> Image {
    let (w0, h0) = (image.width as i64, image.height as i64);
    let vertical_first = (height as i64) < h0 && h0 - height as i64 > 2 * (w0 - width as i64);
    let mut out = image.clone();
    for horizontal in if vertical_first { [false, true] } else { [true, false] } {
        out = match horizontal {
            true if width != out.width => resample(&out, width, true),
            false if height != out.height => resample(&out, height, false),
            _ => out,
        };
    }
    out
}

/// Bits of Pillow's fixed-point weights for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `ImagingResample{Horizontal,Vertical}_8bpc` with the Lanczos
/// filter (support 3, widened by the scale when shrinking).
fn resample(image: &Image, size: usize, horizontal: bool) -> Image {
    let input = if horizontal { image.width } else { image.height };
    let scale = input as f64 / size as f64;
    let filter_scale = scale.max(1.0);
    let support = 3.0 * filter_scale;
    let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI) };
    let lanczos = |x: f64| if (-3.0..3.0).contains(&x) { sinc(x) * sinc(x / 3.0) } else { 0.0 };
    // Per output position: the first input index and the integer weights.
    let taps: Vec<(usize, Vec<i64>)> = (0..size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let w: Vec<f64> = (lo..hi).map(|i| lanczos((i as f64 - center + 0.5) / filter_scale)).collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    let v = k * (1u64 << PRECISION_BITS) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i64
                })
                .collect();
            (lo, fixed)
        })
        .collect();
    let (w, h) = if horizontal { (size, image.height) } else { (image.width, size) };
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let (o, fixed_index) = if horizontal { (x, y) } else { (y, x) };
            let (lo, weights) = &taps[o];
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (j, k) in weights.iter().enumerate() {
                    let (sx, sy) = if horizontal { (lo + j, fixed_index) } else { (fixed_index, lo + j) };
                    acc += image.rgb[3 * (sy * image.width + sx) + c] as i64 * k;
                }
                rgb[3 * (y * w + x) + c] = (acc >> PRECISION_BITS).clamp(0, 255) as u8;
            }
        }
    }
    Image { width: w, height: h, rgb }
}

/// A1111's "fill" masked content: the masked pixels take the colours of the
/// unmasked ones around them, spread by premultiplied blurs of decreasing
/// radius composited over each other (256 px down to the exact pixels).
pub fn fill_masked(image: &Image, mask: &Mask) -> Image {
    let (w, h) = (image.width, image.height);
    let base: Vec<[f32; 4]> = image
        .rgb
        .chunks_exact(3)
        .zip(&mask.bits)
        .map(|(px, &masked)| {
            let a = if masked { 0.0 } else { 1.0 };
            [px[0] as f32 * a, px[1] as f32 * a, px[2] as f32 * a, a]
        })
        .collect();
    let mut out = vec![[0f32; 4]; w * h];
    for (radius, repeats) in [(256.0, 1), (64.0, 1), (16.0, 2), (4.0, 4), (2.0, 2), (0.0, 1)] {
        let layer = if radius > 0.0 { box_blur3(&base, w, h, radius) } else { base.clone() };
        for _ in 0..repeats {
            // `layer` over `out`, premultiplied.
            for (o, l) in out.iter_mut().zip(&layer) {
                for c in 0..4 {
                    o[c] = l[c] + o[c] * (1.0 - l[3]);
                }
            }
        }
    }
    let rgb = out
        .iter()
        .flat_map(|p| {
            let a = if p[3] > 0.0 { p[3] } else { 1.0 };
            [0, 1, 2].map(|c| (p[c] / a).round().clamp(0.0, 255.0) as u8)
        })
        .collect();
    Image { width: w, height: h, rgb }
}

/// A Gaussian blur of standard deviation `sigma` approximated by three box
/// blurs (as PIL blurs), edges extended.
fn box_blur3(src: &[[f32; 4]], w: usize, h: usize, sigma: f32) -> Vec<[f32; 4]> {
    let r = (((12.0 * sigma * sigma / 3.0 + 1.0).sqrt() - 1.0) / 2.0).round().max(1.0) as isize;
    let pass = |v: &[[f32; 4]], horizontal: bool| -> Vec<[f32; 4]> {
        let (len, lines) = if horizontal { (w, h) } else { (h, w) };
        let at = |line: usize, i: isize| -> usize {
            let i = i.clamp(0, len as isize - 1) as usize;
            if horizontal {
                line * w + i
            } else {
                i * w + line
            }
        };
        let mut out = vec![[0f32; 4]; v.len()];
        let n = (2 * r + 1) as f32;
        for line in 0..lines {
            let mut sum = [0f32; 4];
            for i in -r..=r {
                let p = v[at(line, i)];
                (0..4).for_each(|c| sum[c] += p[c]);
            }
            for i in 0..len as isize {
                out[at(line, i)] = sum.map(|s| s / n);
                let (add, sub) = (v[at(line, i + r + 1)], v[at(line, i - r)]);
                (0..4).for_each(|c| sum[c] += add[c] - sub[c]);
            }
        }
        out
    };
    let mut v = src.to_vec();
    for _ in 0..3 {
        v = pass(&pass(&v, true), false);
    }
    v
}

/// OpenCV's `GaussianBlur` of 8-bit levels with standard deviation `sigma`,
/// run as A1111 runs it: along x, then (a second call) along y, each with a
/// `2·⌊2.5σ + 0.5⌋ + 1` kernel and borders reflected around the edge pixel.
/// OpenCV's 8-bit path is fixed point: the kernel in 1/256 steps, rounded
/// with the error carried from the tails inward and the centre taking what
/// makes the sum exactly 1, and each pass rounded back to 8 bits.
pub fn blur_levels(levels: &[u8], width: usize, height: usize, sigma: f64) -> Vec<u8> {
    if sigma <= 0.0 {
        return levels.to_vec();
    }
    let half = (2.5 * sigma + 0.5) as usize;
    let gauss: Vec<f64> =
        (0..=2 * half).map(|i| (-((i as f64 - half as f64).powi(2)) / (2.0 * sigma * sigma)).exp()).collect();
    let total: f64 = gauss.iter().sum();
    let mut fixed = vec![0i64; gauss.len()];
    let (mut err, mut sum) = (0.0, 0);
    for i in 0..half {
        let v = gauss[i] / total * 256.0 + err;
        let q = v.round_ties_even();
        err = v - q;
        (fixed[i], fixed[2 * half - i]) = (q as i64, q as i64);
        sum += 2 * q as i64;
    }
    fixed[half] = 256 - sum;
    let reflect = |i: isize, n: usize| -> usize {
        // One pixel wide: every tap is that pixel.
        if n == 1 {
            return 0;
        }
        let n = n as isize;
        let period = 2 * (n - 1);
        let i = i.rem_euclid(period);
        (if i < n { i } else { period - i }) as usize
    };
    let pass = |src: &[u8], horizontal: bool| -> Vec<u8> {
        let mut out = vec![0u8; src.len()];
        for y in 0..height {
            for x in 0..width {
                let mut acc = 0i64;
                for (k, w) in fixed.iter().enumerate() {
                    let k = k as isize - half as isize;
                    let (sx, sy) = if horizontal {
                        (reflect(x as isize + k, width), y)
                    } else {
                        (x, reflect(y as isize + k, height))
                    };
                    acc += w * src[sy * width + sx] as i64;
                }
                out[y * width + x] = ((acc + 128) >> 8).clamp(0, 255) as u8;
            }
        }
        out
    };
    pass(&pass(levels, true), false)
}

/// A pixel rectangle: left, top, right, bottom (exclusive).
pub type Region = (usize, usize, usize, usize);

/// A1111's "only masked" region: the box of the non-zero mask levels
/// (`mw × mh`) grown by `pad` within the image, then widened or heightened
/// (shifted inside the image where it can) to the `width × height` aspect
/// ratio.
pub fn masked_region(levels: &[u8], mw: usize, mh: usize, pad: usize, width: usize, height: usize) -> Option<Region> {
    let set = |x: usize, y: usize| levels[y * mw + x] > 0;
    let xs: Vec<usize> = (0..mw).filter(|&x| (0..mh).any(|y| set(x, y))).collect();
    let ys: Vec<usize> = (0..mh).filter(|&y| (0..mw).any(|x| set(x, y))).collect();
    let (x1, x2) = (*xs.first()?, *xs.last()? + 1);
    let (y1, y2) = (*ys.first()?, *ys.last()? + 1);
    let (x1, y1, x2, y2) = (x1.saturating_sub(pad), y1.saturating_sub(pad), (x2 + pad).min(mw), (y2 + pad).min(mh));
    let grow = |lo: usize, hi: usize, want: f64, limit: usize| -> (usize, usize) {
        let diff = (want - (hi - lo) as f64) as i64;
        let (mut lo, mut hi) = (lo as i64 - diff / 2, hi as i64 + diff - diff / 2);
        if hi >= limit as i64 {
            let over = hi - limit as i64;
            hi -= over;
            lo -= over;
        }
        if lo < 0 {
            hi -= lo;
            lo = 0;
        }
        (lo as usize, (hi as usize).min(limit))
    };
    let ratio = width as f64 / height as f64;
    Some(if (x2 - x1) as f64 / (y2 - y1) as f64 > ratio {
        let (y1, y2) = grow(y1, y2, (x2 - x1) as f64 / ratio, mh);
        (x1, y1, x2, y2)
    } else {
        let (x1, x2) = grow(x1, x2, (y2 - y1) as f64 * ratio, mw);
        (x1, y1, x2, y2)
    })
}

/// The `region` of `image`.
pub fn crop(image: &Image, (x1, y1, x2, y2): Region) -> Image {
    let rgb =
        (y1..y2).flat_map(|y| image.rgb[3 * (y * image.width + x1)..3 * (y * image.width + x2)].to_vec()).collect();
    Image { width: x2 - x1, height: y2 - y1, rgb }
}

/// `base` with `patch` pasted at (`x`, `y`), clipped to `base`.
pub fn paste(base: &Image, patch: &Image, x: usize, y: usize) -> Image {
    let mut out = base.clone();
    for py in 0..patch.height.min(base.height.saturating_sub(y)) {
        let n = patch.width.min(base.width.saturating_sub(x));
        let d = 3 * ((y + py) * base.width + x);
        out.rgb[d..d + 3 * n].copy_from_slice(&patch.rgb[3 * py * patch.width..3 * (py * patch.width + n)]);
    }
    out
}

/// A mask's gray levels as a (gray) image, and back, for the resizes.
pub fn levels_image(width: usize, height: usize, levels: &[u8]) -> Image {
    Image { width, height, rgb: levels.iter().flat_map(|&l| [l, l, l]).collect() }
}

/// The first channel of `image`: the levels of [`levels_image`].
pub fn image_levels(image: &Image) -> Vec<u8> {
    image.rgb.chunks_exact(3).map(|p| p[0]).collect()
}

/// A1111's "crop and resize": scaled to cover `width × height` keeping its
/// aspect ratio, then centred and cropped.
pub fn resize_crop(image: &Image, width: usize, height: usize) -> Image {
    let cover = width * image.height > height * image.width;
    let (w, h) = if cover {
        (width, (image.height * width / image.width).max(1))
    } else {
        ((image.width * height / image.height).max(1), height)
    };
    place(&resize(image, w, h), width, height, false)
}

/// A1111's "resize and fill": scaled to fit inside `width × height`
/// keeping its aspect ratio, centred, and the bands left over filled with
/// its edge rows or columns stretched outwards.
pub fn resize_fill(image: &Image, width: usize, height: usize) -> Image {
    let fit_width = width * image.height < height * image.width;
    let (w, h) = if fit_width {
        (width, (image.height * width / image.width).max(1))
    } else {
        ((image.width * height / image.height).max(1), height)
    };
    place(&resize(image, w, h), width, height, true)
}

/// `image` centred on a `width × height` canvas (offsets rounded as A1111's
/// `width // 2 - w // 2`), cropping what overflows; with `extend`, the
/// canvas outside it takes its nearest edge pixel.
fn place(image: &Image, width: usize, height: usize, extend: bool) -> Image {
    let offset = |outer: usize, inner: usize| outer as i64 / 2 - inner as i64 / 2;
    let (ox, oy) = (offset(width, image.width), offset(height, image.height));
    let mut rgb = vec![0u8; width * height * 3];
    for y in 0..height {
        let sy = y as i64 - oy;
        for x in 0..width {
            let sx = x as i64 - ox;
            let inside = (0..image.width as i64).contains(&sx) && (0..image.height as i64).contains(&sy);
            if !inside && !extend {
                continue;
            }
            let (sx, sy) =
                (sx.clamp(0, image.width as i64 - 1) as usize, sy.clamp(0, image.height as i64 - 1) as usize);
            let s = 3 * (sy * image.width + sx);
            rgb[3 * (y * width + x)..][..3].copy_from_slice(&image.rgb[s..s + 3]);
        }
    }
    Image { width, height, rgb }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_equals_pillows_lanczos() {
        // Pillow 13's Image.resize(…, LANCZOS) of the same pattern: SHA-256
        // prefixes of the RGB bytes, and their first six values.
        use sha2::Digest;
        let src = |w: usize, h: usize| Image {
            width: w,
            height: h,
            rgb: (0..h)
                .flat_map(|y| {
                    (0..w).flat_map(move |x| {
                        (0..3).map(move |c| (((x * 37 + y * 91 + c * 53) % 256) ^ ((x * y * 7) & 0xff)) as u8)
                    })
                })
                .collect(),
        };
        for ((w, h, ow, oh), hash, first) in [
            ((13, 9, 7, 5), "9e135e89e155f5a9", [72, 114, 155, 132, 165, 120]),
            ((13, 9, 20, 17), "3f9fd7e4a646da30", [0, 44, 88, 5, 55, 97]),
            ((13, 9, 13, 4), "061742bc5db83aca", [72, 125, 125, 113, 108, 164]),
            ((64, 48, 33, 47), "8f20702b5718da02", [18, 72, 122, 88, 145, 210]),
            // The vertical pass first: wider and shorter, or much shorter.
            ((13, 9, 15, 4), "2973b4a7220e64d4", [70, 126, 123, 107, 110, 163]),
            ((40, 30, 36, 10), "f94ae50433b14f01", [82, 127, 127, 111, 114, 155]),
        ] {
            let out = resize(&src(w, h), ow, oh);
            let digest = sha2::Sha256::digest(&out.rgb);
            let ours: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
            assert_eq!((ours.as_str(), &out.rgb[..6]), (hash, &first[..]), "{w}x{h} → {ow}x{oh}");
        }
    }

    #[test]
    fn fill_takes_the_colours_around_the_mask_and_keeps_the_rest() {
        // Left half red, right half blue; a masked square inside the red half.
        let (w, h) = (32, 16);
        let rgb = (0..w * h).flat_map(|p| if p % w < 16 { [200, 10, 10] } else { [10, 10, 200] }).collect();
        let image = Image { width: w, height: h, rgb };
        let bits = (0..w * h).map(|p| (4..8).contains(&(p % w)) && (4..8).contains(&(p / w))).collect();
        let filled = fill_masked(&image, &Mask { width: w, height: h, bits });
        let px = |x: usize, y: usize| &filled.rgb[3 * (y * w + x)..3 * (y * w + x) + 3];
        assert_eq!(px(0, 0), &[200, 10, 10]);
        assert_eq!(px(20, 10), &[10, 10, 200]);
        let inside = px(5, 5);
        assert!(inside[0] > 150 && inside[2] < 60, "{inside:?}");
    }

    #[test]
    fn mask_blur_matches_opencv() {
        // cv2.GaussianBlur(m, (9, 1), 1.5) then (1, 9): A1111's mask blur
        // (opencv-python-headless 4.x), with a box and a lone corner level;
        // equal level for level.
        let mut m = vec![0u8; 7 * 9];
        for y in 2..5 {
            for x in 3..7 {
                m[y * 9 + x] = 255;
            }
        }
        m[0] = 100;
        let expected = [
            14, 18, 32, 50, 63, 62, 49, 32, 24, 15, 21, 40, 65, 83, 82, 65, 42, 31, 16, 27, 57, 95, 123, 123, 96, 63,
            47, 16, 29, 66, 111, 143, 143, 112, 73, 54, 13, 25, 56, 95, 123, 123, 96, 63, 47, 9, 16, 38, 64, 82, 82,
            65, 42, 31, 7, 12, 29, 48, 62, 62, 49, 32, 24,
        ];
        assert_eq!(blur_levels(&m, 9, 7, 1.5), expected);
        // A one-pixel-wide mask (a one-pixel-wide input image): σ 2, kernel 11.
        assert_eq!(blur_levels(&[200, 200, 0, 200, 200], 1, 5, 2.0), [152, 150, 148, 150, 152]);
        // A1111's default σ 4 (kernel 21, wider than the 12 rows) on a 20×12
        // pattern: the sum, first values and SHA-256 prefix of OpenCV's result.
        use sha2::Digest;
        let (w, h) = (20, 12);
        let m: Vec<u8> = (0..h)
            .flat_map(|y| {
                (0..w).map(move |x| {
                    if (x + y) % 5 != 0 {
                        if (x * 53 + y * 29) % 7 == 0 {
                            255
                        } else {
                            0
                        }
                    } else {
                        (x * y * 13 % 256) as u8
                    }
                })
            })
            .collect();
        let ours = blur_levels(&m, w, h, 4.0);
        let digest: String = sha2::Sha256::digest(&ours).iter().take(8).map(|b| format!("{b:02x}")).collect();
        let sum: u64 = ours.iter().map(|&v| v as u64).sum();
        assert_eq!(
            (digest.as_str(), &ours[..8], sum),
            ("0109fb23120bd653", &[36, 36, 37, 38, 40, 42, 44, 46][..], 12584)
        );
    }

    #[test]
    fn resize_modes_crop_or_fill_to_the_asked_size() {
        // A 16×8 image into 8×8: cropping keeps the middle, filling pads
        // the top and bottom with the edge rows.
        let img = image(16, 8);
        let crop = resize_crop(&img, 8, 8);
        assert_eq!((crop.width, crop.height), (8, 8));
        let fill = resize_fill(&img, 8, 8);
        assert_eq!((fill.width, fill.height), (8, 8));
        // Fitted 8×4 at rows 2..6; rows 0..2 repeat row 2, rows 6..8 repeat row 5.
        let row = |i: usize| fill.rgb[i * 24..(i + 1) * 24].to_vec();
        assert_eq!(row(0), row(2));
        assert_eq!(row(1), row(2));
        assert_eq!(row(7), row(5));
        assert_ne!(row(2), row(5));
    }

    fn image(w: usize, h: usize) -> Image {
        Image { width: w, height: h, rgb: (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect() }
    }

    #[test]
    fn latent_mask_takes_the_top_left_pixel_of_each_cell() {
        let mut bits = vec![false; 16 * 16];
        bits[8 * 16 + 8] = true; // pixel (8, 8) → latent (1, 1)
        bits[9 * 16 + 9] = true; // inside cell (1, 1) but not its corner: ignored
        bits[7] = true; // pixel (0, 7) → nothing
        let m = Mask { width: 16, height: 16, bits };
        let t = m.latent(8, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(t, vec![0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn outpaint_canvas_replicates_edges_and_masks_the_new_area() {
        let img = image(8, 8);
        let pads = Pads { left: 8, right: 0, top: 0, bottom: 8 };
        let (canvas, mask) = outpaint_canvas(&img, pads).unwrap();
        assert_eq!((canvas.width, canvas.height), (16, 16));
        // Original at offset (8, 0).
        for y in 0..8 {
            assert_eq!(&canvas.rgb[3 * (y * 16 + 8)..3 * (y * 16 + 16)], &img.rgb[3 * y * 8..3 * (y + 1) * 8]);
            assert!(!mask.bits[y * 16 + 8] && mask.bits[y * 16 + 7]);
        }
        // Bottom-left corner copies the original's bottom-left pixel.
        assert_eq!(&canvas.rgb[3 * (15 * 16)..3 * (15 * 16) + 3], &img.rgb[3 * 56..3 * 56 + 3]);
        assert!(outpaint_canvas(&img, Pads { left: 4, ..Pads::default() }).is_err());
        assert!(outpaint_canvas(&img, Pads::default()).is_err());
    }

    #[test]
    fn overlay_keeps_unmasked_pixels_exact_with_and_without_blur() {
        let (orig, generated) = (image(16, 16), Image { width: 16, height: 16, rgb: vec![200; 768] });
        let bits: Vec<bool> = (0..256).map(|p| (4..12).contains(&(p % 16)) && (4..12).contains(&(p / 16))).collect();
        let mask = Mask { width: 16, height: 16, bits };
        for blur in [0.0, 2.0] {
            let out = overlay(&generated, &orig, &mask, &Overlay::Feather(blur));
            for p in 0..256 {
                if !mask.bits[p] {
                    assert_eq!(out.rgb[3 * p..3 * p + 3], orig.rgb[3 * p..3 * p + 3]);
                }
            }
        }
        let hard = overlay(&generated, &orig, &mask, &Overlay::Feather(0.0));
        let soft = overlay(&generated, &orig, &mask, &Overlay::Feather(2.0));
        let edge = 3 * (4 * 16 + 4);
        assert_eq!(hard.rgb[edge], 200);
        assert_ne!(soft.rgb[edge], 200, "the blur fades in at the mask's edge");
    }

    #[test]
    fn masked_pixels_become_zero_in_the_tensor() {
        let img = Image { width: 2, height: 1, rgb: vec![255, 0, 51, 255, 255, 255] };
        let mask = Mask { width: 2, height: 1, bits: vec![false, true] };
        let t = to_tensor(&img, Some(&mask), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(t, vec![1.0, 0.0, -1.0, 0.0, 51.0 / 255.0 * 2.0 - 1.0, 0.0]);
    }
}
