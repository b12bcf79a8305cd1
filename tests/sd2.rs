//! SD 2.x: the tiny SD2 model (OpenCLIP-style text encoder with GELU and `!`
//! padding, linear-projection UNet with upcast attention, v-prediction) as a
//! diffusers folder and as an original-format single file, against diffusers;
//! and the v/ε detection rule for single files.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device};
use common::*;
use sdgen::loading::{Family, Model};
use sdgen::sampling::denoiser::Prediction;
use serde::Deserialize;
use sha2::Digest;

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
    probe: HashMap<String, f32>,
    eps_patch: EpsPatch,
}

/// How the fixture script made the ε variant from the v single file: one
/// f16 tensor plus a constant, rounded back to f16 (kept out of the repo).
#[derive(Deserialize)]
struct EpsPatch {
    from: String,
    tensor: String,
    add: f32,
    patched_sha256: String,
}

#[derive(Deserialize)]
struct Case {
    #[serde(flatten)]
    base: PromptCase,
    model: String,
    prediction: String,
}

impl std::ops::Deref for Case {
    type Target = PromptCase;
    fn deref(&self) -> &PromptCase {
        &self.base
    }
}

fn cases() -> Cases {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference/sd2/cases.json")).unwrap()).unwrap()
}

/// A fixture path, or the ε variant written into `dir` from its patch, byte
/// for byte what the fixture script made (checked by SHA-256).
fn model_path(name: &str, dir: &std::path::Path) -> std::path::PathBuf {
    if name != "tiny-sd2-eps.safetensors" {
        return fixture(name);
    }
    let out = dir.join(name);
    if out.exists() {
        return out;
    }
    let patch = cases().eps_patch;
    let mut bytes = std::fs::read(fixture(&patch.from)).unwrap();
    let (header, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info = meta.info(&patch.tensor).unwrap();
    assert_eq!(info.dtype, safetensors::Dtype::F16);
    let (start, end) = (8 + header + info.data_offsets.0, 8 + header + info.data_offsets.1);
    for v in bytes[start..end].chunks_exact_mut(2) {
        let x = half::f16::from_le_bytes([v[0], v[1]]).to_f32() + patch.add;
        v.copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
    }
    let digest: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, patch.patched_sha256, "the patched ε file differs from the fixture script's");
    std::fs::write(&out, bytes).unwrap();
    out
}

/// Runs a case on `model`, forcing `--prediction` when given.
fn generate(model: &std::path::Path, case: &Case, prediction: Option<&str>, out: &std::path::Path) -> image::RgbImage {
    let mut before = case.size_args();
    if let Some(p) = prediction {
        before.extend(["--prediction".to_string(), p.to_string()]);
    }
    case.job(model, out).run(&before, &case.name)
}

#[test]
fn folder_and_single_file_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let mut parity = Parity::default();
    for case in cases().cases {
        let model = model_path(&case.model, dir.path());
        // The folder's scheduler says v; the forced-ε cases pass the flag. A
        // single file's prediction is detected, so it needs none.
        let forced = (model.is_dir() && case.prediction == "eps").then_some("eps");
        let ours = generate(&model, &case, forced, &dir.path().join(format!("{}.png", case.name)));
        if model.is_dir() && forced.is_none() {
            let single = fixture("tiny-sd2.safetensors");
            let other = generate(&single, &case, None, &dir.path().join(format!("{}-single.png", case.name)));
            assert_eq!(ours.as_raw(), other.as_raw(), "case {}: folder and single file differ", case.name);
        }
        parity.check(&case.name, &ours, &read_rgb(&fixture(&format!("reference/sd2/{}", case.png))));
    }
    parity.assert_within_tolerance();
}

/// The v and ε references of the same prompt and seed differ far beyond the
/// tolerance, so a wrong prediction type fails the test above.
#[test]
fn v_and_eps_references_differ() {
    let all = cases().cases;
    let v = all.iter().find(|c| c.prediction == "v" && c.sampler == "euler" && c.model == "tiny-sd2").unwrap();
    let eps = all.iter().find(|c| c.prediction == "eps" && c.model == "tiny-sd2").unwrap();
    assert_eq!((v.prompt.as_str(), v.seed), (eps.prompt.as_str(), eps.seed));
    let read = |c: &Case| read_rgb(&fixture(&format!("reference/sd2/{}", c.png)));
    let (max, mean) = level_diff(&read(v), &read(eps));
    assert!(max > 3 * MAX_LEVELS && mean > 3.0 * MEAN_LEVELS, "v vs ε references: max {max}, mean {mean}");
}

/// A1111's rule on the single files: the probe value equals the one diffusers'
/// UNet gives (recorded by the fixture script), and falls on each side of −1.
#[test]
fn prediction_is_detected_from_single_files() {
    let probes = cases().probe;
    let dir = tempfile::tempdir().unwrap();
    for (file, expected) in [("tiny-sd2.safetensors", Prediction::V), ("tiny-sd2-eps.safetensors", Prediction::Epsilon)]
    {
        let m = Model::load(&model_path(file, dir.path()), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(m.family, Family::Sd2, "{file}");
        assert_eq!(m.prediction, expected, "{file}");
        let ours = sdgen::loading::model::v_probe(m.backbone.unet().unwrap()).unwrap();
        let theirs = probes[file];
        eprintln!("{file}: probe {ours} (diffusers {theirs})");
        assert!((ours - theirs).abs() <= 1e-4 * theirs.abs().max(1.0), "{file}: probe {ours} vs diffusers {theirs}");
        assert!((theirs < -1.0) == (expected == Prediction::V), "{file}: fixture on the wrong side of −1");
    }
}

/// SD 2.x pads with `!` (id 0) from both layouts, and the single file's last
/// text block (SD 2.x conditions on the penultimate one) is left unused.
#[test]
fn single_file_uses_penultimate_layer_and_bang_padding() {
    let folder = Model::load(&fixture("tiny-sd2"), &Device::Cpu, DType::F32).unwrap();
    let single = Model::load(&fixture("tiny-sd2.safetensors"), &Device::Cpu, DType::F32).unwrap();
    for m in [&folder, &single] {
        let ids = m.text.clip().tokenizer.encode_padded("a photo of a cat").ids;
        assert_eq!(*ids.last().unwrap(), 0, "padding id");
    }
    assert_eq!(folder.family, Family::Sd2);
    assert_eq!(folder.prediction, Prediction::V);
    let layers = folder.text.clip().encoder.config.num_hidden_layers;
    assert_eq!(single.text.clip().encoder.config.num_hidden_layers, layers);
    let last = format!("cond_stage_model.model.transformer.resblocks.{layers}.attn.in_proj_weight");
    assert!(single.unused.contains(&last), "{last} should be unused: {:?}", single.unused);
    assert!(!single.unused.iter().any(|n| n.contains("resblocks.0.")), "{:?}", single.unused);
}

/// Module by module against diffusers/transformers, from both layouts: token
/// ids (`!` padding), the text encoder's penultimate-layer states, one UNet
/// call and the detection probe's UNet output.
#[test]
fn modules_match_diffusers() {
    let r = candle_core::safetensors::load(fixture("reference/sd2/modules.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for name in ["tiny-sd2", "tiny-sd2.safetensors"] {
        let m = Model::load(&model_path(name, dir.path()), &Device::Cpu, DType::F32).unwrap();
        let ids: Vec<u32> =
            ["", "a red fox in the snow"].iter().flat_map(|p| m.text.clip().tokenizer.encode_padded(p).ids).collect();
        let expected: Vec<i64> = r["clip.input_ids"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), expected, "{name}: token ids");
        let ids = candle_core::Tensor::from_vec(ids, (2, 77), &Device::Cpu).unwrap();
        let states = m.text.clip().encoder.forward(&ids).unwrap();
        let err = relative_error(&states, &r["clip.last_hidden_state"]);
        assert!(err < TOLERANCE, "{name}: text encoder relative error {err}");
        let t = r["unet.timestep"].to_vec1::<f32>().unwrap()[0];
        let out = m.backbone.unet().unwrap().forward(&r["unet.sample"], t, &r["unet.context"], None).unwrap();
        let err = relative_error(&out, &r["unet.out"]);
        assert!(err < TOLERANCE, "{name}: UNet relative error {err}");
        eprintln!("{name}: text encoder and UNet within {err:e} of diffusers");
    }
    let v = Model::load(&fixture("tiny-sd2.safetensors"), &Device::Cpu, DType::F32).unwrap();
    let x = (candle_core::Tensor::ones((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap() * 0.5).unwrap();
    let context = (candle_core::Tensor::ones((1, 2, 64), DType::F32, &Device::Cpu).unwrap() * 0.5).unwrap();
    let out = v.backbone.unet().unwrap().forward(&x, 999.0, &context, None).unwrap();
    let err = relative_error(&out, &r["probe.v.out"]);
    assert!(err < TOLERANCE, "probe UNet output relative error {err}");
}

/// Defaults come from the family table: SD 2.x v models at 768², and the
/// turbo preset (by name, or `--preset turbo`) as one unguided Euler a step
/// on trailing timesteps at 512².
#[test]
fn family_and_turbo_defaults() {
    use sdgen::loading::{Preset, STANDARD_512};
    use sdgen::sampling::samplers::Sampler;
    use sdgen::sampling::schedule::ScheduleKind;
    let mut m = Model::load(&fixture("tiny-sd2"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.preset, Preset::Standard);
    assert_eq!(m.defaults().size, 768);
    assert_eq!(m.defaults().sampling(), STANDARD_512.sampling());
    m.prediction = Prediction::Epsilon;
    assert_eq!(m.defaults(), STANDARD_512);
    m.preset = Preset::Turbo;
    let turbo = m.defaults();
    assert_eq!((turbo.size, turbo.steps, turbo.cfg_scale), (512, 1, 0.0));
    assert_eq!(turbo.sampling(), (Sampler::EulerAncestral, ScheduleKind::Trailing));
    assert_eq!(Preset::from_name("sd_turbo"), Preset::Turbo);
    assert_eq!(Preset::from_name("SDXL-Turbo-1.0"), Preset::Turbo);

    // From the command line: a model whose name says turbo.
    let dir = tempfile::tempdir().unwrap();
    let named = dir.path().join("tiny-sd2-turbo");
    std::os::unix::fs::symlink(fixture("tiny-sd2"), &named).unwrap();
    let out = dir.path().join("turbo.png");
    let o = sdgen(&["--model", named.to_str().unwrap(), "-p", "a cat", "-s", "1", "-q", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = sdgen::image_io::read_parameters(&out).unwrap().unwrap();
    assert!(text.contains("Steps: 1, Sampler: Euler a, Schedule type: Trailing, CFG scale: 0,"), "{text}");
    assert!(text.contains("Size: 512x512") && text.contains("Family: SD 2.x"), "{text}");
}
