//! Helpers shared by the integration tests: fixture paths, running a job
//! through the library (parity suites) or the built binary (CLI tests), and
//! comparing images level by level.
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
    let generating = !matches!(args.first(), Some(&("models" | "tokenize" | "samplers" | "convert" | "upscale")));
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
    record_compared(a, b);
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / a.as_raw().len() as f64)
}

/// With `SDGEN_PARITY_RECORD=DIR`, every pair of images a test compares is
/// logged by SHA-256 to `DIR/<suite>.<test>`: two runs (two commits) that
/// log the same lines produced bit-identical images.
fn record_compared(a: &image::RgbImage, b: &image::RgbImage) {
    use std::io::Write;
    let Some(dir) = std::env::var_os("SDGEN_PARITY_RECORD") else { return };
    let exe = std::env::current_exe().unwrap();
    let stem = exe.file_stem().unwrap().to_string_lossy();
    // Test binaries are named `<suite>-<build hash>`.
    let suite = stem.rsplit_once('-').map_or(&*stem, |(s, _)| s);
    let test = std::thread::current().name().unwrap_or("main").replace("::", "-");
    let path = Path::new(&dir).join(format!("{suite}.{test}"));
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    let hash = |i: &image::RgbImage| -> String {
        use sha2::Digest;
        sha2::Sha256::digest(i.as_raw()).iter().map(|b| format!("{b:02x}")).collect()
    };
    writeln!(f, "{} {}", hash(a), hash(b)).unwrap();
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

    /// Runs these options after `before` (a subcommand and its options, as
    /// the command line takes them) through the library, and returns the
    /// image written to `out`.
    pub fn run(&self, before: &[String], name: &str) -> image::RgbImage {
        let args: Vec<String> = before.iter().cloned().chain(self.args()).collect();
        run_library(&args).unwrap_or_else(|e| panic!("case {name}: {e:#}"));
        read_rgb(self.out)
    }
}

/// A session on the CPU over `models_dir`, offline, no model named yet.
pub fn cpu_session(models_dir: &Path) -> sdgen::settings::SessionSettings {
    sdgen::settings::SessionSettings {
        model: None,
        models_dir: models_dir.to_path_buf(),
        device: sdgen::device::DeviceSpec::Cpu,
        dtype: None,
        preset: None,
        prediction: None,
        vae_tiling: sdgen::models::vae::Tiling::Auto,
        loras: Vec::new(),
        vae: None,
        offline: true,
        quiet: true,
        batch_size: 1,
        swappable_loras: false,
        no_t5: false,
        text_encoders: Vec::new(),
        t5_tokenizer: None,
    }
}

/// What `sdgen [SUBCOMMAND] OPTIONS` does, through the library alone: the
/// options read by the library's parsers (`Settings::set`, the typed
/// settings' `FromStr`), the input images read, a session opened on the
/// CPU, and the job run into its PNG.
pub fn run_library(args: &[String]) -> anyhow::Result<()> {
    use sdgen::session::{self, InitSpec, RunOptions, Session};
    use sdgen::settings::Settings;
    let (mode, options) = match args.first().map(String::as_str) {
        Some(m @ ("img2img" | "inpaint" | "outpaint")) => (m, &args[1..]),
        _ => ("txt2img", args),
    };
    let mut settings = Settings::default();
    let mut opened = cpu_session(&fixture("no-models-here"));
    let (mut image, mut mask, mut out, mut pads) = (PathBuf::new(), PathBuf::new(), PathBuf::new(), [None; 4]);
    let mut strength = if mode == "img2img" { session::IMG2IMG_STRENGTH } else { session::INPAINT_STRENGTH };
    let mut mask_blur = 0.0;
    let mut words = options.iter();
    while let Some(word) = words.next() {
        let key = word.strip_prefix("--").unwrap_or_else(|| panic!("expected an option, got {word:?}"));
        if key == "quiet" {
            continue;
        }
        let value = words.next().unwrap_or_else(|| panic!("--{key} needs a value"));
        match key {
            "model" => opened.model = Some(value.clone()),
            "models-dir" => opened.models_dir = value.into(),
            "dtype" => opened.dtype = Some(value.parse()?),
            "prediction" => opened.prediction = Some(value.parse()?),
            "preset" => opened.preset = Some(value.parse()?),
            "lora" => opened.loras.push(value.parse()?),
            "vae" => opened.vae = Some(value.clone()),
            "batch-size" => opened.batch_size = value.parse()?,
            "no-t5" => opened.no_t5 = value.parse()?,
            "text-encoder" => opened.text_encoders.push(value.into()),
            "t5-tokenizer" => opened.t5_tokenizer = Some(value.into()),
            "init-image" | "image" => image = value.into(),
            "mask" => mask = value.into(),
            "strength" => strength = value.parse()?,
            "mask-blur" => mask_blur = value.parse()?,
            "pad-left" | "pad-right" | "pad-top" | "pad-bottom" => {
                let side = ["pad-left", "pad-right", "pad-top", "pad-bottom"].iter().position(|k| *k == key);
                pads[side.expect("a side")] = Some(value.parse()?);
            }
            "out" => out = value.into(),
            _ => settings.set(key, value)?,
        }
    }
    let [left, right, top, bottom] = pads.map(|p| p.unwrap_or(0));
    let spec = match mode {
        "img2img" => InitSpec::Img2img { image, strength },
        "inpaint" => InitSpec::Inpaint { image, mask, strength, mask_blur },
        "outpaint" => {
            let pads = sdgen::editing::Pads { left, right, top, bottom };
            InitSpec::Outpaint { image, pads, strength, mask_blur }
        }
        _ => InitSpec::Noise,
    };
    let job = session::SingleJob::prepare(settings, &spec, out)?;
    let (session, _) = Session::open(&opened, &job.prompt_loras()?.0, job.size_asked(), &mut |_| {})?;
    let jobs = job.jobs(&session)?;
    let options = RunOptions { batch_size: opened.batch_size, ..RunOptions::default() };
    session.run(&jobs, &options, &mut |_| Ok(()))?;
    Ok(())
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
    sdgen::ops::cases::relative_error(actual, expected).unwrap()
}

/// Module parity tolerance: fp32 round-off only (both sides compute in f32
/// with different op orders).
pub const TOLERANCE: f32 = 1e-4;
