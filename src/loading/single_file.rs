//! Single-file checkpoints (CompVis/LDM names, as A1111 and ComfyUI keep
//! them): the family and every config are read off the tensors.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device};

use super::assets::display_name;
use super::family::{Family, FamilySpec, Preset, TextTower};
use super::ldm;
use super::lora::{component_weights, Merging};
use super::model::{detect_prediction, vae_dtype, Adapters, Model};
use super::weights::{self, Component, NameMap};
use crate::models::clip::{Activation, ClipConfig, ClipTextModel};
use crate::models::unet::UNet;
use crate::models::vae::Vae;
use crate::models::Network;
use crate::sampling::denoiser::Prediction;
use crate::text::{ClipText, PooledTextEncoder, Text};
use crate::tokenizer::ClipTokenizer;

/// A text tower's tokenizer: CLIP's, sized to its token table (the
/// documented rule for tables smaller than CLIP's); OpenCLIP towers pad
/// with `!` (id 0), CLIP's with the end token.
fn tokenizer_for(tower: TextTower, prefix: &str, t: &ldm::Tensors) -> anyhow::Result<ClipTokenizer> {
    let tokenizer = ClipTokenizer::embedded_for(t.dim(&tower.token_table(prefix), 0)?)?;
    Ok(match tower {
        TextTower::OpenClip { .. } => tokenizer.with_pad_id(0),
        TextTower::Clip { .. } => tokenizer,
    })
}

/// A text tower's config and name table.
fn text_tower(tower: TextTower, prefix: &str, t: &ldm::Tensors) -> anyhow::Result<(ClipConfig, NameMap)> {
    Ok(match tower {
        TextTower::Clip { .. } => (ldm::infer_clip(t, prefix, Activation::QuickGelu)?, NameMap::prefixed(prefix)),
        TextTower::OpenClip { skip, .. } => {
            let cfg = ldm::infer_openclip(t, prefix, skip)?;
            let names = ldm::openclip_names(prefix, cfg.num_hidden_layers);
            (cfg, names)
        }
    })
}

/// The first text encoder of a family's single file: where it is.
fn first_tower(spec: &FamilySpec, t: &ldm::Tensors) -> (TextTower, &'static str) {
    (spec.text_encoder, spec.text_encoder.prefix_in(t).unwrap_or_default())
}

/// A single file's (first) tokenizer, without loading its weights.
pub fn tokenizer(path: &Path) -> anyhow::Result<ClipTokenizer> {
    let ckpt = weights::Checkpoint::open(&[path.to_path_buf()])?;
    let tensors = ldm::Tensors::new(ckpt.shapes());
    let spec = Family::of_single_file(path, &tensors)?.spec();
    let (tower, prefix) = first_tower(spec, &tensors);
    tokenizer_for(tower, prefix, &tensors).with_context(|| format!("{}: text encoder", path.display()))
}

/// Loads a single file; SD 3.5's may take its text encoders from `adapters`.
pub fn load(
    path: &Path,
    device: &Device,
    dtype: DType,
    merging: Merging,
    adapters: &Adapters,
) -> anyhow::Result<Model> {
    let ckpt = weights::Checkpoint::open(&[path.to_path_buf()])?;
    let tensors = ldm::Tensors::new(ckpt.shapes());
    let family = Family::of_single_file(path, &tensors)?;
    if family == Family::Sd3 {
        return super::sd3::load_file(path, &ckpt, &tensors, adapters, merging, dtype, device);
    }
    let spec = family.spec();
    let at = |what: &str| format!("{}: {what}", path.display());
    let (tower, prefix) = first_tower(spec, &tensors);
    let (clip_cfg, clip_names) = text_tower(tower, prefix, &tensors).with_context(|| at("text encoder"))?;
    let tokenizer = tokenizer_for(tower, prefix, &tensors).with_context(|| at("text encoder"))?;
    let text_encoder = ClipTextModel::new(
        &clip_cfg,
        component_weights(&ckpt, clip_names, Component::TextEncoder, merging, dtype, device),
    )?;
    let text_encoder_2 = match spec.pooled_text_encoder {
        Some(tower) => Some(
            load_pooled(&ckpt, &tensors, tower, merging, dtype, device).with_context(|| at("second text encoder"))?,
        ),
        None => None,
    };
    let pooled_dim = text_encoder_2.as_ref().map(|e| e.projection.weight().dim(0)).transpose()?;
    let unet_cfg = ldm::infer_unet(&tensors, pooled_dim).with_context(|| at("UNet"))?;
    let vae_cfg = ldm::infer_vae(&tensors, spec.vae_scaling, None).with_context(|| at("VAE"))?;
    if let Some(p) = merging.patches {
        p.set_backbone_names(ldm::unet_names(&unet_cfg));
    }
    let unet = UNet::new(
        &unet_cfg,
        component_weights(&ckpt, ldm::unet_names(&unet_cfg), Component::Unet, merging, dtype, device),
    )?;
    let vae_dtype = vae_dtype(family, &vae_cfg, dtype);
    let vae = Vae::new(
        &vae_cfg,
        true,
        ckpt.var_builder(ldm::vae_names(&vae_cfg, ldm::VAE_PREFIX), Component::Vae, vae_dtype, device),
    )?;
    let prediction = match spec.probe_prediction {
        true => detect_prediction(&unet).with_context(|| at("UNet"))?,
        false => Prediction::Epsilon,
    };
    Ok(Model {
        family,
        name: display_name(path),
        path: path.to_path_buf(),
        hash_file: path.to_path_buf(),
        text: Text::Clip(Box::new(ClipText {
            tokenizer,
            encoder: text_encoder,
            zero_empty_negative: text_encoder_2.is_some(),
            pooled: text_encoder_2,
            pool_both: false,
        })),
        backbone: Network::Unet(Box::new(unet)),
        vae,
        scheduler: (spec.scheduler)(),
        prediction,
        preset: Preset::from_name(&display_name(path)),
        unused: ckpt.unused(),
        applied: Default::default(),
        base: merging.keep_base.cloned(),
        on_demand: Default::default(),
    })
}

/// SDXL's second text encoder from a single file: all of its blocks (the
/// pooled output comes from the last) and its text projection.
fn load_pooled(
    ckpt: &Arc<weights::Checkpoint>,
    t: &ldm::Tensors,
    tower: TextTower,
    merging: Merging,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<PooledTextEncoder> {
    let prefix = tower.prefix_in(t).unwrap_or_default();
    let (cfg, names) = text_tower(tower, prefix, t)?;
    let projection_dim = cfg.projection_dim.with_context(|| format!("missing tensor `{prefix}text_projection`"))?;
    let weights = || component_weights(ckpt, names.clone(), Component::TextEncoder2, merging, dtype, device);
    let model = ClipTextModel::new(&cfg, weights())?;
    let projection = candle_nn::linear_no_bias(cfg.hidden_size, projection_dim, weights().pp("text_projection"))?;
    let tokenizer = tokenizer_for(tower, prefix, t)?;
    Ok(PooledTextEncoder { tokenizer, model, projection })
}
