//! PNG output with generation parameters, written atomically, and the
//! AUTOMATIC1111 `parameters` text that goes into it.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;

use crate::pipeline::{Image, Request};

/// Everything the `parameters` chunk records about an image.
pub struct Parameters<'a> {
    pub request: &'a Request,
    pub model_name: &'a str,
    pub model_hash: &'a str,
}

impl Parameters<'_> {
    /// AUTOMATIC1111's infotext: prompt, optional negative prompt line, then
    /// `Key: value` pairs.
    pub fn infotext(&self) -> String {
        let r = self.request;
        let mut text = r.prompt.clone();
        if !r.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", r.negative_prompt));
        }
        text.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}, Version: sdgen {}",
            r.steps,
            r.sampler.a1111_name(),
            r.cfg_scale,
            r.seed,
            r.width,
            r.height,
            self.model_hash,
            self.model_name,
            env!("CARGO_PKG_VERSION"),
        ));
        text
    }
}

/// Writes `image` as an 8-bit RGB PNG with a `parameters` text chunk (tEXt
/// when the text is Latin-1, else iTXt, as PIL does), through a temporary
/// file in the same folder renamed into place: the path holds either the
/// old file or the complete new one, never a partial PNG.
pub fn write_png(path: &Path, image: &Image, parameters: &str) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".sdgen-")
        .suffix(".png.tmp")
        .tempfile_in(dir)
        .with_context(|| format!("{}: cannot create a file in {}", path.display(), dir.display()))?;
    {
        let mut out = BufWriter::new(tmp.as_file());
        let mut encoder = png::Encoder::new(&mut out, image.width as u32, image.height as u32);
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
        out.flush()?;
    }
    tmp.as_file().sync_all().with_context(|| format!("{}: write failed", path.display()))?;
    tmp.persist(path).map_err(|e| anyhow::anyhow!("{}: cannot write: {}", path.display(), e.error))?;
    Ok(())
}

/// The `parameters` text of a PNG, if it has one.
pub fn read_parameters(path: &Path) -> anyhow::Result<Option<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{}: not a PNG", path.display()))?;
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
