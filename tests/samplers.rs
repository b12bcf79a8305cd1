//! Every sampler and schedule against diffusers (k-diffusion for
//! `dpmpp_2s_a`) on the tiny SD1 model, and each σ schedule against the
//! arrays diffusers computes.

mod common;

use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    sampler: String,
    schedule: String,
    prompt: String,
    negative_prompt: Option<String>,
    seed: u64,
    steps: usize,
    cfg_scale: f64,
    width: usize,
    height: usize,
    png: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    strength: Option<f64>,
    #[serde(default)]
    image: Option<String>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture("reference/samplers/cases.json")).unwrap();
    serde_json::from_str::<Cases>(&text).unwrap().cases
}

fn run(case: &Case, out: &std::path::Path) -> image::RgbImage {
    let model = fixture(case.model.as_deref().unwrap_or("tiny-sd1"));
    let mut before: Vec<String> = Vec::new();
    if case.mode.as_deref() == Some("img2img") {
        let image = fixture(case.image.as_deref().expect("img2img case has an image"));
        before.extend(["img2img".into(), "--init-image".into(), image.to_str().unwrap().into()]);
        before.extend(["--strength".into(), case.strength.expect("img2img strength").to_string()]);
    } else {
        before.extend(["--width".into(), case.width.to_string(), "--height".into(), case.height.to_string()]);
    }
    before.extend(["--schedule".into(), case.schedule.clone()]);
    let job = Job {
        model: &model,
        prompt: &case.prompt,
        negative_prompt: case.negative_prompt.as_deref().unwrap_or(""),
        seed: case.seed,
        steps: case.steps,
        cfg_scale: case.cfg_scale,
        sampler: &case.sampler,
        out,
    };
    job.run(&before, &case.name)
}

#[test]
fn every_sampler_and_schedule_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let cases = cases();
    for case in &cases {
        let ours = run(case, &dir.path().join(format!("{}.png", case.name)));
        let reference = read_rgb(&fixture(&format!("reference/samplers/{}", case.png)));
        let (max, mean) = level_diff(&ours, &reference);
        eprintln!("{:<32} max {max:>3} mean {mean:.4}", case.name);
        if max > MAX_LEVELS || mean > MEAN_LEVELS {
            failures.push(format!("{}: max {max}, mean {mean:.3}", case.name));
        }
    }
    assert!(failures.is_empty(), "beyond tolerance (max {MAX_LEVELS}, mean {MEAN_LEVELS}): {failures:?}");
    let samplers: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.sampler.as_str()).collect();
    for row in sdgen::sampling::samplers::SAMPLERS {
        assert!(samplers.contains(row.1), "no reference case for sampler {}", row.1);
    }
}

/// Each sampler's reference differs from Euler's far beyond the tolerance,
/// so the comparison above tells samplers apart.
#[test]
fn sampler_references_are_distinct() {
    let cases = cases();
    let find = |sampler: &str| {
        cases.iter().find(|c| c.sampler == sampler && c.schedule == "normal" && c.mode.is_none() && c.model.is_none())
    };
    let euler = find("euler").expect("an euler case");
    let euler_img = read_rgb(&fixture(&format!("reference/samplers/{}", euler.png)));
    for row in sdgen::sampling::samplers::SAMPLERS {
        let Some(case) = find(row.1).filter(|c| c.name != euler.name && (c.steps, c.seed) == (euler.steps, euler.seed))
        else {
            continue;
        };
        let img = read_rgb(&fixture(&format!("reference/samplers/{}", case.png)));
        if img.dimensions() != euler_img.dimensions() {
            continue;
        }
        let (max, mean) = level_diff(&img, &euler_img);
        assert!(max > MAX_LEVELS && mean > MEAN_LEVELS, "{} is within tolerance of euler ({max}, {mean:.3})", row.1);
    }
}
