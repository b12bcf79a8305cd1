//! PyTorch's pickled files (`.ckpt`, `.pt`, `.pth`, `.bin`) read as data:
//! `torch.save`'s zip format (`*/data.pkl` + `*/data/N` storage records)
//! and its legacy format (pickles, then the storages appended), through an
//! interpreter that calls nothing ([`vm`]). The result is a flat list of
//! named tensors, each a view into the file read on demand, and the small
//! scalars and strings beside them.
//!
//! Names: a top-level `state_dict` is unwrapped (for upscalers `params_ema`
//! before `params`, as spandrel does), nested dicts and lists are joined
//! with `.`, and an A1111 embedding (`string_to_param`) becomes its
//! safetensors layout (`emb_params`).

mod vm;
mod zip;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, ensure, Context};
use safetensors::Dtype;
use vm::{Global, Object, Pickle, TensorView, Value};

/// How deep dicts and lists may nest below the root.
const MAX_DEPTH: usize = 64;
/// Metadata kept beside the tensors: strings up to this long, this many entries.
const MAX_TEXT: usize = 1024;
const MAX_METADATA: usize = 1000;

/// The legacy format's first pickle: this number.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// One tensor of a pickled file: a strided view of a storage's bytes.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    stride: Vec<usize>,
    /// Where the storage's bytes start in the file.
    storage_start: u64,
    /// The first element, counted from the storage's start.
    offset: usize,
}

impl StoredTensor {
    /// The tensor's bytes in row-major order (a non-contiguous view is
    /// gathered element by element).
    pub fn read(&self, file: &File) -> std::io::Result<Vec<u8>> {
        let size = element_size(self.dtype);
        let count: usize = self.shape.iter().product();
        if count == 0 {
            return Ok(Vec::new());
        }
        // Checked when the file was read: the view lies inside its storage.
        let last: usize = self.offset + self.shape.iter().zip(&self.stride).map(|(d, s)| (d - 1) * s).sum::<usize>();
        let start = self.storage_start + (self.offset * size) as u64;
        let mut span = vec![0u8; (last - self.offset + 1) * size];
        file.read_exact_at(&mut span, start)?;
        if self.stride == contiguous_strides(&self.shape) {
            return Ok(span);
        }
        let mut out = Vec::with_capacity(count * size);
        let mut index = vec![0usize; self.shape.len()];
        for _ in 0..count {
            let at: usize = index.iter().zip(&self.stride).map(|(i, s)| i * s).sum::<usize>() * size;
            out.extend_from_slice(&span[at..at + size]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(out)
    }
}

/// Bytes per element (every dtype a pickle holds is whole bytes wide).
pub fn element_size(d: Dtype) -> usize {
    d.bitsize() / 8
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// A pickled file's tensors (in the file's order) and its small values
/// (JSON text by dotted name).
pub struct Pickled {
    pub tensors: Vec<(String, StoredTensor)>,
    pub metadata: BTreeMap<String, String>,
}

/// Files read as pickles since the last [`take_notices`], for front ends to
/// report: a line, and whether it is only for information (else a warning).
static NOTICES: Mutex<Vec<(String, bool)>> = Mutex::new(Vec::new());

/// The notices of files read as pickles since the last call.
pub fn take_notices() -> Vec<(String, bool)> {
    std::mem::take(&mut *NOTICES.lock().expect("lock"))
}

/// PyTorch's pickle extensions: files named so are read as pickles even if
/// their first bytes say nothing (protocol 0 has no header).
const EXTENSIONS: &[&str] = &["ckpt", "pt", "pth", "bin", "pkl", "pickle"];

/// Whether the file's first bytes are a pickle, a zip archive (as
/// `torch.save` writes) or the old tar format, whatever its name says, or
/// it has a pickle's extension and is not safetensors.
pub fn looks_pickled(path: &Path) -> bool {
    let mut head = [0u8; 9];
    let n = File::open(path).and_then(|f| f.read_at(&mut head, 0)).unwrap_or(0);
    let head = &head[..n];
    // A safetensors file starts with its header's length, then `{`: a header
    // of 128, 384, … bytes makes its first byte 0x80, as a pickle's is.
    let safetensors_like = head.get(8) == Some(&b'{');
    let protocol = head.len() >= 2 && head[0] == 0x80 && head[1] <= 5;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let named = EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e)) && !safetensors_like;
    (protocol && !safetensors_like) || head.starts_with(b"PK\x03\x04") || is_tar(path) || named
}

fn is_tar(path: &Path) -> bool {
    let mut magic = [0u8; 5];
    File::open(path).and_then(|f| f.read_exact_at(&mut magic, 257)).is_ok() && &magic == b"ustar"
}

/// Reads a pickled PyTorch file as data; names the file in every error.
pub fn read(path: &Path) -> anyhow::Result<Pickled> {
    let out = read_unlabelled(path).with_context(|| format!("{}: reading it as a pickle", path.display()))?;
    let notice = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
        (format!("{}: named .safetensors but a pickle; read as data without running any of it", path.display()), false)
    } else {
        (format!("{}: a pickle, read as data without running any of it", path.display()), true)
    };
    // A load may open the same file more than once (memory check, loading).
    let mut notices = NOTICES.lock().expect("lock");
    if !notices.contains(&notice) {
        notices.push(notice);
    }
    Ok(out)
}

fn read_unlabelled(path: &Path) -> anyhow::Result<Pickled> {
    if is_tar(path) {
        bail!("the tar format of torch.save from before PyTorch 0.4 is not supported; load and save it again with any later PyTorch");
    }
    let file = File::open(path).context("cannot read")?;
    // SAFETY: mapped read-only to parse the pickles and the zip directory;
    // tensors are read later with pread, and the map is gone by then.
    let map = unsafe { memmap2::Mmap::map(&file) }.context("cannot read")?;
    let data: &[u8] = &map;
    let (pickle, storages) = if data.starts_with(b"PK\x03\x04") { zip_format(data)? } else { legacy_format(data)? };
    flatten(&pickle, &storages)
}

/// A storage's place in the file and its element type.
struct Storage {
    start: u64,
    bytes: u64,
    dtype: Dtype,
}

/// The storage a persistent id names: `('storage', type, key, location,
/// numel[, view])`.
struct StorageId {
    dtype: Dtype,
    key: String,
    numel: u64,
}

fn storage_id(p: &Pickle, id: &Value) -> anyhow::Result<StorageId> {
    let Some(Object::Tuple(t)) = p.get(id) else { bail!("a persistent id that is not a tuple") };
    match (t.first(), t.get(1), t.get(2), t.get(4)) {
        (
            Some(Value::Str(tag)),
            Some(Value::Global(Global::Storage(dtype))),
            Some(Value::Str(key)),
            Some(Value::Int(n)),
        ) if tag == "storage" && *n >= 0 => {
            if t.get(5).is_some_and(|v| *v != Value::None) {
                bail!("storage views of the legacy format (before PyTorch 1.0) are not supported");
            }
            Ok(StorageId { dtype: dtype.unwrap_or(Dtype::U8), key: key.clone(), numel: *n as u64 })
        }
        _ => bail!("a persistent id that is not a torch storage"),
    }
}

/// Every storage id the pickle's tensors use, by key.
fn storage_ids(p: &Pickle) -> anyhow::Result<HashMap<String, StorageId>> {
    let mut out = HashMap::new();
    for o in &p.objects {
        if let Object::Persistent(id) = o {
            let s = storage_id(p, id)?;
            if let Some(old) = out.get(&s.key).map(|o: &StorageId| (o.dtype, o.numel)) {
                ensure!(old == (s.dtype, s.numel), "storage {} declared twice with different sizes or types", s.key);
            }
            out.insert(s.key.clone(), s);
        }
    }
    Ok(out)
}

fn zip_format(data: &[u8]) -> anyhow::Result<(Pickle, HashMap<String, Storage>)> {
    let members = zip::members(data)?;
    let pkl: Vec<&zip::Member> =
        members.iter().filter(|m| m.name.split('/').count() == 2 && m.name.ends_with("/data.pkl")).collect();
    let [pkl] = pkl[..] else { bail!("a zip archive without one `*/data.pkl`: not a torch.save file") };
    let prefix = pkl.name.trim_end_matches("data.pkl");
    if let Some(order) = members.iter().find(|m| m.name == format!("{prefix}byteorder")) {
        let text = &data[order.offset as usize..(order.offset + order.size) as usize];
        ensure!(text == b"little", "a big-endian archive");
    }
    let body = &data[pkl.offset as usize..(pkl.offset + pkl.size) as usize];
    let (pickle, _) = vm::run(body).context("data.pkl")?;
    let records: HashMap<&str, &zip::Member> =
        members.iter().filter_map(|m| Some((m.name.strip_prefix(prefix)?.strip_prefix("data/")?, m))).collect();
    let mut storages = HashMap::new();
    for (key, id) in storage_ids(&pickle)? {
        let m = records.get(key.as_str()).with_context(|| format!("storage {key}: no record data/{key}"))?;
        let bytes = id.numel.checked_mul(element_size(id.dtype) as u64).context("storage size")?;
        ensure!(
            m.size == bytes,
            "storage {key}: {} elements of {:?} declared, {} bytes stored",
            id.numel,
            id.dtype,
            m.size
        );
        storages.insert(key, Storage { start: m.offset, bytes, dtype: id.dtype });
    }
    Ok((pickle, storages))
}

fn legacy_format(data: &[u8]) -> anyhow::Result<(Pickle, HashMap<String, Storage>)> {
    let mut at = 0;
    let mut next = |what: &str| -> anyhow::Result<Pickle> {
        let (p, used) = vm::run(&data[at..]).with_context(|| what.to_string())?;
        at += used;
        Ok(p)
    };
    let magic = next("pickle 1 (torch's magic number)")?;
    if magic.root != Value::Long(LEGACY_MAGIC.to_vec()) {
        bail!("a pickle that is not a torch.save file (no torch magic number)");
    }
    next("pickle 2 (protocol version)")?;
    next("pickle 3 (system info)")?;
    let pickle = next("pickle 4 (the data)")?;
    let keys = next("pickle 5 (storage keys)")?;
    let Some(Object::List(keys)) = keys.get(&keys.root) else { bail!("the storage keys are not a list") };
    let ids = storage_ids(&pickle)?;
    let mut storages = HashMap::new();
    let mut pos = at as u64;
    for key in keys {
        let Value::Str(key) = key else { bail!("a storage key that is not a string") };
        let id = ids.get(key).with_context(|| format!("storage {key} is stored but not used"))?;
        let head = data.get(pos as usize..pos as usize + 8).with_context(|| format!("storage {key}: the file ends"))?;
        let numel = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        ensure!(numel == id.numel, "storage {key}: {} elements declared, {numel} stored", id.numel);
        let bytes = numel.checked_mul(element_size(id.dtype) as u64).context("storage size")?;
        let start = pos + 8;
        ensure!(
            start.checked_add(bytes).is_some_and(|e| e <= data.len() as u64),
            "storage {key}: {bytes} bytes past the end of the file"
        );
        storages.insert(key.clone(), Storage { start, bytes, dtype: id.dtype });
        pos = start + bytes;
    }
    for key in ids.keys() {
        ensure!(storages.contains_key(key), "storage {key} is used but not stored");
    }
    Ok((pickle, storages))
}

/// A tensor view checked against its storage.
fn tensor(p: &Pickle, view: &TensorView, storages: &HashMap<String, Storage>) -> anyhow::Result<StoredTensor> {
    let Some(Object::Persistent(id)) = p.get(&view.storage) else { bail!("a tensor without a storage") };
    let key = storage_id(p, id)?.key;
    let s = &storages[&key];
    let size = element_size(s.dtype) as u64;
    let numel = s.bytes / size;
    let count = view.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)).context("tensor size")?;
    // A broadcast view (stride 0) could make a small file expand without bound.
    ensure!(count <= numel, "a tensor of {count} elements viewing a storage of {numel}: broadcast views are not read");
    if count > 0 {
        let extent = view
            .shape
            .iter()
            .zip(&view.stride)
            .try_fold(view.offset as u64, |acc, (&d, &st)| acc.checked_add((d as u64 - 1).checked_mul(st as u64)?))
            .context("tensor extent")?;
        ensure!(
            extent < numel,
            "a tensor of size {:?} (stride {:?}, offset {}) reaches past its storage of {numel} elements",
            view.shape,
            view.stride,
            view.offset
        );
    }
    Ok(StoredTensor {
        dtype: s.dtype,
        shape: view.shape.clone(),
        stride: view.stride.clone(),
        storage_start: s.start,
        offset: view.offset,
    })
}

struct Flattener<'a> {
    pickle: &'a Pickle,
    storages: &'a HashMap<String, Storage>,
    tensors: Vec<(String, StoredTensor)>,
    metadata: BTreeMap<String, String>,
    /// Containers already walked (a shared or cyclic one is walked once).
    seen: HashSet<usize>,
    /// Whether tensors found are kept (not while collecting metadata only).
    collect: bool,
}

impl Flattener<'_> {
    fn get(&self, v: &Value) -> Option<&Object> {
        self.pickle.get(v)
    }

    /// The `(key, value)` pairs of a dict, a list (by index) or a
    /// ParameterDict (its `_parameters`); `None` for anything else.
    fn items(&self, v: &Value) -> Option<Vec<(String, Value)>> {
        match self.get(v)? {
            Object::Dict(d) => Some(d.iter().map(|(k, v)| (self.key(k), v.clone())).collect()),
            Object::List(l) | Object::Tuple(l) => {
                Some(l.iter().enumerate().map(|(i, v)| (i.to_string(), v.clone())).collect())
            }
            // Its parameters: the `_parameters` dict of its state.
            Object::Record { class: Global::ParameterDict, state: Some(state), .. } => {
                let Some(Object::Dict(state)) = self.get(state) else { return None };
                let params = &state.iter().find(|(k, _)| *k == Value::Str("_parameters".into()))?.1;
                let Some(Object::Dict(d)) = self.get(params) else { return None };
                Some(d.iter().map(|(k, v)| (self.key(k), v.clone())).collect())
            }
            _ => None,
        }
    }

    fn key(&self, k: &Value) -> String {
        match k {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
            Value::None => "None".to_string(),
            Value::Global(g) => format!("{g:?}"),
            _ => "?".to_string(),
        }
    }

    fn walk(&mut self, name: &str, v: &Value, depth: usize) -> anyhow::Result<()> {
        ensure!(depth <= MAX_DEPTH, "dicts nested deeper than {MAX_DEPTH} levels");
        if let Some(Object::Tensor(view)) = self.get(v) {
            if !self.collect {
                return Ok(());
            }
            let t = tensor(self.pickle, view, self.storages).with_context(|| format!("tensor `{name}`"))?;
            self.tensors.push((name.to_string(), t));
            return Ok(());
        }
        if let Value::Ref(i) = v {
            if !self.seen.insert(*i) {
                return Ok(());
            }
        }
        if let Some(items) = self.items(v) {
            for (k, child) in items {
                let full = if name.is_empty() { k } else { format!("{name}.{k}") };
                self.walk(&full, &child, depth + 1)?;
            }
            return Ok(());
        }
        let json = match v {
            Value::Bool(b) => serde_json::Value::from(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) if f.is_finite() => serde_json::Value::from(*f),
            Value::Str(s) if s.len() <= MAX_TEXT => serde_json::Value::from(s.as_str()),
            _ => return Ok(()),
        };
        if !name.is_empty() && self.metadata.len() < MAX_METADATA {
            self.metadata.insert(name.to_string(), json.to_string());
        }
        Ok(())
    }
}

fn flatten(pickle: &Pickle, storages: &HashMap<String, Storage>) -> anyhow::Result<Pickled> {
    let mut f = Flattener {
        pickle,
        storages,
        tensors: Vec::new(),
        metadata: BTreeMap::new(),
        seen: HashSet::new(),
        collect: true,
    };
    let top = f.items(&pickle.root).unwrap_or_default();
    let field = |name: &str| top.iter().find(|(k, v)| k == name && f.items(v).is_some()).map(|(_, v)| v.clone());
    let embedding = field("string_to_param");
    let inner = field("state_dict").or_else(|| field("params_ema")).or_else(|| field("params"));
    match (embedding, inner) {
        (Some(params), _) => {
            // An A1111 embedding: its vectors as A1111's safetensors files hold them.
            f.walk("emb_params", &params, 1)?;
            ensure!(f.tensors.len() == 1, "an embedding with {} vector tables in string_to_param", f.tensors.len());
            f.tensors[0].0 = "emb_params".into();
        }
        // The weights alone: sibling tensors (optimiser state, `params` after
        // `params_ema`) are not the model's.
        (None, Some(inner)) => f.walk("", &inner, 0)?,
        (None, None) => f.walk("", &pickle.root, 0)?,
    }
    // The scalars and strings around them.
    f.collect = false;
    f.walk("", &pickle.root, 0)?;
    ensure!(!f.tensors.is_empty(), "no tensors in it");
    let mut names = HashSet::new();
    for (name, _) in &f.tensors {
        ensure!(names.insert(name), "two tensors named `{name}`");
    }
    Ok(Pickled { tensors: f.tensors, metadata: f.metadata })
}
