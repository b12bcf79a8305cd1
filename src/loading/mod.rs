//! Finding and loading models: single-file checkpoints (LDM names) and
//! diffusers folders, both into the same [`Model`].
//!
//! Layers: [`weights`] reads safetensors through name tables ([`ldm`] for
//! single files, diffusers' own names for folders) with shape checks;
//! [`lora`] wraps a weight source to merge LoRAs; [`family`] recognises what
//! a file or folder is and its defaults; [`hashing`] keeps A1111's hashes;
//! [`assets`] finds what the user names.

pub mod assets;
pub mod catalog;
pub mod diffusers;
pub mod embeddings;
pub mod family;
pub mod hashing;
#[cfg(feature = "download")]
pub mod hub;
pub mod ldm;
pub mod lora;
pub mod model;
pub mod single_file;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::tokenizer::ClipTokenizer;
pub use family::{Defaults, Family, Preset, STANDARD_512};
pub use model::{vae_dtype, Adapters, Applied, Model, PooledTextEncoder};

impl Model {
    /// Loads a single `.safetensors` checkpoint or a diffusers folder.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        Self::load_with(path, device, dtype, &Adapters::default())
    }

    /// [`Model::load`] with LoRAs merged into the weights, another VAE and
    /// textual-inversion embeddings.
    pub fn load_with(path: &Path, device: &Device, dtype: DType, adapters: &Adapters) -> anyhow::Result<Self> {
        let patches = match adapters.loras.as_slice() {
            [] => None,
            specs => Some(Arc::new(lora::Patches::new(specs)?)),
        };
        let mut model = if path.is_dir() {
            diffusers::load(path, device, dtype, patches.as_ref())?
        } else {
            single_file::load(path, device, dtype, patches.as_ref())?
        };
        if let Some(p) = patches {
            model.applied.lora_report = p.report();
            for spec in &adapters.loras {
                model
                    .applied
                    .loras
                    .push((spec.name(), hashing::short_sha256(&spec.path, hashing::ADAPTER_HASH_DIGITS)?));
            }
        }
        if let Some(path) = &adapters.vae {
            let dtype = vae_dtype(model.family, &model.vae.config, dtype);
            model.vae = model::load_vae(path, &model.vae.config, dtype, device)?;
            model.applied.vae =
                Some((assets::display_name(path), hashing::short_sha256(path, hashing::MODEL_HASH_DIGITS)?));
        }
        if let Some(dir) = &adapters.embeddings {
            let mut widths = vec![model.text_encoder.config.hidden_size];
            widths.extend(model.text_encoder_2.as_ref().map(|e| e.model.config.hidden_size));
            (model.applied.embeddings, model.applied.embeddings_skipped) = embeddings::read_dir(dir, &widths);
        }
        Ok(model)
    }
}

/// The (first) tokenizer of a model, without loading its weights: a
/// folder's `tokenizer/`, or for a single file CLIP's, sized to its token
/// table and padding as its family does.
pub fn tokenizer_of(path: &Path) -> anyhow::Result<ClipTokenizer> {
    if path.is_dir() {
        let dir = path.join("tokenizer");
        return if dir.is_dir() { ClipTokenizer::from_dir(&dir) } else { ClipTokenizer::embedded() };
    }
    single_file::tokenizer(path)
}
