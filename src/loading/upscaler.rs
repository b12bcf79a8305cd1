//! Upscaler files (`.pth` pickles read as data, or safetensors): which
//! ESRGAN-family architecture they hold, detected from the tensors as
//! spandrel detects it, and name tables from each naming to the one the
//! model code uses (Real-ESRGAN's).

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::Device;

use super::ldm::Tensors;
use super::weights::{Checkpoint, Component, NameMap, Rule};
use crate::models::upscaler::{CompactConfig, RrdbConfig, Upscaler, UpscalerConfig};

/// A loaded upscaler and its name (the file stem).
pub struct LoadedUpscaler {
    pub name: String,
    pub model: Upscaler,
}

/// How an RRDBNet file names its layers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Naming {
    /// Real-ESRGAN / new ESRGAN: `conv_first`, `body.N.rdbK.convJ`, `conv_body`, `conv_upN`, `conv_hr`, `conv_last`.
    New,
    /// Original ESRGAN: `model.0`, `model.1.sub.N.RDBK.convJ.0`, `model.3`, … by position.
    Old,
    /// BSRGAN / RealSR: `RRDB_trunk.N.RDBK.convJ`, `trunk_conv`, `upconvN`, `HRconv`.
    Trunk,
}

fn rule(model: String, ckpt: String) -> Rule {
    Rule { model, ckpt, inner: &[] }
}

/// The table from the model's names to the file's.
fn names(c: &RrdbConfig, naming: Naming) -> NameMap {
    let mut rules = Vec::new();
    for i in 0..c.blocks {
        for k in 1..=3 {
            for j in 1..=5 {
                let ckpt = match naming {
                    Naming::New => format!("body.{i}.rdb{k}.conv{j}."),
                    Naming::Old => format!("model.1.sub.{i}.RDB{k}.conv{j}.0."),
                    Naming::Trunk => format!("RRDB_trunk.{i}.RDB{k}.conv{j}."),
                };
                rules.push(rule(format!("body.{i}.rdb{k}.conv{j}."), ckpt));
            }
        }
    }
    let u = c.upconvs;
    let (first, body, hr, last) = match naming {
        Naming::New => ("conv_first.".into(), "conv_body.".into(), "conv_hr.".into(), "conv_last.".into()),
        Naming::Old => (
            "model.0.".into(),
            format!("model.1.sub.{}.", c.blocks),
            format!("model.{}.", 3 * u + 2),
            format!("model.{}.", 3 * u + 4),
        ),
        Naming::Trunk => ("conv_first.".into(), "trunk_conv.".into(), "HRconv.".into(), "conv_last.".into()),
    };
    rules.extend([
        rule("conv_first.".into(), first),
        rule("conv_body.".into(), body),
        rule("conv_hr.".into(), hr),
        rule("conv_last.".into(), last),
    ]);
    for n in 1..=u {
        let ckpt = match naming {
            Naming::New => format!("conv_up{n}."),
            Naming::Old => format!("model.{}.", 3 * n),
            Naming::Trunk => format!("upconv{n}."),
        };
        rules.push(rule(format!("conv_up{n}."), ckpt));
    }
    NameMap::new(rules)
}

/// What the file holds, and how its names map onto the model's.
fn detect(t: &Tensors) -> anyhow::Result<(UpscalerConfig, NameMap)> {
    let naming = if t.has("model.0.weight") && t.has("model.1.sub.0.RDB1.conv1.0.weight") {
        Some(Naming::Old)
    } else if t.has("conv_first.weight") && t.has("body.0.rdb1.conv1.weight") && t.has("conv_body.weight") {
        Some(Naming::New)
    } else if t.has("conv_first.weight") && t.has("RRDB_trunk.0.RDB1.conv1.weight") && t.has("trunk_conv.weight") {
        Some(Naming::Trunk)
    } else {
        None
    };
    if let Some(naming) = naming {
        let (first, block, up) = match naming {
            Naming::New => ("conv_first.weight", "body.", "conv_up"),
            Naming::Old => ("model.0.weight", "model.1.sub.", ""),
            Naming::Trunk => ("conv_first.weight", "RRDB_trunk.", "upconv"),
        };
        let dense = match naming {
            Naming::New => "body.0.rdb1.conv1.weight",
            Naming::Old => "model.1.sub.0.RDB1.conv1.0.weight",
            Naming::Trunk => "RRDB_trunk.0.RDB1.conv1.weight",
        };
        // The old naming counts conv_body among `model.1.sub.N`, and its layers by position: 3 per upconv, then
        // conv_hr (+2) and conv_last (+4) after the last upconv's activation.
        let (blocks, upconvs, last) = match naming {
            Naming::Old => {
                let layers = t.numbered_len("model.");
                let upconvs = layers.checked_sub(5).context("too few layers for an ESRGAN")? / 3;
                (t.numbered_len(block) - 1, upconvs, format!("model.{}.weight", 3 * upconvs + 4))
            }
            _ => {
                let upconvs = (1..=4).take_while(|n| t.has(&format!("{up}{n}.weight"))).count();
                (t.numbered_len(block), upconvs, "conv_last.weight".into())
            }
        };
        let in_channels = t.dim(first, 1)?;
        let out_channels = t.dim(&last, 0)?;
        // Real-ESRGAN x2plus / x1 pixel-unshuffle their input by 2 / 4.
        let unshuffle = match in_channels / out_channels.max(1) {
            4 if in_channels == 4 * out_channels => 2,
            16 if in_channels == 16 * out_channels => 4,
            _ => 1,
        };
        let c = RrdbConfig {
            in_channels,
            out_channels,
            features: t.dim(first, 0)?,
            growth: t.dim(dense, 0)?,
            blocks,
            upconvs,
            unshuffle,
        };
        if c.blocks == 0 || (1 << c.upconvs) < c.unshuffle {
            bail!(
                "an RRDBNet with {} blocks and {} upconvs (input unshuffled by {})",
                c.blocks,
                c.upconvs,
                c.unshuffle
            );
        }
        let map = names(&c, naming);
        return Ok((UpscalerConfig::Rrdb(c), map));
    }
    if t.has("body.0.weight") && t.has("body.1.weight") && t.shape("body.1.weight")?.len() == 1 {
        let layers = t.numbered_len("body.");
        let last = format!("body.{}.weight", layers - 1);
        let in_channels = t.dim("body.0.weight", 1)?;
        let (s2, features) = (t.dim(&last, 0)? / in_channels.max(1), t.dim("body.0.weight", 0)?);
        let scale = (1..=8).find(|s| s * s == s2).with_context(|| format!("`{last}` gives no square scale"))?;
        let c = CompactConfig { in_channels, out_channels: in_channels, features, convs: (layers - 3) / 2, scale };
        return Ok((UpscalerConfig::Compact(c), NameMap::prefixed("")));
    }
    let mut names: Vec<&String> = t.names().collect();
    names.sort();
    let shown: Vec<String> = names.iter().take(6).map(|n| format!("`{n}`")).collect();
    bail!(
        "not an upscaler architecture sdgen knows (ESRGAN/RRDBNet in its three namings, Real-ESRGAN, \
         SRVGGNetCompact); tensors not recognised: {}{}",
        shown.join(", "),
        if names.len() > 6 { format!(" and {} more", names.len() - 6) } else { String::new() }
    )
}

/// Loads an upscaler file: f32 on the CPU, f16 on GPUs (as ComfyUI and
/// A1111 run ESRGAN-family models there).
pub fn load(path: &Path, device: &Device) -> anyhow::Result<LoadedUpscaler> {
    let at = |what: &str| format!("{}: {what}", path.display());
    let dtype = crate::device::dtype_on(None, device)?;
    let ckpt = Checkpoint::open(&[path.to_path_buf()])?;
    let (config, map) = detect(&Tensors::new(ckpt.shapes())).with_context(|| at("upscaler"))?;
    let model = Upscaler::new(&config, ckpt.var_builder(map, Component::Upscaler, dtype, device))
        .with_context(|| at(config.architecture()))?;
    let unused = ckpt.unused();
    if !unused.is_empty() {
        let shown: Vec<String> = unused.iter().take(6).map(|n| format!("`{n}`")).collect();
        bail!(
            "{}: a {} with tensors it does not use, not recognised: {}",
            path.display(),
            config.architecture(),
            shown.join(", ")
        );
    }
    Ok(LoadedUpscaler { name: super::assets::display_name(path), model })
}
