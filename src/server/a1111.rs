//! AUTOMATIC1111's request fields: each field sdgen honours read and
//! checked here, once; a field sdgen does not implement is accepted at
//! A1111's default value and refused otherwise (it would change the image
//! silently); unknown fields are ignored, as A1111's clients send extras.

use base64::Engine;
use sdgen::editing::{self, Mask};
use sdgen::image_io::{image_from_bytes, mask_levels_from_bytes, Image};
use sdgen::request::Size;
use sdgen::request::{Init, LatentFill, Overlay};
use sdgen::sampling::samplers::{Sampler, SamplerName};
use sdgen::sampling::schedule::ScheduleKind;
use sdgen::settings::{HiresSettings, Settings};
use serde_json::{Map, Value};

use super::ApiError;

/// A JSON request body, read field by field.
pub struct Payload(pub Map<String, Value>);

/// Fields sdgen does not implement, with the values A1111's API takes as
/// their defaults (clients send these on every call). `image_cfg_scale` is
/// not here: A1111 uses it for InstructPix2Pix models only, which sdgen
/// does not load, and webuiapi sends 1.5.
const AT_DEFAULT_ONLY: &[(&str, &[&str])] = &[
    ("restore_faces", &["false", "null"]),
    ("tiling", &["false", "null"]),
    ("subseed_strength", &["0", "0.0", "null"]),
    ("seed_resize_from_h", &["-1", "0", "null"]),
    ("seed_resize_from_w", &["-1", "0", "null"]),
    ("styles", &["[]", "null"]),
    ("script_name", &["null", "\"\""]),
    ("script_args", &["[]", "null"]),
    ("refiner_checkpoint", &["null", "\"\""]),
    ("refiner_switch_at", &["null", "0", "0.0"]),
    ("eta", &["null", "1", "1.0", "0", "0.0"]),
    ("s_noise", &["null", "1", "1.0"]),
    ("s_churn", &["null", "0", "0.0"]),
    ("s_tmin", &["null", "0", "0.0"]),
    ("s_tmax", &["null", "0", "0.0"]),
    ("s_min_uncond", &["null", "0", "0.0"]),
    ("initial_noise_multiplier", &["null", "1", "1.0"]),
    ("alwayson_scripts", &["{}", "null"]),
    ("firstpass_image", &["null"]),
];

impl Payload {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(Self(m)),
            Ok(_) => Err(ApiError::bad_request("body", "the body must be a JSON object")),
            Err(e) => Err(ApiError::bad_request("body", format!("not valid JSON: {e}"))),
        }
    }

    /// A present, non-null field.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub fn string(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::field(key, "must be a string")),
        }
    }

    pub fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| ApiError::field(key, "must be an integer")),
        }
    }

    /// A count or size: an integer from 1 to `max`.
    pub fn count(&self, key: &str, max: i64) -> Result<Option<usize>, ApiError> {
        match self.int(key)? {
            None => Ok(None),
            Some(n) if (1..=max).contains(&n) => Ok(Some(n as usize)),
            Some(n) => Err(ApiError::field(key, format!("must be between 1 and {max}, got {n}"))),
        }
    }

    pub fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().filter(|f| f.is_finite()).map(Some).ok_or_else(|| ApiError::field(key, "must be a number"))
            }
        }
    }

    pub fn boolean(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::field(key, "must be true or false")),
        }
    }

    /// Refuses every unimplemented field set away from its default, and
    /// `extra` ones (`(field, allowed values)`) likewise.
    pub fn check_defaults(&self, extra: &[(&str, &[&str])]) -> Result<(), ApiError> {
        for (key, defaults) in AT_DEFAULT_ONLY.iter().chain(extra) {
            let Some(v) = self.0.get(*key) else { continue };
            let text = v.to_string();
            let same = defaults.iter().any(|d| {
                *d == text
                    || serde_json::from_str::<Value>(d).ok().and_then(|d| d.as_f64()) == v.as_f64() && v.is_number()
            });
            if !same {
                return Err(ApiError::field(key, format!("{text} is not supported by sdgen (only A1111's default)")));
            }
        }
        Ok(())
    }
}

/// A1111's sampler table: the schedule its "Automatic" scheduler gives a
/// sampler; the others step evenly in timestep (diffusers' linspace).
fn automatic_schedule(sampler: Sampler) -> ScheduleKind {
    match sampler {
        Sampler::DpmPP2M | Sampler::DpmPP2SAncestral | Sampler::Dpm2 | Sampler::Dpm2Ancestral => ScheduleKind::Karras,
        Sampler::DpmPP2MSde => ScheduleKind::Exponential,
        // A1111's DDIM/PLMS/UniPC step their own timestep grids: the model's.
        Sampler::Ddim | Sampler::Plms | Sampler::UniPc | Sampler::Deis | Sampler::Ddpm | Sampler::Lcm => {
            ScheduleKind::Normal
        }
        Sampler::Euler | Sampler::EulerAncestral | Sampler::Heun | Sampler::Lms => ScheduleKind::Linspace,
    }
}

/// The sampler and schedule of `sampler_name` (or `sampler_index`, which
/// it wins over) and `scheduler`.
pub fn sampling(p: &Payload) -> Result<(Sampler, ScheduleKind), ApiError> {
    let (key, name) = match (p.string("sampler_name")?, p.string("sampler_index")?) {
        (Some(n), _) if !n.is_empty() => ("sampler_name", n),
        (_, Some(n)) if !n.is_empty() => ("sampler_index", n),
        _ => ("sampler_name", "Euler".to_string()),
    };
    let named: SamplerName = name.parse().map_err(|e: anyhow::Error| ApiError::field(key, e.to_string()))?;
    let scheduler = p.string("scheduler")?.unwrap_or_else(|| "automatic".into());
    let schedule = match scheduler_kind("scheduler", &scheduler)? {
        Some(kind) => kind,
        None => named.schedule.unwrap_or_else(|| automatic_schedule(named.sampler)),
    };
    if let (Some(implied), false) = (named.schedule, scheduler.eq_ignore_ascii_case("automatic")) {
        if implied != schedule {
            return Err(ApiError::field("scheduler", format!("{scheduler:?} contradicts the sampler name {name:?}")));
        }
    }
    Ok((named.sampler, schedule))
}

/// A1111's scheduler `name` in `key`; `None` for "Automatic".
fn scheduler_kind(key: &str, name: &str) -> Result<Option<ScheduleKind>, ApiError> {
    Ok(Some(match name.to_ascii_lowercase().as_str() {
        "automatic" => return Ok(None),
        // A1111's "Uniform" and "Normal" step evenly in timestep.
        "uniform" | "normal" => ScheduleKind::Linspace,
        "karras" => ScheduleKind::Karras,
        "exponential" => ScheduleKind::Exponential,
        "beta" => ScheduleKind::Beta,
        other => {
            return Err(ApiError::field(
                key,
                format!("{other:?} is not supported (automatic, uniform, normal, karras, exponential, beta)"),
            ))
        }
    }))
}

/// txt2img's hires fix: `enable_hr` and the `hr_*` fields, A1111's
/// defaults for those absent (scale 2, "Latent", denoising 0.7); nothing
/// when it is off (clients send the `hr_*` fields anyway).
pub fn hires(p: &Payload) -> Result<HiresSettings, ApiError> {
    if !p.boolean("enable_hr")?.unwrap_or(false) {
        return Ok(HiresSettings::default());
    }
    let side = |key: &str| match p.int(key)?.unwrap_or(0) {
        v @ 0..=MAX_HIRES_SIDE => Ok(v as usize),
        v => Err(ApiError::field(key, format!("must be between 0 and {MAX_HIRES_SIDE}, got {v}"))),
    };
    let (x, y) = (side("hr_resize_x")?, side("hr_resize_y")?);
    // "Use same …" and empty strings mean the first pass's.
    let given = |key: &str| -> Result<Option<String>, ApiError> {
        Ok(p.string(key)?.filter(|s| !s.is_empty() && !s.starts_with("Use same")))
    };
    let parsed = |key: &str| {
        let key = key.to_string();
        move |e: anyhow::Error| ApiError::field(&key, format!("{e:#}"))
    };
    let steps = match p.int("hr_second_pass_steps")?.unwrap_or(0) {
        v @ 0..=1000 => v as usize,
        v => return Err(ApiError::field("hr_second_pass_steps", format!("must be between 0 and 1000, got {v}"))),
    };
    let schedule = match given("hr_scheduler")? {
        Some(name) => scheduler_kind("hr_scheduler", &name)?,
        None => None,
    };
    Ok(HiresSettings {
        scale: Some(p.number("hr_scale")?.unwrap_or(2.0)),
        size: (x > 0 || y > 0).then_some(Size { width: x, height: y }),
        upscaler: given("hr_upscaler")?.map(|n| n.parse()).transpose().map_err(parsed("hr_upscaler"))?,
        steps: Some(steps),
        denoise: Some(p.number("denoising_strength")?.unwrap_or(sdgen::settings::HIRES_DENOISE)),
        sampler: given("hr_sampler_name")?.map(|n| n.parse()).transpose().map_err(parsed("hr_sampler_name"))?,
        schedule,
        prompt: given("hr_prompt")?,
        negative_prompt: given("hr_negative_prompt")?,
        // Forge's field; A1111 1.10 has none.
        cfg_scale: p.number("hr_cfg")?.filter(|&c| c > 0.0),
    })
}

/// The largest `hr_resize_x`/`hr_resize_y`.
const MAX_HIRES_SIDE: i64 = sdgen::image_io::MAX_SIDE as i64;

/// A random 32-bit seed, as A1111 draws for -1.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() & 0xffff_ffff
}

/// The generation settings every A1111 request shares, with A1111's API
/// defaults (50 steps, cfg 7, Euler, 512×512) for what is absent.
pub fn settings(p: &Payload, clip_skip: usize) -> Result<Settings, ApiError> {
    let (sampler, schedule) = sampling(p)?;
    let seed = match p.int("seed")? {
        None | Some(-1) => random_seed(),
        Some(s) if s >= 0 => s as u64,
        Some(s) => return Err(ApiError::field("seed", format!("must be -1 (random) or at least 0, got {s}"))),
    };
    let side = |key: &str| -> Result<usize, ApiError> {
        match p.count(key, sdgen::image_io::MAX_SIDE as i64)? {
            None => Ok(512),
            Some(v) if v % 8 == 0 => Ok(v),
            Some(v) => Err(ApiError::field(key, format!("must be a multiple of 8, got {v}"))),
        }
    };
    Ok(Settings {
        prompt: Some(p.string("prompt")?.unwrap_or_default()),
        negative_prompt: Some(p.string("negative_prompt")?.unwrap_or_default()),
        seed: Some(seed),
        steps: Some(p.count("steps", 1000)?.unwrap_or(50)),
        cfg_scale: Some(p.number("cfg_scale")?.unwrap_or(7.0)),
        width: Some(side("width")?),
        height: Some(side("height")?),
        sampler: Some(SamplerName { sampler, schedule: None }),
        schedule: Some(schedule),
        clip_skip: Some(clip_skip),
        ..Settings::default()
    })
}

/// An image sent as raw base64 or a `data:image/…;base64,` URL (never
/// fetched from anywhere else).
pub fn image_field(key: &str, value: &Value) -> Result<Image, ApiError> {
    let bytes = base64_field(key, value)?;
    image_from_bytes(&bytes, key).map_err(|e| ApiError::field(key, format!("{e:#}")))
}

/// The bytes of a file sent as raw base64 or a `data:image/…;base64,` URL.
pub fn base64_field(key: &str, value: &Value) -> Result<Vec<u8>, ApiError> {
    let Value::String(text) = value else { return Err(ApiError::field(key, "must be a base64 string")) };
    let data = match text.strip_prefix("data:") {
        Some(rest) => match rest.split_once(";base64,") {
            Some((mime, data)) if mime.starts_with("image/") => data,
            _ => return Err(ApiError::field(key, "a data URL must be data:image/…;base64,…")),
        },
        None if text.starts_with("http://") || text.starts_with("https://") => {
            return Err(ApiError::field(key, "URLs are not fetched: send the image as base64"))
        }
        None => text.as_str(),
    };
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::field(key, format!("not valid base64: {e}")))
}

/// "Only masked" inpainting's way back: each generated image is scaled to
/// the region it came from and pasted into the original, with the original
/// laid over it by the blurred mask (A1111's "mask for overlay").
pub struct PasteBack {
    original: Image,
    region: editing::Region,
    alpha: Vec<f32>,
}

impl PasteBack {
    pub fn apply(&self, generated: &Image) -> Image {
        let (x1, y1, x2, y2) = self.region;
        let scaled = editing::resize_crop(generated, x2 - x1, y2 - y1);
        editing::blend(&editing::paste(&self.original, &scaled, x1, y1), &self.original, &self.alpha)
    }
}

/// An image resized to `width × height` as A1111's `resize_mode` says: 0
/// stretch, 1 crop to fill, 2 fit and fill the rest with stretched edges.
fn resized(p: &Payload, image: &Image, width: usize, height: usize) -> Result<Image, ApiError> {
    match p.int("resize_mode")?.unwrap_or(0) {
        0 => Ok(editing::resize(image, width, height)),
        1 => Ok(editing::resize_crop(image, width, height)),
        2 => Ok(editing::resize_fill(image, width, height)),
        3 => Err(ApiError::field("resize_mode", "3 (latent upscale) is not supported")),
        m => Err(ApiError::field("resize_mode", format!("must be 0, 1, 2 or 3, got {m}"))),
    }
}

/// img2img's start: the init image resized to `width × height`, or with a
/// `mask`, inpainting as A1111's img2img prepares it: the mask resized to
/// the image and optionally inverted; with `inpaint_full_res` ("only
/// masked", A1111's default) the mask's region plus padding, at the
/// request's size, pasted back afterwards; `inpainting_fill` 0 fills the
/// masked pixels from their surroundings, 1 keeps them, 2 and 3 start
/// their latents from noise or zeros; `mask_blur` fades the result in.
pub fn init_image(p: &Payload, width: usize, height: usize) -> Result<(Init, Option<PasteBack>), ApiError> {
    let images = match p.get("init_images") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        _ => return Err(ApiError::field("init_images", "img2img needs one image (a list of base64 strings)")),
    };
    if images.len() > 1 {
        return Err(ApiError::field("init_images", "sdgen takes one init image"));
    }
    let image = image_field("init_images", &images[0])?;
    let strength = p.number("denoising_strength")?.unwrap_or(0.75);
    if !(0.0..=1.0).contains(&strength) {
        return Err(ApiError::field("denoising_strength", format!("must be between 0 and 1, got {strength}")));
    }
    let mask = match p.get("mask") {
        Some(Value::String(s)) if s.is_empty() => None,
        Some(v) => Some(base64_field("mask", v)?),
        None => None,
    };
    let Some(mask) = mask else {
        return Ok((Init::Image { image: resized(p, &image, width, height)?, strength }, None));
    };
    let (mw, mh, mut levels) =
        mask_levels_from_bytes(&mask, "mask").map_err(|e| ApiError::field("mask", format!("{e:#}")))?;
    let (w0, h0) = (image.width, image.height);
    if (mw, mh) != (w0, h0) {
        levels = editing::image_levels(&editing::resize(&editing::levels_image(mw, mh, &levels), w0, h0));
    }
    match p.int("inpainting_mask_invert")?.unwrap_or(0) {
        0 => {}
        1 => levels.iter_mut().for_each(|l| *l = 255 - *l),
        v => return Err(ApiError::field("inpainting_mask_invert", format!("must be 0 or 1, got {v}"))),
    }
    let blur = p.number("mask_blur")?.unwrap_or(4.0);
    if !(0.0..=256.0).contains(&blur) {
        return Err(ApiError::field("mask_blur", format!("must be between 0 and 256, got {blur}")));
    }
    let fill = match p.int("inpainting_fill")?.unwrap_or(0) {
        v @ 0..=3 => v,
        v => return Err(ApiError::field("inpainting_fill", format!("must be 0, 1, 2 or 3, got {v}"))),
    };
    // A1111 blurs the mask first: it is what everything after sees.
    let levels = editing::blur_levels(&levels, w0, h0, blur);
    if !levels.iter().any(|&l| l > 0) {
        return Err(ApiError::field("mask", "no pixel is masked (white marks what to repaint)"));
    }
    let gray = editing::levels_image(w0, h0, &levels);
    let unit =
        |levels: &[u8], gain: f32| -> Vec<f32> { levels.iter().map(|&l| (l as f32 * gain / 255.0).min(1.0)).collect() };
    let (image_in, mask_in, overlay, paste) = if p.boolean("inpaint_full_res")?.unwrap_or(true) {
        let pad = match p.int("inpaint_full_res_padding")?.unwrap_or(0) {
            v if v >= 0 => v as usize,
            v => return Err(ApiError::field("inpaint_full_res_padding", format!("must be at least 0, got {v}"))),
        };
        let region = editing::masked_region(&levels, w0, h0, pad, width, height).expect("some level is set");
        let image_in = editing::resize_fill(&editing::crop(&image, region), width, height);
        let mask_in = editing::resize_fill(&editing::crop(&gray, region), width, height);
        // The blend happens after the paste, at the original's size.
        let keep_all = Overlay::Alpha(vec![1.0; width * height]);
        (image_in, mask_in, keep_all, Some(PasteBack { original: image, region, alpha: unit(&levels, 1.0) }))
    } else {
        let mask_in = resized(p, &gray, width, height)?;
        // A1111 doubles the resized mask for the overlay: it fades out past the mask's edge.
        let alpha = Overlay::Alpha(unit(&editing::image_levels(&mask_in), 2.0));
        (resized(p, &image, width, height)?, mask_in, alpha, None)
    };
    let mask = Mask::from_levels(width, height, &editing::image_levels(&mask_in));
    let image = if fill == 0 { editing::fill_masked(&image_in, &mask) } else { image_in };
    let fill = match fill {
        2 => LatentFill::Noise,
        3 => LatentFill::Nothing,
        _ => LatentFill::Original,
    };
    Ok((Init::Inpaint { image, mask, strength, overlay, fill }, paste))
}
