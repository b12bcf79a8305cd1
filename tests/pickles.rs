//! PyTorch pickles read as data (tests/reference/make_pickles.py): files
//! written by real `torch.save` convert to exactly what
//! `torch.load(weights_only=True)` gives, load as models, text encoders
//! and embeddings, and a hostile corpus is refused with one line, running
//! nothing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{fixture, read_rgb};
use sha2::Digest;

#[derive(serde::Deserialize)]
struct Cases {
    good: BTreeMap<String, Good>,
    hostile: BTreeMap<String, Hostile>,
}

#[derive(serde::Deserialize)]
struct Good {
    /// "stored", "float16", "bfloat16", "float32" → tensor name → what torch gives.
    expected: BTreeMap<String, BTreeMap<String, Expected>>,
}

#[derive(serde::Deserialize, Debug, PartialEq)]
struct Expected {
    dtype: String,
    shape: Vec<usize>,
    sha256: String,
}

#[derive(serde::Deserialize)]
struct Hostile {
    error: String,
}

fn cases() -> Cases {
    serde_json::from_str(&std::fs::read_to_string(fixture("pickles/cases.json")).unwrap()).unwrap()
}

/// torch's dtype names for safetensors' dtypes.
fn torch_name(d: safetensors::Dtype) -> &'static str {
    use safetensors::Dtype::*;
    match d {
        F32 => "float32",
        F16 => "float16",
        BF16 => "bfloat16",
        F64 => "float64",
        I64 => "int64",
        I32 => "int32",
        I16 => "int16",
        I8 => "int8",
        U8 => "uint8",
        BOOL => "bool",
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn convert(input: &Path, output: &Path, dtype: Option<&str>) -> std::process::Output {
    let mut args = vec!["convert", input.to_str().unwrap(), output.to_str().unwrap()];
    if let Some(d) = dtype {
        args.extend(["--dtype", d]);
    }
    common::sdgen(&args)
}

#[test]
fn torch_save_files_convert_to_what_torch_loads() {
    let dir = tempfile::tempdir().unwrap();
    for (name, good) in cases().good {
        let input = fixture(&format!("pickles/good/{name}"));
        for (cast, expected) in &good.expected {
            let out = dir.path().join(format!("{name}.{cast}.safetensors"));
            let dtype = match cast.as_str() {
                "stored" => None,
                "float16" => Some("f16"),
                "bfloat16" => Some("bf16"),
                _ => Some("f32"),
            };
            let o = convert(&input, &out, dtype);
            assert!(o.status.success(), "{name} {cast}: {}", common::stderr(&o));
            assert!(common::stderr(&o).contains("read as data without running any of it"), "{}", common::stderr(&o));
            let bytes = std::fs::read(&out).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut got = BTreeMap::new();
            for (n, view) in st.tensors() {
                let sha = format!("{:x}", sha2::Sha256::digest(view.data()));
                got.insert(
                    n,
                    Expected { dtype: torch_name(view.dtype()).into(), shape: view.shape().to_vec(), sha256: sha },
                );
            }
            assert_eq!(&got.keys().collect::<Vec<_>>(), &expected.keys().collect::<Vec<_>>(), "{name} {cast}: names");
            for (n, e) in expected {
                assert_eq!(&got[n], e, "{name} {cast}: tensor {n}");
            }
            // Sorted by name in the file too, and the source recorded.
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let mut by_offset: Vec<(usize, String)> =
                meta.tensors().iter().map(|(n, i)| (i.data_offsets.0, n.clone())).collect();
            by_offset.sort();
            let order: Vec<&String> = by_offset.iter().map(|(_, n)| n).collect();
            assert_eq!(order, expected.keys().collect::<Vec<_>>(), "{name}: data order");
            let source = format!("{:x}", sha2::Sha256::digest(std::fs::read(&input).unwrap()));
            assert_eq!(meta.metadata().as_ref().unwrap()["source_sha256"], source);
        }
    }
}

/// Small values beside the tensors are kept as JSON text; the Lightning
/// file's bookkeeping (a class as a dict key, numpy scalars, a set) reads as data.
#[test]
fn metadata_keeps_small_values() {
    let dir = tempfile::tempdir().unwrap();
    let read_meta = |name: &str| {
        let out = dir.path().join(format!("{name}.safetensors"));
        let o = convert(&fixture(&format!("pickles/good/{name}")), &out, None);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let bytes = std::fs::read(&out).unwrap();
        safetensors::SafeTensors::read_metadata(&bytes).unwrap().1.metadata().clone().unwrap()
    };
    let m = read_meta("nested_zip.pt");
    assert_eq!((m["epoch"].as_str(), m["name"].as_str()), ("3", "\"nested\""));
    let m = read_meta("lightning.ckpt");
    assert_eq!(m["global_step"], "1200");
    assert_eq!(m["pytorch-lightning_version"], "\"1.4.2\"");
    assert_eq!(m["callbacks.Lightning.best_model_score"], "0.125");
    let m = read_meta("embedding.pt");
    assert_eq!((m["name"].as_str(), m["step"].as_str()), ("\"pklemb\"", "100"));
}

fn txt2img(model: &Path, out: &Path) -> std::process::Output {
    let args = ["--model", model.to_str().unwrap(), "-p", "a photo of a cat", "--steps", "2", "-W", "64", "-H", "64"];
    let o = common::sdgen(&[&args[..], &["--seed", "1", "--out", out.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}: {}", model.display(), common::stderr(&o));
    o
}

/// A CompVis-style `.ckpt` of the tiny SD 2 model gives its safetensors
/// twin's image bit for bit, and says it was read as a pickle.
#[test]
fn a_ckpt_gives_the_same_image_as_its_safetensors_twin() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("ckpt.png"), dir.path().join("st.png"));
    let o = txt2img(&fixture("pickles/good/tiny-sd2.ckpt"), &a);
    assert!(common::stderr(&o).contains("tiny-sd2.ckpt: a pickle, read as data without running any of it"));
    txt2img(&fixture("tiny-sd2.safetensors"), &b);
    assert_eq!(read_rgb(&a).as_raw(), read_rgb(&b).as_raw());
}

/// An older diffusers folder's `pytorch_model.bin` text encoder loads as its safetensors does.
#[test]
fn bin_weights_in_a_diffusers_folder_load() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("tiny-sd1-bin");
    std::fs::create_dir(&folder).unwrap();
    for entry in std::fs::read_dir(fixture("tiny-sd1")).unwrap().flatten() {
        if entry.file_name() != "text_encoder" {
            std::os::unix::fs::symlink(entry.path(), folder.join(entry.file_name())).unwrap();
        }
    }
    let te = folder.join("text_encoder");
    std::fs::create_dir(&te).unwrap();
    std::fs::copy(fixture("tiny-sd1/text_encoder/config.json"), te.join("config.json")).unwrap();
    std::os::unix::fs::symlink(fixture("pickles/good/pytorch_model.bin"), te.join("pytorch_model.bin")).unwrap();
    let (a, b) = (dir.path().join("bin.png"), dir.path().join("st.png"));
    txt2img(&folder, &a);
    txt2img(&fixture("tiny-sd1"), &b);
    assert_eq!(read_rgb(&a).as_raw(), read_rgb(&b).as_raw());
}

/// An A1111 `.pt` embedding in the embeddings folder is used like its
/// safetensors form (`emb_params`).
#[test]
fn a1111_pt_embeddings_load() {
    use candle_core::{DType, Device};
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("embeddings")).unwrap();
    std::os::unix::fs::symlink(fixture("pickles/good/embedding.pt"), dir.path().join("embeddings/pklemb.pt")).unwrap();
    let adapters = sdgen::loading::Adapters { embeddings: Some(dir.path().join("embeddings")), ..Default::default() };
    let m = sdgen::loading::Model::load_with(&fixture("tiny-sd1"), &Device::Cpu, DType::F32, &adapters).unwrap();
    let e = m.applied.embeddings.iter().find(|e| e.name == "pklemb").expect("the embedding");
    assert_eq!(e.len(), 2);
    let out = dir.path().join("emb.safetensors");
    assert!(convert(&fixture("pickles/good/embedding.pt"), &out, None).status.success());
    let want = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["emb_params"].clone();
    let diff = (&e.vectors[0] - want.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

/// Every hostile file: one line naming the file and the problem, exit 4,
/// no output, and the payload's marker file never appears.
#[test]
fn hostile_pickles_are_refused_running_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (name, case) in cases().hostile {
        let marker = PathBuf::from(format!("/tmp/sdgen-pickle-pwned-{}", name.split('.').next().unwrap()));
        let _ = std::fs::remove_file(&marker);
        let input = fixture(&format!("pickles/hostile/{name}"));
        let out = dir.path().join("out.safetensors");
        let o = convert(&input, &out, None);
        let err = common::stderr(&o);
        assert_eq!(o.status.code(), Some(4), "{name}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: one line: {err}");
        assert!(err.contains(&name) && err.contains(&case.error), "{name}: expected {:?} in {err}", case.error);
        assert!(!out.exists(), "{name}: output written");
        // The same through --model.
        let png = dir.path().join("x.png");
        let o = common::sdgen(&["--model", input.to_str().unwrap(), "-p", "x", "--out", png.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(4), "{name}: {}", common::stderr(&o));
        assert!(!png.exists());
        assert!(!marker.exists(), "{name}: the payload ran");
    }
}

/// A pickle named `.safetensors` is read like any pickle, with a warning.
#[test]
fn pickles_named_safetensors_are_read_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let misnamed = dir.path().join("model.safetensors");
    std::fs::copy(fixture("pickles/good/nested_zip.pt"), &misnamed).unwrap();
    let o = convert(&misnamed, &dir.path().join("out.safetensors"), None);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("warning: ") && common::stderr(&o).contains("named .safetensors but a pickle"));
    let o = convert(&misnamed, &dir.path().join("out.pt"), None);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
}
