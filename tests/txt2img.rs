//! txt2img parity with diffusers on the tiny SD1 model, from the diffusers
//! folder and from the single-file checkpoint.

mod common;

use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

type Case = PromptCase;

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture("reference/sd1/cases.json")).unwrap();
    serde_json::from_str::<Cases>(&text).unwrap().cases
}

fn generate(model: &std::path::Path, case: &Case, out: &std::path::Path) -> image::RgbImage {
    generate_with(model, case, out, &[])
}

/// [`generate`] with more options after the case's own.
fn generate_with(model: &std::path::Path, case: &Case, out: &std::path::Path, extra: &[&str]) -> image::RgbImage {
    let mut before = case.size_args();
    before.extend(extra.iter().map(|s| s.to_string()));
    case.job(model, out).run(&before, &case.name)
}

#[test]
fn folder_and_single_file_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let folder = fixture("tiny-sd1");
    let single = fixture("tiny-sd1.safetensors");
    let mut parity = Parity::default();
    for case in cases() {
        let a = generate(&folder, &case, &dir.path().join(format!("{}-folder.png", case.name)));
        let b = generate(&single, &case, &dir.path().join(format!("{}-single.png", case.name)));
        assert_eq!(a.as_raw(), b.as_raw(), "case {}: folder and single file differ", case.name);
        parity.check(&case.name, &a, &read_rgb(&fixture(&format!("reference/sd1/{}", case.png))));
    }
    parity.assert_within_tolerance();
}

/// The references of cases that differ only in prompt, seed or sampler differ
/// far beyond the tolerance, so the parity test above can fail.
#[test]
fn changing_prompt_seed_or_sampler_changes_the_image() {
    let cases = cases();
    let mut compared = 0;
    for (i, a) in cases.iter().enumerate() {
        for b in &cases[i + 1..] {
            let same = |x: &Case| (x.width, x.height, x.steps, x.cfg_scale.to_bits(), x.negative_prompt.clone());
            let changed = [a.prompt != b.prompt, a.seed != b.seed, a.sampler != b.sampler];
            if same(a) != same(b) || changed.iter().filter(|c| **c).count() != 1 {
                continue;
            }
            let ra = read_rgb(&fixture(&format!("reference/sd1/{}", a.png)));
            let rb = read_rgb(&fixture(&format!("reference/sd1/{}", b.png)));
            let (max, mean) = level_diff(&ra, &rb);
            assert!(
                max > 10 * MAX_LEVELS && mean > 4.0 * MEAN_LEVELS,
                "{} vs {}: only max {max}, mean {mean:.2} apart",
                a.name,
                b.name
            );
            compared += 1;
        }
    }
    assert!(compared >= 4, "too few comparable cases: {compared}");
}

/// Runs a small job on the tiny single-file model, writing `out`.
fn run_tiny(out: &std::path::Path, args: &[&str]) -> std::process::Output {
    let model = fixture("tiny-sd1.safetensors");
    let base = ["--model", model.to_str().unwrap(), "--width", "64", "--height", "64", "--out", out.to_str().unwrap()];
    let o = sdgen(&[&base[..], args].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

#[test]
fn png_records_a1111_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.png");
    let o = run_tiny(&out, &["--prompt", "a red fox", "--negative-prompt", "blurry", "--seed", "42", "--steps", "2"]);
    let text = sdgen::image_io::read_parameters(&out).unwrap().expect("parameters chunk");
    let expected = format!(
        "a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, \
         Model hash: {}, Model: tiny-sd1, Family: SD 1.x, Version: sdgen {}",
        sha256_10(&fixture("tiny-sd1.safetensors")),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(text, expected);
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(summary.contains("seed 42"), "summary: {summary}");
}

fn sha256_10(path: &std::path::Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect::<String>()[..10].to_string()
}

#[test]
fn batch_count_uses_consecutive_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let job = ["--prompt", "a red fox", "--steps", "3", "--quiet"];
    let batch = dir.path().join("fox.png");
    run_tiny(&batch, &[&job[..], &["--seed", "7", "--batch-count", "2"]].concat());
    let single = dir.path().join("one.png");
    run_tiny(&single, &[&job[..], &["--seed", "8"]].concat());
    assert!(dir.path().join("fox-0.png").is_file());
    assert_eq!(read_rgb(&dir.path().join("fox-1.png")).as_raw(), read_rgb(&single).as_raw());
    assert!(!batch.exists(), "with several images, only numbered files are written");
}

#[test]
fn random_seed_is_printed_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.png");
    let o = run_tiny(&out, &["--prompt", "x", "--steps", "1"]);
    let summary = String::from_utf8_lossy(&o.stdout).into_owned();
    let seed: u64 = summary
        .split("seed ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no seed in {summary:?}"));
    let text = sdgen::image_io::read_parameters(&out).unwrap().unwrap();
    assert!(text.contains(&format!("Seed: {seed},")), "{text}");
}

/// A prompt that starts with `-` (or is `--`) is the prompt, not an option,
/// and is what the PNG records.
#[test]
fn prompts_starting_with_a_hyphen_are_prompts() {
    let dir = tempfile::tempdir().unwrap();
    for (i, prompt) in ["-a red fox", "--"].into_iter().enumerate() {
        let out = dir.path().join(format!("{i}.png"));
        run_tiny(&out, &["--prompt", prompt, "--negative-prompt", "-blurry", "--steps", "1", "--quiet"]);
        let text = sdgen::image_io::read_parameters(&out).unwrap().unwrap();
        assert!(text.starts_with(&format!("{prompt}\nNegative prompt: -blurry\n")), "{text}");
    }
}

/// `--batch-size 3` runs the images of `--batch-count 3` through the UNet
/// together: same files, same seeds, the same pixels up to float rounding.
#[test]
fn batch_size_equals_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sd1");
    let run = |name: &str, size: &str| {
        let out = dir.path().join(format!("{name}.png"));
        let o = sdgen(&[
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--seed",
            "5",
            "--steps",
            "6",
            "--width",
            "64",
            "--height",
            "64",
            "--batch-count",
            "3",
            "--batch-size",
            size,
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        (0..3).map(|i| read_rgb(&dir.path().join(format!("{name}-{i}.png")))).collect::<Vec<_>>()
    };
    let (one, three) = (run("one", "1"), run("three", "3"));
    for (i, (a, b)) in one.iter().zip(&three).enumerate() {
        let (max, _) = level_diff(a, b);
        assert!(max <= 1, "image {i}: batched differs by {max} levels");
    }
    assert!(level_diff(&one[0], &one[1]).0 > 10, "seeds S and S+1 must give different images");
}

/// f16 weights and compute (the GPU default) on the CPU: the sampler keeps
/// f32 latents, so the result stays near the f32 reference. diffusers' own
/// f16 lands 0.2–3 levels (mean) from these references on the same cases.
#[test]
fn f16_stays_near_the_f32_reference() {
    let dir = tempfile::tempdir().unwrap();
    let folder = fixture("tiny-sd1");
    let mut means = Vec::new();
    for case in
        cases().iter().filter(|c| ["cat_euler_a", "fox_euler", "fox_ddim_20_bigseed"].contains(&c.name.as_str()))
    {
        let out = dir.path().join(format!("{}.png", case.name));
        let ours = generate_with(&folder, case, &out, &["--dtype", "f16"]);
        let (max, mean) = level_diff(&ours, &read_rgb(&fixture(&format!("reference/sd1/{}", case.png))));
        eprintln!("{:<24} f16: max {max} mean {mean:.3}", case.name);
        assert!(max > 0, "{}: f16 gave the f32 image exactly; did it run in f16?", case.name);
        means.push(mean);
    }
    assert_eq!(means.len(), 3);
    let average = means.iter().sum::<f64>() / means.len() as f64;
    assert!(average <= 2.0, "f16 average mean difference {average:.2} levels (bar: 2)");
}

/// The profiling tools print one JSON line with positive times.
#[test]
fn dev_benchmark_tools_report_times() {
    let dev = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdgen"))
            .arg("dev")
            .args(args)
            .args(["--device", "cpu"])
            .output()
            .unwrap()
    };
    let model = fixture("tiny-sd1");
    let bench = dev(&["unet-bench", "--model", model.to_str().unwrap(), "--size", "64", "--passes", "1"]);
    assert!(bench.status.success(), "{}", stderr(&bench));
    let v: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    assert!(v["unet_pass_s"].as_f64().unwrap() > 0.0 && v["vae_decode_s"].as_f64().unwrap() > 0.0, "{v}");
    let peak = dev(&["matmul-peak", "--size", "128", "--repeat", "1"]);
    assert!(peak.status.success(), "{}", stderr(&peak));
    let v: serde_json::Value = serde_json::from_slice(&peak.stdout).unwrap();
    assert!(v["gflops"].as_f64().unwrap() > 0.0, "{v}");
}
