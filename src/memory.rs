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
    /// Of the weights, SD 3.5's T5 (which `--no-t5` leaves out).
    pub t5: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights + self.activations
    }
}

/// The values of the tensors a model loads (not EMA copies or training
/// state) of the weight files of `path`, a checkpoint file or diffusers
/// folder, and of them SD 3.5's T5 (left out with `no_t5`). A single file's
/// separate text encoders are not counted.
fn weight_values(path: &Path, no_t5: bool) -> anyhow::Result<(u64, u64)> {
    let mut files = Vec::new();
    if path.is_dir() {
        for (sub, base) in [
            ("unet", "diffusion_pytorch_model"),
            ("transformer", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"),
            ("text_encoder", "model"),
            ("text_encoder_2", "model"),
            ("text_encoder_3", "model"),
        ] {
            if path.join(sub).is_dir() {
                let t5 = sub == "text_encoder_3";
                files.extend(
                    crate::loading::diffusers::weight_files(&path.join(sub), base)?.into_iter().map(|f| (f, t5)),
                );
            }
        }
    } else {
        files.push((path.to_path_buf(), false));
    }
    let (mut values, mut t5_values) = (0u64, 0u64);
    for (file, t5_file) in files {
        let ckpt = Checkpoint::open(&[file])?;
        for (name, _, shape) in ckpt.dtypes() {
            let loaded = path.is_dir()
                || [
                    "model.diffusion_model.",
                    "first_stage_model.",
                    "cond_stage_model.",
                    "conditioner.",
                    "text_encoders.",
                ]
                .iter()
                .any(|p| name.starts_with(p));
            let t5 = t5_file || name.starts_with("text_encoders.t5xxl.");
            let n = shape.iter().map(|&d| d as u64).product::<u64>();
            match (loaded, t5) {
                (true, true) if !no_t5 => t5_values += n,
                (true, false) => values += n,
                _ => {}
            }
        }
    }
    Ok((values + t5_values, t5_values))
}

/// The estimate for a `width` × `height` image with `batch` UNet rows (2 per
/// image with guidance) when computing in `dtype` (SD 3.5: with T5 unless `no_t5`).
pub fn estimate(
    path: &Path,
    dtype: DType,
    (width, height): (usize, usize),
    batch: usize,
    no_t5: bool,
) -> anyhow::Result<Estimate> {
    let size = dtype.size_in_bytes() as u64;
    let pixels = (width * height) as u64;
    let unet = UNET_BYTES_PER_PIXEL * pixels * batch as u64 * size / 4;
    let decoded = if pixels > VAE_AUTO_TILING_PIXELS { VAE_TILE_PIXELS } else { pixels };
    let vae = decoded * VAE_BYTES_PER_PIXEL * size / 4;
    let (weights, t5) = weight_values(path, no_t5)?;
    Ok(Estimate { weights: weights * size, activations: unet.max(vae), t5: t5 * size })
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
    if need.t5 > 0 {
        options.push(format!("--no-t5 (T5 takes {})", gb(need.t5)));
    }
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
        let need = Estimate { weights: 4_000_000_000, activations: 600_000_000, t5: 0 };
        assert!(check(&need, 5_000_000_000, DType::F32, 512, 512).is_ok());
        let err = check(&need, 3_000_000_000, DType::F32, 1024, 1024).unwrap_err().to_string();
        assert!(err.contains("needs about 4.6 GB (weights 4.0 GB in f32, 600 MB for 1024x1024) but 3.0 GB"), "{err}");
        assert!(err.contains("--dtype f16 (weights 2.0 GB)") && err.contains("smaller --width/--height"), "{err}");
        assert!(!err.contains("--no-t5"), "{err}");
        let sd35 = Estimate { t5: 1_500_000_000, ..need };
        let err = check(&sd35, 3_000_000_000, DType::F32, 512, 512).unwrap_err().to_string();
        assert!(err.contains("try --no-t5 (T5 takes 1.5 GB), --dtype f16"), "{err}");
    }

    #[test]
    fn sd35_folders_count_t5_unless_left_out() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd35");
        let with = estimate(&dir, DType::F32, (64, 64), 2, false).unwrap();
        let without = estimate(&dir, DType::F32, (64, 64), 2, true).unwrap();
        assert!(with.t5 > 0 && without.t5 == 0);
        assert_eq!(with.weights - without.weights, with.t5);
    }
}
