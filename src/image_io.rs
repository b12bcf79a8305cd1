//! Image files: reading inputs and masks (PNG/JPEG in any common mode),
//! writing PNGs atomically with the AUTOMATIC1111 `parameters` text.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};

use crate::files::write_atomically;

/// An 8-bit RGB image, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// Inputs larger than this on a side are refused before decoding.
pub const MAX_SIDE: u32 = 16384;

fn decode(path: &Path) -> anyhow::Result<image::DynamicImage> {
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?;
    decode_from(reader, &path.display().to_string())
}

/// Decodes within [`MAX_SIDE`] (checked from the header, before pixels are
/// allocated); errors name `what`.
fn decode_from<R: std::io::BufRead + std::io::Seek>(
    mut reader: image::ImageReader<R>,
    what: &str,
) -> anyhow::Result<image::DynamicImage> {
    let path = Path::new(what);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            anyhow::anyhow!("{}: image is larger than {MAX_SIDE} pixels on a side, sdgen's limit", path.display())
        }
        e => anyhow::anyhow!("{}: not a readable PNG/JPEG image: {e}", path.display()),
    })?;
    if img.width() == 0 || img.height() == 0 {
        bail!("{}: image has no pixels", path.display());
    }
    Ok(img)
}

/// Reads an image as 8-bit RGB (alpha dropped, as PIL's `convert("RGB")`).
pub fn read_image(path: &Path) -> anyhow::Result<Image> {
    Ok(rgb_of(decode(path)?))
}

/// [`read_image`] of a PNG or JPEG file's bytes; errors name `what`.
pub fn image_from_bytes(bytes: &[u8], what: &str) -> anyhow::Result<Image> {
    Ok(rgb_of(decode_bytes(bytes, what)?))
}

/// [`read_mask_levels`] of a file's bytes; errors name `what`.
pub fn mask_levels_from_bytes(bytes: &[u8], what: &str) -> anyhow::Result<(usize, usize, Vec<u8>)> {
    Ok(mask_levels_of(decode_bytes(bytes, what)?))
}

fn decode_bytes(bytes: &[u8], what: &str) -> anyhow::Result<image::DynamicImage> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("{what}: cannot read"))?;
    decode_from(reader, what)
}

fn rgb_of(img: image::DynamicImage) -> Image {
    let rgb = img.to_rgb8();
    Image { width: rgb.width() as usize, height: rgb.height() as usize, rgb: rgb.into_raw() }
}

/// Reads a mask as 8-bit gray levels: the luminance (PIL's `convert("L")`
/// weights) of its colour, or its alpha channel when it has one and its
/// colour is the same everywhere (a mask painted as transparency).
pub fn read_mask_levels(path: &Path) -> anyhow::Result<(usize, usize, Vec<u8>)> {
    Ok(mask_levels_of(decode(path)?))
}

fn mask_levels_of(img: image::DynamicImage) -> (usize, usize, Vec<u8>) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let rgba = img.to_rgba8();
    let px: Vec<[u8; 4]> = rgba.pixels().map(|p| p.0).collect();
    let uniform_colour = px.iter().all(|p| p[..3] == px[0][..3]);
    let levels = if img.color().has_alpha() && uniform_colour {
        px.iter().map(|p| p[3]).collect()
    } else {
        px.iter().map(|p| luminance(p[0], p[1], p[2])).collect()
    };
    (w, h, levels)
}

/// ITU-R 601 luma in PIL's fixed-point form.
fn luminance(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// `image` as an 8-bit RGB PNG with a `parameters` text chunk (tEXt when the
/// text is Latin-1, else iTXt, as PIL does).
pub fn encode_png(out: &mut (impl Write + ?Sized), image: &Image, parameters: &str) -> anyhow::Result<()> {
    let mut encoder = png::Encoder::new(out, image.width as u32, image.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    if parameters.chars().all(|c| (c as u32) < 256) {
        encoder.add_text_chunk("parameters".into(), parameters.into())?;
    } else {
        encoder.add_itxt_chunk("parameters".into(), parameters.into())?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&image.rgb)?;
    writer.finish()?;
    Ok(())
}

/// Writes `image` as [`encode_png`] does, through a temporary
/// file in the same folder renamed into place: the path holds either the
/// old file or the complete new one, never a partial PNG.
pub fn write_png(path: &Path, image: &Image, parameters: &str) -> anyhow::Result<()> {
    write_atomically(path, |out| encode_png(out, image, parameters))
}

/// Writes `bytes` (an encoded file) to `path` as [`write_png`] writes.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomically(path, |out| Ok(out.write_all(bytes)?))
}

/// Removes temporary files a killed writer of `path` may have left.
pub fn remove_stale_temp_files(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = crate::files::temp_prefix(path);
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The `parameters` text of a PNG, if it has one.
pub fn read_parameters(path: &Path) -> anyhow::Result<Option<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    parameters_of(std::io::BufReader::new(file), &path.display().to_string())
}

/// [`read_parameters`] of a PNG file's bytes; errors name `what`.
pub fn parameters_from_bytes(bytes: &[u8], what: &str) -> anyhow::Result<Option<String>> {
    parameters_of(std::io::Cursor::new(bytes), what)
}

fn parameters_of<R: std::io::BufRead + std::io::Seek>(r: R, what: &str) -> anyhow::Result<Option<String>> {
    let reader = png::Decoder::new(r).read_info().with_context(|| format!("{what}: not a PNG"))?;
    let info = reader.info();
    if let Some(t) = info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(Some(t.text.clone()));
    }
    for t in &info.utf8_text {
        if t.keyword == "parameters" {
            return Ok(Some(t.get_text()?));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_pixels_and_non_latin_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        let image = Image { width: 2, height: 1, rgb: vec![1, 2, 3, 250, 251, 252] };
        for text in ["a fox\nSteps: 1", "狐狸 🦊\nSteps: 1"] {
            write_png(&path, &image, text).unwrap();
            assert_eq!(read_parameters(&path).unwrap().as_deref(), Some(text));
            let decoded = image::open(&path).unwrap().to_rgb8();
            assert_eq!(decoded.as_raw(), &image.rgb);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files remain");
    }
}
