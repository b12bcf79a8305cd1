//! The one thread that owns the session and runs generations, first come
//! first served: the HTTP handlers queue jobs here and await their replies.
//! It keeps the loaded model (with its merged LoRAs) between jobs, reopens
//! or re-merges when a job asks for another, and reports progress.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use sdgen::image_io::Image;
use sdgen::loading::lora::LoraArg;
use sdgen::pipeline::Event;
use sdgen::request::Init;
use sdgen::request::Request;
use sdgen::session::Session;
use sdgen::settings::{SessionSettings, Settings};
use tokio::sync::oneshot;

use super::ApiError;

/// The model a job runs on: a name or path, a VAE override, its LoRAs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    pub model: Option<String>,
    pub vae: Option<String>,
    pub loras: Vec<LoraArg>,
}

impl ModelChoice {
    /// Whether `other` needs another session: another model or VAE, however
    /// their paths are spelled.
    pub fn loads_other_than(&self, other: &ModelChoice) -> bool {
        let canonical = |p: &Option<String>| p.as_ref().map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.into()));
        canonical(&self.model) != canonical(&other.model) || canonical(&self.vae) != canonical(&other.vae)
    }
}

/// What a job makes.
pub enum Plan {
    /// Batches of requests, each batch one UNet batch.
    Requests(Vec<Vec<Request>>),
    /// `count` images of `settings` with the model's family defaults for
    /// what they leave unset (known once the model is loaded), seeds S, S+1, …
    FamilyDefaults { settings: Box<Settings>, count: usize },
}

/// One request's images and where its answer goes.
pub struct Job {
    pub choice: ModelChoice,
    pub plan: Plan,
    pub reply: oneshot::Sender<Result<Done, ApiError>>,
}

/// One image of a job: its request, pixels, PNG parameters and seconds of
/// generation (its batch's share).
pub struct Made {
    pub request: Request,
    pub image: Image,
    pub parameters: String,
    pub seconds: f64,
}

/// A finished job.
pub struct Done {
    pub images: Vec<Made>,
    pub model_name: String,
    pub model_hash: String,
}

/// Refuses a batch the CPU's memory cannot hold (GPUs report their own
/// errors), naming the fields that set its size.
fn fits_in_memory(session: &Session, batch: &[Request]) -> Result<(), ApiError> {
    let (Some(r), true) = (batch.first(), session.device.is_cpu()) else { return Ok(()) };
    let Some(available) = sdgen::memory::available() else { return Ok(()) };
    let dtype = sdgen::models::Backbone::dtype(&session.model.backbone);
    let need = sdgen::memory::estimate(&session.model.path, dtype, (r.width, r.height), 2 * batch.len(), false)
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    sdgen::memory::check(&need, available, dtype, r.width, r.height)
        .map_err(|e| ApiError::field("width, height, batch_size", format!("{e:#}")))
}

/// What `/sdapi/v1/progress` reports.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Jobs running or waiting.
    pub job_count: usize,
    /// Jobs finished since the server started.
    pub job_no: usize,
    pub sampling_step: usize,
    pub sampling_steps: usize,
    /// The running job's UNet batches: done, and in all.
    pub batch_no: usize,
    pub batch_count: usize,
    pub started: Option<Instant>,
}

/// `m`'s value; a lock a panicking thread left poisoned still serves (the
/// data behind these locks stays consistent between statements).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the handlers and the worker share.
pub struct Shared {
    queue: Mutex<VecDeque<Job>>,
    wake: Condvar,
    pub max_queue: usize,
    pub progress: Mutex<Progress>,
    pub interrupt: AtomicBool,
    pub skip: AtomicBool,
    pub shutdown: AtomicBool,
    /// The loaded model's name, path and hash, for `/options` and `/sd-models`.
    pub loaded: Mutex<Option<(String, PathBuf, String)>>,
}

impl Shared {
    pub fn new(max_queue: usize) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            max_queue,
            progress: Mutex::new(Progress::default()),
            interrupt: AtomicBool::new(false),
            skip: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            loaded: Mutex::new(None),
        })
    }

    /// Queues `job` behind the others; a full queue (the running job not
    /// counted) or a stopping server refuses it.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        if self.shutdown.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is stopping"));
        }
        let mut queue = lock(&self.queue);
        if queue.len() >= self.max_queue {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "queue full",
                format!("{} jobs are waiting (--max-queue {})", queue.len(), self.max_queue),
            ));
        }
        queue.push_back(job);
        lock(&self.progress).job_count += 1;
        self.wake.notify_one();
        Ok(())
    }

    /// Answers every waiting job with 503 and wakes the worker to exit.
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.interrupt.store(true, Ordering::SeqCst);
        let waiting: Vec<Job> = lock(&self.queue).drain(..).collect();
        for job in waiting {
            let _ = job.reply.send(Err(ApiError::unavailable("the server is stopping")));
        }
        self.wake.notify_all();
    }

    fn next(&self) -> Option<Job> {
        let mut queue = lock(&self.queue);
        loop {
            if self.shutdown.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(job) = queue.pop_front() {
                return Some(job);
            }
            queue = self.wake.wait(queue).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// Runs jobs until the server stops. `settings` opens sessions; each job's
/// [`ModelChoice`] overrides its model, VAE and LoRAs.
pub fn run(shared: Arc<Shared>, settings: SessionSettings) {
    let mut current: Option<(ModelChoice, Session)> = None;
    while let Some(job) = shared.next() {
        let result = if job.reply.is_closed() {
            eprintln!("job cancelled: the client disconnected");
            Err(ApiError::unavailable("client disconnected"))
        } else {
            // A panic in the model code fails this job, not the server; the
            // session it may have left half-changed is dropped.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_job(&shared, &settings, &mut current, &job)
            }));
            match run {
                // Stopping: the interrupted job's images are not answered.
                Ok(Ok(_)) if shared.shutdown.load(Ordering::SeqCst) => {
                    Err(ApiError::unavailable("the server is stopping"))
                }
                Ok(result) => result,
                Err(_) => {
                    current = None;
                    Err(ApiError::internal(
                        "generation failed unexpectedly (a bug in sdgen); the model will be reloaded",
                    ))
                }
            }
        };
        {
            let mut p = lock(&shared.progress);
            let left = p.job_count.saturating_sub(1);
            *p = Progress { job_count: left, job_no: p.job_no + 1, ..Progress::default() };
        }
        shared.interrupt.store(shared.shutdown.load(Ordering::SeqCst), Ordering::SeqCst);
        shared.skip.store(false, Ordering::SeqCst);
        let _ = job.reply.send(result);
    }
}

/// Opens (or keeps) the session `choice` names.
fn session_for<'a>(
    shared: &Shared,
    settings: &SessionSettings,
    current: &'a mut Option<(ModelChoice, Session)>,
    choice: &ModelChoice,
) -> Result<&'a Session, ApiError> {
    let reopen = current.as_ref().is_none_or(|(c, _)| c.loads_other_than(choice));
    if reopen {
        *current = None; // free the old model first
        let s = SessionSettings {
            model: choice.model.clone().or(settings.model.clone()),
            vae: choice.vae.clone(),
            loras: Vec::new(),
            swappable_loras: true,
            ..settings.clone()
        };
        let (session, _) = Session::open(&s, &choice.loras, (None, None), &mut |_| {}).map_err(ApiError::model)?;
        *lock(&shared.loaded) = Some((session.model.name.clone(), session.model.path.clone(), session.hash.clone()));
        *current = Some((choice.clone(), session));
    } else if let Some((c, session)) = current.as_mut() {
        if c.loras != choice.loras {
            // From the base weights the session kept: no request changes them.
            session.set_loras(&choice.loras, &settings.models_dir).map_err(ApiError::model)?;
            c.loras = choice.loras.clone();
        }
    }
    Ok(&current.as_ref().expect("opened above").1)
}

fn run_job(
    shared: &Shared,
    settings: &SessionSettings,
    current: &mut Option<(ModelChoice, Session)>,
    job: &Job,
) -> Result<Done, ApiError> {
    let session = session_for(shared, settings, current, &job.choice)?;
    let batches = match &job.plan {
        Plan::Requests(b) => b.clone(),
        Plan::FamilyDefaults { settings, count } => {
            let r = settings
                .resolve(&session.model.defaults(), Init::Noise)
                .map_err(|e| ApiError::field("body", format!("{e:#}")))?;
            (0..*count as u64).map(|i| vec![Request { seed: r.seed.wrapping_add(i), ..r.clone() }]).collect()
        }
    };
    {
        let mut p = lock(&shared.progress);
        p.started = Some(Instant::now());
        p.batch_count = batches.len();
    }
    let mut images = Vec::new();
    for batch in &batches {
        if shared.interrupt.load(Ordering::SeqCst) {
            break;
        }
        fits_in_memory(session, batch)?;
        if session.model.is_inpainting() && batch.iter().any(|r| !matches!(r.init, Init::Inpaint { .. })) {
            return Err(ApiError::field("mask", "this model is an inpainting model: send img2img with a mask"));
        }
        let started = Instant::now();
        let stop =
            || shared.interrupt.load(Ordering::SeqCst) || shared.skip.load(Ordering::SeqCst) || job.reply.is_closed();
        let mut events = |e: Event| {
            if let Event::Step { done, total } = e {
                let mut p = lock(&shared.progress);
                p.sampling_step = done;
                p.sampling_steps = total;
            }
        };
        let made = session
            .model
            .generate_batch_until(batch, &session.device, &mut events, &stop)
            .map_err(|e| ApiError::internal(format!("{e:#}")))?;
        if job.reply.is_closed() {
            eprintln!("job cancelled: the client disconnected");
            return Err(ApiError::unavailable("client disconnected"));
        }
        let seconds = started.elapsed().as_secs_f64() / batch.len().max(1) as f64;
        for (request, image) in batch.iter().zip(made) {
            let parameters = session.parameters(request);
            images.push(Made { request: request.clone(), image, parameters, seconds });
        }
        // A skip ends the current batch only.
        shared.skip.store(false, Ordering::SeqCst);
        let mut p = lock(&shared.progress);
        p.sampling_step = 0;
        p.batch_no += 1;
    }
    Ok(Done { images, model_name: session.model.name.clone(), model_hash: session.hash.clone() })
}
