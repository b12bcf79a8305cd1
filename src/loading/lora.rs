//! LoRA files, merged into the weights as they load: W += weight ×
//! (alpha / rank) × up · down (convolution LoRAs reshaped around it).
//!
//! Formats: kohya/A1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*` /
//! `lora_te2_*` for SDXL and SD 3; `.lora_down`, `.lora_up`, `.alpha`),
//! with backbone modules named as diffusers or as the original checkpoints
//! (SDXL, SD 3's MMDiT), and diffusers/PEFT (`unet.` / `transformer.` /
//! `text_encoder.` / `text_encoder_2.` + `.lora_A` / `.lora_B`, alpha =
//! rank unless stored). Module names are compared with dots turned into
//! underscores; an update to an original checkpoint tensor goes through
//! the same transform as the weight (a third of a fused qkv, halves
//! swapped). What matched nothing is reported, never silently dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::bail;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::weights::{Checkpoint, Component, NameMap, Transform};

/// kohya's module name prefixes and the components they patch (`lora_unet_`
/// is the backbone on every family); the first of each component is the
/// one reports use.
const KOHYA: &[(&str, Component)] = &[
    ("lora_unet_", Component::Unet),
    ("lora_te_", Component::TextEncoder),
    ("lora_te1_", Component::TextEncoder),
    ("lora_te2_", Component::TextEncoder2),
];

/// The kohya prefix of a component's module names.
fn kohya_prefix(target: Component) -> &'static str {
    KOHYA.iter().find(|(_, c)| *c == target).map_or("", |(p, _)| p)
}

/// `NAME_OR_PATH[:WEIGHT]` as `--lora` takes it (the weight after the last
/// colon, default 1); the name is looked up when the model loads.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraArg {
    pub name: String,
    pub weight: f32,
}

impl FromStr for LoraArg {
    type Err = anyhow::Error;

    fn from_str(arg: &str) -> anyhow::Result<Self> {
        let (name, weight) = match arg.rsplit_once(':') {
            Some((n, w)) if w.trim().parse::<f32>().is_ok() => (n, w.trim().parse().expect("checked")),
            _ => (arg, 1.0),
        };
        Ok(LoraArg { name: name.to_string(), weight })
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
        super::assets::display_name(&self.path)
    }
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
    modules: HashMap<(Component, String), Module>,
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
    let tensors = Checkpoint::open(std::slice::from_ref(path))?.load_all()?;
    #[derive(Default)]
    struct Parts {
        down: Option<Tensor>,
        up: Option<Tensor>,
        alpha: Option<f32>,
    }
    let mut parts: BTreeMap<(Component, String), Parts> = BTreeMap::new();
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
fn classify(name: &str) -> Option<(Component, String, Part)> {
    const PEFT: &[(&str, Component)] = &[
        ("unet.", Component::Unet),
        ("transformer.", Component::Transformer),
        ("text_encoder_2.", Component::TextEncoder2),
        ("text_encoder.", Component::TextEncoder),
    ];
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
    /// The backbone's original checkpoint names (kohya LoRAs for SDXL and
    /// SD 3 use them), known once its config is.
    backbone_names: OnceLock<NameMap>,
    applied: Mutex<BTreeSet<(usize, Component, String)>>,
}

impl Patches {
    /// Reads the LoRA files.
    pub fn new(specs: &[LoraSpec]) -> anyhow::Result<Self> {
        let files = specs.iter().map(read_file).collect::<anyhow::Result<_>>()?;
        Ok(Self { files, backbone_names: OnceLock::new(), applied: Mutex::new(BTreeSet::new()) })
    }

    /// Sets the backbone's names in the original checkpoints, under
    /// `ldm::UNET_PREFIX` (before it loads).
    pub fn set_backbone_names(&self, names: NameMap) {
        let _ = self.backbone_names.set(names);
    }

    /// The modules the model's `name` in `target` may be in LoRA files, and
    /// how an update there becomes one of `name`: its diffusers name as is,
    /// a backbone's original name (under `lora_unet_`) through the name
    /// table's transform.
    fn keys(&self, target: Component, name: &str) -> Vec<(Component, String, Transform)> {
        let Some(module) = name.strip_suffix(".weight") else { return Vec::new() };
        let mut keys = vec![(target, module_key(module), Transform::None)];
        if let (Component::Unet | Component::Transformer, Some(map)) = (target, self.backbone_names.get()) {
            if let Some((ldm, transform)) = map.rename(name) {
                let ldm = ldm.strip_prefix(super::ldm::UNET_PREFIX).unwrap_or(&ldm);
                keys.push((Component::Unet, module_key(ldm.strip_suffix(".weight").unwrap_or(ldm)), transform));
            }
        }
        keys
    }

    /// Whether any LoRA updates the model's `name` in `target`.
    fn touches(&self, target: Component, name: &str) -> bool {
        let keys = self.keys(target, name);
        self.files.iter().any(|f| keys.iter().any(|(c, k, _)| f.modules.contains_key(&(*c, k.clone()))))
    }

    /// `tensor` (the model's `name` in `target`) with every matching update
    /// added, in f32.
    fn apply(&self, target: Component, name: &str, tensor: Tensor) -> candle_core::Result<Tensor> {
        let keys = self.keys(target, name);
        let mut out = tensor;
        for (i, file) in self.files.iter().enumerate() {
            let Some((module, key, transform, m)) =
                keys.iter().find_map(|(c, k, t)| file.modules.get(&(*c, k.clone())).map(|m| (*c, k, *t, m)))
            else {
                continue;
            };
            let (rank, shape) = (m.down.dim(0)?, out.dims().to_vec());
            let delta = transform.apply(m.up.reshape((m.up.dim(0)?, rank))?.matmul(&m.down.reshape((rank, ()))?)?)?;
            if delta.elem_count() != out.elem_count() {
                return Err(candle_core::Error::Msg(format!(
                    "LoRA {}: module {key} gives {:?} for a {shape:?} weight",
                    file.name,
                    delta.dims()
                )));
            }
            // In f32, whatever the stored dtype (the caller casts after).
            out = (out.to_dtype(DType::F32)? + (delta.reshape(shape)? * m.scale)?)?;
            self.applied.lock().expect("lock").insert((i, module, key.clone()));
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
                    .map(|(t, k)| format!("{}{k}", kohya_prefix(*t)))
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

/// Reads a tensor of a wrapped source at the dtype and device given.
type Read<'a> = &'a dyn Fn(DType, &Device) -> candle_core::Result<Tensor>;

/// A weight source that hands each tensor of `inner` through `through`
/// (name, a reader of `inner`, the dtype and device asked for): LoRA
/// merging and base-weight recording wrap the checkpoint this way, so the
/// checkpoint knows nothing of them.
struct Through<B, F> {
    inner: B,
    through: F,
}

fn through<B, F>(inner: B, through: F) -> Through<B, F>
where
    F: Fn(&str, Read, DType, &Device) -> candle_core::Result<Tensor>,
{
    Through { inner, through }
}

impl<B, F> SimpleBackend for Through<B, F>
where
    B: SimpleBackend,
    F: Fn(&str, Read, DType, &Device) -> candle_core::Result<Tensor> + Send + Sync,
{
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        (self.through)(name, &|d, v| self.inner.get(s.clone(), name, init, d, v), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        (self.through)(name, &|d, v| self.inner.get_unchecked(name, d, v), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// The weights a model's LoRA targets were built from, before any LoRA,
/// kept so that other LoRAs can be merged later without reading the model
/// files again. Tensors the model uses unchanged are shared with it.
#[derive(Default)]
pub struct BaseWeights {
    tensors: Mutex<HashMap<(Component, String), Tensor>>,
}

impl BaseWeights {
    fn get(&self, component: Component, name: &str) -> candle_core::Result<Tensor> {
        let tensors = self.tensors.lock().expect("lock");
        tensors
            .get(&(component, name.to_string()))
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("no retained {} tensor `{name}`", component.label())))
    }
}

/// A source over [`BaseWeights`].
struct Retained {
    base: Arc<BaseWeights>,
    component: Component,
}

impl SimpleBackend for Retained {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.base.get(self.component, name)?;
        if t.dims() != s.dims() {
            candle_core::bail!("retained tensor `{name}` has shape {:?}, expected {:?}", t.dims(), s.dims());
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.base.get(self.component, name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.tensors.lock().expect("lock").contains_key(&(self.component, name.to_string()))
    }
}

/// How a component's weights are read besides the checkpoint: LoRAs to
/// merge, and where to keep the base weights for merging others later.
#[derive(Clone, Copy, Default)]
pub struct Merging<'a> {
    pub patches: Option<&'a Arc<Patches>>,
    pub keep_base: Option<&'a Arc<BaseWeights>>,
}

/// `backend` as a `VarBuilder`, with `patches` merged in when there are any.
fn builder<B: SimpleBackend + 'static>(
    backend: B,
    component: Component,
    patches: Option<&Arc<Patches>>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let Some(patches) = patches.cloned() else {
        return VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    };
    let patched = through(backend, move |name, read, dtype, dev| {
        if !patches.touches(component, name) {
            return read(dtype, dev);
        }
        // Merged in f32 on the CPU, whatever the stored and compute dtypes.
        let base = read(DType::F32, &Device::Cpu)?;
        patches.apply(component, name, base)?.to_dtype(dtype)?.to_device(dev)
    });
    VarBuilder::from_backend(Box::new(patched), dtype, device.clone())
}

/// The weights of `component` in `ckpt` (named through `map`), as `merging`
/// says.
pub fn component_weights(
    ckpt: &Arc<Checkpoint>,
    map: NameMap,
    component: Component,
    merging: Merging,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let source = ckpt.source(map, component);
    match merging.keep_base {
        Some(base) => {
            let base = base.clone();
            // Every tensor as the checkpoint gives it, before any LoRA.
            let recording = through(source, move |name, read, dtype, dev| {
                let t = read(dtype, dev)?;
                base.tensors.lock().expect("lock").insert((component, name.to_string()), t.clone());
                Ok(t)
            });
            builder(recording, component, merging.patches, dtype, device)
        }
        None => builder(source, component, merging.patches, dtype, device),
    }
}

/// The weights of `component` from `base`, with `patches` merged in.
pub fn retained_weights(
    base: &Arc<BaseWeights>,
    component: Component,
    patches: Option<&Arc<Patches>>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    builder(Retained { base: base.clone(), component }, component, patches, dtype, device)
}
