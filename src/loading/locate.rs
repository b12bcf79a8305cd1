//! Resolving `--model` to a file or folder: an explicit path, or a name
//! looked up in the models directory (also inside A1111's `Stable-diffusion/`
//! and ComfyUI's `checkpoints/` subfolders).

use std::path::{Path, PathBuf};

use anyhow::bail;

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
    p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// Every model in the models dir and its known subfolders, sorted.
pub fn list_models(models_dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for sub in SUBFOLDERS {
        let Ok(entries) = std::fs::read_dir(models_dir.join(sub)) else { continue };
        for entry in entries.flatten() {
            let p = entry.path();
            if is_checkpoint_file(&p) || is_diffusers_folder(&p) {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

/// Resolves `--model`: an existing path wins; otherwise `NAME`,
/// `NAME.safetensors` or folder `NAME/` in the models dir or its subfolders.
/// Without `--model`, the only model in the models dir.
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
    let direct = PathBuf::from(model);
    if direct.is_file() || is_diffusers_folder(&direct) {
        return Ok(Located::Found(direct));
    }
    if direct.is_dir() {
        bail!("{}: folder has no model_index.json, so it is not a diffusers model folder", direct.display());
    }
    for sub in SUBFOLDERS {
        let base = models_dir.join(sub);
        for candidate in [base.join(format!("{model}.safetensors")), base.join(model)] {
            if is_checkpoint_file(&candidate) || is_diffusers_folder(&candidate) {
                return Ok(Located::Found(candidate));
            }
        }
    }
    let known: Vec<String> = list_models(models_dir).iter().map(|p| super::model_name(p)).collect();
    let hint =
        if known.is_empty() { "it holds no models".to_string() } else { format!("it holds: {}", known.join(", ")) };
    bail!("model {model:?}: no such file, and not found in {} ({hint})", models_dir.display())
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
        assert!(locate(Some("c"), dir.path()).unwrap_err().to_string().contains("holds: a, b"));
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(locate(None, empty.path()).unwrap(), Located::Nothing);
    }
}
