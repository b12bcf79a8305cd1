//! `sdgen serve`: AUTOMATIC1111's `/sdapi/v1` API and OpenAI's images API
//! over the library's session. HTTP runs on tokio (axum); one worker thread
//! owns the model and runs one job at a time ([`worker`]); the handlers
//! translate requests ([`a1111`]), queue them and wait.

mod a1111;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use sdgen::loading::assets::{self, Asset};
use sdgen::loading::lora::LoraArg;
use sdgen::request::Init;
use sdgen::session::prompt_loras;
use sdgen::settings::{SessionSettings, Settings};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use a1111::Payload;
use worker::{lock, Done, Job, Made, ModelChoice, Plan, Shared};

/// Request bodies above this are refused with 413.
const BODY_LIMIT: usize = 50 << 20;
/// Images one request may ask for (batch_size × n_iter).
const MAX_IMAGES: usize = 64;

/// How the server runs.
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub auth: Vec<(String, String)>,
    pub max_queue: usize,
    pub out_dir: PathBuf,
    pub session: SessionSettings,
}

/// An error answer: a status and `{"error": …, "detail": …}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { status, error: error.into(), detail: detail.into() }
    }
    /// A field's value that sdgen cannot take (422), naming the field.
    pub fn field(key: &str, detail: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, format!("invalid field {key}"), format!("{key}: {detail}"))
    }
    pub fn bad_request(what: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, format!("bad {what}"), detail)
    }
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "generation failed", detail)
    }
    /// A model that cannot be found or loaded: the client named it (422).
    pub fn model(e: anyhow::Error) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "model", format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(json!({"error": self.error, "detail": self.detail}))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, "Basic realm=\"sdgen\"".parse().expect("valid header"));
        }
        r
    }
}

type ApiResult = Result<Response, ApiError>;

/// The `/options` values sdgen keeps: what requests run with by default.
#[derive(Debug, Clone)]
struct Options {
    /// The model name or path (None: the one the session settings give).
    model: Option<String>,
    clip_skip: usize,
    /// A VAE name; None: the model's own ("Automatic").
    vae: Option<String>,
}

struct App {
    shared: Arc<Shared>,
    options: Mutex<Options>,
    settings: SessionSettings,
    auth: Vec<(String, String)>,
    out_dir: PathBuf,
    /// Requests saved so far (save_images), for their file names, and the
    /// out dir's manifest once opened.
    saved: Mutex<(usize, Option<sdgen::batch::Manifest>)>,
}

/// Runs the server until Ctrl-C or SIGTERM.
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    if opts.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let shared = Shared::new(opts.max_queue);
    let settings = SessionSettings { swappable_loras: true, ..opts.session.clone() };
    let app = Arc::new(App {
        shared: shared.clone(),
        options: Mutex::new(Options { model: settings.model.clone(), clip_skip: 1, vae: settings.vae.clone() }),
        settings: settings.clone(),
        auth: opts.auth.clone(),
        out_dir: opts.out_dir.clone(),
        saved: Mutex::new((0, None)),
    });
    let first = ModelChoice { model: settings.model.clone(), vae: settings.vae.clone(), loras: Vec::new() };
    let worker = {
        let shared = shared.clone();
        std::thread::Builder::new().name("sdgen-worker".into()).spawn(move || worker::run(shared, settings))?
    };
    // The model loads before the server listens: a missing or broken one
    // ends the command with its error instead of failing the first request.
    let (reply, loaded) = oneshot::channel();
    shared
        .submit(Job { choice: first, plan: Plan::Requests(Vec::new()), reply })
        .map_err(|e| anyhow::anyhow!(e.detail))?;
    if let Err(e) = runtime.block_on(loaded)? {
        shared.stop();
        anyhow::bail!("{}", e.detail);
    }
    let open = opts.host != "127.0.0.1" && opts.host != "localhost" && opts.host != "::1";
    if open && opts.auth.is_empty() {
        eprintln!("warning: listening on {} without --api-auth: anyone who can reach it can use it", opts.host);
    }
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", opts.host, opts.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        eprintln!("sdgen serve: listening on http://{addr}");
        let stopping = shared.clone();
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async move {
                stop_signal().await;
                eprintln!("sdgen serve: stopping");
                stopping.stop();
            })
            .await?;
        anyhow::Ok(())
    })?;
    // The worker ends after the step it is in.
    worker.join().map_err(|_| anyhow::anyhow!("the generation thread panicked"))?;
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(())
}

async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    ctrl_c.await.ok();
}

fn router(app: Arc<App>) -> Router {
    let sd = |p: &str| format!("/sdapi/v1/{p}");
    Router::new()
        .route(&sd("txt2img"), post(txt2img))
        .route(&sd("img2img"), post(img2img))
        .route(&sd("options"), get(get_options).post(set_options))
        .route(&sd("sd-models"), get(sd_models))
        .route(&sd("refresh-checkpoints"), post(ok_empty))
        .route(&sd("samplers"), get(samplers))
        .route(&sd("schedulers"), get(schedulers))
        .route(&sd("loras"), get(loras))
        .route(&sd("refresh-loras"), post(ok_empty))
        .route(&sd("embeddings"), get(embeddings))
        .route(&sd("sd-vae"), get(sd_vae))
        .route(&sd("upscalers"), get(upscalers))
        .route(&sd("latent-upscale-modes"), get(latent_upscale_modes))
        .route(&sd("scripts"), get(scripts))
        .route(&sd("progress"), get(progress))
        .route(&sd("interrupt"), post(interrupt))
        .route(&sd("skip"), post(skip))
        .route(&sd("png-info"), post(png_info))
        .route(&sd("memory"), get(memory))
        .route("/v1/images/generations", post(openai_generate))
        .route("/v1/models", get(openai_models))
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(middleware::from_fn(log))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// One line per request: method, path, status, milliseconds.
async fn log(req: Request, next: Next) -> Response {
    let (method, path, started) = (req.method().clone(), req.uri().path().to_string(), Instant::now());
    let response = next.run(req).await;
    eprintln!("{method} {path} {} {} ms", response.status().as_u16(), started.elapsed().as_millis());
    response
}

/// HTTP Basic on every route when `--api-auth` is set; on `/v1/*` also a
/// bearer token `USER:PASS` (OpenAI's client sends only a bearer token).
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if app.auth.is_empty() {
        return next.run(req).await;
    }
    let header = req.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let credentials = if let Some(b64) = header.strip_prefix("Basic ") {
        base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok().and_then(|b| String::from_utf8(b).ok())
    } else {
        header.strip_prefix("Bearer ").filter(|_| req.uri().path().starts_with("/v1/")).map(|t| t.trim().to_string())
    };
    let allowed = credentials.and_then(|c| c.split_once(':').map(|(u, p)| (u.to_string(), p.to_string()))).is_some_and(
        |(user, pass)| {
            // Every pair is compared in full: the time does not tell which matched.
            app.auth.iter().fold(false, |found, (u, p)| found | (same(u, &user) & same(p, &pass)))
        },
    );
    if allowed {
        next.run(req).await
    } else {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "this server needs HTTP Basic credentials")
            .into_response()
    }
}

/// Constant-time equality (in the longer length).
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len().max(b.len());
    let diff = (0..n)
        .fold(a.len() ^ b.len(), |d, i| d | (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize);
    diff == 0
}

async fn ok_empty() -> Json<Value> {
    Json(json!({}))
}

async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": []}))
}

/// Queues a job and waits for it; a client that goes away drops the
/// receiver, which the worker sees and stops for.
async fn run(app: &App, job_of: impl FnOnce(oneshot::Sender<Result<Done, ApiError>>) -> Job) -> Result<Done, ApiError> {
    let (tx, rx) = oneshot::channel();
    app.shared.submit(job_of(tx))?;
    rx.await.map_err(|_| ApiError::unavailable("the server is stopping"))?
}

/// What an A1111 request asks of the model: `override_settings` over the
/// options, and the prompt's `<lora:…>` tags.
fn choice(app: &App, p: &Payload, prompt: &str) -> Result<(ModelChoice, usize), ApiError> {
    let options = lock(&app.options).clone();
    let overrides = p.get("override_settings").cloned().unwrap_or(json!({}));
    let overrides = Payload(
        overrides.as_object().cloned().ok_or_else(|| ApiError::field("override_settings", "must be an object"))?,
    );
    let model = match overrides.string("sd_model_checkpoint")? {
        Some(m) => {
            Some(checkpoint_name(app, &m).map_err(|e| ApiError::field("override_settings.sd_model_checkpoint", e))?)
        }
        None => options.model.clone(),
    };
    let clip_skip = overrides.count("CLIP_stop_at_last_layers", 12)?.unwrap_or(options.clip_skip);
    let vae = match overrides.string("sd_vae")? {
        Some(v) => vae_name(app, &v).map_err(|e| ApiError::field("override_settings.sd_vae", e))?,
        None => options.vae.clone(),
    };
    let (mut loras, _) =
        prompt_loras(prompt, Default::default()).map_err(|e| ApiError::field("prompt", format!("{e:#}")))?;
    loras.sort_by(|a: &LoraArg, b| a.name.cmp(&b.name));
    Ok((ModelChoice { model, vae, loras }, clip_skip))
}

/// A checkpoint as A1111 names it ("name.safetensors [hash]", "name" or a
/// title from `/sd-models`), as a name or path sdgen finds.
fn checkpoint_name(app: &App, title: &str) -> Result<String, String> {
    let bare = title.split(" [").next().unwrap_or(title).trim();
    let models = assets::list_models(&app.settings.models_dir);
    // The file name first ("x.safetensors" and the folder "x" may both be there), then the bare name.
    let file = |p: &std::path::PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let found = models.iter().find(|p| file(p).as_deref() == Some(bare)).or_else(|| {
        let stem = bare.strip_suffix(".safetensors").unwrap_or(bare);
        models.iter().find(|p| assets::display_name(p) == stem)
    });
    if let Some(path) = found {
        return Ok(path.display().to_string());
    }
    if std::path::Path::new(title).exists() {
        return Ok(title.to_string());
    }
    Err(format!("no checkpoint {title:?} in {} (see /sdapi/v1/sd-models)", app.settings.models_dir.display()))
}

/// `sd_vae`: "Automatic" or "None" mean the model's own.
fn vae_name(app: &App, name: &str) -> Result<Option<String>, String> {
    if name.is_empty() || name.eq_ignore_ascii_case("automatic") || name.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    assets::find(Asset::Vae, name.strip_suffix(".safetensors").unwrap_or(name), &app.settings.models_dir)
        .map(|p| Some(p.display().to_string()))
        .map_err(|e| format!("{e:#}"))
}

/// The images of an A1111 request: `n_iter` UNet batches of `batch_size`,
/// seeds S, S+1, …
fn batches(settings: &Settings, init: Init, p: &Payload) -> Result<Vec<Vec<sdgen::request::Request>>, ApiError> {
    let batch_size = p.count("batch_size", MAX_IMAGES as i64)?.unwrap_or(1);
    let n_iter = p.count("n_iter", MAX_IMAGES as i64)?.unwrap_or(1);
    if batch_size * n_iter > MAX_IMAGES {
        return Err(ApiError::field("n_iter", format!("batch_size × n_iter is at most {MAX_IMAGES}")));
    }
    // Absent fields were filled with A1111's defaults: the family's do not apply.
    let defaults = sdgen::loading::STANDARD_512;
    let request = settings.resolve(&defaults, init).map_err(|e| ApiError::field("body", format!("{e:#}")))?;
    let seed = request.seed;
    Ok((0..n_iter)
        .map(|i| {
            (0..batch_size)
                .map(|j| sdgen::request::Request {
                    seed: seed.wrapping_add((i * batch_size + j) as u64),
                    ..request.clone()
                })
                .collect()
        })
        .collect())
}

async fn txt2img(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let p = Payload::parse(&body)?;
    p.check_defaults(&[("hr_checkpoint_name", &["null", "\"\"", "\"Use same checkpoint\""])])?;
    generate(&app, p, false).await
}

async fn img2img(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let p = Payload::parse(&body)?;
    p.check_defaults(&[])?;
    generate(&app, p, true).await
}

async fn generate(app: &App, p: Payload, img2img: bool) -> ApiResult {
    let prompt = p.string("prompt")?.unwrap_or_default();
    let (choice, clip_skip) = choice(app, &p, &prompt)?;
    let mut settings = a1111::settings(&p, clip_skip)?;
    if !img2img {
        settings.hires = a1111::hires(&p)?;
    }
    let (width, height) = (settings.width.unwrap_or(512), settings.height.unwrap_or(512));
    let (init, paste) = if img2img { a1111::init_image(&p, width, height)? } else { (Init::Noise, None) };
    let batches = batches(&settings, init, &p)?;
    // A missing upscaler is the request's fault, found before it queues.
    if let Some(name) = batches[0][0].hires.as_ref().and_then(|h| h.upscaler.model()) {
        assets::find(Asset::Upscaler, name, &app.settings.models_dir)
            .map_err(|e| ApiError::field("hr_upscaler", format!("{e:#}")))?;
    }
    let save = p.boolean("save_images")?.unwrap_or(false);
    let restore = p.get("override_settings_restore_afterwards").and_then(Value::as_bool).unwrap_or(true);
    let plan = Plan::Requests(batches);
    let mut done = run(app, |reply| Job { choice: choice.clone(), plan, reply }).await?;
    if let Some(paste) = &paste {
        done.images.iter_mut().for_each(|m| m.image = paste.apply(&m.image));
    }
    if !restore {
        let mut o = lock(&app.options);
        (o.model, o.vae, o.clip_skip) = (choice.model.clone(), choice.vae.clone(), clip_skip);
    }
    let mut images = Vec::new();
    for m in &done.images {
        images.push(base64::engine::general_purpose::STANDARD.encode(png(m)?));
    }
    if save {
        save_images(app, &done)?;
    }
    let info = info_json(&done, &p, clip_skip, choice.vae.as_deref());
    Ok(Json(json!({"images": images, "parameters": Value::Object(p.0), "info": info.to_string()})).into_response())
}

/// An image as PNG bytes with its parameters.
fn png(m: &Made) -> Result<Vec<u8>, ApiError> {
    let mut png = Vec::new();
    sdgen::image_io::encode_png(&mut png, &m.image, &m.parameters).map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok(png)
}

/// Writes a job's images into `--out-dir` as `sdgen batch` names them
/// (`JOB-SEED.png`, `JOB-SEED-K.png` for several; the job counts the saving
/// requests), each recorded in the folder's manifest once in place.
fn save_images(app: &App, done: &Done) -> Result<(), ApiError> {
    let fail = |e: anyhow::Error| ApiError::internal(format!("{e:#}"));
    let mut saved = lock(&app.saved);
    let (job, manifest) = &mut *saved;
    if manifest.is_none() {
        *manifest = Some(sdgen::batch::open_out_dir(&app.out_dir, None, false).map_err(fail)?);
    }
    let manifest = manifest.as_mut().expect("opened above");
    let several = done.images.len() > 1;
    for (k, m) in done.images.iter().enumerate() {
        let r = &m.request;
        let file = if several { format!("{job:05}-{}-{k}.png", r.seed) } else { format!("{job:05}-{}.png", r.seed) };
        let bytes = png(m)?;
        sdgen::image_io::write_bytes(&app.out_dir.join(&file), &bytes).map_err(fail)?;
        // The image's own size: only-masked inpainting answers at the original's.
        let size = (m.image.width, m.image.height);
        let entry = sdgen::batch::ManifestEntry::new((*job, 0), r, file, size, &bytes, m.seconds);
        manifest.append(&entry).map_err(fail)?;
    }
    *job += 1;
    Ok(())
}

/// A1111's `info`: the generation's keys, one entry per image in the `all_` lists.
fn info_json(done: &Done, p: &Payload, clip_skip: usize, vae: Option<&str>) -> Value {
    let Some(first) = done.images.first().map(|m| &m.request) else { return json!({}) };
    let all = |f: &dyn Fn(&sdgen::request::Request) -> Value| -> Vec<Value> {
        done.images.iter().map(|m| f(&m.request)).collect()
    };
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    json!({
        "prompt": first.prompt,
        "all_prompts": all(&|r| json!(r.prompt)),
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": all(&|r| json!(r.negative_prompt)),
        "seed": first.seed,
        "all_seeds": all(&|r| json!(r.seed)),
        "subseed": -1,
        "all_subseeds": all(&|_| json!(-1)),
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": first.sampler.a1111_name(),
        "scheduler": first.schedule.a1111_name(),
        "cfg_scale": first.cfg_scale,
        "steps": first.steps,
        "batch_size": p.int("batch_size").ok().flatten().unwrap_or(1),
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": done.model_name,
        "sd_model_hash": done.model_hash,
        "sd_vae_name": vae.map(|v| assets::display_name(std::path::Path::new(v))),
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": match (&first.init, &first.hires) {
            (Init::Image { strength, .. }, _) => json!(strength),
            (_, Some(h)) => json!(h.denoise),
            _ => json!(0),
        },
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": done.images.iter().map(|m| json!(m.parameters)).collect::<Vec<_>>(),
        "styles": [],
        "job_timestamp": stamp.to_string(),
        "clip_skip": clip_skip,
        "is_using_inpainting_conditioning": false,
        "version": format!("sdgen {}", env!("CARGO_PKG_VERSION")),
    })
}

/// A checkpoint's A1111 title, hash and full SHA-256.
fn checkpoint_row(path: &std::path::Path) -> Value {
    let name = assets::display_name(path);
    let file = if path.is_dir() { name.clone() } else { format!("{name}.safetensors") };
    let hash = sdgen::loading::model_hash(path).unwrap_or_default();
    let sha256 = if path.is_file() { sdgen::loading::hashing::sha256(path).unwrap_or_default() } else { String::new() };
    json!({"title": format!("{file} [{hash}]"), "model_name": name, "hash": hash, "sha256": sha256,
           "filename": path.display().to_string(), "config": null})
}

async fn sd_models(State(app): State<Arc<App>>) -> Json<Value> {
    let dir = app.settings.models_dir.clone();
    let rows = tokio::task::spawn_blocking(move || {
        assets::list_models(&dir).iter().map(|p| checkpoint_row(p)).collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    Json(Value::Array(rows))
}

async fn get_options(State(app): State<Arc<App>>) -> Json<Value> {
    let o = lock(&app.options).clone();
    let loaded = lock(&app.shared.loaded).clone();
    let checkpoint = match (&o.model, &loaded) {
        (Some(m), _) => {
            let path = std::path::PathBuf::from(m);
            if path.exists() {
                checkpoint_row(&path)["title"].clone()
            } else {
                json!(m)
            }
        }
        (None, Some((_, path, _))) => checkpoint_row(path)["title"].clone(),
        (None, None) => json!(null),
    };
    let vae = o.vae.as_deref().map_or("Automatic".to_string(), |v| assets::display_name(std::path::Path::new(v)));
    Json(json!({
        "sd_model_checkpoint": checkpoint,
        "CLIP_stop_at_last_layers": o.clip_skip,
        "sd_vae": vae,
        "samples_save": true,
        "samples_format": "png",
        "outdir_samples": app.out_dir.display().to_string(),
        "eta_ancestral": 1.0,
        "sd_checkpoint_hash": loaded.map(|l| l.2),
    }))
}

/// Takes the whole dict a client got back; sdgen's options change (a new
/// checkpoint or VAE is loaded before the answer), others are ignored.
async fn set_options(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let p = Payload::parse(&body)?;
    let mut next = lock(&app.options).clone();
    if let Some(m) = p.string("sd_model_checkpoint")? {
        next.model = Some(checkpoint_name(&app, &m).map_err(|e| ApiError::field("sd_model_checkpoint", e))?);
    }
    if let Some(n) = p.count("CLIP_stop_at_last_layers", 12)? {
        next.clip_skip = n;
    }
    if let Some(v) = p.string("sd_vae")? {
        next.vae = vae_name(&app, &v).map_err(|e| ApiError::field("sd_vae", e))?;
    }
    let current = lock(&app.options).clone();
    let choice = |o: &Options| ModelChoice { model: o.model.clone(), vae: o.vae.clone(), loras: Vec::new() };
    if choice(&next).loads_other_than(&choice(&current)) {
        // Load now, as A1111 does: the answer says whether the model loads.
        let next_choice = choice(&next);
        run(&app, |reply| Job { choice: next_choice, plan: Plan::Requests(Vec::new()), reply }).await?;
    }
    *lock(&app.options) = next;
    Ok(Json(json!(null)).into_response())
}

async fn samplers() -> Json<Value> {
    let rows: Vec<Value> = sdgen::sampling::samplers::SAMPLERS
        .iter()
        .map(|(_, name, a1111, _, _)| json!({"name": a1111, "aliases": [name], "options": {}}))
        .collect();
    Json(Value::Array(rows))
}

async fn schedulers() -> Json<Value> {
    let rows = [
        ("automatic", "Automatic"),
        ("uniform", "Uniform"),
        ("karras", "Karras"),
        ("exponential", "Exponential"),
        ("beta", "Beta"),
        ("normal", "Normal"),
    ];
    Json(Value::Array(
        rows.iter()
            .map(|(n, l)| json!({"name": n, "label": l, "aliases": null, "default_rho": -1, "need_inner_model": false}))
            .collect(),
    ))
}

async fn loras(State(app): State<Arc<App>>) -> Json<Value> {
    let rows: Vec<Value> = assets::list(Asset::Lora, &app.settings.models_dir)
        .iter()
        .map(|p| {
            let name = assets::display_name(p);
            json!({"name": name, "alias": name, "path": p.display().to_string(), "metadata": {}})
        })
        .collect();
    Json(Value::Array(rows))
}

/// The resamplers and the upscaler models in the models dir, by the names
/// `hr_upscaler` takes.
async fn upscalers(State(app): State<Arc<App>>) -> Json<Value> {
    let row = |name: &str, path: Option<String>| json!({"name": name, "model_name": path.as_ref().map(|_| name), "model_path": path, "model_url": null, "scale": null});
    let mut rows = vec![row("Lanczos", None), row("Nearest", None)];
    rows.extend(
        assets::list(Asset::Upscaler, &app.settings.models_dir)
            .iter()
            .map(|p| row(&assets::display_name(p), Some(p.display().to_string()))),
    );
    Json(Value::Array(rows))
}

async fn latent_upscale_modes() -> Json<Value> {
    Json(Value::Array(sdgen::hires::LATENT_MODES.iter().map(|(_, name, _)| json!({"name": name})).collect()))
}

async fn sd_vae(State(app): State<Arc<App>>) -> Json<Value> {
    let rows: Vec<Value> = assets::list(Asset::Vae, &app.settings.models_dir)
        .iter()
        .map(|p| json!({"model_name": format!("{}.safetensors", assets::display_name(p)), "filename": p.display().to_string()}))
        .collect();
    Json(Value::Array(rows))
}

async fn embeddings(State(app): State<Arc<App>>) -> Json<Value> {
    let dir = assets::embeddings_dir(&app.settings.models_dir);
    let mut loaded = serde_json::Map::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")))
            .map(|p| assets::display_name(&p))
            .collect();
        names.sort();
        for n in names {
            loaded.insert(n, json!({"step": null, "sd_checkpoint": null, "sd_checkpoint_name": null, "shape": null, "vectors": null}));
        }
    }
    Json(json!({"loaded": loaded, "skipped": {}}))
}

async fn progress(State(app): State<Arc<App>>) -> Json<Value> {
    let p = lock(&app.shared.progress).clone();
    let running = p.started.is_some();
    let fraction = if running && p.batch_count > 0 {
        let step = if p.sampling_steps > 0 { p.sampling_step as f64 / p.sampling_steps as f64 } else { 0.0 };
        ((p.batch_no as f64 + step) / p.batch_count as f64).min(1.0)
    } else {
        0.0
    };
    let elapsed = p.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let eta = if fraction > 0.0 { elapsed / fraction - elapsed } else { 0.0 };
    Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": app.shared.skip.load(Ordering::SeqCst),
            "interrupted": app.shared.interrupt.load(Ordering::SeqCst),
            "stopping_generation": false,
            "job": if running { "generating" } else { "" },
            "job_count": p.job_count,
            "job_timestamp": "0",
            "job_no": p.job_no,
            "sampling_step": p.sampling_step,
            "sampling_steps": p.sampling_steps,
        },
        "current_image": null,
        "textinfo": null,
        "current_task": null,
    }))
}

async fn interrupt(State(app): State<Arc<App>>) -> Json<Value> {
    if lock(&app.shared.progress).started.is_some() {
        app.shared.interrupt.store(true, Ordering::SeqCst);
    }
    Json(json!({}))
}

async fn skip(State(app): State<Arc<App>>) -> Json<Value> {
    if lock(&app.shared.progress).started.is_some() {
        app.shared.skip.store(true, Ordering::SeqCst);
    }
    Json(json!({}))
}

async fn png_info(body: Bytes) -> ApiResult {
    let p = Payload::parse(&body)?;
    let Some(value) = p.get("image") else { return Err(ApiError::field("image", "missing")) };
    let bytes = a1111::base64_field("image", value)?;
    let parameters = sdgen::image_io::parameters_from_bytes(&bytes, "image")
        .map_err(|e| ApiError::field("image", format!("{e:#}")))?;
    let text = parameters.unwrap_or_default();
    let items = if text.is_empty() { json!({}) } else { json!({"parameters": text}) };
    Ok(Json(json!({"info": text, "items": items, "parameters": {}})).into_response())
}

async fn memory() -> Json<Value> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| -> u64 {
        status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = |key: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let (total, free) = (mem("MemTotal:") * 1024, mem("MemAvailable:") * 1024);
    Json(json!({
        "ram": {"free": free, "used": total.saturating_sub(free), "total": total, "process_rss": kb("VmRSS:") * 1024},
        "cuda": {"error": "sdgen does not report device memory"},
    }))
}

/// OpenAI's images API: the family's own defaults for sampler, steps and
/// guidance; `size` "WxH" or the model's native size; base64 answers only.
async fn openai_generate(State(app): State<Arc<App>>, body: Bytes) -> ApiResult {
    let p = Payload::parse(&body)?;
    let prompt = p.string("prompt")?.ok_or_else(|| ApiError::field("prompt", "missing"))?;
    let n = p.count("n", MAX_IMAGES as i64)?.unwrap_or(1);
    match p.string("response_format")?.as_deref() {
        None | Some("b64_json") => {}
        Some(other) => {
            return Err(ApiError::field("response_format", format!("{other:?}: only b64_json (sdgen serves no URLs)")))
        }
    }
    let size = match p.string("size")?.filter(|s| s != "auto") {
        None => None,
        Some(s) => {
            let parsed = s
                .split_once('x')
                .and_then(|(w, h)| Some((w.trim().parse::<usize>().ok()?, h.trim().parse::<usize>().ok()?)));
            match parsed {
                Some((w, h)) if w > 0 && h > 0 && w % 8 == 0 && h % 8 == 0 => Some((w, h)),
                _ => return Err(ApiError::field("size", format!("{s:?} is not WIDTHxHEIGHT in multiples of 8"))),
            }
        }
    };
    let (mut choice, clip_skip) = choice(&app, &Payload(serde_json::Map::new()), &prompt)?;
    if let Some(m) = p.string("model")? {
        choice.model =
            Some(checkpoint_name(&app, &m).map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "model not found", e))?);
    }
    let settings = Settings {
        prompt: Some(prompt),
        seed: Some(a1111::random_seed()),
        width: size.map(|s| s.0),
        height: size.map(|s| s.1),
        clip_skip: Some(clip_skip),
        ..Settings::default()
    };
    let plan = Plan::FamilyDefaults { settings: Box::new(settings), count: n };
    let done = run(&app, |reply| Job { choice, plan, reply }).await?;
    let mut data = Vec::new();
    for m in &done.images {
        let b64 = base64::engine::general_purpose::STANDARD.encode(png(m)?);
        data.push(json!({"b64_json": b64, "revised_prompt": m.request.prompt}));
    }
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    Ok(Json(json!({"created": created, "data": data})).into_response())
}

async fn openai_models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = assets::list_models(&app.settings.models_dir)
        .iter()
        .map(|p| json!({"id": assets::display_name(p), "object": "model", "created": 0, "owned_by": "sdgen"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}
