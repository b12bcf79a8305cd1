//! Textual-inversion embeddings: learned token vectors, used in a prompt by
//! their file name (A1111's convention). Formats: A1111 (`emb_params`, or
//! `string_to_param.*`), diffusers (one tensor named after its token), and
//! SDXL (`clip_l` and `clip_g`, one per text encoder).

use std::path::Path;

use anyhow::bail;
use candle_core::{DType, Tensor};

/// One embedding: its vectors for each text encoder it fits.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The file stem: the word that stands for it in prompts.
    pub name: String,
    /// A1111's short hash (12 hex digits of the file's SHA-256).
    pub hash: String,
    /// `(n, D)` per text encoder (SDXL: two), f32.
    pub vectors: Vec<Tensor>,
}

impl Embedding {
    /// How many tokens it takes in a chunk.
    pub fn len(&self) -> usize {
        self.vectors[0].dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads one embedding file; `widths` are the model's text encoder widths.
pub fn read(path: &Path, widths: &[usize]) -> anyhow::Result<Embedding> {
    let tensors = super::weights::Checkpoint::open(&[path.to_path_buf()])?.load_all()?;
    let as_rows = |t: &Tensor| -> anyhow::Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        Ok(if t.rank() == 1 { t.unsqueeze(0)? } else { t })
    };
    let per_encoder: Vec<Tensor> = if let (Some(l), Some(g)) = (tensors.get("clip_l"), tensors.get("clip_g")) {
        vec![as_rows(l)?, as_rows(g)?]
    } else if let Some(t) = tensors.get("emb_params") {
        vec![as_rows(t)?]
    } else if let Some((_, t)) = tensors.iter().find(|(k, _)| k.starts_with("string_to_param")) {
        vec![as_rows(t)?]
    } else if tensors.len() == 1 {
        vec![as_rows(tensors.values().next().expect("one"))?]
    } else {
        bail!("{}: not a textual-inversion embedding (no emb_params, clip_l/clip_g or single tensor)", path.display());
    };
    let dims: Vec<usize> = per_encoder.iter().map(|t| t.dim(1)).collect::<candle_core::Result<_>>()?;
    if per_encoder.iter().any(|t| t.rank() != 2) || dims.len() < widths.len() || dims[..widths.len()] != *widths {
        bail!("{}: embedding of width {dims:?} does not fit this model's text encoders {widths:?}", path.display());
    }
    let n = per_encoder[0].dim(0)?;
    if n == 0 || n > crate::prompt::CHUNK_TOKENS || per_encoder.iter().any(|t| t.dim(0).ok() != Some(n)) {
        bail!("{}: embedding has {n} vectors; 1 to 75, the same for each encoder, are usable", path.display());
    }
    Ok(Embedding {
        name: super::assets::display_name(path),
        hash: super::hashing::short_sha256(path, super::hashing::ADAPTER_HASH_DIGITS)?,
        vectors: per_encoder.into_iter().take(widths.len()).collect(),
    })
}

/// Every embedding in `dir` that fits the model; the ones that do not are
/// skipped with a reason (A1111 skips them too: they belong to other models).
pub fn read_dir(dir: &Path, widths: &[usize]) -> (Vec<Embedding>, Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return (Vec::new(), Vec::new()) };
    let mut paths: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            ["safetensors", "pt", "bin"].iter().any(|w| ext.eq_ignore_ascii_case(w))
        })
        .collect();
    paths.sort();
    let (mut found, mut skipped) = (Vec::new(), Vec::new());
    for p in paths {
        match read(&p, widths) {
            Ok(e) => found.push(e),
            Err(e) => skipped.push(format!("{e:#}")),
        }
    }
    (found, skipped)
}
