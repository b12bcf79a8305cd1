//! The `sdgen` command line: parses arguments, reports progress and errors,
//! and leaves the work to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use sdgen::image_io::{write_png, Parameters};
use sdgen::loading::locate::{locate, Located};
use sdgen::loading::Model;
use sdgen::pipeline::{Event, Request};
use sdgen::sampling::samplers::Sampler;

/// Stable Diffusion text-to-image on the command line.
#[derive(Debug, Parser)]
#[command(name = "sdgen", version, about, max_term_width = 100)]
struct Args {
    /// Model: a .safetensors checkpoint, a diffusers folder, or a name in the
    /// models dir. Default: the only model there (downloaded on first use).
    #[arg(long, value_name = "NAME|PATH")]
    model: Option<String>,
    /// Where models live [default: $SDGEN_MODELS_DIR, else ./models].
    #[arg(
        long,
        value_name = "DIR",
        env = "SDGEN_MODELS_DIR",
        default_value = "models",
        hide_default_value = true,
        hide_env = true
    )]
    models_dir: PathBuf,
    /// What to draw.
    #[arg(long, short)]
    prompt: String,
    /// What to steer away from.
    #[arg(long, short, default_value = "")]
    negative_prompt: String,
    /// Random seed [default: random, printed and stored in the PNG].
    #[arg(long, short)]
    seed: Option<u64>,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Classifier-free guidance scale; 1 or less runs the prompt alone.
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    cfg_scale: f64,
    /// Image width in pixels, a multiple of 8 [default: the model's native size].
    #[arg(long, short = 'W')]
    width: Option<usize>,
    /// Image height in pixels, a multiple of 8 [default: the model's native size].
    #[arg(long, short = 'H')]
    height: Option<usize>,
    /// Sampler: euler, euler_a or ddim.
    #[arg(long, default_value = "euler_a")]
    sampler: String,
    /// Number of images; image i uses seed + i.
    #[arg(long, default_value_t = 1)]
    batch_count: usize,
    /// auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32, f16 or bf16 [default: f32 on CPU, f16 on GPU].
    #[arg(long)]
    dtype: Option<String>,
    /// Output PNG; with --batch-count N > 1, NAME-0.png … NAME-(N-1).png.
    #[arg(long, short, default_value = "sdgen.png")]
    out: PathBuf,
    /// Never download a model (also: HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// No progress bars and no summary.
    #[arg(long, short)]
    quiet: bool,
    /// Also list the checkpoint tensors the model did not use.
    #[arg(long, short)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: each cause's first line (candle appends backtraces).
            let causes: Vec<String> =
                e.chain().map(|c| c.to_string().lines().next().unwrap_or_default().trim().to_string()).collect();
            eprintln!("error: {}", causes.join(": "));
            ExitCode::FAILURE
        }
    }
}

/// Output paths for a batch: the path itself, or `stem-i.ext` for several.
fn output_paths(out: &Path, count: usize) -> Vec<PathBuf> {
    if count == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    (0..count).map(|i| out.with_file_name(format!("{stem}-{i}.png"))).collect()
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    // A1111 and ComfyUI show 32-bit seeds; only the low 32 bits seed torch's generator anyway.
    h.finish() & 0xffff_ffff
}

fn spinner(quiet: bool, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, draw_target(quiet));
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn draw_target(quiet: bool) -> ProgressDrawTarget {
    if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    }
}

fn resolve_model(args: &Args) -> anyhow::Result<PathBuf> {
    match locate(args.model.as_deref(), &args.models_dir)? {
        Located::Found(p) => Ok(p),
        Located::Nothing => download_default(args),
    }
}

#[cfg(feature = "download")]
fn download_default(args: &Args) -> anyhow::Result<PathBuf> {
    use sdgen::loading::hub;
    if args.offline || hub::offline_from_env() {
        bail!(
            "no model in {} and downloads are off (--offline / HF_HUB_OFFLINE); put a .safetensors checkpoint or a diffusers folder there, or pass --model",
            args.models_dir.display()
        );
    }
    eprintln!(
        "No model in {}: downloading {} ({}) from the Hugging Face hub …",
        args.models_dir.display(),
        hub::DEFAULT_REPO,
        hub::DEFAULT_SIZE
    );
    std::fs::create_dir_all(&args.models_dir)
        .with_context(|| format!("{}: cannot create", args.models_dir.display()))?;
    hub::download_default(&args.models_dir, !args.quiet)
}

#[cfg(not(feature = "download"))]
fn download_default(args: &Args) -> anyhow::Result<PathBuf> {
    bail!(
        "no model in {}; put a .safetensors checkpoint or a diffusers folder there, or pass --model (this build cannot download)",
        args.models_dir.display()
    )
}

fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let sampler = Sampler::parse(&args.sampler)?;
    if args.batch_count == 0 {
        bail!("--batch-count must be at least 1");
    }
    let outs = output_paths(&args.out, args.batch_count);
    if args.out.extension().is_none_or(|e| !e.eq_ignore_ascii_case("png")) {
        bail!("{}: output must be a .png file", args.out.display());
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("{}: output folder {} does not exist", args.out.display(), dir.display());
        }
    }
    let seed = args.seed.unwrap_or_else(random_seed);
    // Check sizes before loading; the native size is known only afterwards.
    let mut request = Request {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        seed,
        steps: args.steps,
        cfg_scale: args.cfg_scale,
        width: args.width.unwrap_or(8),
        height: args.height.unwrap_or(8),
        sampler,
    };
    request.validate()?;
    let device = sdgen::device::parse_device(&args.device)?;
    let dtype = sdgen::device::parse_dtype(args.dtype.as_deref(), &device)?;

    let path = resolve_model(args)?;
    let loading = spinner(args.quiet, "loading model");
    let model = Model::load(&path, &device, dtype)?;
    let hash = model.hash()?;
    loading.finish_and_clear();
    if !args.quiet {
        let unused = match (model.unused.len(), args.verbose) {
            (0, _) => String::new(),
            (n, false) => format!("; {n} stored tensors unused (--verbose lists them)"),
            (n, true) => format!("; {n} stored tensors unused:"),
        };
        eprintln!("loaded {} ({}){unused}", path.display(), model.family.name());
        if args.verbose {
            for name in &model.unused {
                eprintln!("  {name}");
            }
        }
    }
    request.width = args.width.unwrap_or(model.family.native_size());
    request.height = args.height.unwrap_or(model.family.native_size());

    for (i, out) in outs.iter().enumerate() {
        let req = Request { seed: seed.wrapping_add(i as u64), ..request.clone() };
        let bar = ProgressBar::with_draw_target(Some(req.steps as u64), draw_target(args.quiet));
        bar.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message("encoding");
        let quiet = args.quiet;
        let mut events = |e: Event| match e {
            Event::Warning(w) => {
                if !quiet {
                    bar.suspend(|| eprintln!("warning: {w}"));
                }
            }
            Event::EncodingText => bar.set_message("encoding"),
            Event::Step { done, .. } => {
                bar.set_message("denoising");
                bar.set_position(done as u64);
            }
            Event::Decoding => bar.set_message("decoding"),
        };
        let image = model.txt2img(&req, &device, &mut events)?;
        bar.finish_and_clear();
        let params = Parameters { request: &req, model_name: &model.name, model_hash: &hash };
        write_png(out, &image, &params.infotext())?;
        if !args.quiet {
            println!("{} (seed {}, {:.1} s)", out.display(), req.seed, started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}
