//! The file layouts real models come in all load to the same model: text
//! encoder names with or without `text_model.`, f32/f16/bf16 weights, plain
//! and `.fp16` variant names, sharded files; unused tensors are reported.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use sdgen::loading::Model;
use sdgen::request::{Init, Request};
use sdgen::sampling::samplers::Sampler;
use sdgen::sampling::schedule::ScheduleKind;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Rewrites a safetensors file with renamed and re-typed tensors.
fn rewrite(from: &Path, to: &Path, rename: impl Fn(&str) -> String, dtype: DType) {
    let tensors = candle_core::safetensors::load(from, &Device::Cpu).unwrap();
    let out: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (rename(&k), v.to_dtype(dtype).unwrap())).collect();
    candle_core::safetensors::save(&out, to).unwrap();
}

/// A writable copy of the tiny diffusers folder.
fn folder_copy() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("m");
    copy_dir(&fixture("tiny-sd1"), &folder);
    (dir, folder)
}

fn render(model_path: &Path) -> Vec<u8> {
    let model = Model::load(model_path, &Device::Cpu, DType::F32).unwrap();
    let req = Request {
        prompt: "a photo of a cat".into(),
        negative_prompt: String::new(),
        seed: 42,
        steps: 4,
        cfg_scale: 7.5,
        width: 64,
        height: 64,
        sampler: Sampler::Euler,
        schedule: ScheduleKind::Normal,
        init: Init::Noise,
        size_conditioning: Default::default(),
        text: Default::default(),
        controls: Vec::new(),
        control_options: Default::default(),
        hires: None,
    };
    model.generate(&req, &Device::Cpu, &mut |_| {}).unwrap().rgb
}

#[test]
fn prefixed_text_encoder_and_f32_unet_give_the_same_image() {
    let (_dir, folder) = folder_copy();
    let te = folder.join("text_encoder");
    for entry in std::fs::read_dir(&te).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            rewrite(&p, &p, |k| format!("text_model.{k}"), DType::F16);
        }
    }
    // Full precision next to the fp16 variant: the plain file wins.
    let unet = folder.join("unet");
    rewrite(
        &unet.join("diffusion_pytorch_model.fp16.safetensors"),
        &unet.join("diffusion_pytorch_model.safetensors"),
        str::to_string,
        DType::F32,
    );
    assert_eq!(render(&folder), render(&fixture("tiny-sd1")));
}

#[test]
fn bf16_weights_load_and_stay_close() {
    let (_dir, folder) = folder_copy();
    let vae = folder.join("vae/diffusion_pytorch_model.safetensors");
    rewrite(&vae, &vae, str::to_string, DType::BF16);
    let (a, b) = (render(&folder), render(&fixture("tiny-sd1")));
    let mean = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.len() as f64;
    assert_ne!(a, b, "bf16 rounding must change some pixel");
    assert!(mean < 3.0, "bf16 VAE moved pixels by {mean} levels on average");
}

#[test]
fn unused_tensors_are_the_checkpoint_extras() {
    let model = Model::load(&fixture("tiny-sd1.safetensors"), &Device::Cpu, DType::F32).unwrap();
    let bytes = std::fs::read(fixture("tiny-sd1.safetensors")).unwrap();
    let names: Vec<String> =
        safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(str::to_string).collect();
    let is_weight = |n: &str| {
        ["model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."]
            .iter()
            .any(|p| n.starts_with(p))
            && !n.ends_with("position_ids")
    };
    let extras: std::collections::BTreeSet<String> = names.into_iter().filter(|n| !is_weight(n)).collect();
    assert!(extras.contains("alphas_cumprod") && extras.iter().any(|n| n.starts_with("model_ema.")));
    assert_eq!(model.unused, extras);
    let folder = Model::load(&fixture("tiny-sd1"), &Device::Cpu, DType::F32).unwrap();
    assert!(folder.unused.is_empty(), "{:?}", folder.unused);
}

#[test]
fn unsupported_config_values_are_refused() {
    let (_dir, folder) = folder_copy();
    let cfg_path = folder.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["resnet_time_scale_shift"] = "scale_shift".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = Model::load(&folder, &Device::Cpu, DType::F32).err().expect("must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("resnet_time_scale_shift") && msg.contains("UNet"), "{msg}");
}

/// Every family is recognised from its single file (and from its folder),
/// and `sdgen models` lists them from headers and configs.
#[test]
fn families_are_detected_and_listed() {
    use sdgen::loading::catalog::describe;
    for (path, family, inpainting, prediction) in [
        ("tiny-sd1.safetensors", "SD 1.x", false, "eps"),
        ("tiny-sd1", "SD 1.x", false, "eps"),
        ("tiny-sd1-inpaint", "SD 1.x", true, "eps"),
        ("tiny-sd2.safetensors", "SD 2.x", false, "v"),
        ("tiny-sd2", "SD 2.x", false, "v"),
        ("tiny-sd2-inpaint", "SD 2.x", true, "eps"),
        ("tiny-sdxl.safetensors", "SDXL", false, "eps"),
        ("tiny-sdxl", "SDXL", false, "eps"),
        ("tiny-sdxl-inpaint", "SDXL", true, "eps"),
    ] {
        let e = describe(&fixture(path)).unwrap();
        assert_eq!((e.family, e.inpainting, e.prediction), (family, inpainting, prediction), "{path}");
        assert_eq!(e.hash, sdgen::loading::model_hash(&fixture(path)).unwrap());
        let loaded = Model::load(&fixture(path), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(loaded.family.name(), family, "{path}");
    }

    let dir = tempfile::tempdir().unwrap();
    for name in ["tiny-sd1.safetensors", "tiny-sdxl", "tiny-sd2-inpaint"] {
        std::os::unix::fs::symlink(fixture(name), dir.path().join(name)).unwrap();
    }
    let models_dir = dir.path().to_str().unwrap();
    let o = common::sdgen(&["models", "--models-dir", models_dir]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let table = String::from_utf8(o.stdout).unwrap();
    eprintln!("{table}");
    let row = |name: &str| table.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap().to_string();
    let words = |name: &str| row(name).split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(words("tiny-sd1")[1..6], ["file", "SD", "1.x", "no", "eps"]);
    assert_eq!(words("tiny-sdxl")[1..5], ["folder", "SDXL", "no", "eps"]);
    assert_eq!(words("tiny-sd2-inpaint")[1..6], ["folder", "SD", "2.x", "yes", "eps"]);

    // The hash comes from the sidecar while the file's size and time match:
    // a planted value shows up; touching the file makes it stale.
    let file = dir.path().join("tiny-sd1.safetensors");
    let sidecar = dir.path().join("tiny-sd1.safetensors.sdgen.json");
    let mut cached: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sidecar).unwrap()).unwrap();
    let real = cached["sha256"].as_str().unwrap().to_string();
    assert!(table.contains(&real[..10]));
    cached["sha256"] = serde_json::json!("0123456789".repeat(6) + "abcd");
    std::fs::write(&sidecar, cached.to_string()).unwrap();
    let listed = |args: &[&str]| String::from_utf8(common::sdgen(args).stdout).unwrap();
    assert!(listed(&["models", "--models-dir", models_dir]).contains("0123456789"));
    // A damaged sidecar is recomputed, never trusted or fatal.
    cached["sha256"] = serde_json::json!("abc");
    std::fs::write(&sidecar, cached.to_string()).unwrap();
    assert!(listed(&["models", "--models-dir", models_dir]).contains(&real[..10]));
    let real_file = fixture("tiny-sd1.safetensors");
    std::fs::remove_file(&file).unwrap();
    std::fs::copy(&real_file, &file).unwrap();
    let json = listed(&["models", "--models-dir", models_dir, "--json"]);
    assert!(json.contains(&format!("\"hash\":\"{}\"", &real[..10])), "{json}");
}

/// A safetensors header of 128 bytes makes the file's first byte 0x80, a
/// pickle's protocol byte: the file is still read as safetensors.
#[test]
fn a_header_of_128_bytes_is_not_a_pickle() {
    let dir = tempfile::tempdir().unwrap();
    let json = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let header = format!("{json:<128}");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(1f32.to_le_bytes());
    assert_eq!(bytes[0], 0x80);
    let path = dir.path().join("w.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let ckpt = sdgen::loading::weights::Checkpoint::open(&[path]).unwrap();
    assert_eq!(ckpt.shapes(), [("w".to_string(), vec![1])]);
}
