//! Bad input gets one clear error line naming the file and the problem, a
//! non-zero exit, no panic and no output file.

mod common;

use std::path::{Path, PathBuf};

use common::*;

struct Outcome {
    stderr: String,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

/// Runs a small txt2img job on `model` (with `extra` arguments) that must fail.
fn must_fail(model: &Path, extra: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let mut args = vec!["--model", model.to_str().unwrap(), "--prompt", "a fox", "--out", out.to_str().unwrap()];
    for (flag, value) in [("--steps", "1"), ("--width", "64"), ("--height", "64"), ("--seed", "1")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend(extra);
    let o = sdgen(&args);
    let stderr = stderr(&o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {stderr}");
    eprintln!("{}", stderr.trim_end());
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "panic: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line expected: {stderr}");
    assert!(!out.exists(), "an output file was written");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");
    Outcome { stderr, out, _dir: dir }
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The tiny single-file checkpoint with `edit` applied to its tensor list.
fn edited_checkpoint(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) -> PathBuf {
    let bytes = std::fs::read(fixture("tiny-sd1.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut dtypes = std::collections::HashMap::new();
    for (n, v) in st.tensors() {
        dtypes.insert(n.clone(), v.dtype());
        tensors.push((n, v.shape().to_vec(), v.data().to_vec()));
    }
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            // Renamed or new tensors: the dtype from the bytes per value.
            let dtype = dtypes.get(n).copied().unwrap_or(match d.len() / s.iter().product::<usize>().max(1) {
                4 => safetensors::Dtype::F32,
                8 => safetensors::Dtype::I64,
                _ => safetensors::Dtype::F16,
            });
            (n.clone(), safetensors::tensor::TensorView::new(dtype, s.clone(), d).unwrap())
        })
        .collect();
    let path = dir.join(name);
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn truncated_and_garbage_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(fixture("tiny-sd1.safetensors")).unwrap();
    let truncated = write_file(dir.path(), "truncated.safetensors", &full[..full.len() / 2]);
    let r = must_fail(&truncated, &[]);
    assert!(r.stderr.contains("truncated.safetensors") && r.stderr.contains("safetensors"), "{}", r.stderr);

    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let garbage = write_file(dir.path(), "garbage.safetensors", &garbage);
    let r = must_fail(&garbage, &[]);
    assert!(r.stderr.contains("garbage.safetensors"), "{}", r.stderr);

    let empty = write_file(dir.path(), "empty.safetensors", b"");
    let r = must_fail(&empty, &[]);
    assert!(r.stderr.contains("empty.safetensors"), "{}", r.stderr);
}

#[test]
fn wrong_shape_and_missing_tensor_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let victim = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";
    let wrong = edited_checkpoint(dir.path(), "wrong.safetensors", |ts| {
        let t = ts.iter_mut().find(|t| t.0 == victim).expect("tensor exists");
        t.1 = vec![t.1.iter().product::<usize>()];
    });
    let r = must_fail(&wrong, &[]);
    assert!(
        r.stderr.contains("wrong.safetensors") && r.stderr.contains(victim) && r.stderr.contains("shape"),
        "{}",
        r.stderr
    );

    let missing = edited_checkpoint(dir.path(), "missing.safetensors", |ts| ts.retain(|t| t.0 != victim));
    let r = must_fail(&missing, &[]);
    assert!(
        r.stderr.contains("missing.safetensors") && r.stderr.contains(victim) && r.stderr.contains("missing"),
        "{}",
        r.stderr
    );
}

#[test]
fn not_a_full_model_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let vae_only = edited_checkpoint(dir.path(), "vae.safetensors", |ts| {
        ts.retain(|t| t.0.starts_with("first_stage_model."));
        for t in ts.iter_mut() {
            t.0 = t.0.trim_start_matches("first_stage_model.").to_string();
        }
    });
    let r = must_fail(&vae_only, &[]);
    assert!(r.stderr.contains("vae.safetensors") && r.stderr.contains("VAE"), "{}", r.stderr);

    // An SD UNet beside a text encoder of another architecture.
    let other_text = edited_checkpoint(dir.path(), "t5.safetensors", |ts| {
        for t in ts.iter_mut() {
            t.0 = t.0.replace("cond_stage_model.transformer.text_model.", "text_encoders.t5xxl.transformer.");
        }
    });
    let r = must_fail(&other_text, &[]);
    assert!(
        r.stderr.contains("t5.safetensors")
            && r.stderr.contains("no text encoder")
            && r.stderr.contains("`text_encoders.t5xxl.*`"),
        "{}",
        r.stderr
    );

    // Another architecture altogether: the unexpected tensors are named.
    let flux = edited_checkpoint(dir.path(), "flux.safetensors", |ts| {
        ts.clear();
        for i in 0..3 {
            ts.push((format!("double_blocks.{i}.img_attn.qkv.weight"), vec![2], vec![0; 4]));
        }
        ts.push(("img_in.weight".into(), vec![2], vec![0; 4]));
    });
    let r = must_fail(&flux, &[]);
    assert!(
        r.stderr.contains("flux.safetensors")
            && r.stderr.contains("unexpected tensors")
            && r.stderr.contains("`double_blocks.0.*` (1)")
            && r.stderr.contains("`img_in.weight` (1)"),
        "{}",
        r.stderr
    );
}

#[test]
fn pickles_are_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    // A pickle whose loading would run code; sdgen must not even parse it.
    let pickle = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R.";
    for name in ["model.ckpt", "model.safetensors"] {
        let p = write_file(dir.path(), name, pickle);
        let r = must_fail(&p, &[]);
        assert!(r.stderr.contains(name) && r.stderr.contains("pickle"), "{}", r.stderr);
    }
    let zip = write_file(dir.path(), "archive.pt", b"PK\x03\x04rest-of-a-torch-zip");
    let r = must_fail(&zip, &[]);
    assert!(r.stderr.contains("pickle"), "{}", r.stderr);
}

#[test]
fn bad_sizes_and_arguments() {
    let model = fixture("tiny-sd1.safetensors");
    let r = must_fail(&model, &["--width", "1048576"]);
    assert!(r.stderr.contains("larger than"), "{}", r.stderr);
    let r = must_fail(&model, &["--width", "65"]);
    assert!(r.stderr.contains("width") && r.stderr.contains("multiple of 8"), "{}", r.stderr);
    let r = must_fail(&model, &["--sampler", "nope"]);
    assert!(r.stderr.contains("nope") && r.stderr.contains("euler_a"), "{}", r.stderr);
    let r = must_fail(&model, &["--steps", "0"]);
    assert!(r.stderr.contains("steps"), "{}", r.stderr);
    let r = must_fail(&model, &["--cfg-scale", "-1"]);
    assert!(r.stderr.contains("cfg"), "{}", r.stderr);
    for n in ["0", "99999999"] {
        let r = must_fail(&model, &["--batch-count", n]);
        assert!(r.stderr.contains("--batch-count must be between 1 and"), "{}", r.stderr);
    }
    let r = must_fail(Path::new("/nonexistent/model.safetensors"), &[]);
    assert!(r.stderr.contains("model.safetensors"), "{}", r.stderr);
    assert!(!r.out.exists());
}

#[test]
fn no_model_offline_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(["--prompt", "x", "--models-dir", dir.path().to_str().unwrap(), "--out", out.to_str().unwrap()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("no model") && err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(!out.exists());
}
