//! The `sdgen` command line: parses arguments, shows progress, reports
//! errors; the library does the work.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod cli;
mod server;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use cli::args::{Cli, Command, Common, DevCommand};
use cli::listing::{list_models, list_samplers, tokenize};
use cli::progress::{draw_target, Progress};
use sdgen::batch::{self, Shard};
use sdgen::editing::Pads;
use sdgen::failure::{self, Failure, Tag};
use sdgen::loading::lora::LoraArg;
use sdgen::session::{self, InitSpec, OpenEvent, RunOptions, Session, SingleJob};
use sdgen::settings::{SessionSettings, Settings};
use sdgen::timings::Timings;

fn main() -> ExitCode {
    // Output piped into `head` and the like ends the process quietly, as
    // for other command-line tools, instead of a panic on the next print.
    // SAFETY: restoring a signal's default action, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout as clap prints them; a bad argument is one line.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            eprintln!("{}", text.lines().find(|l| !l.trim().is_empty()).unwrap_or("error: bad arguments"));
            return ExitCode::from(Failure::Usage.code());
        }
    };
    let done = |r: anyhow::Result<()>| r.map(|_| ExitCode::SUCCESS);
    let result = match &cli.command {
        None => done(run_command(&cli.common, InitSpec::Noise)),
        Some(Command::Img2img { init_image, strength, common }) => {
            done(run_command(common, InitSpec::Img2img { image: init_image.clone(), strength: *strength }))
        }
        Some(Command::Inpaint { image, mask, edit, common }) => {
            let (strength, mask_blur) = (edit.strength, edit.mask_blur);
            done(run_command(
                common,
                InitSpec::Inpaint { image: image.clone(), mask: mask.clone(), strength, mask_blur },
            ))
        }
        Some(Command::Outpaint { image, pad, pad_left, pad_right, pad_top, pad_bottom, edit, common }) => {
            let pads = Pads {
                left: pad_left.unwrap_or(*pad),
                right: pad_right.unwrap_or(*pad),
                top: pad_top.unwrap_or(*pad),
                bottom: pad_bottom.unwrap_or(*pad),
            };
            let (strength, mask_blur) = (edit.strength, edit.mask_blur);
            done(run_command(common, InitSpec::Outpaint { image: image.clone(), pads, strength, mask_blur }))
        }
        Some(Command::Batch { file, out_dir, shard, force, common }) => {
            run_batch(file, out_dir, *shard, *force, common)
        }
        Some(Command::Replay { image, common }) => done(run_replay(image, common)),
        Some(Command::Samplers) => {
            list_samplers();
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Models { models, json }) => list_models(&models.models_dir, *json),
        Some(Command::Tokenize { prompt, model, models, prompt_syntax, json }) => {
            done(tokenize(prompt, model.as_deref(), &models.models_dir, prompt_syntax.unwrap_or_default(), *json))
        }
        Some(Command::Convert { input, output, dtype }) => done(convert(input, output, *dtype)),
        Some(Command::Upscale { image, upscaler, scale, out, tile, device, models }) => {
            done(upscale(image, upscaler, *scale, out, *tile, *device, &models.models_dir))
        }
        Some(Command::Serve(args)) => done(serve(args)),
        Some(Command::Dev(dev)) => done(run_dev(dev)),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {}", failure::one_line(&e));
        ExitCode::from(Failure::of(&e).map_or(1, Failure::code))
    })
}

fn convert(input: &Path, output: &Path, dtype: Option<safetensors::Dtype>) -> anyhow::Result<()> {
    let done = sdgen::loading::convert::convert(input, output, dtype)?;
    for (line, notice) in sdgen::loading::pickle::take_notices() {
        eprintln!("{}{line}", if notice { "" } else { "warning: " });
    }
    eprintln!("wrote {}: {} tensors, {} bytes", output.display(), done.tensors, done.bytes);
    Ok(())
}

fn upscale(
    image: &Path,
    upscaler: &str,
    scale: Option<f64>,
    out: &Path,
    tile: usize,
    device: sdgen::device::DeviceSpec,
    models_dir: &Path,
) -> anyhow::Result<()> {
    let device = device.open().tag(Failure::Device)?;
    let (w, h) = sdgen::upscale::upscale_file(image, out, upscaler, scale, models_dir, &device, tile)?;
    for (line, notice) in sdgen::loading::pickle::take_notices() {
        eprintln!("{}{line}", if notice { "" } else { "warning: " });
    }
    eprintln!("wrote {} ({w}×{h})", out.display());
    Ok(())
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    // A1111 and ComfyUI show 32-bit seeds; only the low 32 bits seed torch's generator anyway.
    h.finish() & 0xffff_ffff
}

/// Opens the session with the prompts' LoRAs, a spinner while the model
/// loads, and reports what loading did.
fn open(
    args: &Common,
    settings: &SessionSettings,
    (loras, warnings): (Vec<LoraArg>, Vec<String>),
    size: (Option<usize>, Option<usize>),
) -> anyhow::Result<Session> {
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let spinner = ProgressBar::with_draw_target(None, draw_target(args.quiet));
    spinner.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
    let (session, report) = Session::open(settings, &loras, size, &mut |e| match e {
        OpenEvent::Downloading { repo, size, into } => {
            eprintln!("No model in {}: downloading {repo} ({size}) from the Hugging Face hub …", into.display())
        }
        OpenEvent::Loading => {
            spinner.set_message("loading model");
            spinner.enable_steady_tick(Duration::from_millis(120));
        }
    })?;
    spinner.finish_and_clear();
    let model = &session.model;
    if args.verbose {
        for skipped in &model.applied.embeddings_skipped {
            eprintln!("embedding skipped: {skipped}");
        }
    }
    for (line, complete) in report.notices.iter().chain(&report.loras) {
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
        let (family, prediction) = (model.family.name(), model.prediction.name());
        eprintln!("loaded {} ({family}, {prediction}-prediction){unused}", report.path.display());
        if args.verbose {
            for name in &model.unused {
                eprintln!("  {name}");
            }
        }
    }
    Ok(session)
}

/// txt2img and the editing commands with the command line's settings.
fn run_command(args: &Common, spec: InitSpec) -> anyhow::Result<()> {
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("sdgen.png"));
    run_single(args, args.settings(), &args.session_settings(), out, spec)
}

/// One job: `--batch-count` images, `--batch-size` of them at a time.
fn run_single(
    args: &Common,
    settings: Settings,
    session_settings: &SessionSettings,
    out: PathBuf,
    spec: InitSpec,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let settings = Settings { seed: Some(settings.seed.unwrap_or_else(random_seed)), ..settings };
    let job = SingleJob::prepare(settings, &spec, out)?;
    let load_started = Instant::now();
    let session = open(args, session_settings, job.prompt_loras()?, job.size_asked())?;
    let timings = args.timings.then(|| Timings::new(load_started.elapsed().as_secs_f64()));
    let jobs = job.jobs(&session)?;
    let mut progress = Progress::new(started, args.quiet, None, timings);
    let options = RunOptions { batch_size: session_settings.batch_size, ..RunOptions::default() };
    session.run(&jobs, &options, &mut |e| {
        progress.event(&session, &e);
        Ok(())
    })?;
    progress.bars.clear().ok();
    if let Some(t) = &progress.timings {
        eprintln!("{}", t.json(started.elapsed().as_secs_f64()));
    }
    Ok(())
}

/// Exit status of a batch stopped by Ctrl-C (128 + SIGINT, as shells report it).
const INTERRUPTED: u8 = 130;

fn run_batch(
    file: &Path,
    out_dir: &Path,
    shard: Option<Shard>,
    force: bool,
    args: &Common,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let defaults = Settings { seed: None, ..args.settings() };
    let jobs = batch::read_jobs(file, &defaults)?;
    if jobs.is_empty() {
        eprintln!("{}: no jobs in the file; nothing to do", file.display());
        return Ok(ExitCode::SUCCESS);
    }
    let base_seed = args.seed.unwrap_or_else(|| {
        let s = random_seed();
        eprintln!("base seed {s} (pass --seed {s} to reproduce this batch)");
        s
    });
    let planned = batch::plan(&jobs, &defaults, base_seed, shard);
    let mut manifest = batch::open_out_dir(out_dir, shard, force)?;
    if planned.iter().all(|p| manifest.is_done(out_dir, &p.file)) {
        eprintln!("all {} images are already done in {}", planned.len(), out_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let session_settings = args.session_settings();
    let loras = batch::common_loras(file, &planned)?;
    let session = open(args, &session_settings, loras, (args.width, args.height))?;

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(INTERRUPTED as i32);
        }
        eprintln!("\nstopping after the current image (Ctrl-C again to quit now)");
    })
    .context("cannot install the Ctrl-C handler")?;
    let mut progress = Progress::new(started, args.quiet, Some(planned.len()), None);
    let options = RunOptions { batch_size: session_settings.batch_size, keep_going: true, stop: Some(&stop) };
    let summary =
        batch::run(&session, &planned, &mut manifest, out_dir, &options, &mut |e| progress.event(&session, e))?;
    progress.bars.clear().ok();
    let interrupted = if summary.interrupted { ", interrupted" } else { "" };
    eprintln!(
        "{} done, {} skipped, {} failed{interrupted} in {:.1} s ({})",
        summary.done,
        summary.skipped,
        summary.failed,
        started.elapsed().as_secs_f64(),
        out_dir.display()
    );
    Ok(match summary {
        s if s.interrupted => ExitCode::from(INTERRUPTED),
        s if s.failed > 0 => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// Regenerates an image from its `parameters` chunk; options given on the
/// command line override the recorded ones.
fn run_replay(image: &Path, args: &Common) -> anyhow::Result<()> {
    let recorded = session::recorded_settings(image)?;
    let mut session = args.session_settings();
    if session.model.is_none() {
        session.model = Some(session::recorded_model(&session.models_dir, &recorded)?.display().to_string());
    }
    session.vae = session.vae.or(recorded.vae);
    let stem = image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("{stem}-replay.png")));
    run_single(args, args.settings().over(&recorded.settings), &session, out, InitSpec::Noise)
}

fn serve(args: &cli::args::ServeArgs) -> anyhow::Result<()> {
    let auth = args.credentials().tag(Failure::Usage)?;
    server::serve(server::ServeOptions {
        host: args.host.clone(),
        port: args.port,
        auth,
        max_queue: args.max_queue,
        out_dir: args.out_dir.clone(),
        session: args.session_settings(),
    })
}

fn run_dev(dev: &DevCommand) -> anyhow::Result<()> {
    let json = match dev {
        DevCommand::RandomModel { family, out, seed } => return sdgen::random_model::write(family, out, *seed),
        DevCommand::UnetBench { model, size, batch, passes, no_decode, device, dtype } => {
            sdgen::bench::unet(model, *size, *batch, *passes, !*no_decode, *device, *dtype)?
        }
        DevCommand::OpsCheck { size, device, dtype } => sdgen::bench::ops_check(*size, *device, *dtype)?,
        DevCommand::MatmulPeak { size, repeat, device, dtype } => {
            sdgen::bench::matmul_peak(*size, *repeat, *device, *dtype)?
        }
    };
    println!("{json}");
    Ok(())
}
