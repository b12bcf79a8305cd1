//! Will a generation fit in memory? Estimated from the weight files' headers
//! before anything loads, so that a run that cannot fit fails at once with
//! the numbers and what would make it fit, instead of being killed by the
//! out-of-memory killer halfway.
//!
//! The estimate is a floor: the weights in the compute dtype plus the UNet's
//! and VAE's largest activations (CPU numbers measured on SD 1.5 shapes:
//! BENCHMARKS.md). Only runs that need more than is available are refused.

use std::path::Path;

use candle_core::DType;

use crate::loading::weights::Checkpoint;

/// Bytes of activations per output pixel and UNet batch item, in f32 (the
/// UNet's feature maps at its first level and the skip connections).
const UNET_BYTES_PER_PIXEL: u64 = 300;
/// Bytes per output pixel of a whole VAE decode in f32 (two 128-channel
/// feature maps at full resolution and a convolution's im2col buffer, three
/// times their size).
const VAE_BYTES_PER_PIXEL: u64 = 5 * 128 * 4;
/// Above about 800² the VAE decodes in 512² tiles (`--vae-tiling auto`).
const VAE_AUTO_TILING_PIXELS: u64 = 800 * 800;
const VAE_TILE_PIXELS: u64 = 512 * 512;

/// What a generation needs, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub weights: u64,
    pub activations: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights + self.activations
    }
}

/// The tensors a model loads (not EMA copies or training state) of the
/// weight files of `path`, a checkpoint file or diffusers folder.
fn weight_values(path: &Path) -> anyhow::Result<u64> {
    let files = if path.is_dir() {
        let mut files = Vec::new();
        for (sub, base) in [
            ("unet", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"),
            ("text_encoder", "model"),
            ("text_encoder_2", "model"),
        ] {
            if path.join(sub).is_dir() {
                files.extend(crate::loading::diffusers::weight_files(&path.join(sub), base)?);
            }
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut values = 0u64;
    for file in files {
        let ckpt = Checkpoint::open(&[file])?;
        for (name, _, shape) in ckpt.dtypes() {
            let loaded = path.is_dir()
                || ["model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."]
                    .iter()
                    .any(|p| name.starts_with(p));
            if loaded {
                values += shape.iter().map(|&d| d as u64).product::<u64>();
            }
        }
    }
    Ok(values)
}

/// The estimate for a `width` × `height` image with `batch` UNet rows (2 per
/// image with guidance) when computing in `dtype`.
pub fn estimate(path: &Path, dtype: DType, width: usize, height: usize, batch: usize) -> anyhow::Result<Estimate> {
    let size = dtype.size_in_bytes() as u64;
    let pixels = (width * height) as u64;
    let unet = UNET_BYTES_PER_PIXEL * pixels * batch as u64 * size / 4;
    let decoded = if pixels > VAE_AUTO_TILING_PIXELS { VAE_TILE_PIXELS } else { pixels };
    let vae = decoded * VAE_BYTES_PER_PIXEL * size / 4;
    Ok(Estimate { weights: weight_values(path)? * size, activations: unet.max(vae) })
}

/// Memory available to this process: `SDGEN_MEMORY_LIMIT` (bytes) when set,
/// else the kernel's `MemAvailable`, lowered by a cgroup (container) limit.
pub fn available() -> Option<u64> {
    if let Ok(limit) = std::env::var("SDGEN_MEMORY_LIMIT") {
        return limit.trim().parse().ok();
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    let mut bytes = kib * 1024;
    let cgroup = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok()?.trim().parse::<u64>().ok();
    if let (Some(max), Some(current)) = (cgroup("memory.max"), cgroup("memory.current")) {
        bytes = bytes.min(max.saturating_sub(current));
    }
    Some(bytes)
}

fn gb(bytes: u64) -> String {
    if bytes < 1_000_000_000 {
        format!("{} MB", bytes.div_ceil(1_000_000))
    } else {
        format!("{:.1} GB", bytes as f64 / 1e9)
    }
}

/// Fails when `need` is more than `available`, saying what would fit.
pub fn check(need: &Estimate, available: u64, dtype: DType, width: usize, height: usize) -> anyhow::Result<()> {
    if need.total() <= available {
        return Ok(());
    }
    let mut options = Vec::new();
    if dtype == DType::F32 {
        options.push(format!("--dtype f16 (weights {})", gb(need.weights / 2)));
    }
    if width * height > 512 * 512 {
        options.push("a smaller --width/--height".to_string());
    }
    options.push("--batch-size 1".into());
    options.push("--vae-tiling on".into());
    options.push("closing other programs".into());
    anyhow::bail!(
        "not enough memory: this needs about {} (weights {} in {}, {} for {width}x{height}) but {} is available; try {}",
        gb(need.total()),
        gb(need.weights),
        format!("{dtype:?}").to_lowercase(),
        gb(need.activations),
        gb(available),
        options.join(", ")
    )
}

/// A model's native image side, from its files alone: its family's default
/// size (for SD 2.x its v models' 768, the larger and so the safer guess).
pub fn native_side(path: &Path) -> usize {
    use crate::loading::{Defaults, Family, Preset};
    let family = if path.is_dir() {
        Family::of_folder(path)
    } else {
        Checkpoint::open(&[path.to_path_buf()])
            .and_then(|ckpt| Family::of_single_file(path, &crate::loading::ldm::Tensors::new(ckpt.shapes())))
    };
    family.map_or(512, |f| Defaults::of(f, crate::sampling::denoiser::Prediction::V, Preset::Standard).size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_does_not_fit_and_says_what_would() {
        let need = Estimate { weights: 4_000_000_000, activations: 600_000_000 };
        assert!(check(&need, 5_000_000_000, DType::F32, 512, 512).is_ok());
        let err = check(&need, 3_000_000_000, DType::F32, 1024, 1024).unwrap_err().to_string();
        assert!(err.contains("needs about 4.6 GB (weights 4.0 GB in f32, 600 MB for 1024x1024) but 3.0 GB"), "{err}");
        assert!(err.contains("--dtype f16 (weights 2.0 GB)") && err.contains("smaller --width/--height"), "{err}");
    }
}
