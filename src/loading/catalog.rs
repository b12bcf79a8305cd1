//! What a models dir holds (`sdgen models`), read from file headers and
//! configs without loading weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::assets::display_name;
use super::family::Family;
use super::hashing::{read_sidecar, stamp, write_sidecar};
use super::model::v_probe;
use super::weights::{Checkpoint, Component};
use super::{diffusers, ldm};
use crate::files::read_json;
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

/// Describes the model at `path` (a single file or a diffusers folder).
pub fn describe(path: &Path) -> anyhow::Result<Entry> {
    let hash = super::model_hash(path)?;
    let name = display_name(path);
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
    let family = Family::of_single_file(path, &tensors)?;
    let in_channels = match family {
        Family::Sd3 => tensors.dim(&format!("{}x_embedder.proj.weight", ldm::UNET_PREFIX), 1)?,
        _ => tensors.dim(&format!("{}input_blocks.0.0.weight", ldm::UNET_PREFIX), 1)?,
    };
    let prediction = match family {
        Family::Sd3 => "flow",
        _ if family.spec().probe_prediction => cached_prediction(path, &ckpt, &tensors)?,
        _ => "eps",
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
            let vb = ckpt.var_builder(ldm::unet_names(&cfg), Component::Unet, DType::F32, &Device::Cpu);
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
    struct Scheduler {
        #[serde(default)]
        prediction_type: Option<String>,
    }
    let backbone = diffusers::backbone_dir(dir);
    let unet: Unet = read_json(&backbone.join("config.json"))?;
    let scheduler: Scheduler = read_json(&dir.join("scheduler/scheduler_config.json"))?;
    let family = Family::of_folder(dir)?;
    let unet_files = diffusers::weight_files(&backbone, "diffusion_pytorch_model")?;
    let ckpt = Checkpoint::open(&unet_files)?;
    Ok(Entry {
        name,
        path: dir.to_path_buf(),
        format: "folder",
        family: family.name(),
        inpainting: unet.in_channels == 9,
        prediction: match (family, scheduler.prediction_type.as_deref()) {
            (Family::Sd3, _) => "flow",
            (_, Some("v_prediction")) => "v",
            _ => "eps",
        },
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
