//! SDXL: the tiny SDXL model (two text encoders, pooled text and size
//! conditioning, SDXL base's leading-spaced scheduler config, VAE scaling
//! 0.13025) as a diffusers folder and as an original-format single file,
//! against diffusers; its defaults and the turbo preset.

mod common;

use candle_core::{DType, Device};
use common::*;
use sdgen::loading::{Family, Model};
use serde::Deserialize;

/// SDXL cases: the model, the schedule and the size conditioning, as
/// diffusers' `(height, width)` and `(top, left)` when not the defaults.
#[derive(Deserialize)]
struct Sdxl {
    model: String,
    schedule: String,
    original_size: Option<[usize; 2]>,
    crops_coords_top_left: Option<[usize; 2]>,
    target_size: Option<[usize; 2]>,
}

type Case = CaseWith<Sdxl>;

fn cases() -> Vec<Case> {
    read_cases("reference/families/txt2img.json")
}

/// The case's options besides the common ones: size, schedule, and SDXL's
/// size conditioning as `WxH` / `TOP,LEFT`.
fn case_args(case: &Case) -> Vec<String> {
    let mut a = case.size_args();
    a.extend(["--schedule".into(), case.extra.schedule.clone()]);
    let wxh = |[h, w]: [usize; 2]| format!("{w}x{h}");
    if let Some(s) = case.extra.original_size {
        a.extend(["--original-size".into(), wxh(s)]);
    }
    if let Some([top, left]) = case.extra.crops_coords_top_left {
        a.extend(["--crop-top-left".into(), format!("{top},{left}")]);
    }
    if let Some(s) = case.extra.target_size {
        a.extend(["--target-size".into(), wxh(s)]);
    }
    a
}

/// Every case on the folder, and the single file on its own case; the single
/// file must give the folder's image bit for bit.
#[test]
fn folder_and_single_file_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let mut parity = Parity::default();
    let mut single_checked = 0;
    for case in cases() {
        let out = dir.path().join(format!("{}.png", case.name));
        let ours = case.job(&fixture(&case.extra.model), &out).run(&case_args(&case), &case.name);
        parity.check(&case.name, &ours, &read_rgb(&fixture(&format!("reference/families/{}", case.png))));
        if case.extra.model.ends_with(".safetensors") {
            let folder = fixture(case.extra.model.trim_end_matches(".safetensors"));
            let out = dir.path().join(format!("{}-folder.png", case.name));
            let theirs = case.job(&folder, &out).run(&case_args(&case), &case.name);
            assert_eq!(ours.as_raw(), theirs.as_raw(), "case {}: single file and folder differ", case.name);
            single_checked += 1;
        }
        if case.extra.original_size.is_some() {
            let text =
                sdgen::image_io::read_parameters(&dir.path().join(format!("{}.png", case.name))).unwrap().unwrap();
            assert!(text.contains("Original size: ") && text.contains("Family: SDXL"), "{text}");
        }
    }
    assert!(single_checked >= 1, "no single-file case");
    parity.assert_within_tolerance();
}

/// Cases that differ in one thing only (sampler, negative prompt, guidance,
/// size conditioning) have references far apart, so the test above can fail
/// on each of them.
#[test]
fn references_are_sensitive_to_each_option() {
    let all = cases();
    let base = all.iter().find(|c| c.name == "euler_normal").expect("an `euler_normal` case");
    let read = |c: &Case| read_rgb(&fixture(&format!("reference/families/{}", c.png)));
    let mut compared = 0;
    for other in all.iter().filter(|c| c.name != base.name && c.extra.model == base.extra.model) {
        let (max, mean) = level_diff(&read(base), &read(other));
        eprintln!("{} vs {}: max {max}, mean {mean:.2}", base.name, other.name);
        assert!(
            max > 10 * MAX_LEVELS && mean > MEAN_LEVELS,
            "{} vs {}: max {max}, mean {mean:.2}",
            base.name,
            other.name
        );
        compared += 1;
    }
    assert!(compared >= 5, "only {compared} comparisons");
}

/// Both layouts load as the same SDXL model: the family, the second encoder
/// with its `!` padding, the add-embedding UNet, SDXL's VAE scaling and
/// scheduler, zero negatives, and no tensor left over.
#[test]
fn single_file_and_folder_load_the_same_sdxl_model() {
    let folder = Model::load(&fixture("tiny-sdxl"), &Device::Cpu, DType::F32).unwrap();
    let single = Model::load(&fixture("tiny-sdxl.safetensors"), &Device::Cpu, DType::F32).unwrap();
    for m in [&folder, &single] {
        assert_eq!(m.family, Family::Sdxl);
        let second = m.text.clip().pooled.as_ref().expect("second text encoder");
        assert_eq!(*second.tokenizer.encode_padded("a cat").ids.last().unwrap(), 0, "`!` padding");
        assert_eq!(*m.text.clip().tokenizer.encode_padded("a cat").ids.last().unwrap(), 999, "end-token padding");
        assert_eq!(second.model.config.num_hidden_layers, 3);
        assert_eq!(m.vae.config.scaling_factor, 0.13025);
        assert_eq!(m.scheduler.timestep_spacing.as_deref(), Some("leading"));
        assert_eq!(m.backbone.unet().unwrap().config.addition_time_embed_dim, Some(8));
        assert!(m.text.clip().zero_empty_negative);
        // Real SDXL files also store the first encoder's position ids buffer.
        assert!(m.unused.iter().all(|n| n.ends_with("position_ids")), "unused: {:?}", m.unused);
        let d = m.defaults();
        assert_eq!((d.size, d.steps, d.cfg_scale), (1024, 20, 5.0));
    }
    assert_eq!(
        folder.backbone.unet().unwrap().config.projection_class_embeddings_input_dim,
        single.backbone.unet().unwrap().config.projection_class_embeddings_input_dim
    );
}

/// SDXL-Turbo: chosen by name, the turbo defaults at 512² with the family recorded.
#[test]
fn sdxl_turbo_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let named = dir.path().join("tiny-sdxl-turbo.safetensors");
    std::os::unix::fs::symlink(fixture("tiny-sdxl.safetensors"), &named).unwrap();
    let out = dir.path().join("turbo.png");
    let o = sdgen(&["--model", named.to_str().unwrap(), "-p", "a cat", "-s", "1", "-q", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = sdgen::image_io::read_parameters(&out).unwrap().unwrap();
    assert!(text.contains("Steps: 1, Sampler: Euler a, Schedule type: Trailing, CFG scale: 0,"), "{text}");
    assert!(text.contains("Size: 512x512") && text.contains("Family: SDXL"), "{text}");
}

/// SDXL's VAE overflows in f16: with `--dtype f16` it runs in f32 unless its
/// config says `force_upcast: false`; other families' VAEs follow the dtype.
#[test]
fn sdxl_vae_runs_in_f32_under_f16() {
    let xl = Model::load(&fixture("tiny-sdxl"), &Device::Cpu, DType::F16).unwrap();
    assert_eq!((xl.backbone.unet().unwrap().dtype(), xl.vae.dtype()), (DType::F16, DType::F32));
    let single = Model::load(&fixture("tiny-sdxl.safetensors"), &Device::Cpu, DType::F16).unwrap();
    assert_eq!(single.vae.dtype(), DType::F32);
    let sd1 = Model::load(&fixture("tiny-sd1"), &Device::Cpu, DType::F16).unwrap();
    assert_eq!(sd1.vae.dtype(), DType::F16);
    let mut cfg = xl.vae.config.clone();
    cfg.other.insert("force_upcast".into(), serde_json::json!(false));
    assert_eq!(sdgen::loading::vae_dtype(Family::Sdxl, &cfg, DType::F16), DType::F16);
}

/// A folder whose Euler scheduler uses trailing spacing (as SD-Turbo's and
/// SDXL-Turbo's do) gets the turbo preset whatever its name.
#[test]
fn turbo_by_scheduler_config() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("my-model");
    std::fs::create_dir_all(folder.join("scheduler")).unwrap();
    for entry in std::fs::read_dir(fixture("tiny-sdxl")).unwrap().flatten() {
        if entry.file_name() != "scheduler" {
            std::os::unix::fs::symlink(entry.path(), folder.join(entry.file_name())).unwrap();
        }
    }
    let config = std::fs::read_to_string(fixture("tiny-sdxl/scheduler/scheduler_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["_class_name"] = "EulerAncestralDiscreteScheduler".into();
    config["timestep_spacing"] = "trailing".into();
    std::fs::write(folder.join("scheduler/scheduler_config.json"), config.to_string()).unwrap();
    let m = Model::load(&folder, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.preset, sdgen::loading::Preset::Turbo);
    assert_eq!(m.defaults().size, 512);
}

/// SDXL embeddings carry vectors for both encoders (`clip_l`, `clip_g`):
/// each encoder's half of the context changes with its own vectors.
#[test]
fn sdxl_embeddings_reach_both_encoders() {
    use candle_core::Tensor;
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("clip_l".to_string(), Tensor::randn(0f32, 1.0, (2, 64), &Device::Cpu).unwrap());
    tensors.insert("clip_g".to_string(), Tensor::randn(0f32, 1.0, (2, 64), &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, dir.path().join("shiny.safetensors")).unwrap();
    let adapters = sdgen::loading::Adapters { embeddings: Some(dir.path().to_path_buf()), ..Default::default() };
    let with = Model::load_with(&fixture("tiny-sdxl"), &Device::Cpu, DType::F32, &adapters).unwrap();
    let without = Model::load(&fixture("tiny-sdxl"), &Device::Cpu, DType::F32).unwrap();
    let opts = sdgen::request::TextOptions::default();
    let encode = |m: &Model| m.encode_text("a shiny cat", &opts, &Device::Cpu, &mut |_| {}).unwrap().context;
    let (a, b) = (encode(&with), encode(&without));
    for half in 0..2 {
        let part = |t: &Tensor| t.narrow(2, half * 64, 64).unwrap();
        assert!(relative_error(&part(&a), &part(&b)) > 1e-2, "encoder {} ignores the embedding", half + 1);
    }
}
