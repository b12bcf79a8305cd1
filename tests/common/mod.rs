//! Helpers shared by the integration tests: fixture paths, running the
//! built binary, and comparing images level by level.
#![allow(dead_code)] // each test crate uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fixture path (under tests/fixtures).
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// Runs `sdgen` with `args` on the CPU, without a models dir or network
/// (the listing commands run nothing and take neither option).
pub fn sdgen(args: &[&str]) -> Output {
    let generating = !matches!(args.first(), Some(&("models" | "tokenize" | "samplers")));
    let defaults: &[&str] = if generating { &["--device", "cpu", "--offline"] } else { &[] };
    Command::new(env!("CARGO_BIN_EXE_sdgen"))
        .args(args)
        .args(defaults)
        .env("SDGEN_MODELS_DIR", fixture("no-models-here"))
        .output()
        .expect("sdgen runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn read_rgb(path: &Path) -> image::RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8()
}

/// Largest and mean absolute difference in 8-bit levels.
pub fn level_diff(a: &image::RgbImage, b: &image::RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / a.as_raw().len() as f64)
}

/// The parity tolerance: at most 3 levels anywhere and 0.5 on average.
pub const MAX_LEVELS: u8 = 3;
pub const MEAN_LEVELS: f64 = 0.5;

/// The options every reference case sets, as sdgen arguments.
pub struct Job<'a> {
    pub model: &'a Path,
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub seed: u64,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: &'a str,
    pub out: &'a Path,
}

impl Job<'_> {
    pub fn args(&self) -> Vec<String> {
        let pairs = [
            ("--model", self.model.to_str().unwrap().to_string()),
            ("--prompt", self.prompt.to_string()),
            ("--negative-prompt", self.negative_prompt.to_string()),
            ("--seed", self.seed.to_string()),
            ("--steps", self.steps.to_string()),
            ("--cfg-scale", self.cfg_scale.to_string()),
            ("--sampler", self.sampler.to_string()),
            ("--out", self.out.to_str().unwrap().to_string()),
        ];
        let mut args: Vec<String> = pairs.into_iter().flat_map(|(k, v)| [k.to_string(), v]).collect();
        // The references come from plain diffusers: literal prompts.
        args.extend(["--prompt-syntax".into(), "plain".into(), "--quiet".into()]);
        args
    }

    /// Runs sdgen with these options after `before` (a subcommand and its
    /// options) and returns the image it wrote.
    pub fn run(&self, before: &[String], name: &str) -> image::RgbImage {
        let args: Vec<String> = before.iter().cloned().chain(self.args()).collect();
        let o = sdgen(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "case {name}: sdgen failed: {}", stderr(&o));
        read_rgb(self.out)
    }
}

/// The fields every txt2img-style reference case has (cases.json of the
/// reference suites); suites add their own with `#[serde(flatten)]`.
#[derive(serde::Deserialize)]
pub struct PromptCase {
    pub name: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub cfg_scale: f64,
    pub width: usize,
    pub height: usize,
    pub sampler: String,
    pub png: String,
}

impl PromptCase {
    pub fn job<'a>(&'a self, model: &'a Path, out: &'a Path) -> Job<'a> {
        Job {
            model,
            prompt: &self.prompt,
            negative_prompt: self.negative_prompt.as_deref().unwrap_or(""),
            seed: self.seed,
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            sampler: &self.sampler,
            out,
        }
    }

    /// `--width W --height H`.
    pub fn size_args(&self) -> Vec<String> {
        vec!["--width".into(), self.width.to_string(), "--height".into(), self.height.to_string()]
    }
}

/// A reference case: the common fields and a suite's own (`extra`).
#[derive(serde::Deserialize)]
pub struct CaseWith<E> {
    #[serde(flatten)]
    pub base: PromptCase,
    #[serde(flatten)]
    pub extra: E,
}

impl<E> std::ops::Deref for CaseWith<E> {
    type Target = PromptCase;
    fn deref(&self) -> &PromptCase {
        &self.base
    }
}

/// The `cases` list of a reference suite's JSON file.
pub fn read_cases<T: serde::de::DeserializeOwned>(rel: &str) -> Vec<T> {
    #[derive(serde::Deserialize)]
    struct Cases<T> {
        cases: Vec<T>,
    }
    let text = std::fs::read_to_string(fixture(rel)).unwrap();
    serde_json::from_str::<Cases<T>>(&text).unwrap().cases
}

/// Compares each case's image with its reference, prints the difference, and
/// fails at the end listing every case beyond the parity tolerance.
#[derive(Default)]
pub struct Parity(Vec<String>);

impl Parity {
    pub fn check(&mut self, name: &str, ours: &image::RgbImage, reference: &image::RgbImage) {
        let (max, mean) = level_diff(ours, reference);
        eprintln!("{name:<28} max {max:>3} mean {mean:.4}");
        if max > MAX_LEVELS || mean > MEAN_LEVELS {
            self.0.push(format!("{name}: max {max}, mean {mean:.3}"));
        }
    }

    pub fn assert_within_tolerance(self) {
        assert!(self.0.is_empty(), "beyond tolerance (max {MAX_LEVELS}, mean {MEAN_LEVELS}): {:?}", self.0);
    }
}

/// Max |a − b| relative to the reference's largest magnitude.
pub fn relative_error(actual: &candle_core::Tensor, expected: &candle_core::Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims());
    let diff = (actual - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    diff / scale
}

/// Module parity tolerance: fp32 round-off only (both sides compute in f32
/// with different op orders).
pub const TOLERANCE: f32 = 1e-4;
