//! The `sdgen` command line: parses arguments, reports progress and errors,
//! and leaves the work to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod cli;

use anyhow::{bail, Context};
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use cli::{Cli, Command, Common, EditArgs};
use sdgen::editing::{self, Mask, Pads};
use sdgen::image_io::{read_image, read_mask_levels, write_png, Image, Parameters};
use sdgen::loading::locate::{locate, Located};
use sdgen::loading::Model;
use sdgen::pipeline::{Event, Init, Request};
use sdgen::sampling::samplers::Sampler;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, init) = match &cli.command {
        None => (&cli.common, read_init(None)),
        Some(command) => match command {
            Command::Img2img { common, .. } | Command::Inpaint { common, .. } | Command::Outpaint { common, .. } => {
                (common, read_init(Some(command)))
            }
        },
    };
    match init.and_then(|init| run(args, init)) {
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

fn resolve_model(args: &Common) -> anyhow::Result<PathBuf> {
    match locate(args.model.as_deref(), &args.models_dir)? {
        Located::Found(p) => Ok(p),
        Located::Nothing => download_default(args),
    }
}

#[cfg(feature = "download")]
fn download_default(args: &Common) -> anyhow::Result<PathBuf> {
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
fn download_default(args: &Common) -> anyhow::Result<PathBuf> {
    bail!(
        "no model in {}; put a .safetensors checkpoint or a diffusers folder there, or pass --model (this build cannot download)",
        args.models_dir.display()
    )
}

/// Reads and checks the input image and mask of an editing command, before
/// any model is loaded.
fn read_init(command: Option<&Command>) -> anyhow::Result<Init> {
    let image_of = |path: &Path| -> anyhow::Result<Image> { read_image(path) };
    let inpaint = |image: Image, mask: Mask, edit: &EditArgs| Init::Inpaint {
        image,
        mask,
        strength: edit.strength,
        mask_blur: edit.mask_blur,
    };
    Ok(match command {
        None => Init::Noise,
        Some(Command::Img2img { init_image, strength, common }) => {
            let mut image = image_of(init_image)?;
            let (w, h) = (common.width.unwrap_or(image.width), common.height.unwrap_or(image.height));
            if (w, h) != (image.width, image.height) {
                if w % 8 != 0 || h % 8 != 0 {
                    bail!("--width/--height must be multiples of 8, got {w}x{h}");
                }
                image = editing::resize(&image, w, h);
            }
            check_size(init_image, &image)?;
            Init::Image { image, strength: *strength }
        }
        Some(Command::Inpaint { image, mask, edit, common }) => {
            let pixels = image_of(image)?;
            check_size(image, &pixels)?;
            let (mw, mh, levels) = read_mask_levels(mask)?;
            if (mw, mh) != (pixels.width, pixels.height) {
                bail!(
                    "{}: the mask is {mw}x{mh} but the image {} is {}x{}",
                    mask.display(),
                    image.display(),
                    pixels.width,
                    pixels.height
                );
            }
            fixed_size(common, &pixels, "inpaint")?;
            inpaint(pixels, Mask::from_levels(mw, mh, &levels), edit)
        }
        Some(Command::Outpaint { image, pad, pad_left, pad_right, pad_top, pad_bottom, edit, common }) => {
            let pixels = image_of(image)?;
            let pads = Pads {
                left: pad_left.unwrap_or(*pad),
                right: pad_right.unwrap_or(*pad),
                top: pad_top.unwrap_or(*pad),
                bottom: pad_bottom.unwrap_or(*pad),
            };
            let (canvas, mask) = editing::outpaint_canvas(&pixels, pads)?;
            check_size(image, &canvas)?;
            fixed_size(common, &canvas, "outpaint")?;
            inpaint(canvas, mask, edit)
        }
    })
}

fn check_size(path: &Path, image: &Image) -> anyhow::Result<()> {
    if !image.width.is_multiple_of(8) || !image.height.is_multiple_of(8) {
        bail!(
            "{}: image is {}x{}; sizes must be multiples of 8 (img2img can resize with --width/--height)",
            path.display(),
            image.width,
            image.height
        );
    }
    Ok(())
}

/// Inpainting works at the input's size: --width/--height may only repeat it.
fn fixed_size(common: &Common, image: &Image, what: &str) -> anyhow::Result<()> {
    let (w, h) = (common.width.unwrap_or(image.width), common.height.unwrap_or(image.height));
    if (w, h) != (image.width, image.height) {
        bail!("{what} works at the image's size ({}x{}); --width/--height cannot change it", image.width, image.height);
    }
    Ok(())
}

fn run(args: &Common, init: Init) -> anyhow::Result<()> {
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
        init,
    };
    let input_size = match &request.init {
        Init::Noise => None,
        Init::Image { image, .. } | Init::Inpaint { image, .. } => Some((image.width, image.height)),
    };
    if let Some((w, h)) = input_size {
        (request.width, request.height) = (w, h);
    }
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
    if input_size.is_none() {
        request.width = args.width.unwrap_or(model.family.native_size());
        request.height = args.height.unwrap_or(model.family.native_size());
    }

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
        let image = model.generate(&req, &device, &mut events)?;
        bar.finish_and_clear();
        let params = Parameters { request: &req, model_name: &model.name, model_hash: &hash };
        write_png(out, &image, &params.infotext())?;
        if !args.quiet {
            println!("{} (seed {}, {:.1} s)", out.display(), req.seed, started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}
