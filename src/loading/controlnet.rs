//! ControlNets: diffusers `ControlNetModel` folders and single files in the
//! original format (`control_model.*` names, or the same names unprefixed),
//! their config from `config.json` or from the tensors, and the check that
//! one fits the model it is to guide.

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device};

use super::weights::{Checkpoint, Component, NameMap};
use super::{assets, diffusers, hashing, ldm};
use crate::models::controlnet::{ControlNet, ControlNetConfig};
use crate::models::unet::UNetConfig;

/// A loaded ControlNet and what the PNG parameters record of it.
pub struct LoadedControlNet {
    pub net: ControlNet,
    /// The file or folder name without extension, as A1111 shows it.
    pub name: String,
    /// A1111's legacy hash of its weights (8 hex digits).
    pub hash: String,
}

/// The original format's prefix, when the names carry it.
const PREFIX: &str = "control_model.";

/// Loads the ControlNet at `path` for a model whose UNet is `base`.
pub fn load(path: &Path, base: &UNetConfig, dtype: DType, device: &Device) -> anyhow::Result<LoadedControlNet> {
    let (config, weights, names) = if path.is_dir() {
        let config: ControlNetConfig = crate::files::read_json(&path.join("config.json"))?;
        let files = diffusers::weight_files(path, "diffusion_pytorch_model")?;
        (config, files, NameMap::prefixed(""))
    } else {
        let files = vec![path.to_path_buf()];
        let t = ldm::Tensors::new(Checkpoint::open(&files)?.shapes());
        let prefix = if t.any_with_prefix(PREFIX) { PREFIX } else { "" };
        if !t.has(&format!("{prefix}input_hint_block.0.weight")) {
            bail!("{}: not a ControlNet (no `input_hint_block` tensors)", path.display());
        }
        let pooled_dim =
            base.projection_class_embeddings_input_dim.zip(base.addition_time_embed_dim).map(|(i, d)| i - 6 * d);
        let config = ldm::infer_controlnet(&t, prefix, pooled_dim, pooled_by_yaml(path))
            .with_context(|| path.display().to_string())?;
        let names = ldm::controlnet_names(&config, prefix);
        (config, files, names)
    };
    check_fits(&config.unet, base)
        .with_context(|| format!("{}: this ControlNet does not fit the model", path.display()))?;
    let ckpt = Checkpoint::open(&weights)?;
    let net = ControlNet::new(&config, ckpt.var_builder(names, Component::ControlNet, dtype, device))
        .with_context(|| format!("{}: ControlNet", path.display()))?;
    Ok(LoadedControlNet { net, name: assets::display_name(path), hash: hashing::legacy_hash(&weights[0])? })
}

/// A1111's ControlNet extension reads a single file's settings from a YAML
/// file beside it (`control_v11e_sd15_shuffle.yaml`): pooled residuals are
/// `global_average_pooling: True` there.
fn pooled_by_yaml(path: &Path) -> bool {
    let text = std::fs::read_to_string(path.with_extension("yaml")).unwrap_or_default();
    text.lines().any(|l| {
        let l = l.trim().to_ascii_lowercase().replace(' ', "");
        l == "global_average_pooling:true"
    })
}

/// What a UNet's ControlNets must share with it: the text context, SDXL's
/// added embedding, and the skip connections' widths.
fn check_fits(net: &UNetConfig, base: &UNetConfig) -> anyhow::Result<()> {
    let describe = |c: &UNetConfig| {
        let sdxl = c.addition_time_embed_dim.is_some();
        let family = match (sdxl, c.cross_attention_dim) {
            (true, _) => "SDXL",
            (false, 768) => "SD 1.x",
            (false, 1024) => "SD 2.x",
            _ => "a UNet",
        };
        format!(
            "{family} (text context {} wide{})",
            c.cross_attention_dim,
            if sdxl { ", size conditioning" } else { "" }
        )
    };
    let same = net.cross_attention_dim == base.cross_attention_dim
        && net.addition_time_embed_dim.is_some() == base.addition_time_embed_dim.is_some()
        && net.block_out_channels == base.block_out_channels
        && net.layers_per_block == base.layers_per_block;
    if !same {
        bail!("it is for {} and the model is {}", describe(net), describe(base));
    }
    if net.in_channels != 4 {
        bail!("it takes {}-channel latents; only 4-channel ControlNets are supported", net.in_channels);
    }
    Ok(())
}
