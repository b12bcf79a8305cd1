//! `sdgen serve` as clients see it: the server runs as its own process on
//! an ephemeral loopback port with the tiny SD 1.x model, and each test
//! talks HTTP to it. Jobs that must still be running when a test acts on
//! them use many tiny steps; nothing asserts on timing.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::{fixture, sdgen};
use serde_json::{json, Value};

struct Server {
    child: Child,
    base: String,
    out_dir: tempfile::TempDir,
    /// The server's log lines so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    fn start(extra: &[&str]) -> Self {
        Self::start_in(&fixture("."), extra)
    }

    /// A server whose models dir is `models_dir`.
    fn start_in(models_dir: &std::path::Path, extra: &[&str]) -> Self {
        let out_dir = tempfile::tempdir().unwrap();
        let model = fixture("tiny-sd1");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sdgen"))
            .args(["serve", "--port", "0", "--device", "cpu", "--offline", "--model"])
            .arg(&model)
            .arg("--models-dir")
            .arg(models_dir)
            .arg("--out-dir")
            .arg(out_dir.path())
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("sdgen serve starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("the server says where it listens").unwrap();
            if let Some(addr) = line.strip_prefix("sdgen serve: listening on ") {
                break addr.to_string();
            }
        };
        // Keep reading the log so that the server never blocks on it.
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| sink.lock().unwrap().push(l)));
        Server { child, base, out_dir, log }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The status and JSON body of a request (`None`: GET).
    fn call(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_with(path, body, None)
    }

    fn call_with(&self, path: &str, body: Option<Value>, auth: Option<&str>) -> (u16, Value) {
        let mut req = match body {
            Some(_) => ureq::post(&self.url(path)),
            None => ureq::get(&self.url(path)),
        };
        if let Some(a) = auth {
            req = req.set("Authorization", a);
        }
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{path}: {e}"),
        };
        let status = response.status();
        (status, response.into_json().unwrap_or(Value::Null))
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn png_bytes(b64: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap()
}

fn small(extra: Value) -> Value {
    let mut body = json!({"prompt": "a red fox", "steps": 3, "width": 64, "height": 64, "seed": 5});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// Waits until the server counts `n` jobs running or waiting.
fn wait_jobs(s: &Server, n: u64) {
    for _ in 0..600 {
        if s.call("/sdapi/v1/progress", None).1["state"]["job_count"].as_u64() == Some(n) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the server never counted {n} jobs");
}

/// Waits until the server reports a job sampling.
fn wait_sampling(s: &Server) {
    for _ in 0..600 {
        let (_, p) = s.call("/sdapi/v1/progress", None);
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no job started sampling: {:?}", s.call("/sdapi/v1/progress", None));
}

#[test]
fn txt2img_answers_as_a1111_and_equals_the_cli_image() {
    let s = Server::start(&[]);
    let body = small(json!({"sampler_name": "Euler a", "batch_size": 2, "n_iter": 1, "cfg_scale": 7}));
    let (status, r) = s.call("/sdapi/v1/txt2img", Some(body.clone()));
    assert_eq!(status, 200, "{r}");
    let images = r["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([5, 6]));
    assert_eq!(info["sampler_name"], "Euler a");
    assert_eq!(info["sd_model_name"], "tiny-sd1");
    assert_eq!(r["parameters"]["prompt"], "a red fox");
    // The PNG carries the CLI's parameters text.
    let png = png_bytes(&images[1]);
    let params = sdgen::image_io::parameters_from_bytes(&png, "image").unwrap().unwrap();
    assert_eq!(params, info["infotexts"][1].as_str().unwrap());
    assert!(params.contains("Seed: 6"), "{params}");

    // The same image from the CLI: A1111's defaults made explicit.
    let dir = tempfile::tempdir().unwrap();
    // Batched as the server batched them: two images in one UNet batch.
    let out = dir.path().join("cli.png");
    let model = fixture("tiny-sd1");
    let o = sdgen(&[
        "--model",
        model.to_str().unwrap(),
        "-p",
        "a red fox",
        "--steps",
        "3",
        "-W",
        "64",
        "-H",
        "64",
        "--seed",
        "5",
        "--sampler",
        "euler_a",
        "--schedule",
        "linspace",
        "--cfg-scale",
        "7",
        "--batch-count",
        "2",
        "--batch-size",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let cli = image::open(dir.path().join("cli-1.png")).unwrap().to_rgb8();
    let served = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(cli.as_raw(), served.as_raw(), "server and CLI images differ");
    assert_eq!(std::fs::read_dir(s.out_dir.path()).unwrap().count(), 0, "nothing saved without save_images");
}

#[test]
fn field_rules_defaults_accepted_others_named() {
    let s = Server::start(&[]);
    // What webuiapi sends on every call, at A1111's defaults, plus an unknown key.
    let defaults = small(json!({
        "restore_faces": false, "tiling": false, "eta": 1.0, "s_noise": 1, "s_churn": 0, "s_tmin": 0,
        "scheduler": "automatic", "styles": [], "subseed": -1, "subseed_strength": 0.0, "sampler_index": "Euler",
        "script_args": [], "alwayson_scripts": {}, "send_images": true, "save_images": false,
        "override_settings": {}, "some_client_extra": 1
    }));
    let (status, r) = s.call("/sdapi/v1/txt2img", Some(defaults));
    assert_eq!(status, 200, "{r}");
    for (field, value) in [
        ("restore_faces", json!(true)),
        ("subseed_strength", json!(0.5)),
        ("hr_checkpoint_name", json!("other.safetensors")),
        ("s_noise", json!(0.9)),
        ("styles", json!(["cinematic"])),
        ("alwayson_scripts", json!({"controlnet": {"args": []}})),
    ] {
        let (status, r) = s.call("/sdapi/v1/txt2img", Some(small(json!({ field: value }))));
        assert_eq!(status, 422, "{field}: {r}");
        assert!(r["detail"].as_str().unwrap().starts_with(field), "{field}: {r}");
    }
    for (field, value) in
        [("sampler_name", json!("DPM adaptive")), ("scheduler", json!("sgm_uniform")), ("width", json!(65))]
    {
        let (status, r) = s.call("/sdapi/v1/txt2img", Some(small(json!({ field: value }))));
        assert_eq!(status, 422, "{field}: {r}");
        assert!(r["detail"].as_str().unwrap().contains(field), "{field}: {r}");
    }
    // sampler_name wins over sampler_index; legacy names carry their schedule.
    let (status, r) =
        s.call("/sdapi/v1/txt2img", Some(small(json!({"sampler_name": "DPM++ 2M Karras", "sampler_index": "Euler"}))));
    assert_eq!(status, 200, "{r}");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sampler_name"], "DPM++ 2M");
    assert_eq!(info["scheduler"], "Karras");
    // Bad bodies: not JSON, not an object.
    let bad = ureq::post(&s.url("/sdapi/v1/txt2img")).set("Content-Type", "application/json").send_string("{bad");
    assert!(matches!(bad, Err(ureq::Error::Status(400, _))));
    let (status, _) = s.call("/sdapi/v1/txt2img", Some(json!([1, 2])));
    assert_eq!(status, 400);
    let huge = "x".repeat(51 << 20);
    let big = ureq::post(&s.url("/sdapi/v1/txt2img")).send_string(&huge);
    assert!(matches!(big, Err(ureq::Error::Status(413, _))), "{big:?}");
}

#[test]
fn hires_fix_from_enable_hr_equals_the_cli_image() {
    let s = Server::start(&[]);
    // webuiapi sends the hr_* fields on every call: ignored while enable_hr is false.
    let hr = json!({"hr_scale": 1.5, "hr_upscaler": "Latent (bicubic)", "hr_second_pass_steps": 2,
                    "denoising_strength": 0.6, "hr_sampler_name": "Use same sampler", "hr_prompt": "",
                    "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": "Use same checkpoint"});
    let mut off = small(hr.clone());
    off["enable_hr"] = json!(false);
    let (status, r) = s.call("/sdapi/v1/txt2img", Some(off));
    assert_eq!(status, 200, "{r}");
    assert_eq!(image::load_from_memory(&png_bytes(&r["images"][0])).unwrap().width(), 64);
    let mut on = small(hr);
    on["enable_hr"] = json!(true);
    let (status, r) = s.call("/sdapi/v1/txt2img", Some(on));
    assert_eq!(status, 200, "{r}");
    let png = png_bytes(&r["images"][0]);
    let params = sdgen::image_io::parameters_from_bytes(&png, "image").unwrap().unwrap();
    assert!(
        params.contains("Size: 64x64,")
            && params.contains(
                "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (bicubic)"
            ),
        "{params}"
    );
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], json!(0.6));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cli.png");
    let model = fixture("tiny-sd1");
    #[rustfmt::skip]
    let o = sdgen(&[
        "--model", model.to_str().unwrap(), "-p", "a red fox", "--steps", "3", "-W", "64", "-H", "64",
        "--seed", "5", "--sampler", "euler", "--schedule", "linspace", "--cfg-scale", "7",
        "--hires-scale", "1.5", "--hires-upscaler", "latent-bicubic", "--hires-steps", "2", "--hires-denoise", "0.6",
        "-o", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let served = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(served.dimensions(), (96, 96));
    assert_eq!(image::open(&out).unwrap().to_rgb8().as_raw(), served.as_raw(), "server and CLI images differ");

    let (_, modes) = s.call("/sdapi/v1/latent-upscale-modes", None);
    assert_eq!(modes.as_array().unwrap().len(), 6);
    assert_eq!(modes[0]["name"], "Latent");
    let (_, upscalers) = s.call("/sdapi/v1/upscalers", None);
    assert!(upscalers.as_array().unwrap().iter().any(|u| u["name"] == "Lanczos"), "{upscalers}");
    let (status, r) = s.call("/sdapi/v1/txt2img", Some(small(json!({"enable_hr": true, "hr_upscaler": "4x-Nope"}))));
    assert_eq!(status, 422, "{r}");
}

#[test]
fn img2img_png_info_and_saving() {
    let s = Server::start(&[]);
    let (_, r) = s.call("/sdapi/v1/txt2img", Some(small(json!({"save_images": true}))));
    let png = r["images"][0].clone();
    // save_images: the PNG as `sdgen batch` names it, recorded in the manifest.
    let saved = s.out_dir.path().join("00000-5.png");
    assert_eq!(std::fs::read(&saved).unwrap(), png_bytes(&png), "the saved PNG is the answered one");
    let manifest = std::fs::read_to_string(s.out_dir.path().join("manifest.jsonl")).unwrap();
    let entry: Value = serde_json::from_str(manifest.lines().next().unwrap()).unwrap();
    assert_eq!((entry["file"].as_str(), entry["seed"].as_u64()), (Some("00000-5.png"), Some(5)));
    let (status, info) = s
        .call("/sdapi/v1/png-info", Some(json!({"image": format!("data:image/png;base64,{}", png.as_str().unwrap())})));
    assert_eq!(status, 200);
    assert!(info["info"].as_str().unwrap().starts_with("a red fox\nSteps: 3"), "{info}");
    for mode in [0, 1, 2] {
        let body = small(
            json!({"init_images": [png], "denoising_strength": 0.5, "width": 64, "height": 48, "resize_mode": mode}),
        );
        let (status, r) = s.call("/sdapi/v1/img2img", Some(body));
        assert_eq!(status, 200, "resize_mode {mode}: {r}");
        let out = image::load_from_memory(&png_bytes(&r["images"][0])).unwrap();
        assert_eq!((out.width(), out.height()), (64, 48));
    }
    for (body, field) in [
        (json!({"init_images": ["http://example.com/a.png"]}), "init_images"),
        (json!({"init_images": ["bm90IGFuIGltYWdl"]}), "init_images"),
        (json!({"init_images": [png], "resize_mode": 3}), "resize_mode"),
        (json!({"init_images": []}), "init_images"),
    ] {
        let (status, r) = s.call("/sdapi/v1/img2img", Some(small(body)));
        assert_eq!(status, 422, "{r}");
        assert!(r["detail"].as_str().unwrap().starts_with(field), "{r}");
    }
}

#[test]
fn lists_options_and_openai() {
    let s = Server::start(&[]);
    let (_, models) = s.call("/sdapi/v1/sd-models", None);
    let tiny = models.as_array().unwrap().iter().find(|m| m["model_name"] == "tiny-sd1").expect("tiny-sd1 listed");
    assert!(tiny["title"].as_str().unwrap().starts_with("tiny-sd1"));
    for (path, kind) in [
        ("/sdapi/v1/samplers", "array"),
        ("/sdapi/v1/schedulers", "array"),
        ("/sdapi/v1/loras", "array"),
        ("/sdapi/v1/sd-vae", "array"),
        ("/sdapi/v1/upscalers", "array"),
        ("/sdapi/v1/latent-upscale-modes", "array"),
        ("/sdapi/v1/scripts", "object"),
        ("/sdapi/v1/embeddings", "object"),
        ("/sdapi/v1/memory", "object"),
        ("/sdapi/v1/progress", "object"),
        ("/sdapi/v1/options", "object"),
        ("/v1/models", "object"),
    ] {
        let (status, v) = s.call(path, None);
        assert_eq!(status, 200, "{path}");
        assert_eq!(if v.is_array() { "array" } else { "object" }, kind, "{path}: {v}");
    }
    let (_, samplers) = s.call("/sdapi/v1/samplers", None);
    assert!(samplers.as_array().unwrap().iter().any(|x| x["name"] == "DPM++ 2M"));
    let (status, _) = s.call("/sdapi/v1/refresh-checkpoints", Some(json!({})));
    assert_eq!(status, 200);
    // Options: the whole dict posted back is accepted; an unknown checkpoint is named.
    let (_, options) = s.call("/sdapi/v1/options", None);
    assert_eq!(options["sd_model_checkpoint"], tiny["title"]);
    let (status, _) = s.call("/sdapi/v1/options", Some(options.clone()));
    assert_eq!(status, 200);
    let (status, r) =
        s.call("/sdapi/v1/options", Some(json!({"sd_model_checkpoint": "nope.safetensors [0000000000]"})));
    assert_eq!(status, 422);
    assert!(r["detail"].as_str().unwrap().contains("nope"), "{r}");
    let (status, r) = s.call("/sdapi/v1/options", Some(json!({"sd_model_checkpoint": "tiny-sd2"})));
    assert_eq!(status, 200, "{r}");
    let (_, options) = s.call("/sdapi/v1/options", None);
    assert!(options["sd_model_checkpoint"].as_str().unwrap().starts_with("tiny-sd2 ["), "{options}");
    let (status, r) = s.call("/sdapi/v1/txt2img", Some(small(json!({}))));
    assert_eq!(status, 200, "{r}");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sd_model_name"], "tiny-sd2", "the posted checkpoint is used");
    // OpenAI's images API.
    let (status, r) = s.call(
        "/v1/images/generations",
        Some(json!({"prompt": "a fox", "n": 2, "size": "64x64", "response_format": "b64_json"})),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["data"].as_array().unwrap().len(), 2);
    let png = image::load_from_memory(&png_bytes(&r["data"][0]["b64_json"])).unwrap();
    assert_eq!((png.width(), png.height()), (64, 64));
    let (status, r) = s.call("/v1/images/generations", Some(json!({"prompt": "a fox", "response_format": "url"})));
    assert_eq!(status, 422, "{r}");
    let (status, _) = s.call("/v1/images/generations", Some(json!({"prompt": "a fox", "model": "dall-e-3"})));
    assert_eq!(status, 404);
}

#[test]
fn queue_interrupt_skip_and_disconnect() {
    let s = Server::start(&["--max-queue", "1"]);
    let long = small(json!({"steps": 1000, "width": 16, "height": 16}));
    let base = s.base.clone();
    let post = move |body: Value| {
        let url = format!("{base}/sdapi/v1/txt2img");
        std::thread::spawn(move || match ureq::post(&url).send_json(body) {
            Ok(r) => (r.status(), r.into_json::<Value>().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(e) => panic!("{e}"),
        })
    };
    let running = post(long.clone());
    wait_sampling(&s);
    let waiting = post(small(json!({})));
    // The queue holds one waiting job: a third is refused.
    wait_jobs(&s, 2);
    let (status, r) = s.call("/sdapi/v1/txt2img", Some(small(json!({}))));
    assert_eq!(status, 429, "{r}");
    let (_, p) = s.call("/sdapi/v1/progress", None);
    assert!(p["progress"].as_f64().unwrap() > 0.0, "{p}");
    assert_eq!(p["state"]["job_count"], 2, "{p}");
    // Interrupt: the running request still answers 200, with its image.
    let (status, r) = s.call("/sdapi/v1/interrupt", Some(json!({})));
    assert_eq!((status, r), (200, json!({})));
    let (status, r) = running.join().unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["images"].as_array().unwrap().len(), 1);
    let (status, _) = waiting.join().unwrap();
    assert_eq!(status, 200, "the waiting job runs after the interrupted one");

    // Skip ends the current image of a batch; the next one runs in full.
    let two = post(small(json!({"steps": 300, "width": 16, "height": 16, "n_iter": 2})));
    wait_sampling(&s);
    let (status, _) = s.call("/sdapi/v1/skip", Some(json!({})));
    assert_eq!(status, 200);
    let (status, r) = two.join().unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["images"].as_array().unwrap().len(), 2);

    // A client that disconnects cancels its job, which the server logs;
    // the next job then runs.
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_millis(800)).build();
    let gone =
        agent.post(&s.url("/sdapi/v1/txt2img")).send_json(small(json!({"steps": 1000, "width": 16, "height": 16})));
    assert!(gone.is_err(), "the client timed out");
    let patient = ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build();
    let r = patient.post(&s.url("/sdapi/v1/txt2img")).send_json(small(json!({})));
    assert_eq!(r.map(|r| r.status()).ok(), Some(200), "the next job ran");
    let log = s.log.lock().unwrap().join("\n");
    assert!(log.contains("job cancelled: the client disconnected"), "{log}");
}

#[test]
fn auth_guards_every_route() {
    let s = Server::start(&["--api-auth", "alice:secret,bob:pw"]);
    let basic =
        |u: &str, p: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")));
    for path in ["/sdapi/v1/options", "/sdapi/v1/loras", "/v1/models"] {
        assert_eq!(s.call_with(path, None, None).0, 401, "{path}");
        assert_eq!(s.call_with(path, None, Some("Basic ")).0, 401, "{path}");
        assert_eq!(s.call_with(path, None, Some(&basic("alice", "wrong"))).0, 401, "{path}");
        assert_eq!(s.call_with(path, None, Some(&basic("bob", "pw"))).0, 200, "{path}");
    }
    assert_eq!(s.call_with("/v1/models", None, Some("Bearer alice:secret")).0, 200);
    assert_eq!(s.call_with("/sdapi/v1/options", None, Some("Bearer alice:secret")).0, 401);
    let r = ureq::get(&s.url("/sdapi/v1/options")).call();
    let Err(ureq::Error::Status(401, r)) = r else { panic!("401 expected") };
    assert!(r.header("WWW-Authenticate").is_some_and(|h| h.starts_with("Basic")));
    // Without --api-auth, any Authorization header is ignored.
    let open = Server::start(&[]);
    assert_eq!(open.call_with("/sdapi/v1/options", None, Some("Bearer x")).0, 200);
    assert_eq!(open.call_with("/sdapi/v1/options", None, Some("Basic ")).0, 200);
}

#[test]
fn sigterm_answers_waiting_clients_and_exits_cleanly() {
    let s = Server::start(&[]);
    let url = s.url("/sdapi/v1/txt2img");
    let running = {
        let url = url.clone();
        std::thread::spawn(move || {
            match ureq::post(&url).send_json(small(json!({"steps": 1000, "width": 16, "height": 16}))) {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(c, _)) => c,
                Err(_) => 0,
            }
        })
    };
    wait_sampling(&s);
    let waiting = std::thread::spawn(move || match ureq::post(&url).send_json(small(json!({}))) {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(_) => 0,
    });
    wait_jobs(&s, 2);
    let mut s = s;
    let status = s.stop();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(waiting.join().unwrap(), 503);
    assert_eq!(running.join().unwrap(), 503);
    assert_eq!(std::fs::read_dir(s.out_dir.path()).unwrap().count(), 0, "no files left behind");
}

/// A 64×64 gray mask with a white square from (16, 16) to (40, 40), as base64 PNG.
fn square_mask(size: u32) -> String {
    let mut mask = image::GrayImage::new(size, size);
    for y in 16 * size / 64..40 * size / 64 {
        for x in 16 * size / 64..40 * size / 64 {
            mask.put_pixel(x, y, image::Luma([255]));
        }
    }
    let mut png = Vec::new();
    image::DynamicImage::ImageLuma8(mask)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

fn decoded(b64: &Value) -> image::RgbImage {
    image::load_from_memory(&png_bytes(b64)).unwrap().to_rgb8()
}

#[test]
fn masked_img2img_inpaints_as_a1111_prepares_it_and_as_the_cli_does() {
    let s = Server::start(&[]);
    let (_, r) = s.call("/sdapi/v1/txt2img", Some(small(json!({}))));
    let init = r["images"][0].clone();
    let original = decoded(&init);
    let inpaint = |extra: Value| {
        let body = small(json!({"init_images": [init], "mask": square_mask(64), "denoising_strength": 0.75,
                                "sampler_name": "Euler a", "mask_blur": 4}));
        let mut body = body;
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, r) = s.call("/sdapi/v1/img2img", Some(body));
        assert_eq!(status, 200, "{r}");
        decoded(&r["images"][0])
    };

    // The whole image, the original masked content, no blur: the CLI's inpaint.
    let whole = inpaint(json!({"inpaint_full_res": false, "inpainting_fill": 1, "mask_blur": 0}));
    let dir = tempfile::tempdir().unwrap();
    let (init_png, mask_png, out) = (dir.path().join("i.png"), dir.path().join("m.png"), dir.path().join("o.png"));
    std::fs::write(&init_png, png_bytes(&init)).unwrap();
    std::fs::write(&mask_png, png_bytes(&json!(square_mask(64)))).unwrap();
    let model = fixture("tiny-sd1");
    let o = sdgen(&[
        "inpaint",
        "--model",
        model.to_str().unwrap(),
        "--image",
        init_png.to_str().unwrap(),
        "--mask",
        mask_png.to_str().unwrap(),
        "--strength",
        "0.75",
        "--mask-blur",
        "0",
        "-p",
        "a red fox",
        "--steps",
        "3",
        "--seed",
        "5",
        "--sampler",
        "euler_a",
        "--schedule",
        "linspace",
        "--cfg-scale",
        "7",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(image::open(&out).unwrap().to_rgb8().as_raw(), whole.as_raw(), "server and CLI inpaint differ");

    // Only masked (A1111's default): processed at 32×32, pasted back at 64×64;
    // far from the mask nothing changes.
    let only = inpaint(json!({"width": 32, "height": 32}));
    assert_eq!(only.dimensions(), (64, 64));
    for (x, y) in [(2, 2), (60, 60), (2, 60)] {
        assert_eq!(only.get_pixel(x, y), original.get_pixel(x, y), "({x}, {y})");
    }
    assert_ne!(only.get_pixel(28, 28), original.get_pixel(28, 28));
    // A1111's mask blur: the result fades out past the mask's edge too.
    let blurred = inpaint(json!({"inpaint_full_res": false, "inpainting_fill": 1, "mask_blur": 4}));
    assert_ne!(blurred.get_pixel(14, 28), original.get_pixel(14, 28), "2 px outside the square");
    assert_eq!(blurred.get_pixel(2, 2), original.get_pixel(2, 2));
    assert_eq!(whole.get_pixel(14, 28), original.get_pixel(14, 28), "without blur, outside stays exact");
    // Each masked-content choice runs, and they differ.
    let fills: Vec<image::RgbImage> =
        (0..4).map(|f| inpaint(json!({"inpainting_fill": f, "inpaint_full_res": false}))).collect();
    assert_ne!(fills[1].as_raw(), fills[0].as_raw());
    assert_ne!(fills[1].as_raw(), fills[2].as_raw());
    assert_ne!(fills[2].as_raw(), fills[3].as_raw());
    // Inverted, the square is kept and the rest repainted.
    let inverted = inpaint(json!({"inpainting_mask_invert": 1, "inpaint_full_res": false}));
    assert_eq!(inverted.get_pixel(28, 28), original.get_pixel(28, 28));
    // A mask of another size is resized to the image.
    let (status, r) = s.call("/sdapi/v1/img2img", Some(small(json!({"init_images": [init], "mask": square_mask(32)}))));
    assert_eq!(status, 200, "{r}");
    // An empty mask, a bad fill: named.
    let empty = {
        let mut png = Vec::new();
        image::DynamicImage::ImageLuma8(image::GrayImage::new(64, 64))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(png)
    };
    for (extra, field) in
        [(json!({"mask": empty}), "mask"), (json!({"mask": square_mask(64), "inpainting_fill": 5}), "inpainting_fill")]
    {
        let mut body = small(json!({"init_images": [init]}));
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, r) = s.call("/sdapi/v1/img2img", Some(body));
        assert_eq!(status, 422, "{r}");
        assert!(r["detail"].as_str().unwrap().starts_with(field), "{r}");
    }
}

#[test]
fn prompt_loras_merge_per_request_and_never_change_the_base_weights() {
    let s = Server::start_in(&fixture("adapters"), &[]);
    let plain = || decoded(&s.call("/sdapi/v1/txt2img", Some(small(json!({})))).1["images"][0]);
    let before = plain();
    let (status, r) = s.call("/sdapi/v1/txt2img", Some(small(json!({"prompt": "a red fox <lora:tiny_kohya:0.8>"}))));
    assert_eq!(status, 200, "{r}");
    assert_ne!(decoded(&r["images"][0]).as_raw(), before.as_raw(), "the LoRA changes the image");
    assert_eq!(plain().as_raw(), before.as_raw(), "without the tag, the plain model's image again");
    let (status, r) = s.call("/sdapi/v1/txt2img", Some(small(json!({"prompt": "<lora:no_such_lora:1>"}))));
    assert_eq!(status, 422, "{r}");
    let (_, loras) = s.call("/sdapi/v1/loras", None);
    assert!(loras.as_array().unwrap().iter().any(|l| l["name"] == "tiny_kohya"), "{loras}");
}

#[test]
fn an_inpainting_model_needs_a_mask() {
    let s = Server::start(&[]);
    let (_, r) = s.call("/sdapi/v1/txt2img", Some(small(json!({}))));
    let init = r["images"][0].clone();
    let checkpoint = json!({"override_settings": {"sd_model_checkpoint": "tiny-sd1-inpaint"}});
    let (status, r) = s.call("/sdapi/v1/txt2img", Some(small(checkpoint.clone())));
    assert_eq!(status, 422, "{r}");
    assert!(r["detail"].as_str().unwrap().starts_with("mask"), "{r}");
    let mut body = small(json!({"init_images": [init], "mask": square_mask(64)}));
    body.as_object_mut().unwrap().extend(checkpoint.as_object().unwrap().clone());
    let (status, r) = s.call("/sdapi/v1/img2img", Some(body));
    assert_eq!(status, 200, "{r}");
}

#[test]
fn a_missing_model_ends_the_command_before_it_listens() {
    let o = sdgen(&["serve", "--port", "0", "--model", "no-such-model"]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(err.contains("no-such-model") && !err.contains("listening"), "{err}");
}
