//! First-run download of the default model from the Hugging Face hub into
//! the models dir, as a diffusers folder with fp16 safetensors only.

use std::path::{Path, PathBuf};

use anyhow::Context;

pub const DEFAULT_REPO: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";
pub const DEFAULT_NAME: &str = "stable-diffusion-v1-5";
/// Approximate download size, said before starting.
pub const DEFAULT_SIZE: &str = "about 2.1 GB";

/// The files of the default model: configs, tokenizer, fp16 weights.
pub const DEFAULT_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
];

/// Where the default model lands.
pub fn default_model_dir(models_dir: &Path) -> PathBuf {
    models_dir.join(DEFAULT_NAME)
}

/// True when `HF_HUB_OFFLINE` asks not to touch the network.
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

/// Downloads the default model into `models_dir`, file by file through a
/// cache inside it, then moves each file into place; returns the folder.
/// A partial download leaves no `model_index.json`, so it is never mistaken
/// for a model.
pub fn download_default(models_dir: &Path, progress: bool) -> anyhow::Result<PathBuf> {
    let target = default_model_dir(models_dir);
    let cache = models_dir.join(".hf-cache");
    // From the environment: HF_ENDPOINT points at a mirror, as huggingface_hub reads it.
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache.clone())
        .with_progress(progress)
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    let repo = api.model(DEFAULT_REPO.to_string());
    // model_index.json last: its presence marks a complete folder.
    for file in DEFAULT_FILES.iter().filter(|f| **f != "model_index.json").chain(["model_index.json"].iter()) {
        let cached = repo.get(file).with_context(|| format!("downloading {file} from {DEFAULT_REPO}"))?;
        let dest = target.join(file);
        std::fs::create_dir_all(dest.parent().expect("file has a folder"))?;
        let real = std::fs::canonicalize(&cached)?;
        std::fs::rename(&real, &dest)
            .or_else(|_| std::fs::copy(&real, &dest).map(|_| ()))
            .with_context(|| format!("{}: cannot write", dest.display()))?;
    }
    std::fs::remove_dir_all(&cache).ok();
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_files_form_a_complete_fp16_diffusers_folder() {
        for component in ["text_encoder", "unet", "vae"] {
            assert!(DEFAULT_FILES.contains(&format!("{component}/config.json").as_str()));
            assert!(DEFAULT_FILES.iter().any(|f| f.starts_with(component) && f.ends_with(".fp16.safetensors")));
        }
        assert!(DEFAULT_FILES.iter().all(|f| !f.ends_with(".bin") && !f.ends_with(".ckpt")));
        assert_eq!(default_model_dir(Path::new("m")), Path::new("m").join(DEFAULT_NAME));
    }
}
