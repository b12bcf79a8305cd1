//! Every sampler and schedule against diffusers (k-diffusion for
//! `dpmpp_2s_a`) on the tiny SD1 model, and each σ schedule against the
//! arrays diffusers computes.

mod common;

use common::*;
use serde::Deserialize;

/// A sampler case: the common fields and the schedule; img2img cases name
/// their model, input image and strength.
#[derive(Deserialize)]
struct Extra {
    schedule: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    strength: Option<f64>,
    #[serde(default)]
    image: Option<String>,
}

type Case = CaseWith<Extra>;

fn cases() -> Vec<Case> {
    read_cases("reference/samplers/cases.json")
}

fn run(case: &Case, out: &std::path::Path) -> image::RgbImage {
    let model = fixture(case.extra.model.as_deref().unwrap_or("tiny-sd1"));
    let mut before: Vec<String> = Vec::new();
    if case.extra.mode.as_deref() == Some("img2img") {
        let image = fixture(case.extra.image.as_deref().expect("img2img case has an image"));
        before.extend(["img2img".into(), "--init-image".into(), image.to_str().unwrap().into()]);
        before.extend(["--strength".into(), case.extra.strength.expect("img2img strength").to_string()]);
    } else {
        before.extend(case.size_args());
    }
    before.extend(["--schedule".into(), case.extra.schedule.clone()]);
    case.job(&model, out).run(&before, &case.name)
}

#[test]
fn every_sampler_and_schedule_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let mut parity = Parity::default();
    let cases = cases();
    for case in &cases {
        let ours = run(case, &dir.path().join(format!("{}.png", case.name)));
        parity.check(&case.name, &ours, &read_rgb(&fixture(&format!("reference/samplers/{}", case.png))));
    }
    parity.assert_within_tolerance();
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
        cases.iter().find(|c| {
            c.sampler == sampler
                && c.extra.schedule == "normal"
                && c.extra.mode.as_deref() != Some("img2img")
                && c.steps > 1
        })
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

#[derive(Deserialize)]
struct ScheduleFile {
    entries: Vec<ScheduleEntry>,
}

#[derive(Deserialize)]
struct ScheduleEntry {
    key_prefix: String,
    sampler: String,
    schedule: String,
    steps: usize,
    status: String,
}

fn values(t: &candle_core::Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn assert_close(what: &str, ours: &[f64], theirs: &[f64]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths {ours:?} vs {theirs:?}");
    for (a, b) in ours.iter().zip(theirs) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{what}: {ours:?} vs {theirs:?}");
    }
}

/// Timesteps, σ and initial noise of every sampler × schedule × step count
/// diffusers accepts, against its own arrays (1e-6 relative).
#[test]
fn every_schedule_matches_diffusers_arrays() {
    use sdgen::sampling::samplers::Sampler;
    use sdgen::sampling::schedule::{ScheduleKind, SchedulerConfig};
    let file: ScheduleFile =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference/samplers/schedules.json")).unwrap()).unwrap();
    let arrays =
        candle_core::safetensors::load(fixture("reference/samplers/schedules.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let cfg = SchedulerConfig::sd15();
    let (mut checked, mut refused) = (0, Vec::new());
    for e in file.entries.iter().filter(|e| e.status == "ok") {
        let sampler: Sampler = e.sampler.parse().unwrap();
        let Ok(ours) = sampler.schedule(&cfg, e.steps, e.schedule.parse::<ScheduleKind>().unwrap()) else {
            refused.push(e.key_prefix.clone());
            continue;
        };
        let get = |name: &str| arrays.get(&format!("{}.{name}", e.key_prefix)).map(values);
        let two_calls = matches!(e.sampler.as_str(), "heun" | "dpm_2" | "dpm_2_a");
        let mut timesteps = get("timesteps").unwrap();
        if two_calls {
            timesteps = timesteps.iter().step_by(2).copied().collect();
        } else if e.sampler == "pndm" {
            timesteps.dedup();
        }
        let our_t: Vec<f64> = ours.timesteps.iter().map(|&t| t as f64).collect();
        assert_close(&format!("{} timesteps", e.key_prefix), &our_t, &timesteps);
        let our_sigmas: Vec<f64> = ours.sigmas.iter().map(|&s| s as f64).collect();
        if let Some(mut sigmas) = get("sigmas").filter(|_| e.sampler != "dpmpp_2s_a") {
            if two_calls {
                sigmas = sigmas.iter().step_by(2).copied().collect();
                if sigmas.len() == e.steps {
                    sigmas.push(0.0);
                }
            }
            assert_close(&format!("{} sigmas", e.key_prefix), &our_sigmas, &sigmas);
        }
        let sigma = |a: &f64| ((1.0 - a) / a).sqrt();
        if let (Some(ac), false) = (get("alphas_cumprod"), e.sampler == "pndm") {
            let want: Vec<f64> = ac.iter().map(sigma).collect();
            assert_close(&format!("{} σ(ᾱ)", e.key_prefix), &our_sigmas[..e.steps], &want);
            if e.sampler != "lcm" {
                let prev: Vec<f64> = get("alphas_cumprod_prev").unwrap().iter().map(sigma).collect();
                let landing: Vec<f64> = ours.landing.iter().map(|&s| s as f64).collect();
                assert_close(&format!("{} σ(ᾱ_prev)", e.key_prefix), &landing, &prev);
            }
        }
        // Our initial noise factor is in σ-space; DDPM-space classes say 1.
        let init = get("init_noise_sigma").unwrap()[0];
        let ours_init = ours.init_noise_scale as f64;
        let s0 = our_sigmas[0];
        // k-diffusion starts at σ₀ whatever the spacing.
        let init = if e.sampler == "dpmpp_2s_a" { s0 } else { init };
        let matches = (ours_init - init).abs() <= 1e-6 * init
            || (init == 1.0 && (ours_init / (s0 * s0 + 1.0).sqrt() - 1.0).abs() <= 1e-6);
        assert!(matches, "{}: init noise {ours_init} vs diffusers {init}", e.key_prefix);
        checked += 1;
    }
    eprintln!("{checked} schedules checked; refused as unsupported: {refused:?}");
    assert!(checked >= 300, "only {checked} schedules checked");
    // PLMS's warm-up cannot follow spacings whose steps of T/K miss the next
    // timestep, and LCMScheduler ignores timestep_spacing: both are errors here.
    assert!(
        refused.iter().all(|k| k.starts_with("pndm.") || k.starts_with("lcm.")),
        "unexpectedly refused: {refused:?}"
    );
}

/// Every sampler also runs img2img (a partial schedule) and inpainting, and
/// inpainting keeps the unmasked pixels.
#[test]
fn every_sampler_edits_images() {
    let dir = tempfile::tempdir().unwrap();
    let init = fixture("images/init.png");
    let mask = fixture("images/mask_rect.png");
    let input = read_rgb(&init);
    let mask_img = image::open(&mask).unwrap().to_luma8();
    for row in sdgen::sampling::samplers::SAMPLERS {
        let model = fixture(if row.1 == "lcm" { "tiny-lcm" } else { "tiny-sd1" });
        for mode in ["img2img", "inpaint"] {
            let out = dir.path().join(format!("{}-{mode}.png", row.1));
            let mut before: Vec<String> = vec![mode.into()];
            if mode == "img2img" {
                before.extend([
                    "--init-image".into(),
                    init.to_str().unwrap().into(),
                    "--strength".into(),
                    "0.5".into(),
                ]);
            } else {
                before.extend([
                    "--image".into(),
                    init.to_str().unwrap().into(),
                    "--mask".into(),
                    mask.to_str().unwrap().into(),
                ]);
            }
            let job = Job {
                model: &model,
                prompt: "a red apple",
                negative_prompt: "",
                seed: 3,
                steps: 4,
                cfg_scale: 7.5,
                sampler: row.1,
                out: &out,
            };
            let img = job.run(&before, &format!("{} {mode}", row.1));
            if mode == "inpaint" {
                for (x, y, px) in input.enumerate_pixels() {
                    if mask_img.get_pixel(x, y).0[0] < 128 {
                        assert_eq!(img.get_pixel(x, y), px, "{}: unmasked pixel changed", row.1);
                    }
                }
            }
            assert_ne!(img.as_raw(), input.as_raw(), "{} {mode} changed nothing", row.1);
        }
    }
}
