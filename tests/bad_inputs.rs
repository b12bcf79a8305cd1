//! Bad input gets one clear error line naming the file and the problem, a
//! non-zero exit, no panic and no output file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

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
fn pickles_that_would_run_code_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A pickle whose loading would run code: sdgen reads it as data and refuses the global.
    let pickle = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R.";
    for name in ["model.ckpt", "model.safetensors"] {
        let p = write_file(dir.path(), name, pickle);
        let r = must_fail(&p, &[]);
        assert!(r.stderr.contains(name) && r.stderr.contains("global `os.system` is not allowed"), "{}", r.stderr);
    }
    let zip = write_file(dir.path(), "archive.pt", b"PK\x03\x04rest-of-a-torch-zip");
    let r = must_fail(&zip, &[]);
    assert!(r.stderr.contains("pickle") && r.stderr.contains("not a zip archive"), "{}", r.stderr);
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

/// With downloads on but the hub out of reach, the error says the cause
/// once, and what to do instead.
#[test]
fn failed_download_says_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(["--prompt", "x", "--models-dir", dir.path().to_str().unwrap(), "--out", out.to_str().unwrap()])
        .env_remove("HF_HUB_OFFLINE")
        // Nothing listens on port 9 (discard) here: the connection is refused.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    let err = stderr(&o);
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(line.contains("downloading") && line.contains("failed (") && line.contains("pass --model"), "{line}");
    let cause = line.split("failed (").nth(1).unwrap().split(')').next().unwrap();
    assert_eq!(line.matches(cause).count(), 1, "the cause is said once: {line}");
    assert!(!out.exists());
}

/// How a corpus file is given to sdgen.
enum Given {
    Model,
    InitImage,
    Mask,
    PromptFile,
    Replay,
    Lora,
    Vae,
}

/// Runs sdgen with `file` given as `how` and checks the failure: the exit
/// status of its kind, one line naming the file with `words`, no panic, and
/// nothing written (no image, no temporary file, no batch folder).
fn fails_with(file: &Path, how: Given, code: i32, words: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let (file_s, out_s) = (file.to_str().unwrap(), out.to_str().unwrap());
    let model = fixture("tiny-sd1");
    let model = model.to_str().unwrap();
    let image = fixture("images/init.png");
    let image = image.to_str().unwrap();
    let batch_dir = dir.path().join("batch");
    let mut args: Vec<&str> = match how {
        Given::Model => vec!["--model", file_s],
        Given::InitImage => vec!["img2img", "--init-image", file_s, "--model", model],
        Given::Mask => vec!["inpaint", "--image", image, "--mask", file_s, "--model", model],
        Given::PromptFile => vec!["batch", file_s, "--out-dir", batch_dir.to_str().unwrap(), "--model", model],
        Given::Replay => vec!["replay", file_s, "--model", model],
        Given::Lora => vec!["--model", model, "--lora", file_s],
        Given::Vae => vec!["--model", model, "--vae", file_s],
    };
    if !matches!(how, Given::PromptFile | Given::Replay) {
        args.extend(["-p", "a fox"]);
    }
    args.extend(["--steps", "1", "--out", out_s, "--quiet"]);
    if matches!(how, Given::Model | Given::Lora | Given::Vae) {
        args.extend(["-W", "64", "-H", "64"]);
    }
    let o = sdgen(&args);
    let err = stderr(&o);
    eprintln!("{}: {}", file.display(), err.trim_end());
    assert_eq!(o.status.code(), Some(code), "{}: exit status; stderr: {err}", file.display());
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic: {err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(err.trim_end().lines().count() == 1 && first.starts_with("error: "), "one error line: {err}");
    let name = file.file_name().unwrap().to_str().unwrap();
    assert!(first.contains(name), "the error names the file: {first}");
    for w in words {
        assert!(first.contains(w), "{name}: expected {w:?} in: {first}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "{name}: files left behind: {left:?}");
}

/// Every file of `tests/bad_inputs/` (and the damaged models the helper
/// writes) gets its one-line error and its exit status.
#[test]
fn corpus_files_fail_cleanly_with_their_exit_status() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_inputs");
    let f = |name: &str| corpus.join(name);
    const MODEL: i32 = 4;
    const INPUT: i32 = 3;
    for (name, words) in [
        ("empty.safetensors", &["only 0 bytes"][..]),
        ("short.safetensors", &["not a safetensors file"]),
        ("header_longer_than_file.safetensors", &["invalid header length"]),
        ("header_absurd_length.safetensors", &["header too large"]),
        ("header_not_json.safetensors", &["invalid JSON"]),
        ("header_not_utf8.safetensors", &["invalid UTF-8"]),
        ("duplicate_names.safetensors", &["`a` is named twice"]),
        ("overlapping_offsets.safetensors", &["invalid offset"]),
        ("offsets_out_of_range.safetensors", &["not a valid safetensors file"]),
        ("dtype_shape_disagree.safetensors", &["invalid shape, data type, or offset"]),
        ("unknown_dtype.safetensors", &["unknown variant `Q4`"]),
        ("model.ckpt", &["pickle", "no torch magic number"]),
        ("weights.bin", &["pickle", "no tensors in it"]),
        ("pickle_named.safetensors", &["pickle", "no torch magic number"]),
        ("torch_zip_named.safetensors", &["pickle", "no tensors in it"]),
    ] {
        fails_with(&f(name), Given::Model, MODEL, words);
    }
    fails_with(&fixture("adapters/Lora/tiny_kohya.safetensors"), Given::Model, MODEL, &["a LoRA, not a full model"]);
    fails_with(&fixture("adapters/VAE/tiny_vae_ldm.safetensors"), Given::Model, MODEL, &["a VAE on its own"]);
    fails_with(&f("header_not_json.safetensors"), Given::Lora, MODEL, &["not a valid safetensors file"]);
    fails_with(&f("model.ckpt"), Given::Lora, MODEL, &["pickle"]);
    fails_with(&fixture("adapters/Lora/tiny_kohya.safetensors"), Given::Vae, MODEL, &["not a VAE"]);
    for (name, words) in [
        ("not_an_image.png", &["not a readable PNG/JPEG image"][..]),
        ("truncated.png", &["not a readable PNG/JPEG image"]),
        ("zero_size.png", &["not a readable PNG/JPEG image"]),
        ("huge.png", &["larger than 16384 pixels"]),
    ] {
        fails_with(&f(name), Given::InitImage, INPUT, words);
        fails_with(&f(name), Given::Mask, INPUT, words);
    }
    fails_with(&f("not_an_image.png"), Given::Replay, INPUT, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("mask_32x32.png");
    image::GrayImage::from_pixel(32, 32, image::Luma([255])).save(&small).unwrap();
    fails_with(&small, Given::Mask, INPUT, &["the mask is 32x32 but the image", "is 64x64"]);
    for (name, words) in [
        ("invalid_utf8.txt", &[":2:", "not valid UTF-8"][..]),
        ("unknown_option.txt", &[":1:", "unknown option --frobnicate"]),
        ("unterminated_quote.txt", &[":1:", "unterminated"]),
        ("bad_number.txt", &[":1:", "\"many\" is not a valid number"]),
        ("bad_json.jsonl", &[":1:", "not a valid number"]),
    ] {
        fails_with(&f(name), Given::PromptFile, INPUT, words);
    }
}

/// Damaged models made from the tiny one: a tensor of an unsupported dtype,
/// and weights full of NaN, which must not become a black image: the error
/// says which part produced NaN and what to try.
#[test]
fn damaged_tensors_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let victim = "model.diffusion_model.out.2.weight";
    let int = edited_checkpoint(dir.path(), "int_weights.safetensors", |_| {});
    // Re-type one f16 tensor as I16 in the header (2 bytes per value either way).
    let bytes = std::fs::read(&int).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut v: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(v[victim]["dtype"], "F16");
    v[victim]["dtype"] = "I16".into();
    let mut header = v.to_string().into_bytes();
    header.resize(n, b' ');
    let mut patched = bytes[..8].to_vec();
    patched.extend(header);
    patched.extend(&bytes[8 + n..]);
    std::fs::write(&int, patched).unwrap();
    fails_with(&int, Given::Model, 4, &[victim, "I16", "must be f32, f16, bf16, f64 or f8 (e4m3)"]);

    for (part, victim) in [
        ("text encoder", "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
        ("UNet", "model.diffusion_model.out.2.weight"),
        ("VAE", "first_stage_model.decoder.conv_out.weight"),
    ] {
        let name = format!("nan_{}.safetensors", part.replace(' ', "_"));
        let nan = edited_checkpoint(dir.path(), &name, |ts| {
            let t = ts.iter_mut().find(|t| t.0 == victim).unwrap();
            let nan: &[u8] = match t.2.len() / t.1.iter().product::<usize>() {
                2 => &[0x00, 0x7e],
                _ => &[0x00, 0x00, 0xc0, 0x7f],
            };
            t.2 = t.2.chunks(nan.len()).flat_map(|_| nan.iter().copied()).collect();
        });
        fails_with(&nan, Given::Model, 4, &[&format!("the {part} produced NaN/Inf"), "--dtype f32"]);
    }
}

/// Bad option values exit with the usage status (2), device problems with 5;
/// the sampler error suggests the closest name, the device error lists the
/// choices, and asking a CPU build for CUDA says how to build one.
#[test]
fn arguments_and_devices_have_their_exit_status() {
    let model = fixture("tiny-sd1");
    let image = fixture("images/init.png");
    let run = |args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.png");
        let mut all = args.to_vec();
        all.extend(["--model", model.to_str().unwrap(), "-p", "a fox", "-o", out.to_str().unwrap(), "-q"]);
        let o = Command::new(env!("CARGO_BIN_EXE_sdgen")).args(&all).output().unwrap();
        assert!(!out.exists());
        (o.status.code(), stderr(&o))
    };
    for (args, words) in [
        (&["--steps", "0"][..], "steps must be at least 1"),
        (&["--cfg-scale", "-2"], "--cfg-scale must be a number ≥ 0"),
        (&["--width", "7"], "multiple of 8"),
        (&["--clip-skip", "0"], "--clip-skip must be at least 1"),
        (&["--sampler", "eulr"], "did you mean euler?"),
        (&["img2img", "--init-image", image.to_str().unwrap(), "--strength", "1.5"], "strength must be in (0, 1]"),
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(words), "{args:?}: {err}");
    }
    // An unknown device name is a usage error; a device this build or
    // machine cannot open is a device failure.
    let (code, err) = run(&["--device", "tpu"]);
    assert!(code == Some(2) && err.contains("use auto, cpu, cuda, cuda:N or metal"), "{err}");
    if !cfg!(feature = "cuda") {
        let (code, err) = run(&["--device", "cuda"]);
        assert!(code == Some(5) && err.contains("--features cuda"), "{err}");
    }
}

/// Output problems exit with 6 and leave no partial PNG: a missing folder
/// (not created: a typo should not make folders), a place nothing can be
/// written, and a full disk (a file-size limit makes writes fail).
#[test]
fn output_failures_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sd1");
    let base = ["--model", model.to_str().unwrap(), "-p", "a fox", "-W", "64", "-H", "64", "--steps", "1", "-q"];
    let run = |out: &str| {
        let mut args = base.to_vec();
        args.extend(["-o", out]);
        let o = sdgen(&args);
        (o.status.code(), stderr(&o))
    };
    let missing = dir.path().join("no/such/folder/out.png");
    let (code, err) = run(missing.to_str().unwrap());
    assert!(code == Some(6) && err.contains("does not exist"), "{err}");
    assert!(!dir.path().join("no").exists());
    let (code, err) = run("/proc/sdgen-test.png");
    assert!(code == Some(6) && err.contains("/proc/sdgen-test.png"), "{err}");

    // A full disk: the shell caps file sizes at 1 KiB and ignores SIGXFSZ,
    // so writing the PNG fails with EFBIG as it would with ENOSPC.
    let out = dir.path().join("full.png");
    let mut cmd = format!("trap '' XFSZ; ulimit -f 1; exec '{}'", env!("CARGO_BIN_EXE_sdgen"));
    for a in base.iter().chain(&["-o", out.to_str().unwrap(), "--device", "cpu", "--offline"]) {
        cmd.push_str(&format!(" '{a}'"));
    }
    let o = Command::new("sh").args(["-c", &cmd]).env("SDGEN_MODELS_DIR", dir.path()).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(6), "{err}");
    assert!(err.contains("full.png") && err.lines().count() == 1, "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A run that cannot fit in memory fails before loading, with the numbers
/// and what would make it fit (the available memory capped for the test).
#[test]
fn too_little_memory_fails_fast_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let model = fixture("tiny-sd1");
    let args = ["--model", model.to_str().unwrap(), "-p", "a fox", "-W", "64", "-H", "64", "-o", out.to_str().unwrap()];
    let o = Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(args)
        .args(["--device", "cpu", "--offline", "-q"])
        .env("SDGEN_MEMORY_LIMIT", "10000000")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(
        err.contains("tiny-sd1: not enough memory: this needs about") && err.contains("10 MB is available"),
        "{err}"
    );
    assert!(err.contains("--dtype f16") && err.lines().count() == 1 && !out.exists(), "{err}");
    let o = Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(args)
        .args(["--device", "cpu", "--offline", "-q"])
        .env("SDGEN_MEMORY_LIMIT", "10000000000")
        .output()
        .unwrap();
    assert!(o.status.success() && out.exists(), "{}", stderr(&o));
}

/// Output cut short by its reader (`sdgen samplers | head -1`) ends the
/// process quietly, without a panic. The pipe's reading end is closed
/// before sdgen starts, so its first write fails every time.
#[test]
fn a_closed_output_pipe_is_no_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(env!("CARGO_BIN_EXE_sdgen")).arg("samplers").stdout(writer).output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "a write to a closed pipe cannot succeed");
    assert!(!err.contains("panicked") && err.is_empty(), "{err}");
}
