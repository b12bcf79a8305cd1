//! AUTOMATIC1111's "infotext", the `parameters` text stored in PNGs: the
//! prompt, an optional `Negative prompt:` line, then `Key: value` pairs.
//! Written for every image; parsed back by `sdgen replay`.

use anyhow::{bail, Context};

use crate::hires::HiresTarget;
use crate::loading::Applied;
use crate::preprocess::Preprocess;
use crate::prompt::Syntax;
use crate::request::{Hires, Init, Overlay, Request, Size};
use crate::sampling::schedule::ScheduleKind;
use crate::settings::{ControlArg, Settings};

/// Everything the `parameters` chunk records about an image.
pub struct Parameters<'a> {
    pub request: &'a Request,
    pub model_name: &'a str,
    pub model_hash: &'a str,
    /// The model family ("SD 2.x"): sdgen's own key, which A1111 ignores.
    pub family: &'a str,
    /// LoRAs, embeddings and VAE the model was loaded with.
    pub applied: &'a Applied,
    /// (name, legacy hash) of each of the request's ControlNets.
    pub controlnets: &'a [(String, String)],
}

impl Parameters<'_> {
    pub fn infotext(&self) -> String {
        let r = self.request;
        let mut text = r.prompt.clone();
        if !r.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", r.negative_prompt));
        }
        let mut fields = vec![
            ("Steps", r.steps.to_string()),
            ("Sampler", r.sampler.a1111_name().to_string()),
            ("Schedule type", r.schedule.a1111_name().to_string()),
            ("CFG scale", r.cfg_scale.to_string()),
            ("Seed", r.seed.to_string()),
            ("Size", format!("{}x{}", r.width, r.height)),
            ("Model hash", self.model_hash.to_string()),
            ("Model", self.model_name.to_string()),
            ("Family", self.family.to_string()),
        ];
        if r.schedule == ScheduleKind::Normal {
            fields.retain(|(k, _)| *k != "Schedule type");
        }
        if let Some(strength) = r.strength() {
            fields.push(("Denoising strength", strength.to_string()));
        }
        if let Some(h) = &r.hires {
            fields.extend(hires_fields(r, h));
        }
        if let Init::Inpaint { overlay: Overlay::Feather(blur), .. } = &r.init {
            fields.push(("Mask blur", blur.to_string()));
        }
        let named = |list: &[(String, String)]| {
            list.iter().map(|(name, hash)| format!("{name}: {hash}")).collect::<Vec<_>>().join(", ")
        };
        if !self.applied.loras.is_empty() {
            fields.push(("Lora hashes", named(&self.applied.loras)));
        }
        let used: Vec<(String, String)> = self
            .applied
            .embeddings
            .iter()
            .filter(|e| mentions(&r.prompt, &e.name) || mentions(&r.negative_prompt, &e.name))
            .map(|e| (e.name.clone(), e.hash.clone()))
            .collect();
        if !used.is_empty() {
            fields.push(("TI hashes", named(&used)));
        }
        if let Some((name, hash)) = &self.applied.vae {
            fields.push(("VAE hash", hash.clone()));
            fields.push(("VAE", name.clone()));
        }
        if r.text.clip_skip > 1 {
            fields.push(("Clip skip", r.text.clip_skip.to_string()));
        }
        if r.text.syntax == Syntax::Plain {
            fields.push(("Prompt syntax", "plain".to_string()));
        }
        // SDXL's size conditioning, when not the defaults (sdgen's own keys).
        let c = &r.size_conditioning;
        let crop = (c.crop_top_left != Default::default()).then(|| c.crop_top_left.to_string());
        for (key, value) in
            SIZE_KEYS.iter().zip([c.original.map(|s| s.to_string()), crop, c.target.map(|s| s.to_string())])
        {
            if let Some(v) = value {
                fields.push((key.0, v));
            }
        }
        let units = self.control_units();
        fields.extend(units.iter().map(|(k, v)| (k.as_str(), v.clone())));
        fields.push(("Version", format!("sdgen {}", env!("CARGO_PKG_VERSION"))));
        let pairs: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect();
        text.push('\n');
        text.push_str(&pairs.join(", "));
        text
    }
}

impl Parameters<'_> {
    /// Each ControlNet as A1111's ControlNet extension records a unit:
    /// `ControlNet 0: "Module: canny, Model: NAME [HASH], Weight: 1.0, …"`.
    fn control_units(&self) -> Vec<(String, String)> {
        let r = self.request;
        let options = &r.control_options;
        r.controls
            .iter()
            .zip(self.controlnets)
            .enumerate()
            .map(|(i, (c, (name, hash)))| {
                let mut unit = vec![
                    ("Module", options.preprocess.module().to_string()),
                    ("Model", format!("{name} [{hash}]")),
                    ("Weight", python_float(c.weight)),
                    ("Resize Mode", "Just Resize".to_string()),
                ];
                if let Preprocess::Canny { low, high } = options.preprocess {
                    unit.extend([("Threshold A", python_float(low)), ("Threshold B", python_float(high))]);
                }
                unit.extend([
                    ("Guidance Start", python_float(c.start)),
                    ("Guidance End", python_float(c.end)),
                    ("Control Mode", if options.guess_mode { GUESS_MODE } else { BALANCED }.to_string()),
                ]);
                let text: Vec<String> = unit.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                (format!("ControlNet {i}"), text.join(", "))
            })
            .collect()
    }
}

/// The hires fix as A1111 records it; what equals the first pass's is left out.
fn hires_fields(r: &Request, h: &Hires) -> Vec<(&'static str, String)> {
    let mut fields = vec![("Denoising strength", h.denoise.to_string())];
    fields.push(match h.target {
        HiresTarget::Scale(f) => ("Hires upscale", f.to_string()),
        HiresTarget::Resize(size) => ("Hires resize", size.to_string()),
    });
    if h.steps != 0 {
        fields.push(("Hires steps", h.steps.to_string()));
    }
    fields.push(("Hires upscaler", h.upscaler.to_string()));
    if h.sampler != r.sampler {
        fields.push(("Hires sampler", h.sampler.a1111_name().to_string()));
    }
    if h.schedule != r.schedule {
        fields.push(("Hires schedule type", h.schedule.a1111_name().to_string()));
    }
    if h.prompt != r.prompt {
        fields.push(("Hires prompt", h.prompt.clone()));
    }
    if h.negative_prompt != r.negative_prompt {
        fields.push(("Hires negative prompt", h.negative_prompt.clone()));
    }
    if h.cfg_scale != r.cfg_scale {
        fields.push(("Hires CFG Scale", h.cfg_scale.to_string()));
    }
    fields
}

/// The hires fix's keys and the settings they are (`Denoising strength` is
/// `hires-denoise` when they are there).
const HIRES_KEYS: [(&str, &str); 9] = [
    ("Hires upscale", "hires-scale"),
    ("Hires resize", "hires-size"),
    ("Hires steps", "hires-steps"),
    ("Hires upscaler", "hires-upscaler"),
    ("Hires sampler", "hires-sampler"),
    ("Hires schedule type", "hires-schedule"),
    ("Hires prompt", "hires-prompt"),
    ("Hires negative prompt", "hires-negative-prompt"),
    ("Hires CFG Scale", "hires-cfg-scale"),
];

/// A1111's ControlNet control modes: diffusers' default, and guess mode.
const BALANCED: &str = "Balanced";
const GUESS_MODE: &str = "ControlNet is more important";

/// A number as Python prints a float (`1.0`, `0.35`), as A1111 writes them.
pub fn python_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        v.to_string()
    }
}

/// Whether `text` has `word` as a word of its own (CLIP lowercases both).
fn mentions(text: &str, word: &str) -> bool {
    let (text, word) = (text.to_lowercase(), word.to_lowercase());
    let boundary = |c: Option<char>| c.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
    text.match_indices(&word)
        .any(|(i, _)| boundary(text[..i].chars().last()) && boundary(text[i + word.len()..].chars().next()))
}

/// sdgen's keys for SDXL's size conditioning and the settings they are.
const SIZE_KEYS: [(&str, &str); 3] =
    [("Original size", "original-size"), ("Crop top left", "crop-top-left"), ("Target size", "target-size")];

/// A1111 quotes values that contain a comma, a colon or a line break (as
/// JSON strings).
fn quote(v: &str) -> String {
    if v.contains([',', ':', '"', '\n']) {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
    } else {
        v.to_string()
    }
}

/// A parsed infotext.
#[derive(Debug, Clone, PartialEq)]
pub struct Infotext {
    pub prompt: String,
    pub negative_prompt: String,
    pub fields: Vec<(String, String)>,
}

impl Infotext {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Splits `Key: value, Key: "quoted, value", …`; `None` if the line is not
/// such a list (then it is part of the prompt, as in A1111).
fn parse_fields(line: &str) -> Option<Vec<(String, String)>> {
    let mut fields = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once(':')?;
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_alphanumeric() || " -/_".contains(c)) {
            return None;
        }
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| if c == 'n' { '\n' } else { c })),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        fields.push((key.to_string(), value));
        rest = tail.trim_start().strip_prefix(',').unwrap_or(tail).trim_start();
        if !tail.trim_start().is_empty() && !tail.trim_start().starts_with(',') {
            return None;
        }
    }
    (fields.len() >= 3).then_some(fields)
}

pub fn parse(text: &str) -> Infotext {
    let mut lines: Vec<&str> = text.trim().split('\n').collect();
    let fields = lines.last().and_then(|l| parse_fields(l)).unwrap_or_default();
    if !fields.is_empty() {
        lines.pop();
    }
    let (mut prompt, mut negative, mut in_negative) = (Vec::new(), Vec::new(), false);
    for line in lines {
        if let Some(n) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative.push(n.trim_start());
        } else if in_negative {
            negative.push(line);
        } else {
            prompt.push(line);
        }
    }
    Infotext { prompt: prompt.join("\n"), negative_prompt: negative.join("\n"), fields }
}

/// The generation settings of a txt2img infotext, and the model it names.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub settings: Settings,
    pub model_name: Option<String>,
    pub model_hash: Option<String>,
    /// The name of a VAE that replaced the model's.
    pub vae: Option<String>,
}

/// Keys sdgen writes or can ignore when replaying.
const KNOWN: &[&str] = &[
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "Family",
    "Version",
    "Denoising strength",
    "Mask blur",
    "Original size",
    "Crop top left",
    "Target size",
    "Clip skip",
    "Prompt syntax",
    "Lora hashes",
    "TI hashes",
    "VAE hash",
    "VAE",
    "Hires upscale",
    "Hires resize",
    "Hires steps",
    "Hires upscaler",
    "Hires sampler",
    "Hires schedule type",
    "Hires prompt",
    "Hires negative prompt",
    "Hires CFG Scale",
];

impl Infotext {
    /// The txt2img settings this text describes; unknown keys and editing
    /// images (which need their input files) are errors.
    pub fn to_settings(&self) -> anyhow::Result<Recorded> {
        let unknown: Vec<&str> = self
            .fields
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| !KNOWN.contains(k) && control_index(k).is_none())
            .collect();
        if !unknown.is_empty() {
            bail!("unsupported parameters: {}", unknown.join(", "));
        }
        let hires = self.get("Hires upscale").is_some() || self.get("Hires resize").is_some();
        if (self.get("Denoising strength").is_some() && !hires) || self.get("Mask blur").is_some() {
            bail!("this image was made from another image (img2img/inpaint); replay needs its input and supports txt2img only");
        }
        let mut settings = Settings {
            prompt: Some(self.prompt.clone()),
            negative_prompt: Some(self.negative_prompt.clone()),
            ..Settings::default()
        };
        for key in ["Steps", "Sampler", "CFG scale", "Seed", "Size"] {
            self.get(key).with_context(|| format!("the parameters have no {key:?}"))?;
        }
        let size: Size = self.get("Size").unwrap_or_default().parse().context("Size")?;
        (settings.width, settings.height) = (Some(size.width), Some(size.height));
        let keys = [
            ("Steps", "steps"),
            ("Sampler", "sampler"),
            ("Schedule type", "schedule"),
            ("CFG scale", "cfg-scale"),
            ("Seed", "seed"),
            ("Clip skip", "clip-skip"),
            ("Prompt syntax", "prompt-syntax"),
        ];
        let denoise = hires.then_some(("Denoising strength", "hires-denoise"));
        for (key, setting) in keys.iter().chain(&SIZE_KEYS).chain(&HIRES_KEYS).chain(&denoise) {
            if let Some(value) = self.get(key) {
                settings.set(setting, value).with_context(|| key.to_string())?;
            }
        }
        self.read_controls(&mut settings)?;
        Ok(Recorded {
            settings,
            model_name: self.get("Model").map(str::to_string),
            model_hash: self.get("Model hash").map(str::to_string),
            vae: self.get("VAE").map(str::to_string),
        })
    }
}

/// `N` of a `ControlNet N` key.
fn control_index(key: &str) -> Option<usize> {
    key.strip_prefix("ControlNet ")?.parse().ok()
}

impl Infotext {
    /// The recorded ControlNet units into `settings`: their models, weights
    /// and ranges (the control images are not recorded), the preprocessor
    /// and the control mode.
    fn read_controls(&self, settings: &mut Settings) -> anyhow::Result<()> {
        let mut units: Vec<(usize, &str)> =
            self.fields.iter().filter_map(|(k, v)| Some((control_index(k)?, v.as_str()))).collect();
        units.sort_by_key(|(i, _)| *i);
        for (n, (i, text)) in units.into_iter().enumerate() {
            let key = format!("ControlNet {i}");
            if i != n {
                bail!("{key}: the ControlNet units are not numbered 0, 1, …");
            }
            let fields = parse_fields(text).with_context(|| format!("{key}: not a list of settings"))?;
            let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
            let number = |k: &str, default: f64| -> anyhow::Result<f64> {
                get(k).map_or(Ok(default), |v| v.parse().with_context(|| format!("{key}: {k} {v:?} is not a number")))
            };
            let model = get("Model").with_context(|| format!("{key}: no Model"))?;
            // "NAME [HASH]"
            let model = model.rsplit_once(" [").map_or(model, |(name, _)| name).to_string();
            let preprocess = match get("Module").unwrap_or("none") {
                "none" => Preprocess::None,
                "canny" => {
                    Preprocess::Canny { low: number("Threshold A", 100.0)?, high: number("Threshold B", 200.0)? }
                }
                other => bail!("{key}: preprocessor {other:?} is not supported (sdgen has none and canny)"),
            };
            let guess = match get("Control Mode").unwrap_or(BALANCED) {
                BALANCED => false,
                GUESS_MODE => true,
                other => bail!("{key}: control mode {other:?} is not supported"),
            };
            if n > 0 && (settings.control_preprocess != Some(preprocess) || settings.control_guess_mode != Some(guess))
            {
                bail!("{key}: ControlNet units with different preprocessors or control modes are not supported");
            }
            (settings.control_preprocess, settings.control_guess_mode) = (Some(preprocess), Some(guess));
            let (weight, range) =
                (number("Weight", 1.0)?, (number("Guidance Start", 0.0)?, number("Guidance End", 1.0)?));
            crate::request::check_control(&model, Some(weight), Some(range)).with_context(|| key.clone())?;
            let arg = ControlArg { model, image: None, weight: Some(weight), range: Some(range) };
            settings.controls.get_or_insert_with(Vec::new).push(arg);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loading::STANDARD_512;
    use crate::request::{SizeConditioning, TextOptions, TopLeft};
    use crate::sampling::samplers::Sampler;

    fn request() -> Request {
        Request {
            prompt: "a fox, red\nsecond line".into(),
            negative_prompt: "blurry: bad".into(),
            seed: 42,
            steps: 20,
            cfg_scale: 7.5,
            width: 512,
            height: 768,
            sampler: Sampler::DpmPP2M,
            schedule: ScheduleKind::Karras,
            init: Init::Noise,
            size_conditioning: SizeConditioning {
                original: Some(Size { width: 128, height: 96 }),
                crop_top_left: TopLeft { top: 8, left: 4 },
                target: None,
            },
            text: TextOptions { syntax: Syntax::Plain, clip_skip: 2 },
            controls: Vec::new(),
            control_options: Default::default(),
            hires: None,
        }
    }

    /// The text of `r` made with model "m", no adapters, and `controlnets`.
    fn infotext_of(r: &Request, controlnets: &[(String, String)]) -> String {
        let applied = Applied::default();
        Parameters { request: r, model_name: "m", model_hash: "0", family: "SD 1.x", applied: &applied, controlnets }
            .infotext()
    }

    #[test]
    fn writes_and_reads_back() {
        let r = request();
        let applied = Applied { loras: vec![("fluffy".into(), "0123456789ab".into())], ..Default::default() };
        let text = Parameters {
            request: &r,
            model_name: "my, model",
            model_hash: "0123456789",
            family: "SD 1.x",
            applied: &applied,
            controlnets: &[],
        }
        .infotext();
        assert!(text.contains("Lora hashes: \"fluffy: 0123456789ab\""), "{text}");
        assert!(text.contains(
            "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, Model hash: 0123456789, Model: \"my, model\""
        ));
        assert!(
            text.contains("Clip skip: 2, Prompt syntax: plain, Original size: 128x96, Crop top left: \"8,4\", Version"),
            "{text}"
        );
        let parsed = parse(&text);
        let rec = parsed.to_settings().unwrap();
        assert_eq!(rec.settings.resolve(&STANDARD_512, Init::Noise).unwrap(), r);
        assert_eq!(rec.model_name.as_deref(), Some("my, model"));
        assert_eq!(rec.model_hash.as_deref(), Some("0123456789"));
    }

    #[test]
    fn records_controlnets_as_a1111s_extension_and_reads_them_back_without_images() {
        use crate::request::{Control, ControlOptions};
        let image = crate::image_io::Image { width: 1, height: 1, rgb: vec![0; 3] };
        let control =
            |model: &str, weight, start, end| Control { model: model.into(), image: image.clone(), weight, start, end };
        let r = Request {
            controls: vec![control("cn/canny", 1.0, 0.0, 1.0), control("depth", 0.35, 0.1, 0.8)],
            control_options: ControlOptions {
                preprocess: Preprocess::Canny { low: 50.0, high: 150.5 },
                guess_mode: true,
            },
            ..request()
        };
        let names = [("canny".to_string(), "d14c016b".to_string()), ("depth".to_string(), "e3b0c442".to_string())];
        let text = infotext_of(&r, &names);
        assert!(
            text.contains(r#"ControlNet 0: "Module: canny, Model: canny [d14c016b], Weight: 1.0, Resize Mode: Just Resize, Threshold A: 50.0, Threshold B: 150.5, Guidance Start: 0.0, Guidance End: 1.0, Control Mode: ControlNet is more important", ControlNet 1: "Module: canny, Model: depth [e3b0c442], Weight: 0.35"#),
            "{text}"
        );
        let rec = parse(&text).to_settings().unwrap();
        let arg = |model: &str, w, s, e| ControlArg {
            model: model.into(),
            image: None,
            weight: Some(w),
            range: Some((s, e)),
        };
        assert_eq!(rec.settings.controls, Some(vec![arg("canny", 1.0, 0.0, 1.0), arg("depth", 0.35, 0.1, 0.8)]));
        assert_eq!(rec.settings.control_preprocess, Some(Preprocess::Canny { low: 50.0, high: 150.5 }));
        assert_eq!(rec.settings.control_guess_mode, Some(true));
        let depth = text.replace("Module: canny, Model: depth", "Module: depth_midas, Model: depth");
        let err = parse(&depth).to_settings().unwrap_err().to_string();
        assert!(err.contains("ControlNet 1: preprocessor \"depth_midas\" is not supported"), "{err}");
    }

    #[test]
    fn records_the_hires_fix_as_a1111_and_reads_it_back() {
        let mut settings = Settings { prompt: Some("a fox".into()), seed: Some(3), ..Settings::default() };
        for (k, v) in [
            ("hires-size", "1024x0"),
            ("hires-upscaler", "Latent (bicubic)"),
            ("hires-steps", "4"),
            ("hires-sampler", "euler"),
            ("hires-prompt", "a fox,\nsharp"),
            ("hires-cfg-scale", "5"),
        ] {
            settings.set(k, v).unwrap();
        }
        let r = settings.resolve(&STANDARD_512, Init::Noise).unwrap();
        let text = infotext_of(&r, &[]);
        assert!(text.contains("Size: 512x512,"), "{text}");
        assert!(
            text.contains("Denoising strength: 0.7, Hires resize: 1024x0, Hires steps: 4, Hires upscaler: Latent (bicubic), Hires sampler: Euler, Hires prompt: \"a fox,\\nsharp\", Hires CFG Scale: 5,"),
            "{text}"
        );
        let rec = parse(&text).to_settings().unwrap();
        assert_eq!(rec.settings.resolve(&STANDARD_512, Init::Noise).unwrap(), r);
        // Without a hires key, a denoising strength still means an edited image.
        let edited = text.replace("Hires resize: 1024x0, ", "");
        assert!(parse(&edited).to_settings().unwrap_err().to_string().contains("img2img"));
    }

    #[test]
    fn reads_a1111_text_and_rejects_unknown_keys() {
        let a1111 = "masterpiece, fox\nNegative prompt: ugly\nSteps: 30, Sampler: DDIM, CFG scale: 6, Seed: 7, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, ENSD: 31337";
        let parsed = parse(a1111);
        assert_eq!(parsed.prompt, "masterpiece, fox");
        assert_eq!(parsed.negative_prompt, "ugly");
        let err = parsed.to_settings().unwrap_err().to_string();
        assert!(err.contains("ENSD"), "{err}");
        let no_params = parse("just a prompt, with: a colon");
        assert!(no_params.fields.is_empty());
        assert!(no_params.to_settings().unwrap_err().to_string().contains("the parameters have no"));
    }
}
