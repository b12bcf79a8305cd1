//! Safetensors files as a `VarBuilder` backend: model names are renamed to
//! checkpoint names by a [`NameMap`], every tensor is shape-checked, and the
//! checkpoint tensors that no model asked for are counted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use safetensors::tensor::TensorInfo;
use safetensors::SafeTensors;

/// The parts of a pipeline that load weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    TextEncoder,
    /// SDXL's second, pooled text encoder.
    TextEncoder2,
    Unet,
    Vae,
    ControlNet,
    /// SD 3's MMDiT.
    Transformer,
    /// SD 3's T5.
    TextEncoder3,
    /// An image upscaler (ESRGAN family).
    Upscaler,
}

impl Component {
    /// How errors name it.
    pub fn label(self) -> &'static str {
        match self {
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "second text encoder",
            Component::Unet => "UNet",
            Component::Vae => "VAE",
            Component::ControlNet => "ControlNet",
            Component::Transformer => "transformer",
            Component::TextEncoder3 => "T5 text encoder",
            Component::Upscaler => "upscaler",
        }
    }
}

/// How a checkpoint tensor becomes the model's tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    /// Used as stored.
    None,
    /// A 1×1 convolution kernel `[O, I, 1, 1]` used as a linear weight `[O, I]`
    /// (the LDM VAE stores its attention projections this way).
    Conv1x1ToLinear,
    /// Part `index` of `parts` equal blocks of rows: one of q, k, v from
    /// OpenCLIP's fused `in_proj` `[3C, C]` (and its bias `[3C]`).
    Rows { index: usize, parts: usize },
    /// A matrix stored transposed: open_clip's `text_projection` `[D, P]`
    /// (applied as `x @ P`) used as a linear weight `[P, D]`.
    Transpose,
    /// The two halves of the rows in the other order: SD 3's original files
    /// keep some adaLN layers' (shift, scale) where diffusers has (scale, shift).
    SwapHalves,
}

impl Transform {
    /// The model's tensor from the stored one (a 1×1 kernel keeps its
    /// shape: the caller reshapes).
    pub fn apply(self, t: Tensor) -> candle_core::Result<Tensor> {
        Ok(match self {
            Transform::Rows { index, parts } => {
                let rows = t.dim(0)? / parts;
                t.narrow(0, index * rows, rows)?
            }
            Transform::Transpose => t.t()?.contiguous()?,
            Transform::SwapHalves => {
                let half = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)?
            }
            Transform::None | Transform::Conv1x1ToLinear => t,
        })
    }
}

/// One row of a name table: model names starting with `model` come from
/// checkpoint names starting with `ckpt`; the rest of the name is then looked
/// up in `inner` (first matching model prefix wins) or kept as is.
#[derive(Debug, Clone)]
pub struct Rule {
    pub model: String,
    pub ckpt: String,
    pub inner: &'static [(&'static str, &'static str, Transform)],
}

/// A table of [`Rule`]s; the longest matching model prefix wins.
#[derive(Debug, Clone)]
pub struct NameMap {
    rules: Vec<Rule>,
}

impl NameMap {
    pub fn new(mut rules: Vec<Rule>) -> Self {
        rules.sort_by_key(|r| std::cmp::Reverse(r.model.len()));
        Self { rules }
    }

    /// Every model name maps to `prefix` + the same name.
    pub fn prefixed(prefix: &str) -> Self {
        Self::new(vec![Rule { model: String::new(), ckpt: prefix.to_string(), inner: &[] }])
    }

    pub fn rename(&self, name: &str) -> Option<(String, Transform)> {
        let rule = self.rules.iter().find(|r| name.starts_with(&r.model))?;
        let rest = &name[rule.model.len()..];
        for (model, ckpt, transform) in rule.inner {
            if let Some(tail) = rest.strip_prefix(model) {
                return Some((format!("{}{ckpt}{tail}", rule.ckpt), *transform));
            }
        }
        Some((format!("{}{rest}", rule.ckpt), Transform::None))
    }
}

/// The first name a safetensors header (a JSON object) holds twice.
fn duplicate_name(header: &[u8]) -> Option<String> {
    struct FirstDuplicate(Option<String>);
    impl<'de> serde::Deserialize<'de> for FirstDuplicate {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Keys;
            impl<'de> serde::de::Visitor<'de> for Keys {
                type Value = FirstDuplicate;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<FirstDuplicate, A::Error> {
                    let mut seen = HashSet::new();
                    while let Some(key) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        if !seen.insert(key.clone()) {
                            return Ok(FirstDuplicate(Some(key)));
                        }
                    }
                    Ok(FirstDuplicate(None))
                }
            }
            d.deserialize_map(Keys)
        }
    }
    serde_json::from_slice::<FirstDuplicate>(header).ok().and_then(|d| d.0)
}

/// Where a tensor's bytes are in its file.
enum Stored {
    /// A safetensors entry: where the data section starts, and its layout.
    Safetensors(u64, TensorInfo),
    /// A view into a pickled file's storage.
    Pickled(super::pickle::StoredTensor),
}

impl Stored {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Stored::Safetensors(_, info) => info.dtype,
            Stored::Pickled(t) => t.dtype,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Stored::Safetensors(_, info) => &info.shape,
            Stored::Pickled(t) => &t.shape,
        }
    }
}

/// One or more weight files read as one set of tensors: safetensors, or
/// PyTorch pickles read as data ([`super::pickle`]), told apart by content.
///
/// Tensors are read with `pread`, not through a memory map: candle's CPU
/// tensors own their memory (and usually change dtype), so mapped file pages
/// would only add the file's size to the peak RSS while loading.
pub struct Checkpoint {
    files: Vec<File>,
    /// Name → (index in `files`, where its bytes are).
    tensors: HashMap<String, (usize, Stored)>,
    /// The files' metadata (a pickle's small values, as JSON text).
    metadata: BTreeMap<String, String>,
    label: String,
    used: Mutex<HashSet<String>>,
}

impl Checkpoint {
    pub fn open(paths: &[PathBuf]) -> anyhow::Result<Arc<Self>> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        let mut all_metadata = BTreeMap::new();
        for (i, p) in paths.iter().enumerate() {
            let file = File::open(p).with_context(|| format!("{}: cannot read", p.display()))?;
            if super::pickle::looks_pickled(p) {
                let pickled = super::pickle::read(p)?;
                all_metadata.extend(pickled.metadata);
                for (name, t) in pickled.tensors {
                    if tensors.insert(name.clone(), (i, Stored::Pickled(t))).is_some() {
                        bail!("{}: tensor `{name}` is also in another shard", p.display());
                    }
                }
                files.push(file);
                continue;
            }
            let len = file.metadata().with_context(|| format!("{}: cannot read", p.display()))?.len();
            if len < 8 {
                bail!("{}: not a safetensors file (only {len} bytes)", p.display());
            }
            // SAFETY: mapped read-only and only for the header check, which
            // touches the header pages alone; the map is gone before any
            // tensor is read.
            let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot read", p.display()))?;
            // JSON objects may repeat a key; the last one would silently win.
            let declared = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
            if let Some(name) =
                usize::try_from(declared).ok().and_then(|n| map.get(8..8usize.checked_add(n)?)).and_then(duplicate_name)
            {
                bail!("{}: not a valid safetensors file: tensor `{name}` is named twice", p.display());
            }
            let (header, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", p.display()))?;
            let data_start = 8 + header as u64;
            all_metadata.extend(metadata.metadata().clone().unwrap_or_default());
            for (name, info) in metadata.tensors() {
                if tensors.insert(name.clone(), (i, Stored::Safetensors(data_start, info.clone()))).is_some() {
                    bail!("{}: tensor `{name}` is also in another shard", p.display());
                }
            }
            files.push(file);
        }
        let label = match paths {
            [one] => one.display().to_string(),
            [first, ..] => format!("{} (+{} shards)", first.display(), paths.len() - 1),
            [] => bail!("no weight files given"),
        };
        Ok(Arc::new(Self { files, tensors, metadata: all_metadata, label, used: Mutex::new(HashSet::new()) }))
    }

    /// One tensor's bytes as stored, row-major.
    fn bytes(&self, name: &str, entry: &(usize, Stored)) -> candle_core::Result<Vec<u8>> {
        let (file, stored) = entry;
        let cannot =
            |e: std::io::Error| candle_core::Error::Msg(format!("{}: cannot read tensor `{name}`: {e}", self.label));
        Ok(match stored {
            Stored::Safetensors(start, info) => {
                let (begin, end) = info.data_offsets;
                let mut bytes = vec![0u8; end - begin];
                self.files[*file].read_exact_at(&mut bytes, start + begin as u64).map_err(cannot)?;
                bytes
            }
            Stored::Pickled(t) => t.read(&self.files[*file]).map_err(cannot)?,
        })
    }

    /// Every tensor's name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    /// A tensor as stored, whatever its dtype: (dtype, shape, row-major bytes).
    pub fn raw(&self, name: &str) -> anyhow::Result<(safetensors::Dtype, Vec<usize>, Vec<u8>)> {
        let entry = self.tensors.get(name).with_context(|| format!("{}: no tensor `{name}`", self.label))?;
        Ok((entry.1.dtype(), entry.1.shape().to_vec(), self.bytes(name, entry)?))
    }

    /// The files' metadata: safetensors' `__metadata__`, a pickle's small values as JSON text.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Reads one tensor as stored (on the CPU).
    fn read(&self, name: &str, entry: &(usize, Stored)) -> candle_core::Result<Tensor> {
        let stored = &entry.1;
        let bytes = self.bytes(name, entry)?;
        let dtype = match stored.dtype() {
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F32 => DType::F32,
            // Some pickled checkpoints hold f64 tensors.
            safetensors::Dtype::F64 => DType::F64,
            // fp8 files (SD 3.5's `t5xxl_fp8_e4m3fn`): upcast as they load.
            safetensors::Dtype::F8_E4M3 => DType::F8E4M3,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor `{name}` has dtype {other:?}; model weights must be f32, f16, bf16, f64 or f8 (e4m3)",
                    self.label
                )))
            }
        };
        Tensor::from_raw_buffer(&bytes, dtype, stored.shape(), &Device::Cpu)
    }

    /// Every tensor, as stored (on the CPU): small files (LoRAs, embeddings).
    pub fn load_all(&self) -> anyhow::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(self.tensors.len());
        for (name, entry) in &self.tensors {
            out.insert(name.clone(), self.read(name, entry)?);
        }
        Ok(out)
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Names and shapes of every tensor in the files.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.tensors.iter().map(|(n, (_, t))| (n.clone(), t.shape().to_vec())).collect()
    }

    /// Names, stored dtypes and shapes of every tensor in the files.
    pub fn dtypes(&self) -> Vec<(String, safetensors::Dtype, Vec<usize>)> {
        self.tensors.iter().map(|(n, (_, t))| (n.clone(), t.dtype(), t.shape().to_vec())).collect()
    }

    /// The stored names that no model has asked for so far.
    pub fn unused(&self) -> BTreeSet<String> {
        let used = self.used.lock().expect("lock");
        self.tensors.keys().filter(|n| !used.contains(*n)).cloned().collect()
    }

    /// `component`'s tensors in this checkpoint, named through `map`.
    pub fn source(self: &Arc<Self>, map: NameMap, component: Component) -> Source {
        Source { ckpt: self.clone(), map, component }
    }

    /// A `VarBuilder` reading `component` through `map`, converting to `dtype`.
    pub fn var_builder(
        self: &Arc<Self>,
        map: NameMap,
        component: Component,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.source(map, component)), dtype, device.clone())
    }
}

/// One component's tensors in a checkpoint: a `VarBuilder` backend.
pub struct Source {
    ckpt: Arc<Checkpoint>,
    map: NameMap,
    component: Component,
}

impl Source {
    fn load(&self, name: &str, shape: Option<&Shape>, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let label = &self.ckpt.label;
        let what = self.component.label();
        let (stored, transform) = self.map.rename(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{label}: no checkpoint name for {what} tensor `{name}`"))
        })?;
        let entry = self.ckpt.tensors.get(&stored).ok_or_else(|| {
            candle_core::Error::Msg(format!("{label}: missing tensor `{stored}` (needed by the {what} as `{name}`)"))
        })?;
        let stored_shape = entry.1.shape().to_vec();
        let expected: Option<Vec<usize>> = shape.map(|s| s.dims().to_vec());
        let fits = match (&expected, transform) {
            (None, _) => true,
            (Some(e), Transform::None) => *e == stored_shape,
            (Some(e), Transform::Conv1x1ToLinear) => {
                *e == stored_shape
                    || (stored_shape.len() == 4 && stored_shape[2..] == [1, 1] && e[..] == stored_shape[..2])
            }
            (Some(e), Transform::Rows { parts, .. }) => {
                !e.is_empty()
                    && e.len() == stored_shape.len()
                    && stored_shape[0] == e[0] * parts
                    && e[1..] == stored_shape[1..]
            }
            (Some(e), Transform::Transpose) => e.len() == 2 && stored_shape == [e[1], e[0]],
            (Some(e), Transform::SwapHalves) => *e == stored_shape && e.first().is_some_and(|r| r % 2 == 0),
        };
        if !fits {
            return Err(candle_core::Error::Msg(format!(
                "{label}: tensor `{stored}` has shape {stored_shape:?}, expected {:?} for the {what}",
                expected.unwrap_or_default()
            )));
        }
        let mut t = transform.apply(self.ckpt.read(&stored, entry)?)?;
        if let Some(e) = expected.as_ref().filter(|e| t.dims() != e.as_slice()) {
            t = t.reshape(e.as_slice())?;
        }
        self.ckpt.used.lock().expect("lock").insert(stored);
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl SimpleBackend for Source {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.rename(name).is_some_and(|(n, _)| self.ckpt.tensors.contains_key(&n))
    }
}
