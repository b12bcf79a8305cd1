//! LoRA (kohya and PEFT formats), textual inversion and VAE override on the
//! tiny SD 1.x model, against diffusers (tests/reference/make_adapters.py):
//! `load_lora_weights` + `fuse_lora`, `load_textual_inversion`, a swapped VAE.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use sdgen::loading::{Adapters, Model};

fn reference(name: &str) -> image::RgbImage {
    read_rgb(&fixture(&format!("reference/adapters/{name}.png")))
}

/// A models dir whose Lora/, embeddings/ and VAE/ are the fixture adapters.
fn models_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["Lora", "embeddings", "VAE"] {
        std::os::unix::fs::symlink(fixture(&format!("adapters/{sub}")), dir.path().join(sub)).unwrap();
    }
    dir
}

/// The reference case (6 Euler steps at cfg 7.5, seed 42, 64²) on `model`
/// with `prompt` and extra options: the image, its PNG parameters, stderr.
fn generate(models: &Path, model: &Path, prompt: &str, extra: &[&str]) -> (image::RgbImage, String, String) {
    let out = models.join("image.png");
    let mut args = vec!["--model", model.to_str().unwrap(), "--models-dir", models.to_str().unwrap()];
    args.extend(["-p", prompt, "-n", "", "-s", "42", "--steps", "6", "--sampler", "euler", "--cfg-scale", "7.5"]);
    args.extend(["-W", "64", "-H", "64", "-o", out.to_str().unwrap()]);
    args.extend(extra);
    let o = sdgen(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let params = sdgen::image_io::read_parameters(&out).unwrap().unwrap();
    (read_rgb(&out), params, stderr(&o))
}

fn tiny_sd1(models: &Path, prompt: &str, extra: &[&str]) -> (image::RgbImage, String, String) {
    generate(models, &fixture("tiny-sd1"), prompt, extra)
}

/// Both LoRA formats, by option and by prompt tag, equal diffusers' fused
/// LoRA; every module applies and the PNG records the LoRA's hash.
#[test]
fn lora_matches_diffusers_in_both_formats() {
    let dir = models_dir();
    let mut parity = Parity::default();
    let (ours, params, err) = tiny_sd1(dir.path(), "a photo of a cat <lora:tiny_kohya:0.8>", &[]);
    parity.check("kohya tag", &ours, &reference("lora_kohya"));
    assert!(err.contains("LoRA tiny_kohya: applied to 98 of 98 modules"), "{err}");
    assert!(params.starts_with("a photo of a cat <lora:tiny_kohya:0.8>\n"), "{params}");
    let hash = sdgen::loading::hashing::short_sha256(&fixture("adapters/Lora/tiny_kohya.safetensors"), 12).unwrap();
    assert!(params.contains(&format!("Lora hashes: \"tiny_kohya: {hash}\"")), "{params}");

    let peft = fixture("adapters/Lora/tiny_peft.safetensors");
    let (ours, _, err) = tiny_sd1(dir.path(), "a photo of a cat", &["--lora", &format!("{}:0.8", peft.display())]);
    parity.check("peft option", &ours, &reference("lora_peft"));
    assert!(err.contains("applied to 98 of 98 modules"), "{err}");
    parity.assert_within_tolerance();

    let (max, mean) = level_diff(&reference("base"), &reference("lora_kohya"));
    assert!(max > 10 * MAX_LEVELS && mean > MEAN_LEVELS, "the LoRA changes the image: max {max}, mean {mean}");
}

/// A LoRA that only partly fits says so, naming what did not match; the
/// rest applies as in diffusers (which warns and applies the valid half).
#[test]
fn mismatched_lora_is_reported() {
    let dir = models_dir();
    let (ours, _, err) = tiny_sd1(dir.path(), "a photo of a cat", &["--lora", "tiny_mismatch:0.8"]);
    assert!(
        err.contains("warning: LoRA tiny_mismatch: applied to 49 of 98 modules; no match in the model for"),
        "{err}"
    );
    assert!(err.contains("lora_te_encoder_layers_5_mlp_fc2") && err.contains("and 44 more"), "{err}");
    let mut parity = Parity::default();
    parity.check("mismatch", &ours, &reference("lora_mismatch"));
    parity.assert_within_tolerance();
}

/// SDXL kohya LoRAs name UNet modules as the original checkpoints do and
/// the encoders `lora_te1_` / `lora_te2_`: all of them find their weights.
#[test]
fn sdxl_kohya_names_reach_both_encoders_and_the_unet() {
    let dir = tempfile::tempdir().unwrap();
    let rank = 2;
    let mut tensors = std::collections::HashMap::new();
    for (key, out_dim, in_dim) in [
        ("lora_unet_input_blocks_3_1_proj_in", 32, 32),
        ("lora_unet_output_blocks_0_0_in_layers_2", 32, 64 * 9),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 64, 64),
        ("lora_te2_text_model_encoder_layers_2_mlp_fc1", 128, 64),
    ] {
        let down = (Tensor::ones((rank, in_dim), DType::F32, &Device::Cpu).unwrap() * 0.05).unwrap();
        let up = (Tensor::ones((out_dim, rank), DType::F32, &Device::Cpu).unwrap() * 0.05).unwrap();
        tensors.insert(format!("{key}.lora_down.weight"), down);
        tensors.insert(format!("{key}.lora_up.weight"), up);
        tensors.insert(format!("{key}.alpha"), Tensor::new(1f32, &Device::Cpu).unwrap());
    }
    // The 3×3 convolution's LoRA as kohya stores it: down [r, C, 3, 3].
    let conv = "lora_unet_output_blocks_0_0_in_layers_2.lora_down.weight";
    tensors.insert(conv.into(), tensors[conv].reshape((rank, 64, 3, 3)).unwrap());
    let path = dir.path().join("xl.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let spec = sdgen::loading::lora::LoraSpec { path, weight: 1.0 };
    let adapters = Adapters { loras: vec![spec], ..Default::default() };
    let m = Model::load_with(&fixture("tiny-sdxl.safetensors"), &Device::Cpu, DType::F32, &adapters).unwrap();
    assert_eq!(m.applied.lora_report, [("LoRA xl: applied to 4 of 4 modules".to_string(), true)]);
}

/// Embeddings are used by file name, multi-vector ones taking several
/// tokens: the conditioning and the image equal diffusers'.
#[test]
fn textual_inversion_matches_diffusers() {
    let dir = models_dir();
    let prompt = "a photo of tinyemb and onevec, best quality";
    let adapters = Adapters { embeddings: Some(dir.path().join("embeddings")), ..Default::default() };
    let m = Model::load_with(&fixture("tiny-sd1"), &Device::Cpu, DType::F32, &adapters).unwrap();
    assert_eq!(
        m.applied.embeddings.iter().map(|e| (e.name.as_str(), e.len())).collect::<Vec<_>>(),
        [("onevec", 1), ("tinyemb", 2)]
    );
    let opts = sdgen::request::TextOptions::default();
    let cond = m.encode_text(prompt, &opts, &Device::Cpu, &mut |_| {}).unwrap();
    let r = candle_core::safetensors::load(fixture("reference/adapters/ti_cond.safetensors"), &Device::Cpu).unwrap();
    let err = relative_error(&cond.context, &r["cond"]);
    assert!(err < TOLERANCE, "conditioning relative error {err}");

    let (ours, params, _) = tiny_sd1(dir.path(), prompt, &[]);
    let mut parity = Parity::default();
    parity.check("ti", &ours, &reference("ti"));
    parity.assert_within_tolerance();
    assert!(params.contains("TI hashes: \"onevec: ") && params.contains(", tinyemb: "), "{params}");
    let without = Model::load(&fixture("tiny-sd1"), &Device::Cpu, DType::F32).unwrap();
    let plain = without.encode_text(prompt, &opts, &Device::Cpu, &mut |_| {}).unwrap();
    assert!(relative_error(&plain.context, &r["cond"]) > 1e-2, "the embeddings change the conditioning");
}

/// `--vae` in original and diffusers names, by name from <models>/VAE/.
#[test]
fn vae_override_matches_diffusers() {
    let dir = models_dir();
    let mut parity = Parity::default();
    for name in ["tiny_vae_ldm", "tiny_vae_diffusers"] {
        let (ours, params, _) = tiny_sd1(dir.path(), "a photo of a cat", &["--vae", name]);
        parity.check(name, &ours, &reference("vae"));
        assert!(params.contains(&format!("VAE: {name}")) && params.contains("VAE hash: "), "{params}");
    }
    parity.assert_within_tolerance();
    let (max, _) = level_diff(&reference("base"), &reference("vae"));
    assert!(max > 10 * MAX_LEVELS, "the VAE changes the image");
}

/// A session opened with swappable LoRAs merges others from the weights it
/// kept: each swap gives the image a fresh load with those LoRAs gives, bit
/// for bit, and so diffusers' within the parity tolerance.
#[test]
fn swapped_loras_equal_fresh_loads() {
    use sdgen::loading::lora::LoraArg;
    use sdgen::session::{Job, RunOptions, Session};
    use sdgen::settings::Settings;
    let dir = models_dir();
    let out = dir.path().join("swap.png");
    let mut settings = Settings::default();
    for (key, value) in [("prompt", "a photo of a cat"), ("seed", "42"), ("steps", "6"), ("sampler", "euler")] {
        settings.set(key, value).unwrap();
    }
    (settings.width, settings.height, settings.cfg_scale) = (Some(64), Some(64), Some(7.5));
    let mut opened = sdgen::settings::SessionSettings {
        model: Some(fixture("tiny-sd1").display().to_string()),
        swappable_loras: true,
        ..cpu_session(dir.path())
    };
    let generate = |session: &Session| {
        let request = settings.resolve(&session.model.defaults(), sdgen::request::Init::Noise).unwrap();
        let job = Job { request, path: out.clone() };
        session.run(&[job], &RunOptions::default(), &mut |_| Ok(())).unwrap();
        (read_rgb(&out), sdgen::image_io::read_parameters(&out).unwrap().unwrap())
    };
    let (mut session, _) = Session::open(&opened, &[], (None, None), &mut |_| {}).unwrap();
    let (base, _) = generate(&session);
    let kohya = [LoraArg { name: "tiny_kohya".into(), weight: 0.8 }];
    session.set_loras(&kohya, dir.path()).unwrap();
    let (swapped, params) = generate(&session);
    assert!(params.contains("Lora hashes: \"tiny_kohya: "), "{params}");
    session.set_loras(&[], dir.path()).unwrap();
    let (back, params) = generate(&session);
    assert!(!params.contains("Lora hashes"), "{params}");

    opened.loras = kohya.to_vec();
    let (fresh, _) = Session::open(&opened, &[], (None, None), &mut |_| {}).unwrap();
    assert_eq!(swapped.as_raw(), generate(&fresh).0.as_raw(), "swapped in = loaded with the LoRA");
    assert_eq!(back.as_raw(), base.as_raw(), "swapped out = the base model");
    let mut parity = Parity::default();
    parity.check("swapped kohya", &swapped, &reference("lora_kohya"));
    parity.check("swapped back", &back, &reference("base"));
    parity.assert_within_tolerance();

    opened.swappable_loras = false;
    let (mut fixed, _) = Session::open(&opened, &[], (None, None), &mut |_| {}).unwrap();
    let err = format!("{:#}", fixed.set_loras(&[], dir.path()).unwrap_err());
    assert!(err.contains("reload it to change LoRAs"), "{err}");
}
