//! The `sdgen` command line: parses arguments, reports progress and errors,
//! and leaves the work to the library.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod cli;

use anyhow::{bail, Context};
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use cli::{Cli, Command, Common, DevCommand, EditArgs};
use sdgen::editing::{self, Mask, Pads};
use sdgen::failure::{Failure, Tag};
use sdgen::image_io::{read_image, read_mask_levels, write_png, Image};
use sdgen::infotext::Parameters;
use sdgen::loading::locate::{locate, Located};
use sdgen::loading::lora::{self, LoraSpec};
use sdgen::loading::Model;
use sdgen::loading::{Adapters, Defaults, Preset, STANDARD_512};
use sdgen::pipeline::{Event, Init, Request};
use sdgen::prompt::Syntax;
use sdgen::sampling::denoiser::Prediction;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        None => read_init(None)
            .tag(Failure::Input)
            .and_then(|init| run_single(&cli.common, init))
            .map(|_| ExitCode::SUCCESS),
        Some(Command::Batch { file, out_dir, shard, force, common }) => {
            run_batch(file, out_dir, shard.as_deref(), *force, common)
        }
        Some(Command::Replay { image, common }) => run_replay(image, common).map(|_| ExitCode::SUCCESS),
        Some(Command::Samplers) => {
            list_samplers();
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Models { models, json }) => list_models(&models.models_dir, *json),
        Some(Command::Tokenize { prompt, model, models, prompt_syntax, json }) => {
            tokenize(prompt, model.as_deref(), &models.models_dir, prompt_syntax.as_deref(), *json)
                .map(|_| ExitCode::SUCCESS)
        }
        Some(Command::Dev(DevCommand::RandomModel { family, out, seed })) => {
            sdgen::random_model::write(family, out, *seed).map(|_| ExitCode::SUCCESS)
        }
        Some(Command::Dev(DevCommand::UnetBench { model, size, batch, passes, no_decode, device, dtype })) => {
            unet_bench(model, *size, *batch, *passes, !*no_decode, device, dtype.as_deref()).map(|_| ExitCode::SUCCESS)
        }
        Some(Command::Dev(DevCommand::MatmulPeak { size, repeat, device, dtype })) => {
            matmul_peak(*size, *repeat, device, dtype.as_deref()).map(|_| ExitCode::SUCCESS)
        }
        Some(
            command @ (Command::Img2img { common, .. }
            | Command::Inpaint { common, .. }
            | Command::Outpaint { common, .. }),
        ) => read_init(Some(command))
            .tag(Failure::Input)
            .and_then(|init| run_single(common, init))
            .map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: each cause's first line (candle appends backtraces).
            let causes: Vec<String> = e
                .chain()
                .map(|c| c.to_string().lines().next().unwrap_or_default().trim().to_string())
                .filter(|c| !c.is_empty())
                .collect();
            eprintln!("error: {}", causes.join(": "));
            ExitCode::from(Failure::of(&e).map_or(1, Failure::code))
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
    match locate(args.model.as_deref(), &args.models.models_dir)? {
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
            args.models.models_dir.display()
        );
    }
    eprintln!(
        "No model in {}: downloading {} ({}) from the Hugging Face hub …",
        args.models.models_dir.display(),
        hub::DEFAULT_REPO,
        hub::DEFAULT_SIZE
    );
    std::fs::create_dir_all(&args.models.models_dir)
        .with_context(|| format!("{}: cannot create", args.models.models_dir.display()))?;
    hub::download_default(&args.models.models_dir, !args.quiet)
}

#[cfg(not(feature = "download"))]
fn download_default(args: &Common) -> anyhow::Result<PathBuf> {
    bail!(
        "no model in {}; put a .safetensors checkpoint or a diffusers folder there, or pass --model (this build cannot download)",
        args.models.models_dir.display()
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
        None
        | Some(
            Command::Batch { .. }
            | Command::Replay { .. }
            | Command::Samplers
            | Command::Models { .. }
            | Command::Tokenize { .. }
            | Command::Dev(_),
        ) => Init::Noise,
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

/// The model, its hash and the device, loaded as `args` say.
struct Loaded {
    model: Model,
    hash: String,
    device: candle_core::Device,
}

/// `size`: the image size when an input image fixes it.
fn load(
    args: &Common,
    path: PathBuf,
    device: candle_core::Device,
    size: Option<(usize, usize)>,
) -> anyhow::Result<Loaded> {
    let dtype = sdgen::device::parse_dtype(args.dtype.as_deref(), &device)?;
    // Fail before loading what cannot fit (CPU memory; GPUs report their own errors).
    if device.is_cpu() {
        if let Some(available) = sdgen::memory::available() {
            let native = sdgen::memory::native_side(&path);
            let (w, h) = size.unwrap_or((args.width.unwrap_or(native), args.height.unwrap_or(native)));
            let need = sdgen::memory::estimate(&path, dtype, w, h, 2 * args.batch_size.unwrap_or(1))?;
            sdgen::memory::check(&need, available, dtype, w, h)
                .tag(Failure::Device)
                .with_context(|| path.display().to_string())?;
        }
    }
    let loading = spinner(args.quiet, "loading model");
    let tiling = sdgen::models::vae::Tiling::parse(&args.vae_tiling)?;
    let prediction = args.prediction.as_deref().map(Prediction::parse).transpose().context("--prediction")?;
    let preset = args.preset.as_deref().map(Preset::parse).transpose()?;
    let mut model = Model::load_with(&path, &device, dtype, &adapters(args)?)?;
    model.vae.tiling = tiling;
    if let Some(p) = prediction {
        model.prediction = p;
    }
    if let Some(p) = preset {
        model.preset = p;
    }
    let hash = model.hash()?;
    loading.finish_and_clear();
    if args.verbose {
        for skipped in &model.applied.embeddings_skipped {
            eprintln!("embedding skipped: {skipped}");
        }
    }
    for (line, complete) in &model.applied.lora_report {
        if !complete {
            eprintln!("warning: {line}");
        } else if !args.quiet {
            eprintln!("{line}");
        }
    }
    if !args.quiet {
        let unused = match (model.unused.len(), args.verbose) {
            (0, _) => String::new(),
            (n, false) => format!("; {n} stored tensors unused (--verbose lists them)"),
            (n, true) => format!("; {n} stored tensors unused:"),
        };
        eprintln!(
            "loaded {} ({}, {}-prediction){unused}",
            path.display(),
            model.family.name(),
            model.prediction.name()
        );
        if args.verbose {
            for name in &model.unused {
                eprintln!("  {name}");
            }
        }
    }
    Ok(Loaded { model, hash, device })
}

/// The `<lora:…>` tags of a prompt, in order, as one string.
fn lora_tags(prompt: &str) -> anyhow::Result<String> {
    let tags = sdgen::prompt::network_tags(prompt)?;
    Ok(tags.iter().map(|t| format!("<{}:{}:{}>", t.kind, t.name, t.weight)).collect::<Vec<_>>().join(""))
}

/// `--vae`: a path, or a name in <models>/VAE/ or <models>/vae/.
fn vae(args: &Common) -> anyhow::Result<Option<PathBuf>> {
    let Some(name) = &args.vae else { return Ok(None) };
    let direct = PathBuf::from(name);
    if direct.is_file() {
        return Ok(Some(direct));
    }
    for sub in ["VAE", "vae"] {
        for candidate in [
            args.models.models_dir.join(sub).join(format!("{name}.safetensors")),
            args.models.models_dir.join(sub).join(name),
        ] {
            if candidate.is_file() {
                return Ok(Some(candidate));
            }
        }
    }
    bail!("--vae {name:?}: no such file, and not in {}/VAE", args.models.models_dir.display())
}

/// The LoRAs of `--lora` and of the prompt's `<lora:…>` tags (A1111 syntax),
/// the embeddings folder and `--vae`.
fn adapters(args: &Common) -> anyhow::Result<Adapters> {
    let mut loras: Vec<LoraSpec> =
        args.lora.iter().map(|l| lora::parse_spec(l, &args.models.models_dir)).collect::<anyhow::Result<_>>()?;
    let syntax = args.prompt_syntax.as_deref().map(Syntax::parse).transpose()?.unwrap_or_default();
    if let (Some(prompt), Syntax::A1111) = (&args.prompt, syntax) {
        for tag in sdgen::prompt::network_tags(prompt)? {
            match tag.kind.as_str() {
                "lora" | "lyco" => {
                    loras.push(LoraSpec { path: lora::locate(&tag.name, &args.models.models_dir)?, weight: tag.weight })
                }
                other => eprintln!("warning: <{other}:{}> in the prompt is ignored (sdgen runs LoRAs only)", tag.name),
            }
        }
    }
    Ok(Adapters { loras, embeddings: Some(args.models.models_dir.join("embeddings")), vae: vae(args)? })
}

/// A progress bar over one image's steps, fed by pipeline events.
struct StepBar {
    bar: ProgressBar,
    quiet: bool,
}

impl StepBar {
    fn new(target: ProgressDrawTarget, steps: usize, quiet: bool) -> Self {
        let bar = ProgressBar::with_draw_target(Some(steps as u64), target);
        bar.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Self { bar, quiet }
    }

    fn event(&self, e: Event) {
        match e {
            Event::Warning(w) => {
                if !self.quiet {
                    self.bar.suspend(|| eprintln!("warning: {w}"));
                }
            }
            Event::EncodingText => self.bar.set_message("encoding"),
            Event::Step { done, total } => {
                self.bar.set_length(total as u64);
                self.bar.set_message("denoising");
                self.bar.set_position(done as u64);
            }
            Event::Sampling => self.bar.set_message("denoising"),
            Event::Decoding => self.bar.set_message("decoding"),
        }
    }
}

fn check_out_path(out: &Path) -> anyhow::Result<()> {
    if out.extension().is_none_or(|e| !e.eq_ignore_ascii_case("png")) {
        bail!("{}: output must be a .png file", out.display());
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("{}: output folder {} does not exist", out.display(), dir.display());
        }
    }
    Ok(())
}

/// The request the common options describe; what they leave out comes from
/// `defaults` (the model's), the size from the input image if there is one.
fn request_from(args: &Common, init: Init, seed: u64, defaults: &Defaults) -> anyhow::Result<Request> {
    let input = match &init {
        Init::Noise => None,
        Init::Image { image, .. } | Init::Inpaint { image, .. } => Some((image.width, image.height)),
    };
    let (w, h) = input.unwrap_or((args.width.unwrap_or(defaults.size), args.height.unwrap_or(defaults.size)));
    let (sampler, schedule) =
        sdgen::sampling::samplers::resolve(args.sampler.as_deref(), args.schedule.as_deref(), defaults.sampling())?;
    // Parsed as a batch job's options are.
    let (text, size_conditioning) = args.job_defaults().text_and_size()?;
    let request = Request {
        prompt: args.prompt.clone().context("--prompt is required")?,
        negative_prompt: args.negative_prompt.clone().unwrap_or_default(),
        seed,
        steps: args.steps.unwrap_or(defaults.steps),
        cfg_scale: args.cfg_scale.unwrap_or(defaults.cfg_scale),
        width: w,
        height: h,
        sampler,
        schedule,
        init,
        size_conditioning,
        text,
    };
    request.validate()?;
    Ok(request)
}

/// txt2img and the editing commands: one job, `--batch-count` images,
/// `--batch-size` of them at a time.
fn run_single(args: &Common, init: Init) -> anyhow::Result<()> {
    let started = Instant::now();
    let count = args.batch_count.unwrap_or(1);
    if !(1..=sdgen::batch::MAX_BATCH_COUNT).contains(&count) {
        return Err(anyhow::anyhow!(
            "--batch-count must be between 1 and {}, got {count}",
            sdgen::batch::MAX_BATCH_COUNT
        ))
        .tag(Failure::Usage);
    }
    let batch_size = batch_size(args).tag(Failure::Usage)?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("sdgen.png"));
    check_out_path(&out).tag(Failure::Output)?;
    let seed = args.seed.unwrap_or_else(random_seed);
    // Bad options fail before the (slow) load; the model's defaults come after.
    request_from(args, init.clone(), seed, &STANDARD_512).tag(Failure::Usage)?;
    let device = sdgen::device::parse_device(&args.device).tag(Failure::Device)?;
    let load_started = Instant::now();
    let size = match &init {
        Init::Noise => None,
        Init::Image { image, .. } | Init::Inpaint { image, .. } => Some((image.width, image.height)),
    };
    let Loaded { model, hash, device } =
        load(args, resolve_model(args).tag(Failure::Model)?, device, size).tag(Failure::Model)?;
    let mut timings = Timings { load: load_started.elapsed().as_secs_f64(), ..Timings::default() };
    let request = request_from(args, init, seed, &model.defaults()).tag(Failure::Usage)?;
    let outs = output_paths(&out, count);
    for (c, chunk) in outs.chunks(batch_size).enumerate() {
        let reqs: Vec<Request> = (0..chunk.len())
            .map(|i| Request { seed: request.seed.wrapping_add((c * batch_size + i) as u64), ..request.clone() })
            .collect();
        let bar = StepBar::new(draw_target(args.quiet), request.steps, args.quiet);
        let images = model
            .generate_batch(&reqs, &device, &mut |e| {
                if args.timings {
                    // GPU work is queued: wait for it so each phase gets its own time.
                    device.synchronize().ok();
                    timings.event(&e);
                }
                bar.event(e)
            })
            .tag(Failure::Device)?;
        timings.finish();
        bar.bar.finish_and_clear();
        for ((out, req), image) in chunk.iter().zip(&reqs).zip(&images) {
            let params = Parameters {
                request: req,
                model_name: &model.name,
                model_hash: &hash,
                family: model.family.name(),
                applied: &model.applied,
            };
            write_png(out, image, &params.infotext()).tag(Failure::Output)?;
            if !args.quiet {
                println!("{} (seed {}, {:.1} s)", out.display(), req.seed, started.elapsed().as_secs_f64());
            }
        }
    }
    if args.timings {
        timings.total = started.elapsed().as_secs_f64();
        eprintln!("{}", timings.json());
    }
    Ok(())
}

fn batch_size(args: &Common) -> anyhow::Result<usize> {
    match args.batch_size.unwrap_or(1) {
        0 => bail!("--batch-size must be at least 1"),
        n => Ok(n),
    }
}

/// Wall-clock seconds per phase, from the times of the pipeline's events.
#[derive(Default)]
struct Timings {
    load: f64,
    encode: f64,
    steps: Vec<f64>,
    decode: f64,
    total: f64,
    /// The last event's time.
    last: Option<Instant>,
}

impl Timings {
    fn event(&mut self, e: &Event) {
        let now = Instant::now();
        let since = self.last.map_or(0.0, |t| (now - t).as_secs_f64());
        match e {
            Event::Warning(_) => return,
            Event::EncodingText => {}
            Event::Sampling => self.encode += since,
            Event::Step { .. } => self.steps.push(since),
            // Decoding runs from here to the end.
            Event::Decoding => {}
        }
        self.last = Some(now);
    }

    fn finish(&mut self) {
        if let Some(t) = self.last.take() {
            self.decode += t.elapsed().as_secs_f64();
        }
    }

    fn json(&self) -> String {
        let peak = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<u64>().ok());
        serde_json::json!({
            "load_s": self.load,
            "text_encode_s": self.encode,
            "unet_steps_s": self.steps,
            "vae_decode_s": self.decode,
            "total_s": self.total,
            "peak_rss_mb": peak.map(|kb| kb / 1024),
        })
        .to_string()
    }
}

/// Exit status of a batch stopped by Ctrl-C (128 + SIGINT, as shells report it).
const INTERRUPTED: u8 = 130;

fn run_batch(file: &Path, out_dir: &Path, shard: Option<&str>, force: bool, args: &Common) -> anyhow::Result<ExitCode> {
    use sdgen::batch::{self, BatchEvent, Manifest, RunOptions, Shard};
    let started = Instant::now();
    let defaults = args.job_defaults();
    let jobs = batch::read_jobs(file, &defaults).tag(Failure::Input)?;
    if jobs.is_empty() {
        eprintln!("{}: no jobs in the file; nothing to do", file.display());
        return Ok(ExitCode::SUCCESS);
    }
    let batch_size = batch_size(args).tag(Failure::Usage)?;
    let shard = shard.map(Shard::parse).transpose().tag(Failure::Usage)?;
    let base_seed = args.seed.unwrap_or_else(|| {
        let s = random_seed();
        eprintln!("base seed {s} (pass --seed {s} to reproduce this batch)");
        s
    });
    let planned = batch::plan(&jobs, &defaults, base_seed, shard);
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create", out_dir.display()))
        .tag(Failure::Output)?;
    let manifest_name = shard.map_or_else(|| "manifest.jsonl".to_string(), |s| s.manifest_name());
    let mut manifest = Manifest::open(&out_dir.join(manifest_name), force).tag(Failure::Output)?;
    if planned.iter().all(|p| manifest.is_done(out_dir, &p.file)) {
        eprintln!("all {} images are already done in {}", planned.len(), out_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let device = sdgen::device::parse_device(&args.device).tag(Failure::Device)?;
    // The model loads once, so every job must ask for the same LoRAs; they
    // are read like a single run's `<lora:…>` tags.
    let tags: BTreeSet<String> = planned
        .iter()
        .map(|p| lora_tags(p.options.prompt.as_deref().unwrap_or_default()))
        .collect::<anyhow::Result<_>>()
        .tag(Failure::Input)?;
    if tags.len() > 1 {
        return Err(anyhow::anyhow!(
            "{}: jobs use different <lora:…> tags; sdgen loads one set per batch: split the file by LoRA",
            file.display()
        ))
        .tag(Failure::Input);
    }
    let with_tags = Common { prompt: tags.into_iter().next(), ..args.clone() };
    let Loaded { model, hash, device } =
        load(&with_tags, resolve_model(args).tag(Failure::Model)?, device, None).tag(Failure::Model)?;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(INTERRUPTED as i32);
        }
        eprintln!("\nstopping after the current image (Ctrl-C again to quit now)");
    })
    .context("cannot install the Ctrl-C handler")?;

    let bars = indicatif::MultiProgress::with_draw_target(draw_target(args.quiet));
    let overall = bars.add(ProgressBar::new(planned.len() as u64));
    overall.set_style(
        ProgressStyle::with_template("images [{bar:30}] {pos}/{len} ETA {eta} {msg}").expect("valid template"),
    );
    let steps = bars.add(ProgressBar::new(1));
    let step_bar = StepBar { bar: steps, quiet: args.quiet };
    step_bar.bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {per_sec}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let options = RunOptions { out_dir, batch_size, model_hash: &hash, stop: &stop };
    let summary = batch::run(&model, &device, &planned, &mut manifest, &options, &mut |e| match e {
        BatchEvent::Started { files, done, .. } => {
            overall.set_position(done as u64);
            overall.set_message(files.join(" "));
        }
        BatchEvent::Pipeline(e) => step_bar.event(e),
        BatchEvent::Finished { .. } => overall.inc(1),
        BatchEvent::Failed { file, error } => {
            overall.inc(1);
            bars.suspend(|| eprintln!("{file}: failed: {error}"));
        }
    })?;
    bars.clear().ok();
    eprintln!(
        "{} done, {} skipped, {} failed{} in {:.1} s ({})",
        summary.done,
        summary.skipped,
        summary.failed,
        if summary.interrupted { ", interrupted" } else { "" },
        started.elapsed().as_secs_f64(),
        out_dir.display()
    );
    Ok(if summary.interrupted {
        ExitCode::from(INTERRUPTED)
    } else if summary.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Median seconds of `repeat` runs of `f` after one warm-up, waiting for the
/// device after each.
fn time_median(
    device: &candle_core::Device,
    repeat: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    device.synchronize()?;
    let mut times: Vec<f64> = (0..repeat.max(1))
        .map(|_| {
            let t = Instant::now();
            f()?;
            device.synchronize()?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect::<anyhow::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// UNet passes and a VAE decode alone, without text encoding or sampling.
fn unet_bench(
    model: &Path,
    size: usize,
    batch: usize,
    passes: usize,
    decode: bool,
    device: &str,
    dtype: Option<&str>,
) -> anyhow::Result<()> {
    use candle_core::Tensor;
    if size == 0 || !size.is_multiple_of(8) || size > sdgen::image_io::MAX_SIDE as usize {
        bail!("--size must be a multiple of 8 between 8 and {}, got {size}", sdgen::image_io::MAX_SIDE);
    }
    if !(1..=64).contains(&batch) {
        bail!("--batch must be between 1 and 64, got {batch}");
    }
    let device = sdgen::device::parse_device(device)?;
    let dtype = sdgen::device::parse_dtype(dtype, &device)?;
    let m = sdgen::loading::Model::load(model, &device, dtype)?;
    let side = size / m.vae.config.downscale();
    let latents = Tensor::randn(0f32, 1.0, (batch, m.unet.config.in_channels, side, side), &device)?.to_dtype(dtype)?;
    let context = Tensor::zeros((batch, 77, m.unet.config.cross_attention_dim), dtype, &device)?;
    let unet_s = time_median(&device, passes, || Ok(m.unet.forward(&latents, 500.0, &context, None).map(|_| ())?))?;
    let decode_s = if decode {
        let one =
            latents.narrow(0, 0, 1)?.narrow(1, 0, m.vae.config.latent_channels)?.to_dtype(candle_core::DType::F32)?;
        Some(time_median(&device, 1, || Ok(m.vae.decode(&one).map(|_| ())?))?)
    } else {
        None
    };
    println!(
        "{}",
        serde_json::json!({"device": format!("{:?}", device.location()), "dtype": format!("{dtype:?}").to_lowercase(),
            "size": size, "batch": batch, "unet_pass_s": unet_s, "vae_decode_s": decode_s})
    );
    Ok(())
}

/// Times `size³` matrix products on the chosen device after one warm-up.
fn matmul_peak(size: usize, repeat: usize, device: &str, dtype: Option<&str>) -> anyhow::Result<()> {
    use candle_core::Tensor;
    if !(1..=32768).contains(&size) {
        bail!("--size must be between 1 and 32768, got {size}");
    }
    let device = sdgen::device::parse_device(device)?;
    let dtype = sdgen::device::parse_dtype(dtype, &device)?;
    let a = Tensor::randn(0f32, 1.0, (size, size), &device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (size, size), &device)?.to_dtype(dtype)?;
    let median = time_median(&device, repeat, || Ok(a.matmul(&b).map(|_| ())?))?;
    let gflops = 2.0 * (size as f64).powi(3) / median / 1e9;
    println!(
        "{}",
        serde_json::json!({"device": format!("{:?}", device.location()), "size": size,
            "dtype": format!("{dtype:?}").to_lowercase(), "median_s": median,
            "gflops": gflops, "threads": candle_core::utils::get_num_threads()})
    );
    Ok(())
}

/// `sdgen models`: a table (or JSON lines) of what the models dir holds; a
/// model that cannot be read is reported on stderr and makes the exit
/// status non-zero, after the others are listed.
fn list_models(models_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let paths = sdgen::loading::locate::list_models(models_dir);
    if paths.is_empty() {
        eprintln!("{}: no models (.safetensors files or diffusers folders)", models_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    if !json {
        println!(
            "{:<28} {:<6} {:<6} {:<7} {:<4} {:<5} {:>9} HASH",
            "NAME", "FORMAT", "FAMILY", "INPAINT", "PRED", "DTYPE", "SIZE"
        );
    }
    let mut failed = false;
    for path in paths {
        match sdgen::loading::catalog::describe(&path) {
            Ok(e) if json => println!("{}", serde_json::to_string(&e)?),
            Ok(e) => println!(
                "{:<28} {:<6} {:<6} {:<7} {:<4} {:<5} {:>9} {}",
                e.name,
                e.format,
                e.family,
                if e.inpainting { "yes" } else { "no" },
                e.prediction,
                e.dtype,
                format!("{:.1} MB", e.size as f64 / 1e6),
                e.hash
            ),
            Err(err) => {
                failed = true;
                let causes: Vec<String> = err.chain().map(|c| c.to_string()).collect();
                eprintln!("error: {}", causes.join(": "));
            }
        }
    }
    Ok(if failed { ExitCode::from(Failure::Model.code()) } else { ExitCode::SUCCESS })
}

/// `sdgen tokenize`: each chunk's tokens (id, weight, text) as the text
/// encoder gets them, or the ids and weights as JSON.
fn tokenize(
    prompt: &str,
    model: Option<&str>,
    models_dir: &Path,
    syntax: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let syntax = syntax.map(Syntax::parse).transpose()?.unwrap_or_default();
    let tokenizer = match model {
        Some(m) => match locate(Some(m), models_dir).tag(Failure::Model)? {
            Located::Found(path) => sdgen::loading::tokenizer_of(&path).tag(Failure::Model)?,
            Located::Nothing => bail!("no model {m:?}"),
        },
        None => sdgen::tokenizer::ClipTokenizer::embedded()?,
    };
    let chunked = sdgen::prompt::chunk(&tokenizer, prompt, syntax);
    for w in &chunked.warnings {
        eprintln!("warning: {w}");
    }
    if json {
        let chunks: Vec<_> =
            chunked.chunks.iter().map(|c| serde_json::json!({"ids": c.ids, "weights": c.weights})).collect();
        println!("{}", serde_json::json!({"chunks": chunks, "token_count": chunked.token_count}));
        return Ok(());
    }
    let (_, eos, _) = tokenizer.specials();
    for (i, c) in chunked.chunks.iter().enumerate() {
        let end = c.ids.iter().skip(1).position(|&id| id == eos).map_or(c.ids.len(), |p| p + 2);
        println!("chunk {} ({} tokens + BOS/EOS, {} padding):", i + 1, end - 2, c.ids.len() - end);
        for (id, w) in c.ids[..end].iter().zip(&c.weights) {
            println!("  {id:>6}  {w:<6.4}  {}", tokenizer.token_text(*id).unwrap_or("?"));
        }
    }
    println!("token count: {}", chunked.token_count);
    Ok(())
}

fn list_samplers() {
    use sdgen::sampling::samplers::SAMPLERS;
    println!("samplers (--sampler; A1111 names work too):");
    for (_, name, a1111, deterministic, what) in SAMPLERS {
        let kind = if *deterministic { "deterministic" } else { "ancestral" };
        println!("  {name:<14} {a1111:<14} {kind:<13} {what}");
    }
    println!("schedules (--schedule):");
    for (name, what) in sdgen::sampling::schedule::SCHEDULE_NAMES {
        println!("  {name:<14} {what}");
    }
}

/// Regenerates an image from its `parameters` chunk.
fn run_replay(image: &Path, args: &Common) -> anyhow::Result<()> {
    let text = sdgen::image_io::read_parameters(image)
        .and_then(|t| t.with_context(|| format!("{}: no generation parameters in this PNG", image.display())))
        .tag(Failure::Input)?;
    let recorded = sdgen::infotext::parse(&text)
        .to_request()
        .with_context(|| format!("{}", image.display()))
        .tag(Failure::Input)?;
    let r = &recorded.request;
    let [original, crop, target] = r.size_conditioning.texts();
    let overridden = Common {
        prompt: args.prompt.clone().or(Some(r.prompt.clone())),
        negative_prompt: args.negative_prompt.clone().or(Some(r.negative_prompt.clone())),
        seed: args.seed.or(Some(r.seed)),
        steps: args.steps.or(Some(r.steps)),
        cfg_scale: args.cfg_scale.or(Some(r.cfg_scale)),
        width: args.width.or(Some(r.width)),
        height: args.height.or(Some(r.height)),
        sampler: args.sampler.clone().or(Some(r.sampler.name().to_string())),
        schedule: args.schedule.clone().or(Some(r.schedule.name().to_string())),
        batch_count: args.batch_count,
        prompt_syntax: args.prompt_syntax.clone().or(Some(r.text.syntax.name().to_string())),
        clip_skip: args.clip_skip.or(Some(r.text.clip_skip)),
        vae: args.vae.clone().or(recorded.vae.clone()),
        original_size: args.original_size.clone().or(original),
        crop_top_left: args.crop_top_left.clone().or(crop),
        target_size: args.target_size.clone().or(target),
        out: args.out.clone().or_else(|| {
            let stem = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            Some(PathBuf::from(format!("{stem}-replay.png")))
        }),
        model: match &args.model {
            Some(m) => Some(m.clone()),
            None => {
                Some(find_recorded_model(&args.models.models_dir, &recorded).tag(Failure::Model)?.display().to_string())
            }
        },
        ..args.clone()
    };
    run_single(&overridden, Init::Noise)
}

/// The model an infotext names: by name in the models dir, else by hash.
fn find_recorded_model(models_dir: &Path, recorded: &sdgen::infotext::Recorded) -> anyhow::Result<PathBuf> {
    if let Some(name) = &recorded.model_name {
        if let Ok(Located::Found(p)) = locate(Some(name), models_dir) {
            return Ok(p);
        }
    }
    if let Some(hash) = &recorded.model_hash {
        for candidate in sdgen::loading::locate::list_models(models_dir) {
            if sdgen::loading::model_hash(&candidate).is_ok_and(|h| h.eq_ignore_ascii_case(hash)) {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "the model {:?} (hash {}) is not in {}; pass --model",
        recorded.model_name.as_deref().unwrap_or("?"),
        recorded.model_hash.as_deref().unwrap_or("?"),
        models_dir.display()
    )
}
