//! Safetensors files as a `VarBuilder` backend: model names are renamed to
//! checkpoint names by a [`NameMap`], every tensor is shape-checked, and the
//! checkpoint tensors that no model asked for are counted.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// How a checkpoint tensor becomes the model's tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    /// Used as stored.
    None,
    /// A 1×1 convolution kernel `[O, I, 1, 1]` used as a linear weight `[O, I]`
    /// (the LDM VAE stores its attention projections this way).
    Conv1x1ToLinear,
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

const PICKLE_EXTENSIONS: &[&str] = &["ckpt", "pt", "pth", "bin", "pkl", "pickle"];

/// Refuses pickled PyTorch files, by extension or by content (a pickle
/// protocol byte, or a zip archive as `torch.save` writes), before anything
/// reads them as data.
pub fn refuse_pickle(path: &Path) -> anyhow::Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let mut head = [0u8; 4];
    let looks_pickled = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map(|n| n >= 2 && (head[0] == 0x80 && head[1] <= 5 || head[..n.min(4)] == *b"PK\x03\x04"))
        .unwrap_or(false);
    if PICKLE_EXTENSIONS.contains(&ext.as_str()) || looks_pickled {
        bail!(
            "{}: this is a pickled PyTorch file; sdgen never loads pickles because unpickling can run \
             arbitrary code. Convert it to .safetensors in a trusted Python environment (e.g. \
             `safetensors.torch.save_file(torch.load(f, weights_only=True)[\"state_dict\"], out)`) \
             or download the .safetensors version of the model",
            path.display()
        );
    }
    Ok(())
}

/// One or more memory-mapped safetensors files read as one set of tensors.
pub struct Checkpoint {
    files: MmapedSafetensors,
    label: String,
    used: Mutex<HashSet<String>>,
}

impl Checkpoint {
    pub fn open(paths: &[PathBuf]) -> anyhow::Result<Arc<Self>> {
        for p in paths {
            refuse_pickle(p)?;
            let meta = std::fs::metadata(p).with_context(|| format!("{}: cannot read", p.display()))?;
            if meta.len() < 8 {
                bail!("{}: not a safetensors file (only {} bytes)", p.display(), meta.len());
            }
        }
        // SAFETY: the files are mapped read-only; as with every mmap, a file
        // truncated by another process while we run would fault.
        let files = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| match e {
            candle_core::Error::WithPath { inner, path } => {
                anyhow::anyhow!("{}: not a valid safetensors file: {inner}", path.display())
            }
            other => anyhow::anyhow!("{}: {other}", paths[0].display()),
        })?;
        let label = match paths {
            [one] => one.display().to_string(),
            [first, ..] => format!("{} (+{} shards)", first.display(), paths.len() - 1),
            [] => bail!("no weight files given"),
        };
        Ok(Arc::new(Self { files, label, used: Mutex::new(HashSet::new()) }))
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Names and shapes of every tensor in the files.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.files.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect()
    }

    /// The stored names that no model has asked for so far.
    pub fn unused(&self) -> BTreeSet<String> {
        let used = self.used.lock().expect("lock");
        self.files.tensors().into_iter().map(|(n, _)| n).filter(|n| !used.contains(n)).collect()
    }

    /// A `VarBuilder` reading this checkpoint through `map`, converting to `dtype`.
    pub fn var_builder(
        self: &Arc<Self>,
        map: NameMap,
        component: &'static str,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let backend = Component { ckpt: self.clone(), map, component };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }
}

struct Component {
    ckpt: Arc<Checkpoint>,
    map: NameMap,
    component: &'static str,
}

impl Component {
    fn load(&self, name: &str, shape: Option<&Shape>, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let label = &self.ckpt.label;
        let what = self.component;
        let (stored, transform) = self.map.rename(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{label}: no checkpoint name for {what} tensor `{name}`"))
        })?;
        let view = self.ckpt.files.get(&stored).map_err(|_| {
            candle_core::Error::Msg(format!("{label}: missing tensor `{stored}` (needed by the {what} as `{name}`)"))
        })?;
        let stored_shape = view.shape().to_vec();
        let expected: Option<Vec<usize>> = shape.map(|s| s.dims().to_vec());
        let fits = match (&expected, transform) {
            (None, _) => true,
            (Some(e), Transform::None) => *e == stored_shape,
            (Some(e), Transform::Conv1x1ToLinear) => {
                *e == stored_shape
                    || (stored_shape.len() == 4 && stored_shape[2..] == [1, 1] && e[..] == stored_shape[..2])
            }
        };
        if !fits {
            return Err(candle_core::Error::Msg(format!(
                "{label}: tensor `{stored}` has shape {stored_shape:?}, expected {:?} for the {what}",
                expected.unwrap_or_default()
            )));
        }
        if !matches!(view.dtype(), safetensors::Dtype::F16 | safetensors::Dtype::BF16 | safetensors::Dtype::F32) {
            return Err(candle_core::Error::Msg(format!(
                "{label}: tensor `{stored}` has dtype {:?}; model weights must be f32, f16 or bf16",
                view.dtype()
            )));
        }
        let t = self.ckpt.files.load(&stored, dev)?.to_dtype(dtype)?;
        self.ckpt.used.lock().expect("lock").insert(stored);
        match expected {
            Some(e) if t.dims() != e.as_slice() => t.reshape(e),
            _ => Ok(t),
        }
    }
}

impl SimpleBackend for Component {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.rename(name).is_some_and(|(n, _)| self.ckpt.files.get(&n).is_ok())
    }
}
