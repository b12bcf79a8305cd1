//! Finding what the user names: a model (`--model`), a LoRA (`--lora`,
//! `<lora:…>`), a VAE (`--vae`), a ControlNet, an upscaler and the
//! embeddings folder, each by path or by name in the models dir, in the
//! subfolders A1111 and ComfyUI use.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::failure::{Failure, Tag};

/// What a name is looked up as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    Model,
    Lora,
    Vae,
    ControlNet,
    /// An ESRGAN-family image upscaler.
    Upscaler,
}

impl Asset {
    /// The subfolders of the models dir it may be in.
    fn subfolders(self) -> &'static [&'static str] {
        match self {
            Asset::Model => SUBFOLDERS,
            Asset::Lora => &["Lora", "loras", "LoRA", "lora"],
            Asset::Vae => &["VAE", "vae"],
            Asset::ControlNet => &["ControlNet", "controlnet"],
            Asset::Upscaler => &["ESRGAN", "RealESRGAN", "upscale_models"],
        }
    }

    /// Whether a name in the models dir resolved to `p`.
    fn fits(self, p: &Path) -> bool {
        match self {
            Asset::Model => is_checkpoint_file(p) || is_diffusers_folder(p),
            Asset::Lora | Asset::Vae | Asset::Upscaler => p.is_file(),
            Asset::ControlNet => p.is_file() || is_controlnet_folder(p),
        }
    }
}

/// The extensions of weight files: safetensors, and PyTorch's pickles
/// (read as data, never run: [`super::pickle`]).
pub const WEIGHT_EXTENSIONS: &[&str] = &["safetensors", "ckpt", "pt", "pth", "bin"];

/// `name` as a path (any file, or for a model a diffusers folder), else
/// `NAME.<ext>` ([`WEIGHT_EXTENSIONS`], in that order) or `NAME` in the
/// models dir's subfolders for `kind`.
pub fn find(kind: Asset, name: &str, models_dir: &Path) -> anyhow::Result<PathBuf> {
    find_untagged(kind, name, models_dir).tag(Failure::Model)
}

fn find_untagged(kind: Asset, name: &str, models_dir: &Path) -> anyhow::Result<PathBuf> {
    let direct = PathBuf::from(name);
    if direct.is_file() || (kind == Asset::Model && is_diffusers_folder(&direct)) {
        return Ok(direct);
    }
    if kind == Asset::ControlNet && direct.is_dir() {
        if is_controlnet_folder(&direct) {
            return Ok(direct);
        }
        bail!("{}: folder has no config.json, so it is not a diffusers ControlNet folder", direct.display());
    }
    if kind == Asset::Model && direct.is_dir() {
        bail!("{}: folder has no model_index.json, so it is not a diffusers model folder", direct.display());
    }
    for sub in kind.subfolders() {
        let base = models_dir.join(sub);
        let named = WEIGHT_EXTENSIONS.iter().map(|ext| base.join(format!("{name}.{ext}")));
        for candidate in named.chain([base.join(name)]) {
            if kind.fits(&candidate) {
                return Ok(candidate);
            }
        }
    }
    let dir = models_dir.display();
    match kind {
        Asset::Model => {
            let known: Vec<String> = list_models(models_dir).iter().map(|p| display_name(p)).collect();
            let hint = if known.is_empty() {
                "it holds no models".to_string()
            } else {
                format!("it holds: {}", known.join(", "))
            };
            bail!("model {name:?}: no such file, and not found in {dir} ({hint})")
        }
        Asset::Lora => bail!("LoRA {name:?}: no such file, and not in {dir}/Lora or {dir}/loras"),
        Asset::Vae => bail!("--vae {name:?}: no such file, and not in {dir}/VAE"),
        Asset::ControlNet => bail!("ControlNet {name:?}: no such file or folder, and not in {dir}/ControlNet"),
        Asset::Upscaler => bail!(
            "upscaler {name:?}: not lanczos or nearest, no such file, and not in {dir}/ESRGAN, {dir}/RealESRGAN or \
             {dir}/upscale_models"
        ),
    }
}

/// A diffusers `ControlNetModel` folder: a `config.json` beside its weights.
fn is_controlnet_folder(p: &Path) -> bool {
    p.join("config.json").is_file()
}

/// The textual-inversion embeddings folder.
pub fn embeddings_dir(models_dir: &Path) -> PathBuf {
    models_dir.join("embeddings")
}

/// The name A1111 shows for a model or adapter path: the file stem or folder name.
pub fn display_name(path: &Path) -> String {
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// Subfolders of the models dir that other tools keep checkpoints in.
pub const SUBFOLDERS: &[&str] = &["", "Stable-diffusion", "checkpoints"];

/// What `--model` (or its absence) resolved to.
#[derive(Debug, PartialEq)]
pub enum Located {
    Found(PathBuf),
    /// The models dir holds no model at all.
    Nothing,
}

fn is_diffusers_folder(p: &Path) -> bool {
    p.join("model_index.json").is_file()
}

fn is_checkpoint_file(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    p.is_file() && WEIGHT_EXTENSIONS.iter().any(|w| ext.eq_ignore_ascii_case(w))
}

/// Every model in the models dir and its known subfolders, sorted.
pub fn list_models(models_dir: &Path) -> Vec<PathBuf> {
    list(Asset::Model, models_dir)
}

/// Every asset of `kind` in the models dir's subfolders for it, sorted:
/// models as [`list_models`], LoRAs and VAEs as weight files.
pub fn list(kind: Asset, models_dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for sub in kind.subfolders() {
        let Ok(entries) = std::fs::read_dir(models_dir.join(sub)) else { continue };
        for entry in entries.flatten() {
            let p = entry.path();
            if is_checkpoint_file(&p) || (kind == Asset::Model && is_diffusers_folder(&p)) {
                found.push(p);
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Resolves `--model` ([`find`]); without one, the only model in the models dir.
pub fn locate(model: Option<&str>, models_dir: &Path) -> anyhow::Result<Located> {
    let Some(model) = model else {
        let all = list_models(models_dir);
        return match all.as_slice() {
            [] => Ok(Located::Nothing),
            [one] => Ok(Located::Found(one.clone())),
            many => {
                let names: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
                bail!(
                    "{} models found in {}; choose one with --model: {}",
                    many.len(),
                    models_dir.display(),
                    names.join(", ")
                )
            }
        };
    };
    find(Asset::Model, model, models_dir).map(Located::Found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_by_name_in_subfolders_and_lists_ambiguity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("Stable-diffusion")).unwrap();
        std::fs::write(dir.path().join("Stable-diffusion/a.safetensors"), b"x").unwrap();
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("b/model_index.json"), b"{}").unwrap();
        assert_eq!(
            locate(Some("a"), dir.path()).unwrap(),
            Located::Found(dir.path().join("Stable-diffusion/a.safetensors"))
        );
        assert_eq!(locate(Some("b"), dir.path()).unwrap(), Located::Found(dir.path().join("b")));
        let err = locate(None, dir.path()).unwrap_err().to_string();
        assert!(err.contains("2 models found"), "{err}");
        assert!(format!("{:#}", locate(Some("c"), dir.path()).unwrap_err()).contains("holds: a, b"));
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(locate(None, empty.path()).unwrap(), Located::Nothing);
    }
}
