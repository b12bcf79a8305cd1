//! Finding and loading models: single-file checkpoints (LDM names) and
//! diffusers folders, both into the same [`Model`].
//!
//! Layers: [`weights`] reads safetensors through name tables ([`ldm`] for
//! single files, diffusers' own names for folders) with shape checks;
//! [`lora`] wraps a weight source to merge LoRAs; [`family`] recognises what
//! a file or folder is and its defaults; [`hashing`] keeps A1111's hashes;
//! [`assets`] finds what the user names; [`controlnet`] loads ControlNets.

pub mod assets;
pub mod catalog;
pub mod controlnet;
pub mod convert;
pub mod diffusers;
pub mod embeddings;
pub mod family;
pub mod hashing;
#[cfg(feature = "download")]
pub mod hub;
pub mod ldm;
pub mod lora;
pub mod model;
pub mod pickle;
pub mod sd3;
pub mod single_file;
pub mod upscaler;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::tokenizer::ClipTokenizer;
pub use family::{Defaults, Family, Preset, STANDARD_512};
pub use model::{vae_dtype, Adapters, Applied, Model};

impl Model {
    /// Loads a single `.safetensors` checkpoint or a diffusers folder.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        Self::load_with(path, device, dtype, &Adapters::default())
    }

    /// [`Model::load`] with LoRAs merged into the weights, another VAE and
    /// textual-inversion embeddings.
    pub fn load_with(path: &Path, device: &Device, dtype: DType, adapters: &Adapters) -> anyhow::Result<Self> {
        if device.is_cpu() {
            crate::ops::reuse_freed_memory();
        }
        let patches = patches_of(&adapters.loras)?;
        let base = adapters.retain_base.then(|| Arc::new(lora::BaseWeights::default()));
        let merging = lora::Merging { patches: patches.as_ref(), keep_base: base.as_ref() };
        let mut model = if path.is_dir() {
            diffusers::load(path, device, dtype, merging, adapters.no_t5)?
        } else {
            single_file::load(path, device, dtype, merging, adapters)?
        };
        model.record_loras(&adapters.loras, patches.as_deref())?;
        if let Some(path) = &adapters.vae {
            let dtype = vae_dtype(model.family, &model.vae.config, dtype);
            model.vae = model::load_vae(path, &model.vae.config, dtype, device)?;
            let hash = hashing::short_sha256(path, hashing::MODEL_HASH_DIGITS)?;
            model.applied.vae = Some((assets::display_name(path), hash));
        }
        model.on_demand = model::OnDemand::new(adapters.models_dir.clone());
        if let Some(dir) = &adapters.embeddings {
            let widths = model.text.clip().widths();
            (model.applied.embeddings, model.applied.embeddings_skipped) = embeddings::read_dir(dir, &widths);
        }
        Ok(model)
    }

    /// Merges `loras` into the base weights in place of the LoRAs the model
    /// has now, without reading the model files again: the backbone and the
    /// CLIP encoders are rebuilt from the retained base weights (bit for bit a
    /// fresh load's where the stored and compute dtypes agree). The model
    /// must have been loaded with [`Adapters::retain_base`]; on an error it
    /// is left as it was.
    pub fn merge_loras(&mut self, loras: &[lora::LoraSpec]) -> anyhow::Result<()> {
        use crate::models::clip::ClipTextModel;
        use crate::models::{mmdit::Mmdit, unet::UNet, Backbone, Network};
        use weights::Component;
        let Some(base) = self.base.clone() else {
            anyhow::bail!("this model was loaded without its base weights kept; reload it to change LoRAs");
        };
        let patches = patches_of(loras)?;
        if let Some(p) = &patches {
            p.set_backbone_names(match &self.backbone {
                Network::Unet(u) => ldm::unet_names(&u.config),
                Network::Mmdit(m) => ldm::mmdit_names(&m.config, ldm::UNET_PREFIX),
            });
        }
        let (dtype, device) = (self.backbone.dtype(), self.backbone.device());
        let vb = |c| lora::retained_weights(&base, c, patches.as_ref(), dtype, &device);
        let backbone = match &self.backbone {
            Network::Unet(u) => Network::Unet(Box::new(UNet::new(&u.config, vb(Component::Unet))?)),
            Network::Mmdit(m) => Network::Mmdit(Box::new(Mmdit::new(&m.config, vb(Component::Transformer))?)),
        };
        let text = self.text.clip();
        let encoder = ClipTextModel::new(&text.encoder.config, vb(Component::TextEncoder))?;
        let pooled = match &text.pooled {
            Some(p) => {
                let (projection_dim, hidden) = p.projection.weight().dims2()?;
                let model = ClipTextModel::new(&p.model.config, vb(Component::TextEncoder2))?;
                let vb = vb(Component::TextEncoder2).pp("text_projection");
                Some((model, candle_nn::linear_no_bias(hidden, projection_dim, vb)?))
            }
            None => None,
        };
        self.record_loras(loras, patches.as_deref())?;
        self.backbone = backbone;
        let text = self.text.clip_mut();
        text.encoder = encoder;
        if let (Some(p), Some((model, projection))) = (&mut text.pooled, pooled) {
            (p.model, p.projection) = (model, projection);
        }
        Ok(())
    }

    /// Records the LoRAs merged into this model (names, A1111 hashes, what applied).
    fn record_loras(&mut self, loras: &[lora::LoraSpec], patches: Option<&lora::Patches>) -> anyhow::Result<()> {
        self.applied.lora_report = patches.map(lora::Patches::report).unwrap_or_default();
        self.applied.loras = loras
            .iter()
            .map(|spec| Ok((spec.name(), hashing::short_sha256(&spec.path, hashing::ADAPTER_HASH_DIGITS)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(())
    }
}

/// The LoRA files of `loras`, read; `None` without any.
fn patches_of(loras: &[lora::LoraSpec]) -> anyhow::Result<Option<Arc<lora::Patches>>> {
    Ok(match loras {
        [] => None,
        specs => Some(Arc::new(lora::Patches::new(specs)?)),
    })
}

/// The model hash of a checkpoint file or diffusers folder (A1111: the
/// checkpoint; a folder: its UNet weights), without loading it.
pub fn model_hash(path: &Path) -> anyhow::Result<String> {
    let file = match path.is_dir() {
        true => diffusers::weight_files(&diffusers::backbone_dir(path), "diffusion_pytorch_model")?.remove(0),
        false => path.to_path_buf(),
    };
    hashing::short_sha256(&file, hashing::MODEL_HASH_DIGITS)
}

/// The (first) tokenizer of a model, without loading its weights: a
/// folder's `tokenizer/`, or for a single file CLIP's, sized to its token
/// table and padding as its family does.
pub fn tokenizer_of(path: &Path) -> anyhow::Result<ClipTokenizer> {
    use crate::failure::{Failure, Tag};
    let dir = path.join("tokenizer");
    match path.is_dir() {
        true if dir.is_dir() => ClipTokenizer::from_dir(&dir),
        true => ClipTokenizer::embedded(),
        false => single_file::tokenizer(path),
    }
    .tag(Failure::Model)
}
