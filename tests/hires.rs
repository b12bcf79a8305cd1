//! The hires fix against references composed from diffusers on the tiny
//! SD 1.x model (`tests/reference/make_hires.py`), its latent
//! interpolations against torch's, its PNG parameters and replay, and its
//! bad options.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative_prompt: String,
    seed: u64,
    steps: usize,
    cfg_scale: f64,
    width: usize,
    height: usize,
    sampler: String,
    schedule: String,
    hires_scale: Option<f64>,
    hires_size: Option<[usize; 2]>,
    hires_upscaler: String,
    hires_steps: usize,
    hires_denoise: f64,
    hires_sampler: Option<String>,
    hires_schedule: Option<String>,
    hires_cfg_scale: Option<f64>,
    hires_prompt: Option<String>,
    hires_negative_prompt: Option<String>,
    png: String,
}

impl Case {
    fn args(&self, models: &Path, out: &Path) -> Vec<String> {
        let mut pairs = vec![
            ("model", "tiny-sd1".to_string()),
            ("models-dir", models.to_str().unwrap().to_string()),
            ("prompt", self.prompt.clone()),
            ("negative-prompt", self.negative_prompt.clone()),
            ("seed", self.seed.to_string()),
            ("steps", self.steps.to_string()),
            ("cfg-scale", self.cfg_scale.to_string()),
            ("width", self.width.to_string()),
            ("height", self.height.to_string()),
            ("sampler", self.sampler.clone()),
            ("schedule", self.schedule.clone()),
            ("prompt-syntax", "plain".to_string()),
            ("hires-upscaler", self.hires_upscaler.clone()),
            ("hires-steps", self.hires_steps.to_string()),
            ("hires-denoise", self.hires_denoise.to_string()),
            ("out", out.to_str().unwrap().to_string()),
        ];
        let optional = [
            ("hires-scale", self.hires_scale.map(|s| s.to_string())),
            ("hires-size", self.hires_size.map(|[w, h]| format!("{w}x{h}"))),
            ("hires-sampler", self.hires_sampler.clone()),
            ("hires-schedule", self.hires_schedule.clone()),
            ("hires-cfg-scale", self.hires_cfg_scale.map(|c| c.to_string())),
            ("hires-prompt", self.hires_prompt.clone()),
            ("hires-negative-prompt", self.hires_negative_prompt.clone()),
        ];
        pairs.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
        pairs.into_iter().flat_map(|(k, v)| [format!("--{k}"), v]).collect()
    }
}

/// A models dir with the tiny SD 1.x model and the tiny upscalers in
/// `upscale_models/` (ComfyUI's folder).
fn models_dir(root: &Path) -> PathBuf {
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(fixture("tiny-sd1"), models.join("tiny-sd1")).unwrap();
    std::os::unix::fs::symlink(fixture("upscalers"), models.join("upscale_models")).unwrap();
    models
}

#[test]
fn hires_fix_matches_diffusers_composed_as_a1111_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let models = models_dir(dir.path());
    let mut parity = Parity::default();
    for case in read_cases::<Case>("reference/hires/cases.json") {
        let out = dir.path().join(format!("{}.png", case.name));
        run_library(&case.args(&models, &out)).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        let ours = read_rgb(&out);
        parity.check(&case.name, &ours, &read_rgb(&fixture(&format!("reference/hires/{}", case.png))));

        // A1111's keys: the first pass's size, then the second pass.
        let params = sdgen::image_io::read_parameters(&out).unwrap().unwrap();
        let size = format!("Size: {}x{},", case.width, case.height);
        assert!(params.contains(&size), "{params}");
        let target = match (case.hires_scale, case.hires_size) {
            (Some(scale), _) => format!("Hires upscale: {scale}"),
            (_, Some([w, h])) => format!("Hires resize: {w}x{h}"),
            _ => panic!("{}: no hires target", case.name),
        };
        assert!(params.contains(&format!("Denoising strength: {}, {target}", case.hires_denoise)), "{params}");
        let upscaler: sdgen::hires::HiresUpscaler = case.hires_upscaler.parse().unwrap();
        assert!(params.contains(&format!("Hires upscaler: {upscaler}")), "{params}");
        assert_eq!(params.contains("Hires steps"), case.hires_steps != 0, "{params}");

        // Replay finds the model and the upscaler by name and gives the same image.
        let again = dir.path().join(format!("{}-replay.png", case.name));
        let (o, a, m) = (out.to_str().unwrap(), again.to_str().unwrap(), models.to_str().unwrap());
        let r = sdgen(&["replay", o, "--out", a, "--models-dir", m, "--quiet"]);
        assert!(r.status.success(), "{}: {}", case.name, stderr(&r));
        assert_eq!(read_rgb(&again), ours, "{}: the replay differs", case.name);
    }
    parity.assert_within_tolerance();
}

#[test]
fn latent_modes_interpolate_as_torch() {
    use candle_core::Device;
    let tensors =
        candle_core::safetensors::load(fixture("reference/hires/interpolate.safetensors"), &Device::Cpu).unwrap();
    let input = &tensors["input"];
    let mut checked = 0;
    for (name, _, mode) in sdgen::hires::LATENT_MODES {
        for (h, w) in [(13, 11), (14, 10), (4, 3)] {
            let expected = &tensors[&format!("{name}.{h}x{w}")];
            let ours = sdgen::hires::interpolate(input, h, w, mode).unwrap();
            assert_eq!(ours.dims(), expected.dims(), "{name} {h}x{w}");
            let err = (ours - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-5, "{name} to {h}x{w}: max error {err}");
            checked += 1;
        }
    }
    assert_eq!(checked, 18);
}

#[test]
fn bad_hires_options_fail_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let models = models_dir(dir.path());
    let out = dir.path().join("x.png");
    let (m, o, init) = (models.to_str().unwrap(), out.to_str().unwrap(), fixture("images/init.png"));
    let base = ["--model", "tiny-sd1", "--models-dir", m, "--prompt", "a fox", "--steps", "2", "-W", "64", "-H", "64"];
    let cases: &[(&[&str], &str, i32)] = &[
        (&["--hires-scale", "2", "--hires-upscaler", "latent-cubic"], "is not a latent upscale mode", 2),
        (&["--hires-scale", "2", "--hires-denoise", "0"], "--hires-denoise must be in (0, 1]", 2),
        (&["--hires-steps", "4"], "need --hires-scale or --hires-size", 2),
        (&["--hires-scale", "0.05"], "less than 8 pixels", 2),
        (&["--hires-scale", "2", "--hires-upscaler", "4x-Missing"], "4x-Missing", 4),
    ];
    for (extra, want, code) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).chain(&["--out", o]).copied().collect();
        let r = sdgen(&args);
        let err = stderr(&r);
        assert_eq!(r.status.code(), Some(*code), "{extra:?}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert!(errors.len() == 1 && errors[0].contains(want), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote an image");
    }
    let r = sdgen(
        &["img2img", "--init-image", init.to_str().unwrap(), "--hires-scale", "2", "--out", o]
            .iter()
            .chain(&base)
            .copied()
            .collect::<Vec<_>>(),
    );
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(stderr(&r).contains("the hires fix (--hires-*) is for txt2img"), "{}", stderr(&r));
}
