//! The denoiser `(x, σ) → x̂₀` samplers see, in k-diffusion-style layers
//! around a [`Backbone`]: its conditioning ([`Conditioned`], with
//! ControlNets' residuals from [`Control`]), guidance ([`Guided`]), and the
//! output's parameterisation with the σ-space input scaling ([`Denoiser`]).

use candle_core::{DType, Result, Tensor};

use crate::models::controlnet::ControlNet;
use crate::models::unet::{Residuals, TextTime};
use crate::models::{Backbone, BackboneConditioning};
use crate::sampling::schedule::Schedule;

/// What the backbone predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
    /// Flow matching's velocity `ε − x₀` (SD 3), on a flow schedule.
    Flow,
}

/// diffusers' `prediction_type` values, and `eps` / `v` as the CLI says them.
impl std::str::FromStr for Prediction {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "epsilon" | "eps" => Ok(Prediction::Epsilon),
            "v_prediction" | "v" => Ok(Prediction::V),
            "flow_prediction" | "flow" => Ok(Prediction::Flow),
            other => anyhow::bail!("prediction type {other:?} is not supported; use eps, v or flow"),
        }
    }
}

impl Prediction {
    pub fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "eps",
            Prediction::V => "v",
            Prediction::Flow => "flow",
        }
    }
}

/// Anything that maps a noisy σ-space sample to its denoised estimate.
pub trait Denoise {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> anyhow::Result<Tensor>;
}

/// The text conditioning of a batch: the context `(B, L, D)` the UNet
/// attends to and, for SDXL, the pooled embedding `(B, P)`.
pub struct TextEmbedding {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

impl TextEmbedding {
    /// The embeddings of several prompts as one batch.
    pub fn cat(each: &[TextEmbedding]) -> Result<Self> {
        let contexts: Vec<&Tensor> = each.iter().map(|e| &e.context).collect();
        let pooled: Option<Vec<&Tensor>> = each.iter().map(|e| e.pooled.as_ref()).collect();
        Ok(Self { context: Tensor::cat(&contexts, 0)?, pooled: pooled.map(|p| Tensor::cat(&p, 0)).transpose()? })
    }
}

/// The conditioning of a batch: the prompts' text embeddings and, when
/// guided, the negative prompts'; for SDXL the size numbers `(B, 6)`.
pub struct Conditioning {
    pub cond: TextEmbedding,
    pub uncond: Option<TextEmbedding>,
    pub cfg_scale: f64,
    pub time_ids: Option<Vec<f32>>,
}

/// One ControlNet of a batch: the network, its control images' embedding
/// (one row per image), its weight (diffusers' `controlnet_conditioning_scale`)
/// and the part of the run it acts in (`control_guidance_start/end`).
pub struct ControlUnit<'a> {
    pub net: &'a ControlNet,
    pub hint: Tensor,
    pub weight: f64,
    pub start: f64,
    pub end: f64,
}

/// The ControlNets of a batch, their residuals summed as diffusers'
/// MultiControlNet does.
pub struct Control<'a> {
    pub units: Vec<ControlUnit<'a>>,
    /// diffusers' `guess_mode`: the ControlNets see the prompts' half of a
    /// guided batch only, their residuals scaled from 0.1 (first skip) to 1
    /// (mid block). Pooled ControlNets (the first one decides) imply it.
    pub guess: bool,
    /// How many model calls the sampler makes: diffusers' `len(timesteps)`.
    pub calls: usize,
}

impl Control<'_> {
    /// diffusers' `controlnet_keep`: call `i` of `n` runs the unit iff
    /// `i/n ≥ start` and `(i+1)/n ≤ end`.
    fn active(&self, unit: &ControlUnit, call: usize) -> bool {
        let (i, n) = (call as f64, self.calls as f64);
        !(i / n < unit.start || (i + 1.0) / n > unit.end)
    }

    /// The summed residuals of the units active at `call`, for `input` of
    /// `rows` copies of the batch (negative prompts' rows first).
    fn residuals(
        &self,
        input: &Tensor,
        rows: usize,
        t: f32,
        call: usize,
        context: &Tensor,
        added: Option<(&Tensor, &[f32])>,
    ) -> Result<Option<Residuals>> {
        let guess = self.guess || self.units.first().is_some_and(|u| u.net.config.global_pool_conditions);
        let prompts_only = guess && rows == 2;
        let b = input.dim(0)? / rows;
        let (input, context, added, copies) = if prompts_only {
            let added =
                added.map(|(pooled, ids)| Ok::<_, candle_core::Error>((pooled.narrow(0, b, b)?, &ids[6 * b..])));
            (input.narrow(0, b, b)?, context.narrow(0, b, b)?, added.transpose()?, 1)
        } else {
            (input.clone(), context.clone(), added.map(|(p, ids)| (p.clone(), ids)), rows)
        };
        let text_time = added.as_ref().map(|(text_embeds, time_ids)| TextTime { text_embeds, time_ids });
        let mut sum: Option<Residuals> = None;
        for unit in self.units.iter().filter(|u| self.active(u, call)) {
            let k = unit.net.outputs();
            let pooled = unit.net.config.global_pool_conditions;
            // torch.logspace(-1, 0, k) over the skips then the mid block.
            let scales: Vec<f64> = (0..k)
                .map(|i| if guess && !pooled { 10f64.powf(i as f64 / (k - 1) as f64 - 1.0) } else { 1.0 } * unit.weight)
                .collect();
            let hint = Tensor::cat(&vec![&unit.hint; copies], 0)?;
            let r = unit.net.forward(&input, t, &context, text_time.as_ref(), &hint, &scales)?;
            sum = Some(match sum {
                Some(s) => s.add(&r)?,
                None => r,
            });
        }
        let Some(sum) = sum else { return Ok(None) };
        if !prompts_only {
            return Ok(Some(sum));
        }
        // The negative prompts' rows get nothing.
        let pad = |r: &Tensor| Tensor::cat(&[&r.zeros_like()?, r], 0);
        Ok(Some(Residuals { down: sum.down.iter().map(pad).collect::<Result<_>>()?, mid: pad(&sum.mid)? }))
    }
}

/// Layer 1: the backbone with its conditioning for one batch: the text
/// context, the pooled text and SDXL's size numbers, an inpainting UNet's extra input
/// channels, an LCM UNet's embedded guidance scale, ControlNets. With
/// guidance its rows are the negative prompts' then the prompts', as
/// diffusers batches them.
pub struct Conditioned<'a> {
    backbone: &'a dyn Backbone,
    context: Tensor,
    /// The pooled text embeddings (SDXL, SD 3) and SDXL's size numbers,
    /// batched like `context`.
    pooled: Option<Tensor>,
    time_ids: Option<Vec<f32>>,
    /// Channels appended to the scaled sample, per image (an inpainting
    /// UNet's latent mask and masked-image latents).
    extra: Option<Tensor>,
    /// LCM UNets: the embedded guidance scale, in place of guidance.
    guidance: Option<Tensor>,
    control: Option<Control<'a>>,
}

impl<'a> Conditioned<'a> {
    /// `guided`: rows for the negative prompts come first.
    fn new(
        backbone: &'a dyn Backbone,
        c: &Conditioning,
        extra: Option<Tensor>,
        control: Option<Control<'a>>,
        guided: bool,
    ) -> Result<Self> {
        let dtype = backbone.dtype();
        let batch = c.cond.context.dim(0)?;
        // An LCM UNet embeds w = cfg − 1 and runs once, unguided.
        let guidance = match backbone.guidance_dim() {
            Some(dim) => Some(
                crate::models::unet::guidance_embedding(c.cfg_scale as f32 - 1.0, dim, c.cond.context.device())?
                    .repeat((batch, 1))?
                    .to_dtype(dtype)?,
            ),
            None => None,
        };
        let uncond = c.uncond.as_ref().filter(|_| guided);
        let both = |u: &Tensor, c: &Tensor| match uncond {
            Some(_) => Tensor::cat(&[u, c], 0),
            None => Ok(c.clone()),
        };
        let context = match uncond {
            Some(u) => both(&u.context, &c.cond.context)?,
            None => c.cond.context.clone(),
        };
        let pooled = match &c.cond.pooled {
            Some(pooled) => Some(
                match uncond.map(|u| u.pooled.as_ref()) {
                    Some(Some(u)) => both(u, pooled)?,
                    Some(None) => candle_core::bail!("the negative prompt has no pooled embedding"),
                    None => pooled.clone(),
                }
                .to_dtype(dtype)?,
            ),
            None => None,
        };
        let time_ids =
            c.time_ids.as_ref().map(|ids| if uncond.is_some() { [ids.as_slice(), ids].concat() } else { ids.clone() });
        Ok(Self { backbone, context: context.to_dtype(dtype)?, pooled, time_ids, extra, guidance, control })
    }

    /// The backbone's output for `input` (in the backbone's dtype, `rows`
    /// = 1 or 2 copies of the batch) at timestep `t`, model call `call` of
    /// the run, cast to `dtype`.
    fn output(&self, input: &Tensor, rows: usize, t: f32, call: usize, dtype: DType) -> Result<Tensor> {
        let control = match &self.control {
            Some(c) => {
                c.residuals(input, rows, t, call, &self.context, self.pooled.as_ref().zip(self.time_ids.as_deref()))?
            }
            None => None,
        };
        let input = match &self.extra {
            Some(extra) => Tensor::cat(&[input, &Tensor::cat(&vec![extra; rows], 0)?], 1)?,
            None => input.clone(),
        };
        let guidance = self.guidance.as_ref().filter(|_| rows == 1);
        let cond = BackboneConditioning {
            context: &self.context,
            guidance,
            pooled: self.pooled.as_ref(),
            time_ids: self.time_ids.as_deref(),
            control: control.as_ref(),
        };
        self.backbone.forward(&input, t, &cond)?.to_dtype(dtype)
    }
}

/// Layer 2: classifier-free guidance over the model output:
/// `uncond + scale · (cond − uncond)`, or the prompts alone.
pub struct Guided<'a> {
    inner: Conditioned<'a>,
    scale: Option<f64>,
}

impl Guided<'_> {
    fn output(&self, input: &Tensor, t: f32, call: usize, dtype: DType) -> Result<Tensor> {
        let Some(scale) = self.scale else { return self.inner.output(input, 1, t, call, dtype) };
        let both = self.inner.output(&Tensor::cat(&[input, input], 0)?, 2, t, call, dtype)?;
        let b = input.dim(0)?;
        let (uncond, cond) = (both.narrow(0, 0, b)?, both.narrow(0, b, b)?);
        &uncond + ((cond - &uncond)? * scale)?
    }
}

/// Layer 3, what samplers see: σ-space in, x̂₀ out. Scales the input for
/// the backbone, looks up the timestep of σ, and reads the guided output
/// as its parameterisation says (ε or v).
pub struct Denoiser<'a> {
    inner: Guided<'a>,
    schedule: &'a Schedule,
    prediction: Prediction,
    /// The last x̂₀: what a run stopped between steps decodes (as A1111 does).
    last: Option<Tensor>,
    /// Model calls so far (ControlNets act on some of them).
    calls: usize,
}

impl<'a> Denoiser<'a> {
    /// Guidance runs only for `cfg_scale > 1` with a negative embedding and
    /// a backbone without embedded guidance, as in diffusers; otherwise one
    /// conditional pass per step.
    pub fn new(
        backbone: &'a dyn Backbone,
        schedule: &'a Schedule,
        prediction: Prediction,
        c: &Conditioning,
        extra: Option<Tensor>,
        control: Option<Control<'a>>,
    ) -> Result<Self> {
        let guided = c.uncond.is_some() && c.cfg_scale > 1.0 && backbone.guidance_dim().is_none();
        let inner = Conditioned::new(backbone, c, extra, control, guided)?;
        let inner = Guided { inner, scale: guided.then_some(c.cfg_scale) };
        Ok(Self { inner, schedule, prediction, last: None, calls: 0 })
    }

    /// The last denoised estimate x̂₀, if a step ran.
    pub fn last_denoised(&self) -> Option<&Tensor> {
        self.last.as_ref()
    }
}

impl Denoise for Denoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> anyhow::Result<Tensor> {
        let t = self.schedule.timestep(sigma);
        // σ-space latents are scaled to unit variance; flow latents already are.
        let c_in = match self.prediction {
            Prediction::Flow => 1.0,
            _ => (sigma * sigma + 1.0).sqrt() as f64,
        };
        // The sampler's latents are f32; the backbone runs in its own dtype.
        let scaled = (x / c_in)?.to_dtype(self.inner.inner.backbone.dtype())?;
        let out = self.inner.output(&scaled, t, self.calls, x.dtype())?;
        self.calls += 1;
        let s = sigma as f64;
        let denoised = match self.prediction {
            Prediction::Epsilon | Prediction::Flow => (x - (out * s)?)?,
            Prediction::V => ((x / (s * s + 1.0))? + (out * (-s / (s * s + 1.0).sqrt()))?)?,
        };
        self.last = Some(denoised.clone());
        Ok(denoised)
    }
}
