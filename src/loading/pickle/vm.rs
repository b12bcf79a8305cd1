//! A pickle interpreter that builds data and calls nothing. Python's
//! unpickler imports whatever `GLOBAL` names and calls it on `REDUCE`; this
//! one knows a short list of names ([`Global`]) and gives each a meaning of
//! its own (a dict, a tensor view, an opaque record), so no code named by
//! the file can run: there is none to run. Every length, index and depth the
//! file declares is checked against the bytes and limits it has.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context};

/// How deep `MARK`s may nest, how many objects the memo and the stack may
/// hold, how many objects a file may build.
const MAX_MARKS: usize = 1000;
const MAX_MEMO: usize = 1 << 20;
const MAX_STACK: usize = 1 << 22;
const MAX_OBJECTS: usize = 1 << 24;
/// No allowed call takes more arguments than this.
const MAX_ARGS: usize = 16;

/// The names a pickle may use, each read as data by our own code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    /// `torch.*Storage`, with its element type (`None`: untyped bytes).
    Storage(Option<safetensors::Dtype>),
    Size,
    Device,
    ParameterDict,
    CodecsEncode,
    Set,
    FrozenSet,
    NumpyDtype,
    NumpyNdarray,
    NumpyReconstruct,
    NumpyScalar,
    /// PyTorch Lightning's checkpoint bookkeeping, kept as an opaque record.
    Lightning,
}

impl Global {
    /// The allow-list: `module.name` → its meaning.
    fn find(module: &str, name: &str) -> Option<Self> {
        use safetensors::Dtype::*;
        let storage = |d| Some(Global::Storage(Some(d)));
        match (module, name) {
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_tensor") => Some(Global::RebuildTensor),
            ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
            ("torch", "FloatStorage") => storage(F32),
            ("torch", "HalfStorage") => storage(F16),
            ("torch", "BFloat16Storage") => storage(BF16),
            ("torch", "DoubleStorage") => storage(F64),
            ("torch", "LongStorage") => storage(I64),
            ("torch", "IntStorage") => storage(I32),
            ("torch", "ShortStorage") => storage(I16),
            ("torch", "CharStorage") => storage(I8),
            ("torch", "ByteStorage") => storage(U8),
            ("torch", "BoolStorage") => storage(BOOL),
            ("torch.storage", "UntypedStorage" | "TypedStorage") | ("torch", "UntypedStorage") => {
                Some(Global::Storage(None))
            }
            ("torch", "Size") => Some(Global::Size),
            ("torch", "device") => Some(Global::Device),
            ("torch.nn.modules.container", "ParameterDict") => Some(Global::ParameterDict),
            ("_codecs", "encode") => Some(Global::CodecsEncode),
            ("builtins" | "__builtin__", "set") => Some(Global::Set),
            ("builtins" | "__builtin__", "frozenset") => Some(Global::FrozenSet),
            ("numpy", "dtype") => Some(Global::NumpyDtype),
            ("numpy", "ndarray") => Some(Global::NumpyNdarray),
            ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => Some(Global::NumpyReconstruct),
            ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => Some(Global::NumpyScalar),
            ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
            | ("pytorch_lightning.callbacks", "model_checkpoint")
            | ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint") => Some(Global::Lightning),
            _ => None,
        }
    }
}

/// A value on the stack or in the memo. Containers live in the machine's
/// arena, so that the memo shares them as Python's does (a dict memoized
/// empty and filled afterwards is the same dict).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits (little-endian two's complement).
    Long(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Global(Global),
    Ref(usize),
}

/// A tensor view as `_rebuild_tensor_v2` describes it; its storage is the
/// persistent id the file gave, resolved by the container.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorView {
    pub storage: Value,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// In insertion order.
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    /// An allowed class's instance, kept as data (its arguments and state).
    Record {
        class: Global,
        args: Vec<Value>,
        state: Option<Value>,
    },
    /// A persistent id (`BINPERSID`): a storage, as the container names it.
    Persistent(Value),
    Tensor(TensorView),
}

/// A pickle's objects and its result.
pub struct Pickle {
    pub objects: Vec<Object>,
    pub root: Value,
}

impl Pickle {
    pub fn get(&self, v: &Value) -> Option<&Object> {
        match v {
            Value::Ref(i) => self.objects.get(*i),
            _ => None,
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    objects: Vec<Object>,
    /// Where each scalar key of each dict is, so that a repeated key finds
    /// its slot without a scan.
    keys: HashMap<(usize, Key), usize>,
    /// Values copied so far, against a budget linear in the input (a list
    /// handed to many calls would otherwise cost its length each time).
    copied: usize,
}

/// A dict key that Python compares by value (`True == 1`).
#[derive(PartialEq, Eq, Hash)]
enum Key {
    Str(String),
    Int(i64),
    None,
}

fn key_of(v: &Value) -> Option<Key> {
    match v {
        Value::Str(s) => Some(Key::Str(s.clone())),
        Value::Int(i) => Some(Key::Int(*i)),
        Value::Bool(b) => Some(Key::Int(*b as i64)),
        Value::None => Some(Key::None),
        _ => None,
    }
}

/// Runs the pickle at the start of `data`; returns it and the bytes it used.
pub fn run(data: &[u8]) -> anyhow::Result<(Pickle, usize)> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: Vec::new(),
        keys: HashMap::new(),
        copied: 0,
    };
    let root = m.run().with_context(|| format!("pickle opcode at byte {}", m.pos.saturating_sub(1)))?;
    Ok((Pickle { objects: m.objects, root }, m.pos))
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> anyhow::Result<&[u8]> {
        let left = self.data.len() - self.pos;
        ensure!(n <= left, "the pickle ends before its STOP opcode ({n} more bytes needed, {left} left)");
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn byte(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, n: usize) -> anyhow::Result<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    /// A length as the file declares it, checked against what is left.
    fn len(&mut self, n: usize) -> anyhow::Result<usize> {
        let len = self.uint(n)?;
        let left = (self.data.len() - self.pos) as u64;
        ensure!(len <= left, "a length of {len} bytes declared with only {left} left in the file");
        Ok(len as usize)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').context("a text argument without its newline")?;
        let text = std::str::from_utf8(&rest[..end]).context("a text argument that is not UTF-8")?.to_string();
        self.pos += end + 1;
        Ok(text)
    }

    fn push(&mut self, v: Value) -> anyhow::Result<()> {
        ensure!(self.stack.len() < MAX_STACK, "more than {MAX_STACK} values on the stack");
        self.stack.push(v);
        Ok(())
    }

    fn new_object(&mut self, o: Object) -> anyhow::Result<Value> {
        ensure!(self.objects.len() < MAX_OBJECTS, "more than {MAX_OBJECTS} objects");
        self.objects.push(o);
        Ok(Value::Ref(self.objects.len() - 1))
    }

    fn pop(&mut self) -> anyhow::Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        ensure!(self.stack.len() > floor, "the stack is empty");
        Ok(self.stack.pop().expect("checked"))
    }

    fn top(&mut self) -> anyhow::Result<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        ensure!(self.stack.len() > floor, "the stack is empty");
        Ok(self.stack.last().expect("checked"))
    }

    /// The values since the last `MARK`, which is dropped.
    fn pop_mark(&mut self) -> anyhow::Result<Vec<Value>> {
        let at = self.marks.pop().context("no MARK to pop to")?;
        Ok(self.stack.split_off(at))
    }

    fn memo_put(&mut self, key: u64) -> anyhow::Result<()> {
        let v = self.top()?.clone();
        ensure!(self.memo.len() < MAX_MEMO || self.memo.contains_key(&key), "more than {MAX_MEMO} memo entries");
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> anyhow::Result<()> {
        let v = self.memo.get(&key).with_context(|| format!("memo entry {key} was never stored"))?.clone();
        self.push(v)
    }

    fn object(&mut self, v: &Value) -> anyhow::Result<&mut Object> {
        match v {
            Value::Ref(i) => Ok(&mut self.objects[*i]),
            other => bail!("expected a container, found {}", describe(other)),
        }
    }

    fn run(&mut self) -> anyhow::Result<Value> {
        loop {
            let op = self.byte()?;
            match op {
                0x80 => {
                    let proto = self.byte()?;
                    ensure!(proto <= 5, "pickle protocol {proto}");
                }
                0x95 => {
                    // FRAME: a length hint for buffering; the bytes follow inline.
                    self.uint(8)?;
                }
                b'.' => return self.pop(),
                b'(' => {
                    ensure!(self.marks.len() < MAX_MARKS, "MARKs nested deeper than {MAX_MARKS}");
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.push(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.uint(1)?;
                    self.push(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.push(Value::Int(v as i64))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.uint(1)? as usize } else { self.len(4)? };
                    let bytes = self.take(n)?.to_vec();
                    self.push(long(bytes))?
                }
                b'I' => {
                    let text = self.line()?;
                    let v = match text.as_str() {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        t => Value::Int(t.parse().with_context(|| format!("INT {t:?}"))?),
                    };
                    self.push(v)?
                }
                b'L' => {
                    let text = self.line()?;
                    let v: i64 = text.trim_end_matches('L').parse().with_context(|| format!("LONG {text:?}"))?;
                    self.push(Value::Int(v))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.push(Value::Float(v))?
                }
                b'F' => {
                    let text = self.line()?;
                    self.push(Value::Float(text.parse().with_context(|| format!("FLOAT {text:?}"))?))?
                }
                0x8c | b'X' | 0x8d => {
                    let n = match op {
                        0x8c => self.len(1)?,
                        b'X' => self.len(4)?,
                        _ => self.len(8)?,
                    };
                    let text = std::str::from_utf8(self.take(n)?).context("a string that is not UTF-8")?.to_string();
                    self.push(Value::Str(text))?
                }
                b'V' => {
                    let text = self.line()?;
                    self.push(Value::Str(text))?
                }
                // Python 2 strings: bytes, read as Latin-1 text as Python 3's default does.
                b'U' | b'T' => {
                    let n = if op == b'U' { self.len(1)? } else { self.len(4)? };
                    let text: String = self.take(n)?.iter().map(|&b| b as char).collect();
                    self.push(Value::Str(text))?
                }
                b'S' => {
                    let text = self.line()?;
                    let inner = text.trim();
                    let unquoted = inner
                        .strip_prefix('\'')
                        .and_then(|t| t.strip_suffix('\''))
                        .or_else(|| inner.strip_prefix('"').and_then(|t| t.strip_suffix('"')))
                        .with_context(|| format!("STRING {text:?} is not quoted"))?;
                    self.push(Value::Str(unquoted.to_string()))?
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => self.len(1)?,
                        b'B' => self.len(4)?,
                        _ => self.len(8)?,
                    };
                    let bytes = self.take(n)?.to_vec();
                    self.push(Value::Bytes(bytes))?
                }
                b']' => {
                    let v = self.new_object(Object::List(Vec::new()))?;
                    self.push(v)?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.new_object(Object::List(items))?;
                    self.push(v)?
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?.clone();
                    self.append(&list, vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?.clone();
                    self.append(&list, items)?;
                }
                b')' => {
                    let v = self.new_object(Object::Tuple(Vec::new()))?;
                    self.push(v)?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.new_object(Object::Tuple(items))?;
                    self.push(v)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.new_object(Object::Tuple(items))?;
                    self.push(v)?
                }
                b'}' => {
                    let v = self.new_object(Object::Dict(Vec::new()))?;
                    self.push(v)?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let v = self.new_object(Object::Dict(Vec::new()))?;
                    self.set_items(&v, items)?;
                    self.push(v)?
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let dict = self.top()?.clone();
                    self.set_items(&dict, vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?.clone();
                    self.set_items(&dict, items)?;
                }
                0x8f => {
                    let v = self.new_object(Object::Set(Vec::new()))?;
                    self.push(v)?
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let set = self.top()?.clone();
                    match self.object(&set)? {
                        Object::Set(s) => s.extend(items),
                        other => bail!("ADDITEMS on {}", kind(other)),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.new_object(Object::Set(items))?;
                    self.push(v)?
                }
                b'p' => {
                    let key = self.line()?.parse().context("PUT index")?;
                    self.memo_put(key)?
                }
                b'q' => {
                    let key = self.uint(1)?;
                    self.memo_put(key)?
                }
                b'r' => {
                    let key = self.uint(4)?;
                    self.memo_put(key)?
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?
                }
                b'g' => {
                    let key = self.line()?.parse().context("GET index")?;
                    self.memo_get(key)?
                }
                b'h' => {
                    let key = self.uint(1)?;
                    self.memo_get(key)?
                }
                b'j' => {
                    let key = self.uint(4)?;
                    self.memo_get(key)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(global(&module, &name)?))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        bail!("STACK_GLOBAL with {} and {}", describe(&module), describe(&name));
                    };
                    self.push(Value::Global(global(module, name)?))?
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let args = self.tuple(&args)?;
                    let v = self.call(&callable, args)?;
                    self.push(v)?
                }
                0x81 => {
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let args = self.tuple(&args)?;
                    let v = self.call(&class, args)?;
                    self.push(v)?
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let class = self.pop()?;
                    ensure!(
                        matches!(self.get(&kwargs), Some(Object::Dict(d)) if d.is_empty()),
                        "NEWOBJ_EX with keyword arguments"
                    );
                    let args = self.tuple(&args)?;
                    let v = self.call(&class, args)?;
                    self.push(v)?
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?.clone();
                    self.build(&target, state)?;
                }
                b'P' => {
                    let id = Value::Str(self.line()?);
                    let v = self.new_object(Object::Persistent(id))?;
                    self.push(v)?
                }
                b'Q' => {
                    let id = self.pop()?;
                    let v = self.new_object(Object::Persistent(id))?;
                    self.push(v)?
                }
                b'i' => bail!("opcode INST (creates an instance of any class named in the file) refused"),
                b'o' => bail!("opcode OBJ (calls any class on the stack) refused"),
                0x82..=0x84 => bail!("EXT opcodes (globals from the copyreg registry) refused"),
                0x97 | 0x98 => bail!("out-of-band buffers (NEXT_BUFFER / READONLY_BUFFER) refused"),
                other => bail!("unknown pickle opcode 0x{other:02x}"),
            }
        }
    }

    fn get(&self, v: &Value) -> Option<&Object> {
        match v {
            Value::Ref(i) => self.objects.get(*i),
            _ => None,
        }
    }

    fn tuple(&self, v: &Value) -> anyhow::Result<Vec<Value>> {
        match self.get(v) {
            Some(Object::Tuple(t)) if t.len() <= MAX_ARGS => Ok(t.clone()),
            Some(Object::Tuple(t)) => bail!("a call with {} arguments", t.len()),
            _ => bail!("call arguments must be a tuple, found {}", self.describe(v)),
        }
    }

    /// Copies of a list's items (for a call's arguments), charged to the budget.
    fn items_of(&mut self, v: &Value, what: &str) -> anyhow::Result<Vec<Value>> {
        let items = match self.get(v) {
            Some(Object::List(l) | Object::Tuple(l) | Object::Set(l)) => l.clone(),
            _ => bail!("{what} of {}", self.describe(v)),
        };
        self.copied += items.len();
        ensure!(self.copied <= 16 * self.data.len() + (1 << 20), "more copying than a pickle of this size needs");
        Ok(items)
    }

    fn append(&mut self, list: &Value, items: Vec<Value>) -> anyhow::Result<()> {
        match self.object(list)? {
            Object::List(l) => l.extend(items),
            other => bail!("APPEND on {}", kind(other)),
        }
        Ok(())
    }

    fn set_items(&mut self, dict: &Value, items: Vec<Value>) -> anyhow::Result<()> {
        ensure!(items.len().is_multiple_of(2), "SETITEMS with an odd number of values");
        let Value::Ref(id) = *dict else { bail!("SETITEM on {}", self.describe(dict)) };
        let Object::Dict(d) = &mut self.objects[id] else { bail!("SETITEM on {}", self.describe(dict)) };
        let mut items = items.into_iter();
        while let (Some(k), Some(v)) = (items.next(), items.next()) {
            // A repeated key replaces its value, as in a Python dict.
            match key_of(&k).map(|key| self.keys.entry((id, key))) {
                Some(std::collections::hash_map::Entry::Occupied(slot)) => d[*slot.get()].1 = v,
                Some(std::collections::hash_map::Entry::Vacant(slot)) => {
                    slot.insert(d.len());
                    d.push((k, v));
                }
                None => d.push((k, v)),
            }
        }
        Ok(())
    }

    /// `BUILD`: state set on an object we created as data; never on a class,
    /// a tensor or anything else (Python would call its `__setstate__`).
    fn build(&mut self, target: &Value, state: Value) -> anyhow::Result<()> {
        match self.object(target) {
            // An OrderedDict's attributes (`state_dict()._metadata`): not items.
            Ok(Object::Dict(_)) => Ok(()),
            Ok(Object::Record { state: slot, .. }) => {
                *slot = Some(state);
                Ok(())
            }
            _ => bail!("BUILD on {} refused", self.describe(target)),
        }
    }

    /// `REDUCE` / `NEWOBJ` of an allowed name, interpreted by our own code.
    fn call(&mut self, callable: &Value, args: Vec<Value>) -> anyhow::Result<Value> {
        let Value::Global(g) = callable else { bail!("call of {}", self.describe(callable)) };
        let int = |m: &Self, v: &Value, what: &str| -> anyhow::Result<usize> {
            match v {
                Value::Int(i) if *i >= 0 => Ok(*i as usize),
                other => bail!("{what}: expected a non-negative integer, found {}", m.describe(other)),
            }
        };
        let ints = |m: &Self, v: &Value, what: &str| -> anyhow::Result<Vec<usize>> {
            match m.get(v) {
                Some(Object::Tuple(t) | Object::List(t)) => t.iter().map(|x| int(m, x, what)).collect(),
                _ => bail!("{what}: expected a tuple of integers, found {}", m.describe(v)),
            }
        };
        let object = match g {
            Global::OrderedDict => {
                let v = self.new_object(Object::Dict(Vec::new()))?;
                if let Some(items) = args.first() {
                    let pairs = self.items_of(items, "OrderedDict")?;
                    for pair in pairs {
                        let kv = match self.get(&pair) {
                            Some(Object::Tuple(kv) | Object::List(kv)) if kv.len() == 2 => kv.clone(),
                            _ => bail!("OrderedDict item {}", self.describe(&pair)),
                        };
                        self.set_items(&v, kv)?;
                    }
                }
                return Ok(v);
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                ensure!(args.len() >= 4, "{g:?} with {} arguments", args.len());
                ensure!(
                    matches!(self.get(&args[0]), Some(Object::Persistent(_))),
                    "a tensor whose storage is {}",
                    self.describe(&args[0])
                );
                let shape = ints(self, &args[2], "tensor size")?;
                let stride = ints(self, &args[3], "tensor stride")?;
                ensure!(shape.len() == stride.len(), "a tensor of {} sizes and {} strides", shape.len(), stride.len());
                let offset = int(self, &args[1], "storage offset")?;
                Object::Tensor(TensorView { storage: args[0].clone(), offset, shape, stride })
            }
            Global::RebuildParameter => {
                let data = args.first().context("_rebuild_parameter without data")?;
                ensure!(matches!(self.get(data), Some(Object::Tensor(_))), "a parameter of {}", self.describe(data));
                return Ok(data.clone());
            }
            Global::Size => {
                let dims = args.first().map(|a| ints(self, a, "torch.Size")).transpose()?.unwrap_or_default();
                Object::Tuple(dims.into_iter().map(|d| Value::Int(d as i64)).collect())
            }
            Global::Device => match args.first() {
                Some(Value::Str(s)) => return Ok(Value::Str(s.clone())),
                _ => bail!("torch.device of {}", args.first().map_or("nothing".into(), |a| self.describe(a))),
            },
            Global::CodecsEncode => match (args.first(), args.get(1)) {
                (Some(Value::Str(s)), Some(Value::Str(enc))) if enc == "latin1" || enc == "latin-1" => {
                    let bytes = s.chars().map(|c| u8::try_from(c as u32)).collect::<Result<Vec<u8>, _>>();
                    return Ok(Value::Bytes(bytes.context("_codecs.encode: a character beyond Latin-1")?));
                }
                _ => bail!("_codecs.encode other than (text, 'latin1')"),
            },
            Global::Set | Global::FrozenSet => {
                let items = match args.first() {
                    None => Vec::new(),
                    Some(a) => self.items_of(a, "set")?,
                };
                Object::Set(items)
            }
            Global::NumpyScalar => {
                if let Some(v) = numpy_scalar(self, &args) {
                    return Ok(v);
                }
                Object::Record { class: *g, args, state: None }
            }
            Global::ParameterDict
            | Global::Lightning
            | Global::NumpyDtype
            | Global::NumpyNdarray
            | Global::NumpyReconstruct => Object::Record { class: *g, args, state: None },
            Global::Storage(_) => bail!("a storage built by a call, not a persistent id"),
        };
        self.new_object(object)
    }

    fn describe(&self, v: &Value) -> String {
        match self.get(v) {
            Some(o) => kind(o).to_string(),
            None => describe(v),
        }
    }
}

fn global(module: &str, name: &str) -> anyhow::Result<Global> {
    Global::find(module, name).with_context(|| format!("global `{module}.{name}` is not allowed (it could run code)"))
}

/// A `LONG1`/`LONG4` integer: an `Int` when it fits 64 bits.
fn long(bytes: Vec<u8>) -> Value {
    if bytes.len() <= 8 {
        let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
        let mut full = [if negative { 0xff } else { 0 }; 8];
        full[..bytes.len()].copy_from_slice(&bytes);
        Value::Int(i64::from_le_bytes(full))
    } else {
        Value::Long(bytes)
    }
}

/// `numpy.core.multiarray.scalar(dtype, bytes)` as a number, for the
/// little-endian float and integer dtypes Lightning's bookkeeping holds.
fn numpy_scalar(m: &Machine, args: &[Value]) -> Option<Value> {
    let Some(Object::Record { class: Global::NumpyDtype, args: dtype, .. }) = args.first().and_then(|a| m.get(a))
    else {
        return None;
    };
    let (Some(Value::Str(code)), Some(Value::Bytes(b))) = (dtype.first(), args.get(1)) else { return None };
    let b8 = || <[u8; 8]>::try_from(b.as_slice()).ok();
    let b4 = || <[u8; 4]>::try_from(b.as_slice()).ok();
    Some(match code.as_str() {
        "f8" => Value::Float(f64::from_le_bytes(b8()?)),
        "i8" => Value::Int(i64::from_le_bytes(b8()?)),
        "f4" => Value::Float(f32::from_le_bytes(b4()?) as f64),
        "i4" => Value::Int(i32::from_le_bytes(b4()?) as i64),
        _ => return None,
    })
}

fn kind(o: &Object) -> &'static str {
    match o {
        Object::List(_) => "a list",
        Object::Tuple(_) => "a tuple",
        Object::Dict(_) => "a dict",
        Object::Set(_) => "a set",
        Object::Record { .. } => "a record",
        Object::Persistent(_) => "a storage",
        Object::Tensor(_) => "a tensor",
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(_) => "a bool".into(),
        Value::Int(_) | Value::Long(_) => "an integer".into(),
        Value::Float(_) => "a float".into(),
        Value::Str(_) => "a string".into(),
        Value::Bytes(_) => "bytes".into(),
        Value::Global(g) => format!("the global {g:?}"),
        Value::Ref(_) => "an object".into(),
    }
}
