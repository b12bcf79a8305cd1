//! What a models dir holds (`sdgen models`), read from file headers and
//! configs without loading weights, and the cached model hashes: a SHA-256
//! is stored in a small sidecar beside the hashed file (`NAME.sdgen.json`,
//! keyed by the file's size and modification time) so that listing and
//! generating do not re-read gigabytes each time.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{detect_family, diffusers, ldm, v_probe, weights::Checkpoint, Family};
use crate::models::unet::UNet;

/// One model of the models dir.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub name: String,
    pub path: PathBuf,
    /// `file` (single checkpoint) or `folder` (diffusers).
    pub format: &'static str,
    pub family: &'static str,
    pub inpainting: bool,
    /// `eps` or `v`.
    pub prediction: &'static str,
    /// The UNet's stored dtype (the one most of its bytes have).
    pub dtype: String,
    /// Bytes on disk (a folder: all its files).
    pub size: u64,
    /// A1111's short model hash (first 10 hex digits of the SHA-256).
    pub hash: String,
}

/// What the sidecar remembers about a file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Sidecar {
    size: u64,
    modified_ns: u128,
    sha256: Option<String>,
    /// SD 2.x single files: the v/ε probe's answer.
    prediction: Option<String>,
}

fn sidecar_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".sdgen.json");
    file.with_file_name(name)
}

/// The file's size and modification time, which a sidecar must match.
fn stamp(file: &Path) -> anyhow::Result<(u64, u128)> {
    let meta = std::fs::metadata(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    Ok((meta.len(), modified.map_or(0, |d| d.as_nanos())))
}

/// The sidecar of `file` if it still describes it.
fn read_sidecar(file: &Path) -> anyhow::Result<Sidecar> {
    let (size, modified_ns) = stamp(file)?;
    let fresh = Sidecar { size, modified_ns, ..Sidecar::default() };
    let cached =
        std::fs::read_to_string(sidecar_path(file)).ok().and_then(|t| serde_json::from_str::<Sidecar>(&t).ok());
    Ok(cached.filter(|c| c.size == size && c.modified_ns == modified_ns).unwrap_or(fresh))
}

/// Writes the sidecar atomically; a read-only models dir only loses the cache.
fn write_sidecar(file: &Path, sidecar: &Sidecar) {
    let path = sidecar_path(file);
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let written = serde_json::to_vec(sidecar).ok().is_some_and(|bytes| std::fs::write(&tmp, bytes).is_ok());
    if !written || std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The full SHA-256 of a file in hex, from its sidecar when that is current.
pub fn sha256(file: &Path) -> anyhow::Result<String> {
    let mut sidecar = read_sidecar(file)?;
    // A sidecar is only a cache: anything but a SHA-256 in it is recomputed.
    if let Some(hash) = sidecar.sha256.as_ref().filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Ok(hash.clone());
    }
    let mut f = std::fs::File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("{}: read failed", file.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    sidecar.sha256 = Some(hex.clone());
    write_sidecar(file, &sidecar);
    Ok(hex)
}

/// Describes the model at `path` (a single file or a diffusers folder).
pub fn describe(path: &Path) -> anyhow::Result<Entry> {
    let hash = super::model_hash(path)?;
    let name = super::model_name(path);
    if path.is_dir() {
        describe_folder(path, name, hash)
    } else {
        describe_file(path, name, hash)
    }
}

/// The dtype holding most of the bytes of the tensors `keep` selects.
fn main_dtype(ckpts: &[std::sync::Arc<Checkpoint>], keep: impl Fn(&str) -> bool) -> String {
    let mut bytes: HashMap<String, usize> = HashMap::new();
    for ckpt in ckpts {
        for (name, dtype, shape) in ckpt.dtypes() {
            if keep(&name) {
                *bytes.entry(format!("{dtype:?}").to_ascii_lowercase()).or_default() += shape.iter().product::<usize>();
            }
        }
    }
    bytes.into_iter().max_by_key(|(_, n)| *n).map_or_else(|| "?".into(), |(d, _)| d)
}

fn describe_file(path: &Path, name: String, hash: String) -> anyhow::Result<Entry> {
    let ckpt = Checkpoint::open(&[path.to_path_buf()])?;
    let tensors = ldm::Tensors::new(ckpt.shapes());
    let family = detect_family(path, &tensors)?;
    let in_channels = tensors.dim(&format!("{}input_blocks.0.0.weight", ldm::UNET_PREFIX), 1)?;
    let prediction = match family {
        Family::Sd2 => cached_prediction(path, &ckpt, &tensors)?,
        Family::Sd1 | Family::Sdxl => "eps",
    };
    Ok(Entry {
        name,
        path: path.to_path_buf(),
        format: "file",
        family: family.name(),
        inpainting: in_channels == 9,
        prediction,
        dtype: main_dtype(&[ckpt], |n| n.starts_with(ldm::UNET_PREFIX)),
        size: stamp(path)?.0,
        hash,
    })
}

/// An SD 2.x single file's prediction type: the probe loads and runs the UNet
/// once, so its answer is kept in the sidecar.
fn cached_prediction(path: &Path, ckpt: &std::sync::Arc<Checkpoint>, t: &ldm::Tensors) -> anyhow::Result<&'static str> {
    let mut sidecar = read_sidecar(path)?;
    let answer = match sidecar.prediction.as_deref() {
        Some("v") => "v",
        Some("eps") => "eps",
        _ => {
            let cfg = ldm::infer_unet(t, None).with_context(|| format!("{}: UNet", path.display()))?;
            let vb = ckpt.var_builder(ldm::unet_names(&cfg), "UNet", DType::F32, &Device::Cpu);
            let unet = UNet::new(&cfg, vb)?;
            let answer = if v_probe(&unet)? < -1.0 { "v" } else { "eps" };
            sidecar.prediction = Some(answer.into());
            write_sidecar(path, &sidecar);
            answer
        }
    };
    Ok(answer)
}

fn describe_folder(dir: &Path, name: String, hash: String) -> anyhow::Result<Entry> {
    #[derive(Deserialize)]
    struct Unet {
        in_channels: usize,
    }
    #[derive(Deserialize)]
    struct TextEncoder {
        #[serde(default)]
        hidden_act: Option<String>,
    }
    #[derive(Deserialize)]
    struct Scheduler {
        #[serde(default)]
        prediction_type: Option<String>,
    }
    let unet: Unet = diffusers::read_json(&dir.join("unet/config.json"))?;
    let te: TextEncoder = diffusers::read_json(&dir.join("text_encoder/config.json"))?;
    let scheduler: Scheduler = diffusers::read_json(&dir.join("scheduler/scheduler_config.json"))?;
    let family = if dir.join("text_encoder_2").is_dir() {
        Family::Sdxl
    } else if te.hidden_act.as_deref() == Some("gelu") {
        Family::Sd2
    } else {
        Family::Sd1
    };
    let unet_files = diffusers::weight_files(&dir.join("unet"), "diffusion_pytorch_model")?;
    let ckpt = Checkpoint::open(&unet_files)?;
    Ok(Entry {
        name,
        path: dir.to_path_buf(),
        format: "folder",
        family: family.name(),
        inpainting: unet.in_channels == 9,
        prediction: if scheduler.prediction_type.as_deref() == Some("v_prediction") { "v" } else { "eps" },
        dtype: main_dtype(&[ckpt], |_| true),
        size: folder_size(dir),
        hash,
    })
}

/// Bytes of every file under `dir` (following links, as loading does; a
/// link loop ends at a depth no model folder reaches).
fn folder_size(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: usize) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        entries
            .flatten()
            .map(|e| {
                let p = e.path();
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_dir() && depth < 8 => walk(&p, depth + 1),
                    Ok(m) if m.is_file() => m.len(),
                    _ => 0,
                }
            })
            .sum()
    }
    walk(dir, 0)
}
