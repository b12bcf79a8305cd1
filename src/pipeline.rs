//! Generation: encode the prompts, start from the seed's noise (or a noised
//! image), sample, decode, and for inpainting put the original pixels back.
//!
//! - txt2img: latents start as noise at the schedule's first σ.
//! - img2img: diffusers' `StableDiffusionImg2ImgPipeline`: with K steps and
//!   strength s, the last ⌊K·s⌋ steps run, starting from the image latents
//!   noised to that step's σ.
//! - inpaint: diffusers' `StableDiffusionInpaintPipeline`: 9-channel UNets
//!   see the latent mask and the masked image's latents beside the sample;
//!   4-channel UNets get the unmasked area re-noised from the image after
//!   every step (the sampler hook). Strength 1 starts from pure noise.
//! - hires fix (txt2img): A1111's second pass, img2img on the first pass's
//!   latents upscaled ([`crate::hires`]).
//! - ControlNets (any mode): diffusers' ControlNet pipelines: each control
//!   image stretched to the output size and preprocessed, embedded once,
//!   and the ControlNets' residuals added to the UNet's at the steps their
//!   range covers (the denoiser's [`Control`] layer).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::editing::{self, Mask};
use crate::failure::{Failure, Tag};
use crate::hires::{self, HiresUpscaler};
use crate::image_io::Image;
use crate::loading::controlnet::LoadedControlNet;
use crate::loading::Model;
use crate::models::Backbone;
use crate::request::{Hires, Init, LatentFill, Request, TextOptions};
use crate::rng::TorchRng;
use crate::sampling::denoiser::{Conditioning, Control, ControlUnit, Denoiser, TextEmbedding};
use crate::sampling::samplers::{sample, Sampler};
use crate::sampling::schedule::Schedule;
use crate::text::{self, TextConditioner};
use crate::upscale::{self, Upscaling};

/// What the pipeline reports while it runs.
#[derive(Debug)]
pub enum Event {
    Warning(String),
    EncodingText,
    /// Text encoded, initial latents ready: sampling starts.
    Sampling,
    Step {
        done: usize,
        total: usize,
    },
    Decoding,
    /// The batch's images are ready.
    Decoded,
}

/// Sampling's result: the final latents and their scale, or when stopped,
/// the last denoised estimate (data space, scale 1).
struct Sampled {
    latents: Tensor,
    scale: f64,
    stopped: bool,
}

/// The error a run stopped between steps ends sampling with; the pipeline
/// then decodes the last denoised estimate.
#[derive(Debug)]
pub struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("stopped between steps")
    }
}

impl std::error::Error for Stopped {}

impl Model {
    /// The text conditioning of `text` ([`TextConditioner::encode`]), with
    /// this model's embeddings; parser warnings go to `events`.
    pub fn encode_text(
        &self,
        text: &str,
        opts: &TextOptions,
        device: &Device,
        events: &mut dyn FnMut(Event),
    ) -> anyhow::Result<TextEmbedding> {
        let (embedding, warnings) = self.text.encode(text, opts, &self.applied.embeddings, device)?;
        warnings.into_iter().for_each(|w| events(Event::Warning(w)));
        Ok(embedding)
    }

    /// The text conditioning of a batch ([`text::encode_prompts`]).
    pub fn encode_prompts(
        &self,
        reqs: &[Request],
        guided: bool,
        device: &Device,
        events: &mut dyn FnMut(Event),
    ) -> anyhow::Result<(TextEmbedding, Option<TextEmbedding>)> {
        let embeddings = &self.applied.embeddings;
        text::encode_prompts(&self.text, embeddings, reqs, guided, device, &mut |w| events(Event::Warning(w)))
    }

    /// Scaled latents (VAE posterior mean × scaling factor) of an image, with
    /// the pixels under `mask` blanked first.
    fn encode_image(&self, image: &Image, mask: Option<&Mask>, device: &Device) -> anyhow::Result<Tensor> {
        let pixels = editing::to_tensor(image, mask, device)?;
        Ok(self.vae.config.to_latents(&self.vae.encode_mean(&pixels)?)?)
    }

    /// Runs one job on `device`.
    pub fn generate(&self, req: &Request, device: &Device, events: &mut dyn FnMut(Event)) -> anyhow::Result<Image> {
        Ok(self.generate_batch(std::slice::from_ref(req), device, events)?.remove(0))
    }

    /// Runs jobs that share a [`Request::batch_key`] through the UNet
    /// together. Each image has its own generator, so the result equals
    /// one-by-one generation up to float rounding.
    pub fn generate_batch(
        &self,
        reqs: &[Request],
        device: &Device,
        events: &mut dyn FnMut(Event),
    ) -> anyhow::Result<Vec<Image>> {
        self.generate_batch_until(reqs, device, events, &|| false)
    }

    /// [`Model::generate_batch`], checking `stop` after each step: when it
    /// says so, sampling ends there and the images are decoded from the last
    /// denoised estimate (A1111's interrupt and skip).
    pub fn generate_batch_until(
        &self,
        reqs: &[Request],
        device: &Device,
        events: &mut dyn FnMut(Event),
        stop: &dyn Fn() -> bool,
    ) -> anyhow::Result<Vec<Image>> {
        let Some(req) = reqs.first() else { return Ok(Vec::new()) };
        for r in reqs {
            r.validate()?;
            if r.batch_key() != req.batch_key() {
                anyhow::bail!("jobs of one batch must share size, steps, sampler, guidance and input kind");
            }
        }
        let scale = self.vae.config.downscale();
        // An MMDiT also cuts the latents into patches.
        let multiple = scale * self.backbone.patch_size();
        if !req.width.is_multiple_of(multiple) || !req.height.is_multiple_of(multiple) {
            return Err(anyhow::anyhow!("width and height must be multiples of {multiple} for this model"))
                .tag(Failure::Usage);
        }
        let mut sources = Vec::new();
        let mut masks = Vec::new();
        for r in reqs {
            let (source, mask) = match &r.init {
                Init::Noise => (None, None),
                Init::Image { image, .. } => (Some(image), None),
                Init::Inpaint { image, mask, .. } => (Some(image), Some(mask)),
            };
            if let Some(image) = source {
                if (image.width, image.height) != (r.width, r.height) {
                    anyhow::bail!(
                        "the input image is {}x{}, the job {}x{}",
                        image.width,
                        image.height,
                        r.width,
                        r.height
                    );
                }
                sources.push(image);
            }
            if let Some(m) = mask {
                if (m.width, m.height) != (r.width, r.height) {
                    anyhow::bail!("the mask is {}x{} but the image is {}x{}", m.width, m.height, r.width, r.height);
                }
                masks.push(m);
            }
        }
        if self.is_inpainting() && masks.is_empty() {
            anyhow::bail!("this is an inpainting model (9-channel UNet): use `sdgen inpaint` or `sdgen outpaint`");
        }

        let conditioning = self.condition(reqs, device, events)?;

        let mut schedule = req.sampler.schedule(&self.scheduler, req.steps, req.schedule)?;
        if let Some(s) = req.strength() {
            schedule = schedule.from_strength(req.steps, s);
        }
        // Latents stay f32 between steps whatever the model's dtype (the
        // denoiser casts at the UNet's boundary), as diffusers' schedulers do.
        let dtype = self.backbone.dtype();
        let (c, h, w) = (self.vae.config.latent_channels, req.height / scale, req.width / scale);
        // Noise comes from each seed's CPU generator on every device, so a seed
        // gives the same image everywhere (and the same as diffusers/ComfyUI).
        let mut rngs: Vec<TorchRng> = reqs.iter().map(|r| TorchRng::new(r.seed)).collect();
        let values: Vec<f32> = rngs.iter_mut().flat_map(|r| r.randn(c * h * w)).collect();
        let noise = Tensor::from_vec(values, (reqs.len(), c, h, w), device)?;
        let image_latents = if sources.is_empty() {
            None
        } else {
            let each =
                sources.iter().map(|i| self.encode_image(i, None, device)).collect::<anyhow::Result<Vec<_>>>()?;
            Some(Tensor::cat(&each, 0)?)
        };
        // The masked area's start for the latent fills; the blend hook keeps
        // the original latents for the unmasked area.
        let start_latents = match &image_latents {
            Some(x0)
                if reqs
                    .iter()
                    .any(|r| matches!(r.init, Init::Inpaint { fill, .. } if fill != LatentFill::Original)) =>
            {
                let each = reqs
                    .iter()
                    .zip(&mut rngs)
                    .enumerate()
                    .map(|(i, (r, rng))| {
                        let x = x0.narrow(0, i, 1)?;
                        let Init::Inpaint { mask, fill, .. } = &r.init else { return Ok(x) };
                        let m = mask.latent(scale, device)?;
                        let kept = x.broadcast_mul(&(1.0 - &m)?)?;
                        Ok(match fill {
                            LatentFill::Original => x,
                            LatentFill::Nothing => kept,
                            LatentFill::Noise => {
                                let n = Tensor::from_vec(rng.randn(c * h * w), (1, c, h, w), device)?;
                                (kept + n.broadcast_mul(&m)?)?
                            }
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Some(Tensor::cat(&each, 0)?)
            }
            other => other.clone(),
        };
        // diffusers' inpaint pipeline starts from pure noise at strength 1;
        // img2img always noises the image.
        let pure_noise = matches!(req.init, Init::Inpaint { strength, .. } if strength >= 1.0);
        let x = match &start_latents {
            Some(x0) if !pure_noise => schedule.noised(x0, &noise, schedule.sigmas[schedule.start])?,
            _ => (&noise * schedule.init_noise_scale as f64)?,
        };

        let latent_mask = if masks.is_empty() {
            None
        } else {
            let each = masks.iter().map(|m| m.latent(scale, device)).collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&each, 0)?)
        };
        let extra = match &latent_mask {
            Some(lm) if self.is_inpainting() => {
                let masked = sources
                    .iter()
                    .zip(&masks)
                    .map(|(i, m)| self.encode_image(i, Some(m), device))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Some(Tensor::cat(&[lm, &Tensor::cat(&masked, 0)?], 1)?.to_dtype(dtype)?)
            }
            _ => None,
        };
        // 4-channel inpainting: blend the unmasked area back after each step.
        let blend = match (&latent_mask, &image_latents) {
            (Some(lm), Some(x0)) if extra.is_none() => Some((lm, x0)),
            _ => None,
        };

        let nets = req.controls.iter().map(|c| self.controlnet(&c.model)).collect::<anyhow::Result<Vec<_>>>()?;
        let control = self.control(reqs, &nets, device)?.map(|units| Control {
            units,
            guess: req.control_options.guess_mode,
            calls: req.sampler.model_calls(&schedule),
        });
        let mut denoiser = Denoiser::new(&self.backbone, &schedule, self.prediction, &conditioning, extra, control)?;
        events(Event::Sampling);
        let blend = blend.map(|(m, x0)| (m, x0, &noise));
        let mut sampled =
            self.sample_steps(req.sampler, &mut denoiser, x, &schedule, &mut rngs, blend, events, stop)?;
        // A1111 skips the second pass of an interrupted image.
        if req.hires.is_some() && !sampled.stopped {
            let x0 = (&sampled.latents * sampled.scale)?;
            sampled = self.hires_pass(reqs, x0, device, events, stop)?;
        }

        events(Event::Decoding);
        let latents = self.vae.config.from_latents(&sampled.latents, sampled.scale)?;
        let decoded = self.vae.decode_batch(&latents)?;
        let images = reqs
            .iter()
            .zip(decoded)
            .map(|(r, decoded)| {
                check_finite(&decoded, &self.path, "VAE")?;
                let generated = to_image(&decoded)?;
                Ok(match &r.init {
                    Init::Inpaint { image, mask, overlay, .. } => editing::overlay(&generated, image, mask, overlay),
                    _ => generated,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        events(Event::Decoded);
        Ok(images)
    }

    /// The text conditioning of a batch: its prompts, guidance and SDXL's
    /// size conditioning.
    fn condition(
        &self,
        reqs: &[Request],
        device: &Device,
        events: &mut dyn FnMut(Event),
    ) -> anyhow::Result<Conditioning> {
        events(Event::EncodingText);
        let req = &reqs[0];
        // LCM UNets embed the guidance scale instead of a negative pass.
        let guided = req.cfg_scale > 1.0 && self.backbone.guidance_dim().is_none();
        let (cond, uncond) = self.encode_prompts(reqs, guided, device, events)?;
        for e in std::iter::once(&cond).chain(&uncond) {
            check_finite(&e.context, &self.path, "text encoder")?;
        }
        let time_ids = self
            .backbone
            .takes_size_conditioning()
            .then(|| reqs.iter().flat_map(|r| r.size_conditioning.time_ids(r.height, r.width)).collect());
        Ok(Conditioning { cond, uncond, cfg_scale: req.cfg_scale, time_ids })
    }

    /// Samples `x` over `schedule`'s steps, reporting each and checking
    /// `stop` after it; `blend` (mask, image latents, initial noise) puts
    /// the unmasked area back after every step (4-channel inpainting).
    #[allow(clippy::too_many_arguments)]
    fn sample_steps(
        &self,
        sampler: Sampler,
        denoiser: &mut Denoiser,
        x: Tensor,
        schedule: &Schedule,
        rngs: &mut [TorchRng],
        blend: Option<(&Tensor, &Tensor, &Tensor)>,
        events: &mut dyn FnMut(Event),
        stop: &dyn Fn() -> bool,
    ) -> anyhow::Result<Sampled> {
        let (first, total) = (schedule.start, schedule.timesteps.len());
        let last_sigma_scale = 1.0 / schedule.final_scale() as f64;
        let mut hook = |i: usize, x: Tensor| -> anyhow::Result<Tensor> {
            events(Event::Step { done: i + 1 - first, total: total - first });
            if stop() {
                return Err(Stopped.into());
            }
            let Some((m, x0, noise)) = blend else { return Ok(x) };
            // The image at the σ the step landed on: noised with the initial
            // noise, or clean after the last step (σ-space: scaled so that
            // the final DDPM-space latents are exactly the image's).
            let target = if i + 1 < total {
                schedule.noised(x0, noise, schedule.sigmas[i + 1])?
            } else {
                (x0 * last_sigma_scale)?
            };
            Ok((m.broadcast_mul(&(x - &target)?)? + target)?)
        };
        let sampled = match sample(sampler, denoiser, x, schedule, rngs, &mut hook) {
            Ok(latents) => Sampled { latents, scale: schedule.final_scale() as f64, stopped: false },
            Err(e) if e.is::<Stopped>() => match denoiser.last_denoised() {
                Some(x0) => Sampled { latents: x0.clone(), scale: 1.0, stopped: true },
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        check_finite(&sampled.latents, &self.path, "UNet")?;
        Ok(sampled)
    }

    /// The hires fix's second pass (A1111's `sample_hr_pass`) from the
    /// first pass's latents `x0` (data space): upscaled, noised with a fresh
    /// generator of each seed to the start of the last N steps of a longer
    /// schedule ([`hires::steps`]), and sampled with the hires prompts.
    fn hires_pass(
        &self,
        reqs: &[Request],
        x0: Tensor,
        device: &Device,
        events: &mut dyn FnMut(Event),
        stop: &dyn Fn() -> bool,
    ) -> anyhow::Result<Sampled> {
        let h = reqs[0].hires.as_ref().expect("a hires job");
        let x0 = h.size.crop_latents(&self.upscale_latents(h, &x0, device, events)?)?;
        let out = h.size.output();
        let second: Vec<Request> = reqs
            .iter()
            .map(|r| {
                let h = r.hires.as_ref().expect("a batch shares its hires fix");
                Request {
                    prompt: h.prompt.clone(),
                    negative_prompt: h.negative_prompt.clone(),
                    cfg_scale: h.cfg_scale,
                    width: out.width,
                    height: out.height,
                    hires: None,
                    ..r.clone()
                }
            })
            .collect();
        let conditioning = self.condition(&second, device, events)?;
        let (total, run) = hires::steps(h.steps, reqs[0].steps, h.denoise);
        let schedule = h.sampler.schedule(&self.scheduler, total, h.schedule)?.from_step(total - run);
        let mut rngs: Vec<TorchRng> = reqs.iter().map(|r| TorchRng::new(r.seed)).collect();
        let values: Vec<f32> = rngs.iter_mut().flat_map(|r| r.randn(x0.elem_count() / reqs.len())).collect();
        let noise = Tensor::from_vec(values, x0.shape(), device)?;
        let x = schedule.noised(&x0, &noise, schedule.sigmas[schedule.start])?;
        let mut denoiser = Denoiser::new(&self.backbone, &schedule, self.prediction, &conditioning, None, None)?;
        events(Event::Sampling);
        self.sample_steps(h.sampler, &mut denoiser, x, &schedule, &mut rngs, None, events, stop)
    }

    /// The first pass's latents `x0` enlarged to the hires fix's
    /// `upscale_to`: interpolated, or decoded to 8-bit images, enlarged by
    /// the upscaler and encoded again (to the posterior's mean; A1111 samples it).
    fn upscale_latents(
        &self,
        h: &Hires,
        x0: &Tensor,
        device: &Device,
        events: &mut dyn FnMut(Event),
    ) -> anyhow::Result<Tensor> {
        let to = h.size.upscale_to;
        let scale = self.vae.config.downscale();
        let name = match &h.upscaler {
            HiresUpscaler::Latent(mode) => {
                return Ok(hires::interpolate(x0, to.height / scale, to.width / scale, *mode)?)
            }
            HiresUpscaler::Image(name) => name,
        };
        let loaded;
        let how = match upscale::resampler(name) {
            Some(how) => how,
            None => {
                loaded = self.upscaler(name)?;
                Upscaling::Model { model: &loaded.model, name: &loaded.name, device }
            }
        };
        events(Event::Decoding);
        let decoded = self.vae.decode_batch(&self.vae.config.from_latents(x0, 1.0)?)?;
        let each = decoded
            .iter()
            .map(|d| {
                let image = upscale::resize_with(&to_image(d)?, &how, to.width, to.height)?;
                self.encode_image(&image, None, device)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&each, 0)?)
    }

    /// The ControlNets of a batch (`nets`, which every job names: they share
    /// a batch key), each with its jobs' control images embedded.
    fn control<'a>(
        &self,
        reqs: &[Request],
        nets: &'a [Arc<LoadedControlNet>],
        device: &Device,
    ) -> anyhow::Result<Option<Vec<ControlUnit<'a>>>> {
        if nets.is_empty() {
            return Ok(None);
        }
        let units = nets
            .iter()
            .enumerate()
            .map(|(k, loaded)| {
                let images = reqs
                    .iter()
                    .map(|r| {
                        let image = r.control_options.preprocess.control_image(&r.controls[k].image, r.width, r.height);
                        crate::preprocess::to_tensor(&image, device)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let c = &reqs[0].controls[k];
                let hint = loaded.net.embed_hint(&Tensor::cat(&images, 0)?)?;
                Ok(ControlUnit { net: &loaded.net, hint, weight: c.weight, start: c.start, end: c.end })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Some(units))
    }
}

/// The error for NaN/Inf values out of `part`, which would otherwise end as a
/// black or noise image.
fn non_finite(model: &Path, part: &str, also: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: the {part} produced NaN/Inf values (broken weights, or f16 overflow): no image written; try --dtype f32{also}",
        model.display()
    )
}

/// Fails when `t` holds NaN or Inf values.
fn check_finite(t: &Tensor, model: &Path, part: &str) -> anyhow::Result<()> {
    let max = t.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()?;
    if max.is_finite() {
        return Ok(());
    }
    let also = if part == "VAE" { " or another VAE (--vae)" } else { "" };
    Err(non_finite(model, part, also)).tag(Failure::Model)
}

/// `(1, 3, H, W)` in [-1, 1] → 8-bit RGB: `round(clamp(x/2 + 0.5, 0, 1) · 255)`,
/// rounding half to even as numpy does.
pub fn to_image(decoded: &Tensor) -> anyhow::Result<Image> {
    let (_, c, h, w) = decoded.dims4()?;
    if c != 3 {
        anyhow::bail!("the VAE produced {c} channels, expected 3");
    }
    let hwc: Vec<f32> = decoded.get(0)?.permute((1, 2, 0))?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if hwc.iter().any(|v| !v.is_finite()) {
        anyhow::bail!("the decoded image has NaN/Inf values");
    }
    let rgb = hwc.iter().map(|v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8).collect();
    Ok(Image { width: w, height: h, rgb })
}
