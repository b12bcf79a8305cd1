//! SD 3.5's networks against diffusers/transformers on the tiny SD 3.5
//! Medium-shaped model (tests/reference/make_sd35.py): T5 encoder, MMDiT
//! (dual attention, QK norm, a cropped positional table at a non-square
//! size), the 16-channel VAE with its shift and no quant convolutions.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixture, read_rgb, relative_error, TOLERANCE};
use sdgen::loading::weights::{Checkpoint, Component, NameMap};

fn references() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("reference/sd35/modules.safetensors"), &Device::Cpu).unwrap()
}

fn config<T: serde::de::DeserializeOwned>(dir: &Path) -> T {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// The folder's weights as a `VarBuilder` (diffusers names), and the checkpoint to check that all were used.
fn weights(
    dir: &Path,
    file: &str,
    component: Component,
) -> (candle_nn::VarBuilder<'static>, std::sync::Arc<Checkpoint>) {
    let ckpt = Checkpoint::open(&[dir.join(file)]).unwrap();
    (ckpt.var_builder(NameMap::prefixed(""), component, DType::F32, &Device::Cpu), ckpt)
}

#[test]
fn t5_encoder_matches_transformers() {
    use sdgen::models::t5::T5Encoder;
    let r = references();
    let dir = fixture("tiny-sd35/text_encoder_3");
    let (vb, _) = weights(&dir, "model.safetensors", Component::TextEncoder3);
    let t5 = T5Encoder::new(&config(&dir), vb).unwrap();
    let ids = r["t5.input_ids"].to_dtype(DType::U32).unwrap();
    let out = t5.forward(&ids).unwrap();
    let err = relative_error(&out, &r["t5.last_hidden_state"]);
    eprintln!("t5: relative error {err:e}");
    assert!(err < TOLERANCE, "T5 relative error {err}");
}

#[test]
fn mmdit_matches_diffusers() {
    use sdgen::models::mmdit::Mmdit;
    let r = references();
    let dir = fixture("tiny-sd35/transformer");
    let (vb, ckpt) = weights(&dir, "diffusion_pytorch_model.safetensors", Component::Transformer);
    let mmdit = Mmdit::new(&config(&dir), vb).unwrap();
    assert!(ckpt.unused().is_empty(), "unused: {:?}", ckpt.unused());
    let ts: Vec<f32> = r["transformer.timestep"].to_vec1().unwrap();
    // One timestep per call, as the sampler runs it: row by row.
    for (i, &t) in ts.iter().enumerate() {
        let row = |name: &str| r[name].narrow(0, i, 1).unwrap();
        let out = mmdit
            .forward(
                &row("transformer.hidden_states"),
                t,
                &row("transformer.encoder_hidden_states"),
                &row("transformer.pooled_projections"),
            )
            .unwrap();
        let err = relative_error(&out, &row("transformer.out"));
        eprintln!("mmdit row {i} (t = {t}): relative error {err:e}");
        assert!(err < TOLERANCE, "MMDiT relative error {err}");
    }
}

#[test]
fn sd3_vae_matches_diffusers() {
    use sdgen::models::vae::{Vae, VaeConfig};
    let r = references();
    let dir = fixture("tiny-sd35/vae");
    let (vb, ckpt) = weights(&dir, "diffusion_pytorch_model.safetensors", Component::Vae);
    let cfg: VaeConfig = config(&dir);
    let vae = Vae::new(&cfg, true, vb).unwrap();
    assert!(ckpt.unused().is_empty(), "unused: {:?}", ckpt.unused());
    let decoded = vae.decode(&r["vae.decoder_input"]).unwrap();
    let err = relative_error(&decoded, &r["vae.decoded"]);
    eprintln!("vae decode: relative error {err:e}");
    assert!(err < TOLERANCE, "VAE decode relative error {err}");
    let mean = vae.encode_mean(&r["vae.encoder_input"]).unwrap();
    let err = relative_error(&mean, &r["vae.posterior_mean"]);
    assert!(err < TOLERANCE, "VAE encode relative error {err}");
    let latents = cfg.to_latents(&mean).unwrap();
    let err = relative_error(&latents, &r["vae.image_latents"]);
    assert!(err < TOLERANCE, "latents (z − shift)·scale relative error {err}");
    let back = cfg.from_latents(&r["vae.latents"], 1.0).unwrap();
    assert!(relative_error(&back, &r["vae.decoder_input"]) < TOLERANCE, "latents / scale + shift");
}

#[derive(serde::Deserialize)]
struct Extra {
    pipeline: String,
    with_t5: bool,
    strength: Option<f64>,
    image: Option<String>,
    mask: Option<String>,
}

/// The options that give the tiny single file its separate text encoders
/// and T5's tokenizer.
fn separate_encoders() -> Vec<String> {
    let path = |rel: &str| fixture(rel).to_str().unwrap().to_string();
    let mut args = Vec::new();
    for file in ["clip_l", "clip_g", "t5xxl"] {
        args.extend(["--text-encoder".into(), path(&format!("tiny-sd35-text/{file}.safetensors"))]);
    }
    args.extend(["--t5-tokenizer".into(), path("tiny-sd35/tokenizer_3/tokenizer.json")]);
    args
}

/// Images against `StableDiffusion3Pipeline` (with and without T5, a
/// negative prompt, cfg 1, a non-square size, Euler and Heun),
/// `StableDiffusion3Img2ImgPipeline` and `StableDiffusion3InpaintPipeline`
/// on the tiny folder.
#[test]
fn sd35_matches_diffusers_pipelines() {
    use common::{read_cases, CaseWith, Parity};
    let dir = tempfile::tempdir().unwrap();
    let mut parity = Parity::default();
    let path = |rel: &str| fixture(rel).to_str().unwrap().to_string();
    for case in read_cases::<CaseWith<Extra>>("reference/sd35/cases.json") {
        // The official layout: the MMDiT and VAE in one file, each text encoder in its own.
        let single = case.name.starts_with("single_file");
        let model = fixture(if single { "tiny-sd35.safetensors" } else { "tiny-sd35" });
        let out = dir.path().join(format!("{}.png", case.name));
        let e = &case.extra;
        let mut before: Vec<String> = match e.pipeline.as_str() {
            "img2img" => vec!["img2img".into(), "--init-image".into(), path(e.image.as_deref().unwrap())],
            "inpaint" => vec![
                "inpaint".into(),
                "--image".into(),
                path(e.image.as_deref().unwrap()),
                "--mask".into(),
                path(e.mask.as_deref().unwrap()),
            ],
            _ => case.size_args(),
        };
        if let Some(s) = e.strength {
            before.extend(["--strength".into(), s.to_string()]);
        }
        if !e.with_t5 {
            before.extend(["--no-t5".into(), "true".into()]);
        }
        if single {
            before.extend(separate_encoders());
        }
        let ours = case.job(&model, &out).run(&before, &case.name);
        parity.check(&case.name, &ours, &read_rgb(&fixture(&format!("reference/sd35/{}", case.png))));
    }
    parity.assert_within_tolerance();
}

#[test]
fn other_samplers_are_refused_on_flow_models_with_the_ones_that_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let args: Vec<String> = [
        "--model",
        fixture("tiny-sd35").to_str().unwrap(),
        "--prompt",
        "a fox",
        "--sampler",
        "lms",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let err = format!("{:#}", common::run_library(&args).unwrap_err());
    assert!(err.contains("use euler, heun or dpmpp_2m"), "{err}");
    assert!(!out.exists());
    // Patches of 2 latent pixels: sizes go in steps of 16.
    let mut odd = args.clone();
    let at = odd.iter().position(|a| a == "lms").unwrap();
    odd[at] = "euler".into();
    let at = odd.iter().position(|a| a == "--width").unwrap();
    odd[at + 1] = "72".into();
    let err = format!("{:#}", common::run_library(&odd).unwrap_err());
    assert!(err.contains("width and height must be multiples of 16 for this model"), "{err}");
    assert!(!out.exists());
}

/// Without `--text-encoder`, a single file's encoders are found in
/// `<models>/text_encoders/` (ComfyUI's layout); missing ones are one line.
#[test]
fn single_files_find_their_text_encoders() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    std::os::unix::fs::symlink(fixture("tiny-sd35-text"), models.join("text_encoders")).unwrap();
    let (out, again) = (dir.path().join("a.png"), dir.path().join("b.png"));
    let model = fixture("tiny-sd35.safetensors");
    let tokenizer = fixture("tiny-sd35/tokenizer_3/tokenizer.json");
    let base = |out: &Path| -> Vec<String> {
        [
            "--model",
            model.to_str().unwrap(),
            "-p",
            "a red fox",
            "--steps",
            "2",
            "-W",
            "64",
            "-H",
            "64",
            "--seed",
            "3",
            "--t5-tokenizer",
            tokenizer.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ]
        .map(String::from)
        .to_vec()
    };
    let found = common::sdgen(
        &[base(&out), vec!["--models-dir".into(), models.to_str().unwrap().into()]]
            .concat()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(found.status.success(), "{}", common::stderr(&found));
    let mut given = base(&again);
    for file in ["clip_g", "clip_l", "t5xxl"] {
        given.extend([
            "--text-encoder".into(),
            fixture(&format!("tiny-sd35-text/{file}.safetensors")).to_str().unwrap().into(),
        ]);
    }
    let o = common::sdgen(&given.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(read_rgb(&out), read_rgb(&again), "found and given encoders are the same files");
    let missing = dir.path().join("c.png");
    let o = common::sdgen(&base(&missing).iter().map(String::as_str).collect::<Vec<_>>());
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("needs CLIP-L and CLIP-G text encoders, 0 found"), "{err}");
    assert!(!missing.exists());
    // The built-in T5 vocabulary (32,100 tokens) does not fit the tiny T5's table.
    let mut builtin = base(&missing);
    let at = builtin.iter().position(|a| a == "--t5-tokenizer").unwrap();
    builtin.drain(at..at + 2);
    builtin.extend(["--models-dir".into(), models.to_str().unwrap().into()]);
    let o = common::sdgen(&builtin.iter().map(String::as_str).collect::<Vec<_>>());
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("the T5 tokenizer has 32100 tokens, the model's table 420"), "{err}");
    assert!(!missing.exists());
}

/// An fp8 (e4m3) T5 file, as `t5xxl_fp8_e4m3fn.safetensors` ships, loads
/// upcast: its states stay close to the f16 file's.
#[test]
fn fp8_t5_files_load_upcast() {
    use sdgen::models::t5::T5Encoder;
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-sd35-text/t5xxl.safetensors");
    let tensors = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    let fp8: HashMap<String, Tensor> =
        tensors.iter().map(|(k, v)| (k.clone(), v.to_dtype(DType::F8E4M3).unwrap())).collect();
    let file = dir.path().join("t5xxl_fp8_e4m3fn.safetensors");
    candle_core::safetensors::save(&fp8, &file).unwrap();
    let cfg: sdgen::models::t5::T5Config = config(&fixture("tiny-sd35/text_encoder_3"));
    let load = |p: &Path| {
        let ckpt = Checkpoint::open(&[p.to_path_buf()]).unwrap();
        T5Encoder::new(&cfg, ckpt.var_builder(NameMap::prefixed(""), Component::TextEncoder3, DType::F32, &Device::Cpu))
            .unwrap()
    };
    let ids = references()["t5.input_ids"].to_dtype(DType::U32).unwrap();
    let (full, quantised) = (load(&src).forward(&ids).unwrap(), load(&file).forward(&ids).unwrap());
    let err = relative_error(&quantised, &full);
    eprintln!("fp8 T5 against f16: relative error {err:e}");
    assert!(err > 0.0 && err < 0.2, "fp8 T5 relative error {err}");
}

fn extras_case() -> common::PromptCase {
    let mut cases = common::read_cases::<common::PromptCase>("reference/sd35-extras/cases.json");
    assert_eq!(cases.len(), 1);
    cases.remove(0)
}

/// A kohya LoRA (the official module names: fused qkv, the official
/// adaLN order) and the same updates in diffusers' PEFT names, on the
/// folder and on the single file: all four equal diffusers' fused LoRA
/// (make_sd35_extras.py), and every module applies.
#[test]
fn sd35_loras_match_diffusers_in_both_formats() {
    use sdgen::loading::lora::LoraSpec;
    use sdgen::loading::{Adapters, Model};
    let dir = tempfile::tempdir().unwrap();
    let case = extras_case();
    let reference = read_rgb(&fixture("reference/sd35-extras/lora.png"));
    let mut parity = common::Parity::default();
    for (model, single) in [("tiny-sd35", false), ("tiny-sd35.safetensors", true)] {
        for (file, modules) in [("lora_kohya", 50), ("lora_peft", 60)] {
            let lora = fixture(&format!("reference/sd35-extras/{file}.safetensors"));
            let name = format!("{model} {file}");
            let out = dir.path().join(format!("{file}{single}.png"));
            let mut before = case.size_args();
            before.extend(["--lora".into(), format!("{}:0.8", lora.display())]);
            let mut adapters = Adapters { loras: vec![LoraSpec { path: lora, weight: 0.8 }], ..Default::default() };
            if single {
                before.extend(separate_encoders());
                adapters.text_encoders =
                    ["clip_l", "clip_g", "t5xxl"].map(|f| fixture(&format!("tiny-sd35-text/{f}.safetensors"))).into();
                adapters.t5_tokenizer = Some(fixture("tiny-sd35/tokenizer_3/tokenizer.json"));
            }
            let ours = case.job(&fixture(model), &out).run(&before, &name);
            parity.check(&name, &ours, &reference);
            let m = Model::load_with(&fixture(model), &Device::Cpu, DType::F32, &adapters).unwrap();
            let report = format!("LoRA {file}: applied to {modules} of {modules} modules");
            assert_eq!(m.applied.lora_report, [(report, true)], "{name}");
        }
    }
    parity.assert_within_tolerance();
    let (_, mean) = common::level_diff(&reference, &read_rgb(&fixture("reference/sd35/euler.png")));
    assert!(mean > 10.0, "the LoRA changes the image: mean {mean}");
}

/// A server's session swaps LoRAs on the MMDiT from the weights it kept:
/// the same image as a fresh load with the LoRA, and back.
#[test]
fn sd35_swapped_loras_equal_fresh_loads() {
    use sdgen::loading::lora::LoraArg;
    use sdgen::session::{Job, RunOptions, Session};
    use sdgen::settings::Settings;
    let dir = tempfile::tempdir().unwrap();
    let case = extras_case();
    let out = dir.path().join("swap.png");
    let mut settings = Settings::default();
    for (key, value) in [("prompt", case.prompt.as_str()), ("sampler", "euler")] {
        settings.set(key, value).unwrap();
    }
    (settings.seed, settings.steps) = (Some(case.seed), Some(case.steps));
    (settings.width, settings.height, settings.cfg_scale) = (Some(64), Some(64), Some(case.cfg_scale));
    let lora = fixture("reference/sd35-extras/lora_kohya.safetensors").display().to_string();
    let mut opened = sdgen::settings::SessionSettings {
        model: Some(fixture("tiny-sd35").display().to_string()),
        swappable_loras: true,
        ..common::cpu_session(dir.path())
    };
    let generate = |session: &Session| {
        let request = settings.resolve(&session.model.defaults(), sdgen::request::Init::Noise).unwrap();
        session.run(&[Job { request, path: out.clone() }], &RunOptions::default(), &mut |_| Ok(())).unwrap();
        read_rgb(&out)
    };
    let (mut session, _) = Session::open(&opened, &[], (None, None), &mut |_| {}).unwrap();
    let base = generate(&session);
    let with = [LoraArg { name: lora, weight: 0.8 }];
    session.set_loras(&with, dir.path()).unwrap();
    let swapped = generate(&session);
    session.set_loras(&[], dir.path()).unwrap();
    assert_eq!(generate(&session).as_raw(), base.as_raw(), "swapped out = the base model");
    opened.loras = with.to_vec();
    let (fresh, _) = Session::open(&opened, &[], (None, None), &mut |_| {}).unwrap();
    assert_eq!(swapped.as_raw(), generate(&fresh).as_raw(), "swapped in = loaded with the LoRA");
    let mut parity = common::Parity::default();
    parity.check("swapped in", &swapped, &read_rgb(&fixture("reference/sd35-extras/lora.png")));
    parity.check("base", &base, &read_rgb(&fixture("reference/sd35/euler.png")));
    parity.assert_within_tolerance();
}

/// A single file with its text encoders bundled
/// (`text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`, as make_sd35_extras.py
/// builds and checks it with diffusers) needs no encoder files: the same
/// image, bit for bit, as the separate files give.
#[test]
fn bundled_single_files_need_no_encoder_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = candle_core::safetensors::load(fixture("tiny-sd35.safetensors"), &Device::Cpu).unwrap();
    for (stem, prefix) in [
        ("clip_l", "text_encoders.clip_l.transformer."),
        ("clip_g", "text_encoders.clip_g.transformer."),
        ("t5xxl", "text_encoders.t5xxl.transformer."),
    ] {
        let file = fixture(&format!("tiny-sd35-text/{stem}.safetensors"));
        for (k, v) in candle_core::safetensors::load(file, &Device::Cpu).unwrap() {
            tensors.insert(format!("{prefix}{k}"), v);
        }
    }
    let shared = tensors["text_encoders.t5xxl.transformer.shared.weight"].clone();
    tensors.insert("text_encoders.t5xxl.transformer.encoder.embed_tokens.weight".into(), shared);
    let bundled = dir.path().join("tiny-sd35-bundled.safetensors");
    candle_core::safetensors::save(&tensors, &bundled).unwrap();
    let case = extras_case();
    let tokenizer = fixture("tiny-sd35/tokenizer_3/tokenizer.json").display().to_string();
    let (a, b) = (dir.path().join("bundled.png"), dir.path().join("separate.png"));
    let mut before = case.size_args();
    before.extend(["--t5-tokenizer".into(), tokenizer]);
    let ours = case.job(&bundled, &a).run(&before, "bundled");
    let separate = case
        .job(&fixture("tiny-sd35.safetensors"), &b)
        .run(&[case.size_args(), separate_encoders()].concat(), "separate");
    assert_eq!(ours.as_raw(), separate.as_raw(), "bundled = separate encoder files");
    let mut parity = common::Parity::default();
    parity.check("bundled", &ours, &read_rgb(&fixture("reference/sd35/euler.png")));
    parity.assert_within_tolerance();
}
