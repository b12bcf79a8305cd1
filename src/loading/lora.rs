//! LoRA files, merged into the weights as they load: W += weight ×
//! (alpha / rank) × up · down (convolution LoRAs reshaped around it).
//!
//! Formats: kohya/A1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*` /
//! `lora_te2_*` for SDXL; `.lora_down`, `.lora_up`, `.alpha`), with UNet
//! modules named as diffusers or as the original checkpoints (SDXL), and
//! diffusers/PEFT (`unet.` / `text_encoder.` / `text_encoder_2.` +
//! `.lora_A` / `.lora_B`, alpha = rank unless stored). Module names are
//! compared with dots turned into underscores; what matched nothing is
//! reported, never silently dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use super::weights::NameMap;

/// Which model a LoRA module patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Target {
    /// The kohya prefix of the target's module names.
    fn prefix(self) -> &'static str {
        match self {
            Target::Unet => "lora_unet_",
            Target::TextEncoder => "lora_te_",
            Target::TextEncoder2 => "lora_te2_",
        }
    }

    /// The target of a component as the loaders name it.
    pub fn of_component(component: &str) -> Option<Self> {
        match component {
            "UNet" => Some(Target::Unet),
            "text encoder" => Some(Target::TextEncoder),
            "second text encoder" => Some(Target::TextEncoder2),
            _ => None,
        }
    }
}

/// A LoRA to apply and how strongly.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub weight: f32,
}

impl LoraSpec {
    /// The name A1111 shows (the file stem).
    pub fn name(&self) -> String {
        super::model_name(&self.path)
    }
}

/// Finds a LoRA by path, or by name in `<models>/Lora/` or `<models>/loras/`.
pub fn locate(name: &str, models_dir: &Path) -> anyhow::Result<PathBuf> {
    let direct = PathBuf::from(name);
    if direct.is_file() {
        return Ok(direct);
    }
    for sub in ["Lora", "loras", "LoRA", "lora"] {
        for candidate in [models_dir.join(sub).join(format!("{name}.safetensors")), models_dir.join(sub).join(name)] {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("LoRA {name:?}: no such file, and not in {}/Lora or {}/loras", models_dir.display(), models_dir.display())
}

/// Parses `NAME_OR_PATH[:WEIGHT]` (the weight after the last colon, default 1).
pub fn parse_spec(arg: &str, models_dir: &Path) -> anyhow::Result<LoraSpec> {
    let (name, weight) = match arg.rsplit_once(':') {
        Some((n, w)) if w.trim().parse::<f32>().is_ok() => (n, w.trim().parse().expect("checked")),
        _ => (arg, 1.0),
    };
    Ok(LoraSpec { path: locate(name, models_dir)?, weight })
}

/// One low-rank update.
struct Module {
    down: Tensor,
    up: Tensor,
    /// weight × alpha / rank.
    scale: f64,
}

/// One LoRA file's updates by (target, module key with underscores).
struct File {
    name: String,
    modules: HashMap<(Target, String), Module>,
    /// Keys of the file that are not LoRA tensors sdgen understands.
    unknown: Vec<String>,
}

/// The key of a module under `target`, from a model or checkpoint name
/// without `.weight`: underscores for dots, no `text_model` wrapper.
fn module_key(name: &str) -> String {
    let key = name.replace('.', "_");
    key.strip_prefix("text_model_").map_or(key.clone(), str::to_string)
}

fn read_file(spec: &LoraSpec) -> anyhow::Result<File> {
    let path = &spec.path;
    super::weights::refuse_pickle(path)?;
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    #[derive(Default)]
    struct Parts {
        down: Option<Tensor>,
        up: Option<Tensor>,
        alpha: Option<f32>,
    }
    let mut parts: BTreeMap<(Target, String), Parts> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (name, t) in &tensors {
        let Some((target, module, part)) = classify(name) else {
            unknown.push(name.clone());
            continue;
        };
        let entry = parts.entry((target, module_key(&module))).or_default();
        match part {
            Part::Down => entry.down = Some(t.clone()),
            Part::Up => entry.up = Some(t.clone()),
            Part::Alpha => {
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let [alpha] = values[..] else {
                    bail!("{}: `{name}` holds {} values; an alpha is one number", path.display(), values.len());
                };
                entry.alpha = Some(alpha);
            }
        }
    }
    if parts.is_empty() {
        bail!("{}: no LoRA tensors (`lora_unet_*`/`lora_te*` or `*.lora_A/B`) in this file", path.display());
    }
    let mut modules = HashMap::new();
    for ((target, key), Parts { down, up, alpha }) in parts {
        let (Some(down), Some(up)) = (down, up) else {
            bail!("{}: LoRA module {key} lacks its down or up matrix", path.display());
        };
        let rank = down.dim(0)?;
        if up.dim(1)? != rank {
            bail!("{}: LoRA module {key}: up {:?} does not fit down {:?}", path.display(), up.dims(), down.dims());
        }
        let scale = spec.weight as f64 * alpha.map_or(1.0, |a| a as f64 / rank as f64);
        modules.insert((target, key), Module { down: down.to_dtype(DType::F32)?, up: up.to_dtype(DType::F32)?, scale });
    }
    Ok(File { name: spec.name(), modules, unknown })
}

#[derive(Clone, Copy)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// (target, module name, part) of a LoRA tensor name in either format.
fn classify(name: &str) -> Option<(Target, String, Part)> {
    const KOHYA: &[(&str, Target)] = &[
        ("lora_unet_", Target::Unet),
        ("lora_te1_", Target::TextEncoder),
        ("lora_te2_", Target::TextEncoder2),
        ("lora_te_", Target::TextEncoder),
    ];
    const PEFT: &[(&str, Target)] =
        &[("unet.", Target::Unet), ("text_encoder_2.", Target::TextEncoder2), ("text_encoder.", Target::TextEncoder)];
    const PARTS: &[(&str, Part)] = &[
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
    ];
    let (module, part) = PARTS.iter().find_map(|(suffix, part)| name.strip_suffix(suffix).map(|m| (m, *part)))?;
    let found = KOHYA.iter().chain(PEFT).find_map(|(prefix, target)| module.strip_prefix(prefix).map(|m| (*target, m)));
    found.map(|(target, m)| (target, m.to_string(), part))
}

/// The LoRAs of one load, applied to the tensors as the models ask for them.
pub struct Patches {
    files: Vec<File>,
    /// The UNet's original checkpoint names (SDXL kohya LoRAs use them),
    /// known once the UNet's config is.
    unet_ldm: OnceLock<NameMap>,
    applied: Mutex<BTreeSet<(usize, Target, String)>>,
}

impl Patches {
    /// Reads the LoRA files.
    pub fn new(specs: &[LoraSpec]) -> anyhow::Result<Self> {
        let files = specs.iter().map(read_file).collect::<anyhow::Result<_>>()?;
        Ok(Self { files, unet_ldm: OnceLock::new(), applied: Mutex::new(BTreeSet::new()) })
    }

    /// Sets the UNet's names in the original checkpoints (before it loads).
    pub fn set_unet_names(&self, cfg: &crate::models::unet::UNetConfig) {
        let _ = self.unet_ldm.set(super::ldm::unet_names(cfg));
    }

    /// `tensor` (the model's `name` in `component`) with every matching
    /// update added, in f32.
    pub fn apply(&self, component: &str, name: &str, tensor: Tensor) -> candle_core::Result<Tensor> {
        let (Some(target), Some(module)) = (Target::of_component(component), name.strip_suffix(".weight")) else {
            return Ok(tensor);
        };
        let mut keys = vec![module_key(module)];
        if let (Target::Unet, Some(map)) = (target, self.unet_ldm.get()) {
            if let Some((ldm, _)) = map.rename(name) {
                let ldm = ldm.strip_prefix(super::ldm::UNET_PREFIX).unwrap_or(&ldm);
                keys.push(module_key(ldm.strip_suffix(".weight").unwrap_or(ldm)));
            }
        }
        let mut out = tensor;
        for (i, file) in self.files.iter().enumerate() {
            let Some((key, m)) = keys.iter().find_map(|k| file.modules.get(&(target, k.clone())).map(|m| (k, m)))
            else {
                continue;
            };
            let (rank, shape) = (m.down.dim(0)?, out.dims().to_vec());
            let delta = m.up.reshape((m.up.dim(0)?, rank))?.matmul(&m.down.reshape((rank, ()))?)?;
            if delta.elem_count() != out.elem_count() {
                return Err(candle_core::Error::Msg(format!(
                    "LoRA {}: module {key} gives {:?} for a {shape:?} weight",
                    file.name,
                    delta.dims()
                )));
            }
            // In f32, whatever the stored dtype (the caller casts after).
            out = (out.to_dtype(DType::F32)? + (delta.reshape(shape)? * m.scale)?)?;
            self.applied.lock().expect("lock").insert((i, target, key.clone()));
        }
        Ok(out)
    }

    /// One line per LoRA: how many of its modules were applied, and the
    /// first few that matched nothing.
    pub fn report(&self) -> Vec<(String, bool)> {
        let applied = self.applied.lock().expect("lock");
        self.files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let missed: Vec<String> = f
                    .modules
                    .keys()
                    .filter(|(t, k)| !applied.contains(&(i, *t, k.clone())))
                    .map(|(t, k)| format!("{}{k}", t.prefix()))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let total = f.modules.len();
                let done = total - missed.len();
                if missed.is_empty() && f.unknown.is_empty() {
                    (format!("LoRA {}: applied to {done} of {total} modules", f.name), true)
                } else {
                    let mut text = format!("LoRA {}: applied to {done} of {total} modules", f.name);
                    if !missed.is_empty() {
                        let shown: Vec<&str> = missed.iter().take(5).map(String::as_str).collect();
                        let more =
                            if missed.len() > 5 { format!(" and {} more", missed.len() - 5) } else { String::new() };
                        text.push_str(&format!("; no match in the model for {}{more}", shown.join(", ")));
                    }
                    if !f.unknown.is_empty() {
                        text.push_str(&format!("; {} tensors not understood (e.g. {})", f.unknown.len(), f.unknown[0]));
                    }
                    (text, false)
                }
            })
            .collect()
    }
}

/// First 12 hex digits of a LoRA's SHA-256 (A1111's `Lora hashes`).
pub fn short_hash(path: &Path) -> anyhow::Result<String> {
    Ok(super::catalog::sha256(path).with_context(|| format!("{}: hashing", path.display()))?[..12].to_string())
}
