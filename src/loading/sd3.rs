//! SD 3.5's parts, from a diffusers folder (`StableDiffusion3Pipeline`) or
//! as the official files ship them: a single file with the MMDiT and the
//! VAE (`model.diffusion_model.*`, `first_stage_model.*`) and the text
//! encoders bundled in it (`text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`)
//! or in files of their own (`clip_l.safetensors`, `clip_g.safetensors`,
//! `t5xxl*.safetensors`: `--text-encoder`, or in `<models>/text_encoders/`
//! or `<models>/clip/`, ComfyUI's layout), T5's tokenizer built in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device};

use super::assets::display_name;
use super::diffusers::{clip_tokenizer, load_pooled_encoder, load_text_encoder, weight_files};
use super::family::{Family, Preset};
use super::ldm;
use super::lora::{component_weights, Merging};
use super::model::{vae_dtype, Adapters, Model};
use super::weights::{Checkpoint, Component, NameMap};
use crate::files::read_json;
use crate::models::clip::{Activation, ClipConfig, ClipTextModel};
use crate::models::mmdit::{Mmdit, MmditConfig};
use crate::models::t5::{T5Config, T5Encoder};
use crate::models::vae::{Vae, VaeConfig};
use crate::models::Network;
use crate::sampling::denoiser::Prediction;
use crate::sampling::schedule::SchedulerConfig;
use crate::text::{ClipText, PooledTextEncoder, Sd3Text, T5Text, Text};
use crate::tokenizer::ClipTokenizer;

/// T5's tokens in SD 3's pipelines (diffusers' `max_sequence_length`).
pub const T5_MAX_LENGTH: usize = 256;

/// SD 3's VAE latents: `(z − shift) · scale`.
const VAE_SHIFT: f64 = 0.0609;

/// The loaded parts, and the checkpoints whose unused tensors are reported.
struct Parts {
    clip: ClipText,
    t5: Option<T5Text>,
    mmdit: Mmdit,
    vae: Vae,
    scheduler: SchedulerConfig,
    /// Checkpoints, and the names in them that SD 3 does not use.
    unused: Vec<String>,
}

fn model(path: &Path, hash_file: PathBuf, parts: Parts, merging: Merging) -> Model {
    let width = parts.mmdit.config.joint_attention_dim;
    Model {
        family: Family::Sd3,
        name: display_name(path),
        path: path.to_path_buf(),
        hash_file,
        text: Text::Sd3(Box::new(Sd3Text { clip: parts.clip, t5: parts.t5, width, max_length: T5_MAX_LENGTH })),
        backbone: Network::Mmdit(Box::new(parts.mmdit)),
        vae: parts.vae,
        prediction: Prediction::Flow,
        preset: Preset::from_name(&display_name(path)),
        scheduler: parts.scheduler,
        unused: parts.unused.into_iter().collect(),
        applied: Default::default(),
        base: merging.keep_base.cloned(),
        on_demand: Default::default(),
    }
}

/// CLIP-L's projection goes unused: SD 3 pools it unprojected (it is the
/// identity in the official files).
fn unused_but_projection(clip_l: &Arc<Checkpoint>, projection: &str, others: &[&Arc<Checkpoint>]) -> Vec<String> {
    let mut names: Vec<String> = clip_l.unused().into_iter().filter(|n| n != projection).collect();
    names.extend(others.iter().flat_map(|c| c.unused()));
    names
}

/// An SD 3 folder: CLIP-L, OpenCLIP-G, T5 (optional: without
/// `text_encoder_3/`, or with `no_t5`, its part of the context is zeros),
/// the MMDiT, the 16-channel VAE, a flow-matching scheduler.
pub fn load_folder(dir: &Path, device: &Device, dtype: DType, merging: Merging, no_t5: bool) -> anyhow::Result<Model> {
    let scheduler: SchedulerConfig = read_json(&dir.join("scheduler/scheduler_config.json"))?;
    if !scheduler.is_flow() || scheduler.use_dynamic_shifting {
        bail!(
            "{}: scheduler {} (dynamic shifting: {}) is not SD 3's flow matching",
            dir.display(),
            scheduler.class_name,
            scheduler.use_dynamic_shifting
        );
    }
    let clip_cfg: ClipConfig = read_json(&dir.join("text_encoder/config.json"))?;
    let (te, clip_l) =
        load_text_encoder(&dir.join("text_encoder"), Component::TextEncoder, &clip_cfg, dtype, device, merging)?;
    let (te2, clip_g) = load_pooled_encoder(dir, dtype, device, merging)?;
    let t5_dir = dir.join("text_encoder_3");
    let (te3, t5) = if t5_dir.is_dir() && !no_t5 {
        let cfg: T5Config = read_json(&t5_dir.join("config.json"))?;
        let ckpt = Checkpoint::open(&weight_files(&t5_dir, "model")?)?;
        let vb = ckpt.var_builder(NameMap::prefixed(""), Component::TextEncoder3, dtype, device);
        let model = T5Encoder::new(&cfg, vb).with_context(|| format!("{}: T5 text encoder", t5_dir.display()))?;
        let tokenizer = t5_tokenizer(&dir.join("tokenizer_3/tokenizer.json"))?;
        (Some(ckpt), Some(T5Text { tokenizer, model }))
    } else {
        (None, None)
    };
    let cfg: MmditConfig = read_json(&dir.join("transformer/config.json"))?;
    let files = weight_files(&dir.join("transformer"), "diffusion_pytorch_model")?;
    let ckpt = Checkpoint::open(&files)?;
    let weights = mmdit_weights(&ckpt, &cfg, NameMap::prefixed(""), merging, dtype, device);
    let mmdit = Mmdit::new(&cfg, weights).with_context(|| format!("{}: transformer", dir.display()))?;
    let vae_cfg: VaeConfig = read_json(&dir.join("vae/config.json"))?;
    let vae_ckpt = Checkpoint::open(&weight_files(&dir.join("vae"), "diffusion_pytorch_model")?)?;
    let vae_dtype = vae_dtype(Family::Sd3, &vae_cfg, dtype);
    let vae = Vae::new(&vae_cfg, true, vae_ckpt.var_builder(NameMap::prefixed(""), Component::Vae, vae_dtype, device))
        .with_context(|| format!("{}: VAE", dir.display()))?;
    let clip = ClipText {
        tokenizer: clip_tokenizer(dir)?,
        encoder: clip_l,
        pooled: Some(clip_g),
        zero_empty_negative: false,
        pool_both: true,
    };
    let others: Vec<&Arc<Checkpoint>> =
        [Some(&te2), te3.as_ref(), Some(&ckpt), Some(&vae_ckpt)].into_iter().flatten().collect();
    let unused = unused_but_projection(&te, "text_projection.weight", &others);
    Ok(model(dir, files[0].clone(), Parts { clip, t5, mmdit, vae, scheduler, unused }, merging))
}

/// The MMDiT's weights (`names` from diffusers' names), with LoRAs merged:
/// kohya files name its modules as the official files do.
fn mmdit_weights(
    ckpt: &Arc<Checkpoint>,
    cfg: &MmditConfig,
    names: NameMap,
    merging: Merging,
    dtype: DType,
    device: &Device,
) -> candle_nn::VarBuilder<'static> {
    if let Some(p) = merging.patches {
        p.set_backbone_names(ldm::mmdit_names(cfg, ldm::UNET_PREFIX));
    }
    component_weights(ckpt, names, Component::Transformer, merging, dtype, device)
}

fn t5_tokenizer(file: &Path) -> anyhow::Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(file).map_err(|e| anyhow::anyhow!("{}: not a T5 tokenizer: {e}", file.display()))
}

/// Where each text encoder of a single file is: a checkpoint and the prefix
/// of its names there.
struct Encoders {
    clip_l: (Arc<Checkpoint>, String),
    clip_g: (Arc<Checkpoint>, String),
    t5: Option<(Arc<Checkpoint>, String)>,
}

/// What an encoder file holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Clip(usize),
    T5,
}

fn kind_of(t: &ldm::Tensors) -> Option<Kind> {
    if t.has("encoder.block.0.layer.0.SelfAttention.q.weight") {
        return Some(Kind::T5);
    }
    t.shape("text_model.embeddings.token_embedding.weight").ok().map(|s| Kind::Clip(s[1]))
}

/// The separate encoder files: `given` (`--text-encoder`, recognised by
/// their tensors; of two CLIP models the narrower is CLIP-L), else
/// `clip_l*`, `clip_g*`, `t5xxl*` in `<models>/text_encoders/` or `<models>/clip/`.
fn encoder_files(given: &[PathBuf], models_dir: Option<&Path>, no_t5: bool) -> anyhow::Result<Encoders> {
    let open = |p: &Path| -> anyhow::Result<(Arc<Checkpoint>, Option<Kind>)> {
        let ckpt = Checkpoint::open(&[p.to_path_buf()])?;
        let kind = kind_of(&ldm::Tensors::new(ckpt.shapes()));
        Ok((ckpt, kind))
    };
    let mut clips = Vec::new();
    let mut t5 = None;
    let mut found = |p: &Path, want: Option<&str>| -> anyhow::Result<()> {
        let (ckpt, kind) = open(p)?;
        match (kind, want) {
            (Some(Kind::T5), None | Some("t5")) => t5 = Some(ckpt),
            (Some(Kind::Clip(w)), None | Some("clip")) => clips.push((w, ckpt)),
            (None, _) => bail!("{}: not a CLIP or T5 text encoder", p.display()),
            _ => {}
        }
        Ok(())
    };
    if given.is_empty() {
        let dirs: Vec<PathBuf> = models_dir.map(|d| vec![d.join("text_encoders"), d.join("clip")]).unwrap_or_default();
        for (stem, want) in [("clip_l", "clip"), ("clip_g", "clip"), ("t5xxl", "t5")] {
            let file = dirs.iter().find_map(|d| {
                let mut names: Vec<PathBuf> = std::fs::read_dir(d).ok()?.flatten().map(|e| e.path()).collect();
                names.sort();
                names.into_iter().find(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name.starts_with(stem) && name.ends_with(".safetensors")
                })
            });
            if let Some(f) = file {
                if !(want == "t5" && no_t5) {
                    found(&f, Some(want))?;
                }
            }
        }
    } else {
        for p in given {
            found(p, None)?;
        }
    }
    clips.sort_by_key(|(w, _)| *w);
    let [(_, l), (_, g)] = <[_; 2]>::try_from(clips).map_err(|c: Vec<_>| {
        anyhow::anyhow!(
            "SD 3.5 needs CLIP-L and CLIP-G text encoders, {} found: give them with --text-encoder or put \
             clip_l.safetensors and clip_g.safetensors in <models>/text_encoders/",
            c.len()
        )
    })?;
    if t5.is_none() && !no_t5 {
        bail!(
            "no T5 text encoder: give t5xxl_fp16.safetensors with --text-encoder or put it in \
             <models>/text_encoders/, or run without it (--no-t5)"
        );
    }
    let prefix = |c: Arc<Checkpoint>, p: &str| (c, p.to_string());
    Ok(Encoders { clip_l: prefix(l, "text_model."), clip_g: prefix(g, "text_model."), t5: t5.map(|c| prefix(c, "")) })
}

/// The encoders bundled in the file, if it holds them.
fn bundled(ckpt: &Arc<Checkpoint>, t: &ldm::Tensors, no_t5: bool) -> Option<Encoders> {
    let (l, g, t5) =
        ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.", "text_encoders.t5xxl.transformer.");
    if !t.any_with_prefix(l) || !t.any_with_prefix(g) {
        return None;
    }
    let at = |p: &str| (ckpt.clone(), p.to_string());
    Some(Encoders {
        clip_l: at(&format!("{l}text_model.")),
        clip_g: at(&format!("{g}text_model.")),
        t5: (!no_t5 && t.any_with_prefix(t5)).then(|| at(t5)),
    })
}

/// An official SD 3.5 single file, its text encoders bundled or beside it.
pub fn load_file(
    path: &Path,
    ckpt: &Arc<Checkpoint>,
    tensors: &ldm::Tensors,
    adapters: &Adapters,
    merging: Merging,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Model> {
    let at = |what: &str| format!("{}: {what}", path.display());
    let p = ldm::UNET_PREFIX;
    let cfg = ldm::infer_mmdit(tensors, p).with_context(|| at("transformer"))?;
    let weights = mmdit_weights(ckpt, &cfg, ldm::mmdit_names(&cfg, p), merging, dtype, device);
    let mmdit = Mmdit::new(&cfg, weights).with_context(|| at("transformer"))?;
    let vae_cfg =
        ldm::infer_vae(tensors, Family::Sd3.spec().vae_scaling, Some(VAE_SHIFT)).with_context(|| at("VAE"))?;
    let vae_names = ldm::vae_names(&vae_cfg, ldm::VAE_PREFIX);
    let vae = Vae::new(
        &vae_cfg,
        true,
        ckpt.var_builder(vae_names, Component::Vae, vae_dtype(Family::Sd3, &vae_cfg, dtype), device),
    )
    .with_context(|| at("VAE"))?;
    let encoders = match bundled(ckpt, tensors, adapters.no_t5) {
        Some(e) => e,
        None => encoder_files(&adapters.text_encoders, adapters.models_dir.as_deref(), adapters.no_t5)
            .with_context(|| at("text encoders"))?,
    };
    let clip_model = |(c, p): &(Arc<Checkpoint>, String), act: Activation, component: Component| {
        let t = ldm::Tensors::new(c.shapes());
        let cfg = ldm::infer_clip(&t, p, act).with_context(|| format!("{}: text encoder", c.label()))?;
        let vb = component_weights(c, NameMap::prefixed(p), component, merging, dtype, device);
        let model = ClipTextModel::new(&cfg, vb).with_context(|| format!("{}: text encoder", c.label()))?;
        let tokenizer = ClipTokenizer::embedded_for(cfg.vocab_size)?;
        anyhow::Ok((model, tokenizer, t, cfg))
    };
    let (clip_l, tokenizer, ..) = clip_model(&encoders.clip_l, Activation::QuickGelu, Component::TextEncoder)?;
    let (g_model, tokenizer_2, t, cfg_g) = clip_model(&encoders.clip_g, Activation::Gelu, Component::TextEncoder2)?;
    // The projection sits beside `text_model.`, as transformers saves it.
    let g_root = encoders.clip_g.1.trim_end_matches("text_model.");
    let projection_dim = t.dim(&format!("{g_root}text_projection.weight"), 0).with_context(|| at("CLIP-G"))?;
    let vb = component_weights(
        &encoders.clip_g.0,
        NameMap::prefixed(g_root),
        Component::TextEncoder2,
        merging,
        dtype,
        device,
    );
    let projection = candle_nn::linear_no_bias(cfg_g.hidden_size, projection_dim, vb.pp("text_projection"))?;
    // OpenCLIP pads with "!" (id 0).
    let clip_g = PooledTextEncoder { tokenizer: tokenizer_2.with_pad_id(0), model: g_model, projection };
    let t5 = match &encoders.t5 {
        Some((c, p)) => {
            let cfg = ldm::infer_t5(&ldm::Tensors::new(c.shapes()), p).with_context(|| format!("{}: T5", c.label()))?;
            let model =
                T5Encoder::new(&cfg, c.var_builder(NameMap::prefixed(p), Component::TextEncoder3, dtype, device))
                    .with_context(|| format!("{}: T5", c.label()))?;
            let tokenizer = match &adapters.t5_tokenizer {
                Some(file) => t5_tokenizer(file)?,
                None => crate::tokenizer::t5_embedded()?,
            };
            if tokenizer.get_vocab_size(true) > cfg.vocab_size {
                bail!(
                    "{}: the T5 tokenizer has {} tokens, the model's table {}: give its tokenizer.json with --t5-tokenizer",
                    c.label(),
                    tokenizer.get_vocab_size(true),
                    cfg.vocab_size
                );
            }
            Some(T5Text { tokenizer, model })
        }
        None => None,
    };
    let clip =
        ClipText { tokenizer, encoder: clip_l, pooled: Some(clip_g), zero_empty_negative: false, pool_both: true };
    let mut checkpoints: Vec<&Arc<Checkpoint>> = vec![&encoders.clip_g.0];
    checkpoints.extend(encoders.t5.as_ref().map(|(c, _)| c));
    let l_projection = format!("{}text_projection.weight", encoders.clip_l.1.trim_end_matches("text_model."));
    let mut unused = unused_but_projection(&encoders.clip_l.0, &l_projection, &checkpoints);
    if !Arc::ptr_eq(&encoders.clip_l.0, ckpt) {
        unused.extend(ckpt.unused());
    }
    unused.sort();
    unused.dedup();
    let scheduler = SchedulerConfig::sd3();
    Ok(model(path, path.to_path_buf(), Parts { clip, t5, mmdit, vae, scheduler, unused }, merging))
}
