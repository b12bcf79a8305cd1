//! A generation session: one model loaded on one device, shared by every
//! front end (single runs, `batch`, `replay`, the server). It finds the
//! model (or downloads the default), checks memory, loads the model with
//! its adapters, reads input images, and runs jobs: UNet batches of
//! consecutive compatible requests, then each PNG written atomically with
//! its parameters. Errors carry their [`Failure`] kind from here.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;

use crate::editing::{self, Mask, Pads};
use crate::failure::{Failure, Tag};
use crate::image_io::{read_image, read_mask_levels, write_png, Image};
use crate::infotext::{Parameters, Recorded};
use crate::loading::assets::{self, Asset, Located};
use crate::loading::lora::{LoraArg, LoraSpec};
use crate::loading::{model_hash, Adapters, Model};
use crate::pipeline::Event;
use crate::prompt::Syntax;
use crate::request::{Control, Init, Request, Size};
use crate::settings::{SessionSettings, Settings};

/// A loaded model, ready for requests.
pub struct Session {
    pub model: Model,
    /// A1111's model hash, written into every PNG.
    pub hash: String,
    pub device: Device,
}

/// What opening a session did, for the front end to report.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub path: PathBuf,
    /// One line per LoRA, and whether all of it applied.
    pub loras: Vec<(String, bool)>,
    /// One line per file read as a pickle, and whether it is only a notice
    /// (else a warning: a pickle named `.safetensors`).
    pub notices: Vec<(String, bool)>,
}

/// What a session reports while it opens.
#[derive(Debug)]
pub enum OpenEvent<'a> {
    /// No model in the models dir: the default one is being downloaded.
    Downloading {
        repo: &'a str,
        size: &'a str,
        into: &'a Path,
    },
    Loading,
}

impl Session {
    /// Finds, checks and loads the model `settings` name, with the LoRAs of
    /// `settings` and `prompt_loras` (a prompt's `<lora:…>` tags). `size`
    /// is the width and height asked for, if any (for the memory check;
    /// the model's native size stands in for what is not given).
    pub fn open(
        settings: &SessionSettings,
        prompt_loras: &[LoraArg],
        size: (Option<usize>, Option<usize>),
        events: &mut dyn FnMut(OpenEvent),
    ) -> anyhow::Result<(Session, LoadReport)> {
        settings.validate().tag(Failure::Usage)?;
        let device = settings.device.open().tag(Failure::Device)?;
        let dtype = crate::device::dtype_on(settings.dtype, &device).tag(Failure::Usage)?;
        let path = match assets::locate(settings.model.as_deref(), &settings.models_dir).tag(Failure::Model)? {
            Located::Found(p) => p,
            Located::Nothing => download_default(settings, events).tag(Failure::Model)?,
        };
        // Fail before loading what cannot fit (CPU memory; GPUs report their own errors).
        if device.is_cpu() {
            if let Some(available) = crate::memory::available() {
                let native = crate::memory::native_side(&path);
                let size = Size { width: size.0.unwrap_or(native), height: size.1.unwrap_or(native) };
                let need = crate::memory::estimate(
                    &path,
                    dtype,
                    (size.width, size.height),
                    2 * settings.batch_size,
                    settings.no_t5,
                )
                .tag(Failure::Model)?;
                crate::memory::check(&need, available, dtype, size.width, size.height)
                    .with_context(|| path.display().to_string())
                    .tag(Failure::Device)?;
            }
        }
        events(OpenEvent::Loading);
        let loras: Vec<LoraArg> = settings.loras.iter().chain(prompt_loras).cloned().collect();
        let loras = find_loras(&loras, &settings.models_dir)?;
        let vae = settings
            .vae
            .as_deref()
            .map(|name| assets::find(Asset::Vae, name, &settings.models_dir))
            .transpose()
            .tag(Failure::Model)?;
        let embeddings = Some(assets::embeddings_dir(&settings.models_dir));
        let models_dir = Some(settings.models_dir.clone());
        let adapters = Adapters {
            loras,
            embeddings,
            vae,
            retain_base: settings.swappable_loras,
            models_dir,
            no_t5: settings.no_t5,
            text_encoders: settings.text_encoders.clone(),
            t5_tokenizer: settings.t5_tokenizer.clone(),
        };
        let mut model = Model::load_with(&path, &device, dtype, &adapters).tag(Failure::Model)?;
        model.vae.tiling = settings.vae_tiling;
        if let Some(p) = settings.prediction {
            model.prediction = p;
        }
        if let Some(p) = settings.preset {
            model.preset = p;
        }
        let hash = model.hash().tag(Failure::Model)?;
        let notices = crate::loading::pickle::take_notices();
        let report = LoadReport { path, loras: model.applied.lora_report.clone(), notices };
        Ok((Session { model, hash, device }, report))
    }

    /// Merges `loras` (looked up in `models_dir`) in place of the current
    /// ones, from the base weights the session kept (opened with
    /// `swappable_loras`), without reading the model again.
    pub fn set_loras(&mut self, loras: &[LoraArg], models_dir: &Path) -> anyhow::Result<()> {
        let specs = find_loras(loras, models_dir)?;
        self.model.merge_loras(&specs).tag(Failure::Model)
    }

    /// The PNG `parameters` text of an image made for `request`.
    pub fn parameters(&self, request: &Request) -> String {
        // Generating the image loaded its ControlNets.
        let controlnets: Vec<(String, String)> = request
            .controls
            .iter()
            .map(|c| match self.model.loaded_controlnet(&c.model) {
                Some(net) => (net.name.clone(), net.hash.clone()),
                None => (c.model.clone(), String::new()),
            })
            .collect();
        Parameters {
            request,
            model_name: &self.model.name,
            model_hash: &self.hash,
            family: self.model.family.name(),
            applied: &self.model.applied,
            controlnets: &controlnets,
        }
        .infotext()
    }

    /// Generates `jobs`, up to `opts.batch_size` consecutive ones with the
    /// same [`Request::batch_key`] in one UNet batch, and writes each PNG.
    /// With `keep_going`, a failed generation is reported and the run goes
    /// on; a failed write always ends it.
    pub fn run(
        &self,
        jobs: &[Job],
        opts: &RunOptions,
        events: &mut dyn FnMut(RunEvent) -> anyhow::Result<()>,
    ) -> anyhow::Result<Summary> {
        let mut summary = Summary::default();
        let mut i = 0;
        while i < jobs.len() {
            if opts.stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                summary.interrupted = true;
                break;
            }
            let key = jobs[i].request.batch_key();
            let n = jobs[i..].iter().take(opts.batch_size.max(1)).take_while(|j| j.request.batch_key() == key).count();
            let group = &jobs[i..i + n];
            i += n;
            events(RunEvent::Started { jobs: group })?;
            let started = Instant::now();
            let requests: Vec<Request> = group.iter().map(|j| j.request.clone()).collect();
            let mut pipeline_events = |e| {
                // Progress reporting cannot fail a generation.
                let _ = events(RunEvent::Pipeline(e));
            };
            let images = match self.model.generate_batch(&requests, &self.device, &mut pipeline_events) {
                Ok(images) => images,
                Err(e) if opts.keep_going => {
                    for job in group {
                        events(RunEvent::Failed { job, error: format!("{e:#}") })?;
                    }
                    summary.failed += n;
                    continue;
                }
                Err(e) => return Err(e).tag(Failure::Device),
            };
            let seconds = started.elapsed().as_secs_f64() / n as f64;
            for (job, image) in group.iter().zip(images) {
                write_png(&job.path, &image, &self.parameters(&job.request)).tag(Failure::Output)?;
                summary.done += 1;
                events(RunEvent::Written { job, seconds })?;
            }
        }
        Ok(summary)
    }
}

/// The files of `loras`, by path or by name in `models_dir`.
fn find_loras(loras: &[LoraArg], models_dir: &Path) -> anyhow::Result<Vec<LoraSpec>> {
    let find = |l: &LoraArg| Ok(LoraSpec { path: assets::find(Asset::Lora, &l.name, models_dir)?, weight: l.weight });
    loras.iter().map(find).collect::<anyhow::Result<Vec<_>>>().tag(Failure::Model)
}

/// The default model, downloaded into the models dir.
#[cfg(feature = "download")]
fn download_default(settings: &SessionSettings, events: &mut dyn FnMut(OpenEvent)) -> anyhow::Result<PathBuf> {
    use crate::loading::hub;
    let dir = &settings.models_dir;
    let what_to_do =
        format!("put a .safetensors checkpoint or a diffusers folder in {}, or pass --model", dir.display());
    if settings.offline || hub::offline_from_env() {
        bail!("no model in {} and downloads are off (--offline / HF_HUB_OFFLINE); {what_to_do}", dir.display());
    }
    events(OpenEvent::Downloading { repo: hub::DEFAULT_REPO, size: hub::DEFAULT_SIZE, into: dir });
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    // The causes of a failed download repeat each other: say the root once.
    hub::download_default(dir, !settings.quiet).map_err(|e| {
        let cause = e.root_cause().to_string();
        let cause = cause.lines().next().unwrap_or_default();
        anyhow::anyhow!(
            "no model in {}, and downloading {} failed ({cause}); {what_to_do}",
            dir.display(),
            hub::DEFAULT_REPO
        )
    })
}

#[cfg(not(feature = "download"))]
fn download_default(settings: &SessionSettings, _: &mut dyn FnMut(OpenEvent)) -> anyhow::Result<PathBuf> {
    bail!(
        "no model in {}; put a .safetensors checkpoint or a diffusers folder there, or pass --model (this build cannot download)",
        settings.models_dir.display()
    )
}

/// The LoRAs of a prompt's `<lora:NAME:WEIGHT>` tags (A1111 syntax), and a
/// warning for each other network tag, which sdgen ignores.
pub fn prompt_loras(prompt: &str, syntax: Syntax) -> anyhow::Result<(Vec<LoraArg>, Vec<String>)> {
    let (mut loras, mut warnings) = (Vec::new(), Vec::new());
    if syntax == Syntax::A1111 {
        for tag in crate::prompt::network_tags(prompt)? {
            match tag.kind.as_str() {
                "lora" | "lyco" => loras.push(LoraArg { name: tag.name, weight: tag.weight }),
                other => {
                    warnings.push(format!("<{other}:{}> in the prompt is ignored (sdgen runs LoRAs only)", tag.name))
                }
            }
        }
    }
    Ok((loras, warnings))
}

/// img2img's default strength (diffusers' and A1111's).
pub const IMG2IMG_STRENGTH: f64 = 0.75;
/// Inpainting's default strength: the masked area starts from pure noise.
pub const INPAINT_STRENGTH: f64 = 1.0;

/// The input images of a command, before they are read.
#[derive(Debug, Clone)]
pub enum InitSpec {
    Noise,
    Img2img { image: PathBuf, strength: f64 },
    Inpaint { image: PathBuf, mask: PathBuf, strength: f64, mask_blur: f32 },
    Outpaint { image: PathBuf, pads: Pads, strength: f64, mask_blur: f32 },
}

impl InitSpec {
    /// Reads and checks the input image and mask. img2img resizes the image
    /// to `settings`' size if it gives one; inpainting works at the input's
    /// size, which `settings` may only repeat.
    pub fn read(&self, settings: &Settings) -> anyhow::Result<Init> {
        let asked = |image: &Image| (settings.width.unwrap_or(image.width), settings.height.unwrap_or(image.height));
        let fixed = |image: &Image, what: &str| -> anyhow::Result<()> {
            if asked(image) != (image.width, image.height) {
                return Err(anyhow::anyhow!(
                    "{what} works at the image's size ({}x{}); --width/--height cannot change it",
                    image.width,
                    image.height
                ))
                .tag(Failure::Input);
            }
            Ok(())
        };
        let inpaint = |image, mask, strength: &f64, mask_blur: &f32| Init::Inpaint {
            image,
            mask,
            strength: *strength,
            overlay: crate::request::Overlay::Feather(*mask_blur),
            fill: crate::request::LatentFill::Original,
        };
        let init = match self {
            InitSpec::Noise => Init::Noise,
            InitSpec::Img2img { image: path, strength } => {
                let mut image = read_image(path).tag(Failure::Input)?;
                let (w, h) = asked(&image);
                if (w, h) != (image.width, image.height) {
                    image = editing::resize(&image, w, h);
                }
                check_size(path, &image)?;
                Init::Image { image, strength: *strength }
            }
            InitSpec::Inpaint { image: path, mask, strength, mask_blur } => {
                let image = read_image(path).tag(Failure::Input)?;
                check_size(path, &image)?;
                let (mw, mh, levels) = read_mask_levels(mask).tag(Failure::Input)?;
                if (mw, mh) != (image.width, image.height) {
                    return Err(anyhow::anyhow!(
                        "{}: the mask is {mw}x{mh} but the image {} is {}x{}",
                        mask.display(),
                        path.display(),
                        image.width,
                        image.height
                    ))
                    .tag(Failure::Input);
                }
                fixed(&image, "inpaint")?;
                inpaint(image, Mask::from_levels(mw, mh, &levels), strength, mask_blur)
            }
            InitSpec::Outpaint { image: path, pads, strength, mask_blur } => {
                let image = read_image(path).tag(Failure::Input)?;
                let (canvas, mask) = editing::outpaint_canvas(&image, *pads).tag(Failure::Input)?;
                check_size(path, &canvas)?;
                fixed(&canvas, "outpaint")?;
                inpaint(canvas, mask, strength, mask_blur)
            }
        };
        Ok(init)
    }
}

/// The control images of `settings`' ControlNets, read and checked.
pub fn read_controls(settings: &Settings) -> anyhow::Result<Vec<Control>> {
    let args = settings.controls.as_deref().unwrap_or_default();
    args.iter()
        .enumerate()
        .map(|(i, arg)| {
            let Some(path) = &arg.image else {
                return Err(anyhow::anyhow!(
                    "ControlNet {i} ({}): the control image is missing; give it with --control {}:IMAGE",
                    arg.model,
                    arg.model
                ))
                .tag(Failure::Usage);
            };
            let image =
                read_image(path).with_context(|| format!("control image of {}", arg.model)).tag(Failure::Input)?;
            let (start, end) = arg.range.unwrap_or((0.0, 1.0));
            Ok(Control { model: arg.model.clone(), image, weight: arg.weight.unwrap_or(1.0), start, end })
        })
        .collect()
}

/// Sizes must be multiples of 8; the error names the input file.
fn check_size(path: &Path, image: &Image) -> anyhow::Result<()> {
    if !image.width.is_multiple_of(8) || !image.height.is_multiple_of(8) {
        return Err(anyhow::anyhow!(
            "{}: image is {}x{}; sizes must be multiples of 8 (img2img can resize with --width/--height)",
            path.display(),
            image.width,
            image.height
        ))
        .tag(Failure::Input);
    }
    Ok(())
}

/// A single command's job (txt2img, img2img, inpaint, outpaint, replay),
/// checked and with its input read before any model loads.
pub struct SingleJob {
    pub settings: Settings,
    pub init: Init,
    pub controls: Vec<Control>,
    pub out: PathBuf,
}

impl SingleJob {
    /// Checks `settings` (usage errors), reads `spec`'s input images (input
    /// errors), checks `out` (output errors). `settings` must carry a seed.
    pub fn prepare(settings: Settings, spec: &InitSpec, out: PathBuf) -> anyhow::Result<Self> {
        // Bad options fail before any file is read.
        settings.validate(&Init::Noise).tag(Failure::Usage)?;
        let init = spec.read(&settings)?;
        settings.validate(&init).tag(Failure::Usage)?;
        let controls = read_controls(&settings)?;
        check_output(&out)?;
        Ok(Self { settings, init, controls, out })
    }

    /// The LoRAs its prompt's tags name, and warnings about other tags.
    pub fn prompt_loras(&self) -> anyhow::Result<(Vec<LoraArg>, Vec<String>)> {
        let s = &self.settings;
        prompt_loras(s.prompt.as_deref().unwrap_or_default(), s.prompt_syntax.unwrap_or_default()).tag(Failure::Usage)
    }

    /// The width and height it asks for, for [`Session::open`]: the hires
    /// fix's when it has one.
    pub fn size_asked(&self) -> (Option<usize>, Option<usize>) {
        let asked = self.init.size_asked(self.settings.width, self.settings.height);
        let hires = match (asked, self.settings.hires.target()) {
            ((Some(w), Some(h)), Some(target)) => crate::hires::HiresSize::of(w, h, target).ok(),
            _ => None,
        };
        hires.map_or(asked, |s| (Some(s.output().width), Some(s.output().height)))
    }

    /// Its images on `session`: the model's defaults for what is unset,
    /// seeds S, S+1, … and numbered files when there are several.
    pub fn jobs(self, session: &Session) -> anyhow::Result<Vec<Job>> {
        let count = self.settings.image_count().tag(Failure::Usage)?;
        let mut request = self.settings.resolve(&session.model.defaults(), self.init).tag(Failure::Usage)?;
        request.controls = self.controls;
        // A missing upscaler fails before any image is generated.
        if let Some(name) = request.hires.as_ref().and_then(|h| h.upscaler.model()) {
            session.model.upscaler(name).tag(Failure::Model)?;
        }
        Ok(numbered_jobs(&request, &self.out, count))
    }
}

/// The settings recorded in a PNG's parameters, and the model they name.
pub fn recorded_settings(image: &Path) -> anyhow::Result<Recorded> {
    let text = crate::image_io::read_parameters(image)
        .and_then(|t| t.with_context(|| format!("{}: no generation parameters in this PNG", image.display())))
        .tag(Failure::Input)?;
    crate::infotext::parse(&text).to_settings().with_context(|| image.display().to_string()).tag(Failure::Input)
}

/// One image to make and the PNG it goes to.
#[derive(Debug, Clone)]
pub struct Job {
    pub request: Request,
    pub path: PathBuf,
}

/// `count` images of `request` with seeds S, S+1, … into `out`, or
/// `NAME-0.png` … `NAME-(count−1).png` beside it when there are several.
fn numbered_jobs(request: &Request, out: &Path, count: usize) -> Vec<Job> {
    if count == 1 {
        return vec![Job { request: request.clone(), path: out.to_path_buf() }];
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    (0..count)
        .map(|i| Job {
            request: Request { seed: request.seed.wrapping_add(i as u64), ..request.clone() },
            path: out.with_file_name(format!("{stem}-{i}.png")),
        })
        .collect()
}

/// Refuses an output path sdgen cannot write a PNG to, before any work.
fn check_output(out: &Path) -> anyhow::Result<()> {
    if out.extension().is_none_or(|e| !e.eq_ignore_ascii_case("png")) {
        return Err(anyhow::anyhow!("{}: output must be a .png file", out.display())).tag(Failure::Output);
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(anyhow::anyhow!("{}: output folder {} does not exist", out.display(), dir.display()))
                .tag(Failure::Output);
        }
    }
    Ok(())
}

/// How [`Session::run`] goes.
#[derive(Debug, Default)]
pub struct RunOptions<'a> {
    /// Images per UNet batch (consecutive compatible jobs only).
    pub batch_size: usize,
    /// Report a failed generation and go on (batch files).
    pub keep_going: bool,
    /// Set (e.g. by Ctrl-C) to stop after the images in progress.
    pub stop: Option<&'a AtomicBool>,
}

/// What [`Session::run`] reports.
#[derive(Debug)]
pub enum RunEvent<'a> {
    /// These jobs start generating together.
    Started {
        jobs: &'a [Job],
    },
    Pipeline(Event),
    /// A PNG is in place; `seconds` of generation per image of its batch.
    Written {
        job: &'a Job,
        seconds: f64,
    },
    Failed {
        job: &'a Job,
        error: String,
    },
}

/// Counts for a run's summary.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub interrupted: bool,
}

/// The model a PNG's parameters name: by name in the models dir, else by hash.
pub fn recorded_model(models_dir: &Path, recorded: &Recorded) -> anyhow::Result<PathBuf> {
    if let Some(name) = &recorded.model_name {
        if let Ok(Located::Found(p)) = assets::locate(Some(name), models_dir) {
            return Ok(p);
        }
    }
    if let Some(hash) = &recorded.model_hash {
        for candidate in assets::list_models(models_dir) {
            if model_hash(&candidate).is_ok_and(|h| h.eq_ignore_ascii_case(hash)) {
                return Ok(candidate);
            }
        }
    }
    Err(anyhow::anyhow!(
        "the model {:?} (hash {}) is not in {}; pass --model",
        recorded.model_name.as_deref().unwrap_or("?"),
        recorded.model_hash.as_deref().unwrap_or("?"),
        models_dir.display()
    ))
    .tag(Failure::Model)
}
