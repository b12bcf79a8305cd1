//! Upscaling an image: an upscaler model run in tiles, or a plain
//! resampler (Pillow's Lanczos or nearest, exactly), to a scale as A1111's
//! upscalers reach it; and the PNG parameters an upscaled image carries.

use anyhow::{bail, ensure};
use candle_core::{DType, Device, Tensor};

use crate::editing;
use crate::image_io::Image;
use crate::models::upscaler::Upscaler;

/// Input pixels per tile side (a 23-block RRDBNet's activations for a
/// 512² tile stay around 1 GB in f32).
pub const TILE: usize = 512;

/// What enlarges the image.
pub enum Upscaling<'a> {
    Model { model: &'a Upscaler, name: &'a str, device: &'a Device },
    Lanczos,
    Nearest,
}

impl Upscaling<'_> {
    /// The name A1111 records (`Postprocess upscaler`, `Hires upscaler`).
    pub fn name(&self) -> &str {
        match self {
            Upscaling::Model { name, .. } => name,
            Upscaling::Lanczos => "Lanczos",
            Upscaling::Nearest => "Nearest",
        }
    }

    /// One enlargement: the model's own scale, or `scale` for a resampler.
    fn once(&self, image: &Image, scale: f64, tile: usize) -> anyhow::Result<Image> {
        let to = |n: usize| (n as f64 * scale) as usize;
        match self {
            Upscaling::Model { model, device, .. } => {
                let side = image.width.max(image.height) * model.config().scale();
                ensure!(
                    side <= crate::image_io::MAX_SIDE as usize,
                    "the upscaled image would be {side} pixels on a side, more than {}",
                    crate::image_io::MAX_SIDE
                );
                run_tiled(model, image, tile, None, device)
            }
            Upscaling::Lanczos => Ok(editing::resize(image, to(image.width), to(image.height))),
            Upscaling::Nearest => Ok(nearest(image, to(image.width), to(image.height))),
        }
    }
}

/// `image` enlarged by `scale` as A1111's `Upscaler.upscale` does it: the
/// target is ⌊side·scale⌋ rounded down to a multiple of 8; the upscaler runs
/// (up to three times while the image is smaller than that), then Pillow's
/// Lanczos resizes to the target if needed. Without a scale a model runs
/// once at its own scale.
pub fn upscale(image: &Image, how: &Upscaling, scale: Option<f64>, tile: usize) -> anyhow::Result<Image> {
    let Some(scale) = scale else {
        return match how {
            Upscaling::Model { .. } => how.once(image, 1.0, tile),
            _ => bail!("the {} resampler needs a scale (--scale)", how.name()),
        };
    };
    ensure!(scale.is_finite() && scale > 0.0, "scale {scale} is not a positive number");
    let dest = |n: usize| ((n as f64 * scale) / 8.0).floor() as usize * 8;
    let (w, h) = (dest(image.width), dest(image.height));
    ensure!(w > 0 && h > 0, "{}×{} scaled by {scale} is smaller than 8 pixels", image.width, image.height);
    ensure!(
        w <= crate::image_io::MAX_SIDE as usize && h <= crate::image_io::MAX_SIDE as usize,
        "{w}×{h} is larger than {} pixels on a side",
        crate::image_io::MAX_SIDE
    );
    let mut out = image.clone();
    for _ in 0..3 {
        let before = (out.width, out.height);
        out = how.once(&out, scale, tile)?;
        if before == (out.width, out.height) || (out.width >= w && out.height >= h) {
            break;
        }
    }
    if (out.width, out.height) != (w, h) {
        out = editing::resize(&out, w, h);
    }
    Ok(out)
}

/// `image` stretched to `width × height` as A1111's `resize_image` ("just
/// resize") does with an upscaler: enlarged by it ([`upscale`]) when the
/// larger ratio of the sides is above 1, then Lanczos to the exact size.
pub fn resize_with(image: &Image, how: &Upscaling, width: usize, height: usize) -> anyhow::Result<Image> {
    let scale = (width as f64 / image.width as f64).max(height as f64 / image.height as f64);
    let mut out = if scale > 1.0 { upscale(image, how, Some(scale), TILE)? } else { image.clone() };
    if (out.width, out.height) != (width, height) {
        out = editing::resize(&out, width, height);
    }
    Ok(out)
}

/// The model's output for `image`, computed in tiles of `tile` input pixels,
/// each with `margin` pixels of context around it (default: the model's
/// [`tile_margin`](crate::models::upscaler::UpscalerConfig::tile_margin))
/// that are cropped away, not blended: every output pixel comes from one tile.
pub fn run_tiled(
    model: &Upscaler,
    image: &Image,
    tile: usize,
    margin: Option<usize>,
    device: &Device,
) -> anyhow::Result<Image> {
    let config = model.config();
    let s = config.scale();
    // Tiles start on multiples of 4 input pixels, so that a pixel-unshuffled
    // input groups its pixels as the whole image does.
    let margin = margin.unwrap_or_else(|| config.tile_margin()).next_multiple_of(4);
    let tile = tile.max(4).next_multiple_of(4);
    let (w, h) = (image.width, image.height);
    let mut out = Image { width: w * s, height: h * s, rgb: vec![0; w * s * h * s * 3] };
    for y0 in (0..h).step_by(tile) {
        for x0 in (0..w).step_by(tile) {
            let (y1, x1) = ((y0 + tile).min(h), (x0 + tile).min(w));
            let (cy0, cx0) = (y0.saturating_sub(margin), x0.saturating_sub(margin));
            let (cy1, cx1) = ((y1 + margin).min(h), (x1 + margin).min(w));
            let crop = editing::crop(image, (cx0, cy0, cx1, cy1));
            let x = (Tensor::from_vec(crop.rgb, (cy1 - cy0, cx1 - cx0, 3), &Device::Cpu)?
                .to_dtype(DType::F32)?
                .permute((2, 0, 1))?
                .unsqueeze(0)?
                / 255.0)?;
            let y = model.forward(&x.to_device(device)?.to_dtype(model.dtype())?)?;
            let y = y.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.squeeze(0)?.permute((1, 2, 0))?;
            let y = (y.clamp(0f32, 1f32)? * 255.0)?.round()?.to_dtype(DType::U8)?;
            let pixels: Vec<u8> = y.flatten_all()?.to_vec1()?;
            let cw = (cx1 - cx0) * s;
            for row in (y0 - cy0) * s..(y1 - cy0) * s {
                let from = (row * cw + (x0 - cx0) * s) * 3;
                let to = (((cy0 * s + row) * w * s) + x0 * s) * 3;
                let n = (x1 - x0) * s * 3;
                out.rgb[to..to + n].copy_from_slice(&pixels[from..from + n]);
            }
        }
    }
    Ok(out)
}

/// Pillow's `resize(…, NEAREST)`: each output pixel takes the input pixel
/// under its centre, the position accumulated in f64 as Pillow's affine
/// transform does.
pub fn nearest(image: &Image, width: usize, height: usize) -> Image {
    let index = |n: usize, out: usize| -> Vec<usize> {
        let step = n as f64 / out as f64;
        let mut at = step * 0.5;
        (0..out)
            .map(|_| {
                let i = (at as usize).min(n - 1);
                at += step;
                i
            })
            .collect()
    };
    let (xs, ys) = (index(image.width, width), index(image.height, height));
    let mut rgb = Vec::with_capacity(width * height * 3);
    for &y in &ys {
        for &x in &xs {
            let at = (y * image.width + x) * 3;
            rgb.extend_from_slice(&image.rgb[at..at + 3]);
        }
    }
    Image { width, height, rgb }
}

/// `parameters` with A1111's postprocessing keys added (its "Extras" tab
/// writes them in an `extras` chunk; here they join the generation's text).
pub fn parameters_with_upscale(parameters: Option<&str>, upscaler: &str, scale: f64) -> String {
    let keys =
        format!("Postprocess upscaler: {upscaler}, Postprocess upscale by: {}", crate::infotext::python_float(scale));
    match parameters.map(str::trim_end).filter(|p| !p.is_empty()) {
        Some(p) if p.lines().count() > 1 || p.contains(": ") => format!("{p}, {keys}"),
        Some(p) => format!("{p}\n{keys}"),
        None => keys,
    }
}

/// `sdgen upscale`: reads `input`, enlarges it with `upscaler` (a model
/// name or path, or `lanczos` / `nearest`), writes `output` with the
/// input's parameters and the postprocessing keys. Returns the new size.
pub fn upscale_file(
    input: &std::path::Path,
    output: &std::path::Path,
    upscaler: &str,
    scale: Option<f64>,
    models_dir: &std::path::Path,
    device: &Device,
    tile: usize,
) -> anyhow::Result<(usize, usize)> {
    use crate::failure::{Failure, Tag};
    let image = crate::image_io::read_image(input).tag(Failure::Input)?;
    let parameters = crate::image_io::read_parameters(input).tag(Failure::Input)?;
    let loaded;
    let how = match resampler(upscaler) {
        Some(r) => r,
        None => {
            let path = crate::loading::assets::find(crate::loading::assets::Asset::Upscaler, upscaler, models_dir)?;
            loaded = crate::loading::upscaler::load(&path, device).tag(Failure::Model)?;
            Upscaling::Model { model: &loaded.model, name: &loaded.name, device }
        }
    };
    let out = upscale(&image, &how, scale, tile).tag(Failure::Usage)?;
    let by = scale.unwrap_or(out.width as f64 / image.width as f64);
    let text = parameters_with_upscale(parameters.as_deref(), how.name(), by);
    crate::image_io::write_png(output, &out, &text).tag(Failure::Output)?;
    Ok((out.width, out.height))
}

/// `lanczos` / `nearest` (A1111's names accepted too; its "None" upscaler
/// leaves the resizing to Lanczos) as resamplers.
pub fn resampler(name: &str) -> Option<Upscaling<'static>> {
    match name.to_ascii_lowercase().as_str() {
        "lanczos" | "none" => Some(Upscaling::Lanczos),
        "nearest" => Some(Upscaling::Nearest),
        _ => None,
    }
}
