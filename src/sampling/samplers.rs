//! Samplers in the k-diffusion style: each is one small step function over a
//! σ schedule and a denoiser; [`sample`] is the one loop they share, and it
//! calls the per-step hook (inpaint blending, previews, progress).
//!
//! Each equals a diffusers scheduler (or k-diffusion, for `dpmpp_2s_a`),
//! rewritten in σ-space (`x = x_ddpm · √(σ² + 1)`, the sample diffusers'
//! Euler-family schedulers hold; DDPM-space schedulers — DDIM, DPM-Solver —
//! start from unit noise, i.e. `√(σ₀² + 1)` here, and their sample is
//! divided by `√(σ_last² + 1)` at the end, a no-op when σ_last = 0):
//! - `euler`: EulerDiscreteScheduler; `x += (σ' − σ)·d`, `d = (x − x̂₀)/σ`.
//! - `euler_a`: EulerAncestralDiscreteScheduler: Euler to σ_down, then σ_up
//!   of fresh noise (every step, the last included).
//! - `heun`: HeunDiscreteScheduler: Euler predictor, trapezoid corrector with
//!   a second UNet call at σ' (Euler alone into σ' = 0).
//! - `dpm_2` / `dpm_2_a`: KDPM2(Ancestral)DiscreteScheduler: a midpoint at
//!   the geometric mean of σ and σ' (σ_down), whose timestep is interpolated
//!   in log σ; the ancestral one adds σ_up of noise after each full step but
//!   the last.
//! - `lms`: LMSDiscreteScheduler: 4th-order linear multistep on d, with the
//!   Lagrange weights integrated exactly (diffusers integrates numerically).
//! - `dpmpp_2m` / `dpmpp_2m_sde`: DPMSolverMultistepScheduler (dpmsolver++ /
//!   sde-dpmsolver++, order 2, midpoint): first order on the first step and
//!   into σ = 0; the SDE variant draws noise every step.
//! - `dpmpp_2s_a`: k-diffusion's `sample_dpmpp_2s_ancestral`.
//! - `ddim`: DDIMScheduler (η = 0): an Euler step between σ(ᾱ_t) and
//!   σ(ᾱ_prev), ending at ᾱ₀.

use std::str::FromStr;

use anyhow::bail;
use candle_core::{Device, Tensor};

use super::denoiser::Denoise;
use super::schedule::{Grid, Schedule, ScheduleKind, SchedulerConfig};
use crate::rng::TorchRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sampler {
    Euler,
    EulerAncestral,
    Heun,
    Dpm2,
    Dpm2Ancestral,
    Lms,
    DpmPP2M,
    DpmPP2MSde,
    DpmPP2SAncestral,
    UniPc,
    Deis,
    Ddim,
    Plms,
    Ddpm,
    Lcm,
}

/// Every sampler: name, A1111 display name, deterministic?, what it is for.
pub const SAMPLERS: &[(Sampler, &str, &str, bool, &str)] = &[
    (Sampler::Euler, "euler", "Euler", true, "simple and fast; a good baseline"),
    (Sampler::EulerAncestral, "euler_a", "Euler a", false, "varied, soft results at few steps"),
    (Sampler::Heun, "heun", "Heun", true, "2nd order, two UNet calls per step: accurate, slower"),
    (Sampler::Dpm2, "dpm_2", "DPM2", true, "2nd order midpoint method, two UNet calls per step"),
    (Sampler::Dpm2Ancestral, "dpm_2_a", "DPM2 a", false, "ancestral DPM2"),
    (Sampler::Lms, "lms", "LMS", true, "4th-order linear multistep; best with karras"),
    (Sampler::DpmPP2M, "dpmpp_2m", "DPM++ 2M", true, "2nd-order multistep: sharp at 20-30 steps (the default)"),
    (Sampler::DpmPP2MSde, "dpmpp_2m_sde", "DPM++ 2M SDE", false, "stochastic DPM++ 2M: more detail, noisier"),
    (Sampler::DpmPP2SAncestral, "dpmpp_2s_a", "DPM++ 2S a", false, "2nd-order single-step ancestral"),
    (Sampler::UniPc, "unipc", "UniPC", true, "predictor-corrector multistep: good at 10-20 steps"),
    (Sampler::Deis, "deis", "DEIS", true, "exponential-integrator multistep: good at few steps"),
    (Sampler::Ddim, "ddim", "DDIM", true, "the original deterministic sampler"),
    (Sampler::Plms, "pndm", "PLMS", true, "pseudo linear multistep (PNDM without Runge-Kutta warm-up)"),
    (Sampler::Ddpm, "ddpm", "DDPM", false, "the original ancestral sampler; needs many steps"),
    (Sampler::Lcm, "lcm", "LCM", false, "for LCM-distilled models: 1-8 steps, cfg 1-2"),
];

impl Sampler {
    fn row(self) -> &'static (Sampler, &'static str, &'static str, bool, &'static str) {
        SAMPLERS.iter().find(|r| r.0 == self).expect("every sampler has a row")
    }

    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// The name AUTOMATIC1111 shows (and writes into PNG metadata).
    pub fn a1111_name(self) -> &'static str {
        self.row().2
    }

    /// Whether the sampler draws fresh noise while sampling.
    pub fn is_ancestral(self) -> bool {
        !self.row().3
    }

    /// How this sampler's diffusers scheduler lays out its timesteps.
    fn grid(self) -> Grid {
        let discrete =
            |f32_linspace, round_karras, conversions| Grid::Discrete { f32_linspace, round_karras, conversions };
        match self {
            Sampler::Euler => discrete(false, false, true),
            // EulerAncestralDiscreteScheduler has no karras/exponential/beta.
            Sampler::EulerAncestral => discrete(true, false, false),
            Sampler::Heun | Sampler::Lms => discrete(true, false, true),
            Sampler::Dpm2 | Sampler::Dpm2Ancestral => discrete(true, true, true),
            // Driven by EulerDiscreteScheduler's σ, as the references do.
            Sampler::DpmPP2SAncestral => discrete(false, false, true),
            Sampler::DpmPP2M | Sampler::DpmPP2MSde | Sampler::UniPc => Grid::Multistep { deis_final: false },
            Sampler::Deis => Grid::Multistep { deis_final: true },
            Sampler::Ddim | Sampler::Plms => Grid::Ddim { ddpm: false },
            Sampler::Ddpm => Grid::Ddim { ddpm: true },
            Sampler::Lcm => Grid::Lcm,
        }
    }

    /// The schedule diffusers' scheduler class for this sampler builds from `cfg`.
    pub fn schedule(self, cfg: &SchedulerConfig, steps: usize, kind: ScheduleKind) -> anyhow::Result<Schedule> {
        let context = |e| anyhow::anyhow!("sampler {} with schedule {}: {e}", self.name(), kind.name());
        if cfg.is_flow() {
            return match (self, kind) {
                (Sampler::Euler | Sampler::Heun, ScheduleKind::Normal) => Schedule::flow(cfg, steps),
                (Sampler::DpmPP2M, ScheduleKind::Normal) => Schedule::flow_multistep(cfg, steps),
                (Sampler::Euler | Sampler::Heun | Sampler::DpmPP2M, _) => {
                    Err(context(anyhow::anyhow!("flow-matching models (SD 3) run the normal schedule only")))
                }
                _ => bail!(
                    "sampler {} does not run flow-matching models (SD 3) yet; use euler, heun or dpmpp_2m",
                    self.name()
                ),
            };
        }
        let mut schedule = Schedule::build(cfg, steps, kind, self.grid()).map_err(context)?;
        if self == Sampler::DpmPP2SAncestral {
            schedule = schedule.k_diffusion_style();
        }
        // PLMS's warm-up pairs the next timestep with the landing sample.
        if self == Sampler::Plms && schedule.landing[..] != schedule.sigmas[1..] {
            return Err(context(anyhow::anyhow!("steps of T/K do not meet this spacing's timesteps")));
        }
        Ok(schedule)
    }

    /// How many times the sampler calls the model over `schedule`'s steps
    /// (diffusers' `len(timesteps)`): once per step, twice for a
    /// second-order step that does not land on σ = 0, and PLMS's extra call
    /// in its first step.
    pub fn model_calls(self, schedule: &Schedule) -> usize {
        let steps = schedule.steps();
        match self {
            Sampler::Heun | Sampler::Dpm2 | Sampler::Dpm2Ancestral | Sampler::DpmPP2SAncestral => {
                steps.map(|i| if schedule.landing[i] == 0.0 { 1 } else { 2 }).sum()
            }
            Sampler::Plms => steps.len() + 1,
            _ => steps.len(),
        }
    }

    fn step_fn(self) -> StepFn {
        match self {
            Sampler::Euler | Sampler::Ddim => euler,
            Sampler::EulerAncestral => euler_ancestral,
            Sampler::Heun => heun,
            Sampler::Dpm2 => dpm_2,
            Sampler::Dpm2Ancestral => dpm_2_ancestral,
            Sampler::Lms => lms,
            Sampler::DpmPP2M => dpmpp_2m,
            Sampler::DpmPP2MSde => dpmpp_2m_sde,
            Sampler::DpmPP2SAncestral => dpmpp_2s_ancestral,
            Sampler::UniPc => unipc,
            Sampler::Deis => deis,
            Sampler::Plms => plms,
            Sampler::Ddpm => ddpm,
            Sampler::Lcm => lcm,
        }
    }
}

/// A sampler by its name (ComfyUI style, e.g. `dpmpp_2m`) or A1111 display
/// name (`DPM++ 2M`), case-insensitive.
impl FromStr for Sampler {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> anyhow::Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        let aliases = [("euler_ancestral", Sampler::EulerAncestral), ("k_lms", Sampler::Lms), ("plms", Sampler::Plms)];
        if let Some((_, s)) = aliases.iter().find(|(a, _)| *a == lower) {
            return Ok(*s);
        }
        if let Some(row) = SAMPLERS.iter().find(|r| r.1 == lower || r.2.to_ascii_lowercase() == lower) {
            return Ok(row.0);
        }
        let names: Vec<&str> = SAMPLERS.iter().map(|r| r.1).collect();
        let closest = names.iter().min_by_key(|n| edit_distance(n, &lower)).expect("samplers exist");
        bail!("unknown sampler {name:?} (did you mean {closest}?); available: {}", names.join(", "))
    }
}

/// A sampler as the user names it: an A1111 name may carry its schedule
/// (`DPM++ 2M Karras`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerName {
    pub sampler: Sampler,
    pub schedule: Option<ScheduleKind>,
}

impl FromStr for SamplerName {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> anyhow::Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        for (suffix, kind) in [(" karras", ScheduleKind::Karras), (" exponential", ScheduleKind::Exponential)] {
            if let Some(base) = lower.strip_suffix(suffix) {
                return Ok(Self { sampler: base.parse()?, schedule: Some(kind) });
            }
        }
        Ok(Self { sampler: lower.parse()?, schedule: None })
    }
}

/// The sampler and schedule the user asked for: `--sampler` (an A1111 name
/// may include the schedule) and `--schedule`; neither means the model's
/// `default` (A1111's DPM++ 2M with the Karras schedule for most); a sampler
/// alone runs with its scheduler's own spacing.
pub fn resolve(
    sampler: Option<SamplerName>,
    schedule: Option<ScheduleKind>,
    default: (Sampler, ScheduleKind),
) -> anyhow::Result<(Sampler, ScheduleKind)> {
    let Some(SamplerName { sampler, schedule: implied }) = sampler else {
        return Ok((default.0, schedule.unwrap_or(default.1)));
    };
    match (implied, schedule) {
        (Some(a), Some(b)) if a != b => {
            bail!(
                "--sampler {} {} implies the {} schedule but --schedule says {}",
                sampler.a1111_name(),
                a.a1111_name(),
                a.name(),
                b.name()
            )
        }
        (a, b) => Ok((sampler, b.or(a).unwrap_or(ScheduleKind::Normal))),
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// What a step needs besides the sample: the schedule, the noise source and
/// what multistep samplers remember.
pub struct StepContext<'a> {
    pub sigmas: &'a [f32],
    pub landing: &'a [f32],
    pub timesteps: &'a [f32],
    /// One generator per image of the batch, each continuing its seed's stream.
    pub rngs: &'a mut [TorchRng],
    pub device: &'a Device,
    /// Earlier steps' values (x̂₀ or d), oldest first; empty at the first step run.
    pub history: Vec<Tensor>,
    /// UniPC's corrector: the sample its last predictor started from, and
    /// that predictor's order.
    pub last_sample: Option<(Tensor, usize)>,
    /// A flow-matching schedule (x = (1 − σ)·x₀ + σ·ε).
    pub flow: bool,
}

impl StepContext<'_> {
    /// Fresh unit noise shaped like `x`, each image's from its own generator,
    /// so a batch draws exactly what one-by-one runs would.
    fn noise_like(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        let per_image = x.elem_count() / self.rngs.len();
        let values: Vec<f32> = self.rngs.iter_mut().flat_map(|r| r.randn(per_image)).collect();
        Tensor::from_vec(values, x.shape(), self.device)?.to_dtype(x.dtype())
    }

    /// σ of step `i` and where its update lands.
    fn pair(&self, i: usize) -> (f64, f64) {
        (self.sigmas[i] as f64, self.landing[i] as f64)
    }

    /// Keeps the last `n` history entries after pushing `v`.
    fn remember(&mut self, v: Tensor, n: usize) {
        self.history.push(v);
        if self.history.len() > n {
            self.history.remove(0);
        }
    }
}

type StepFn = fn(&mut dyn Denoise, &Tensor, usize, &mut StepContext) -> anyhow::Result<Tensor>;

/// `d = (x − x̂₀)/σ`, the ODE derivative.
fn derivative(model: &mut dyn Denoise, x: &Tensor, sigma: f64) -> anyhow::Result<Tensor> {
    let denoised = model.denoise(x, sigma as f32)?;
    Ok(((x - denoised)? / sigma)?)
}

/// `x + d·dt`.
fn advance(x: &Tensor, d: &Tensor, dt: f64) -> anyhow::Result<Tensor> {
    Ok((x + (d * dt)?)?)
}

fn euler(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    advance(x, &derivative(model, x, s)?, next - s)
}

/// σ_up and σ_down of an ancestral step from σ to σ' (η = 1).
fn ancestral(s: f64, next: f64) -> (f64, f64) {
    let up = (next * next * (s * s - next * next) / (s * s)).sqrt();
    (up, (next * next - up * up).sqrt())
}

fn euler_ancestral(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    let (up, down) = ancestral(s, next);
    let x = advance(x, &derivative(model, x, s)?, down - s)?;
    let noise = ctx.noise_like(&x)?;
    Ok((x + (noise * up)?)?)
}

fn heun(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    let d = derivative(model, x, s)?;
    if next == 0.0 {
        return advance(x, &d, next - s);
    }
    let predicted = advance(x, &d, next - s)?;
    let d2 = derivative(model, &predicted, next)?;
    advance(x, &((d + d2)? * 0.5)?, next - s)
}

/// The geometric mean of two σ, computed as torch's `log().lerp(…, 0.5).exp()` in f32.
fn log_midpoint(a: f64, b: f64) -> f64 {
    let (la, lb) = ((a as f32).ln(), (b as f32).ln());
    (la + 0.5 * (lb - la)).exp() as f64
}

/// DPM-Solver-2 from σ to `target` through the log-σ midpoint.
fn dpm_2_to(model: &mut dyn Denoise, x: &Tensor, s: f64, target: f64) -> anyhow::Result<Tensor> {
    let d = derivative(model, x, s)?;
    if target == 0.0 {
        return advance(x, &d, target - s);
    }
    let mid = log_midpoint(s, target);
    let x_mid = advance(x, &d, mid - s)?;
    advance(x, &derivative(model, &x_mid, mid)?, target - s)
}

fn dpm_2(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    dpm_2_to(model, x, s, next)
}

fn dpm_2_ancestral(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    let (up, down) = ancestral(s, next);
    let x = dpm_2_to(model, x, s, down)?;
    if next == 0.0 {
        return Ok(x);
    }
    let noise = ctx.noise_like(&x)?;
    Ok((x + (noise * up)?)?)
}

/// ∫ from `a` to `b` of the Lagrange basis polynomial of node `j` over `nodes`.
fn lagrange_integral(nodes: &[f64], j: usize, a: f64, b: f64) -> f64 {
    // Coefficients of Π_{k≠j} (τ − nodes[k]) / (nodes[j] − nodes[k]), lowest first.
    let mut poly = vec![1.0];
    for (_, &node) in nodes.iter().enumerate().filter(|(k, _)| *k != j) {
        let denom = nodes[j] - node;
        let mut next = vec![0.0; poly.len() + 1];
        for (p, c) in poly.iter().enumerate() {
            next[p + 1] += c / denom;
            next[p] -= c * node / denom;
        }
        poly = next;
    }
    poly.iter().enumerate().map(|(p, c)| c * (b.powi(p as i32 + 1) - a.powi(p as i32 + 1)) / (p as f64 + 1.0)).sum()
}

fn lms(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    const ORDER: usize = 4;
    let (s, next) = ctx.pair(i);
    let d = derivative(model, x, s)?;
    ctx.remember(d, ORDER);
    // diffusers sizes the formula by the absolute step (so img2img's first
    // steps use higher-order weights for the derivatives they have).
    let order = (i + 1).min(ORDER);
    let nodes: Vec<f64> = (0..order).map(|k| ctx.sigmas[i - k] as f64).collect();
    let mut x = x.clone();
    for (j, d) in ctx.history.iter().rev().enumerate().take(order) {
        x = advance(&x, d, lagrange_integral(&nodes, j, s, next))?;
    }
    Ok(x)
}

/// λ = −ln σ, the log signal-to-noise ratio of DPM-Solver.
/// The signal's scale at σ: 1 in σ-space, 1 − σ for flow matching.
fn alpha(ctx: &StepContext, sigma: f64) -> f64 {
    if ctx.flow {
        1.0 - sigma
    } else {
        1.0
    }
}

fn lambda(sigma: f64) -> f64 {
    -sigma.ln()
}

/// DPM-Solver's λ = log(α/σ) (`lambda` in σ-space).
fn lambda_of(ctx: &StepContext, sigma: f64) -> f64 {
    alpha(ctx, sigma).ln() - sigma.ln()
}

/// The second-order DPM-Solver++ estimate from this and the previous x̂₀.
fn dpmpp_2m_estimate(ctx: &StepContext, i: usize, denoised: &Tensor) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    let Some(prev) = ctx.history.last().filter(|_| next > 0.0) else {
        return Ok(denoised.clone());
    };
    let h = lambda_of(ctx, next) - lambda_of(ctx, s);
    let r = (lambda_of(ctx, s) - lambda_of(ctx, ctx.sigmas[i - 1] as f64)) / h;
    Ok(((denoised * (1.0 + 1.0 / (2.0 * r)))? - (prev * (1.0 / (2.0 * r)))?)?)
}

fn dpmpp_2m(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    let denoised = model.denoise(x, s as f32)?;
    let estimate = dpmpp_2m_estimate(ctx, i, &denoised)?;
    ctx.remember(denoised, 1);
    // x_t = (σ_t/σ_s)·x − α_t (e^{−h} − 1)·D, with e^{−h} = σ_t α_s / (α_t σ_s).
    let ratio = next / s;
    Ok(((x * ratio)? + (estimate * (alpha(ctx, next) - ratio * alpha(ctx, s)))?)?)
}

fn dpmpp_2m_sde(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    let denoised = model.denoise(x, s as f32)?;
    let noise = ctx.noise_like(x)?;
    if next == 0.0 {
        ctx.remember(denoised.clone(), 1);
        return Ok(denoised);
    }
    // The midpoint estimate D0 + D1/2 is the same combination as in 2M.
    let estimate = dpmpp_2m_estimate(ctx, i, &denoised)?;
    ctx.remember(denoised, 1);
    let h = lambda(next) - lambda(s);
    let decay = (-h).exp();
    let x = ((x * (next / s * decay))? + (estimate * (1.0 - (-2.0 * h).exp()))?)?;
    Ok((x + (noise * (next * (1.0 - (-2.0 * h).exp()).sqrt()))?)?)
}

fn dpmpp_2s_ancestral(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    let denoised = model.denoise(x, s as f32)?;
    let up = next.min((next * next * (s * s - next * next) / (s * s)).sqrt());
    let down = (next * next - up * up).sqrt();
    let x = if down == 0.0 {
        advance(x, &((x - &denoised)? / s)?, down - s)?
    } else {
        let (t, t_next) = (lambda(s), lambda(down));
        let h = t_next - t;
        let mid = (-(t + 0.5 * h)).exp();
        let x_mid = ((x * (mid / s))? - (&denoised * (-h * 0.5).exp_m1())?)?;
        let denoised_mid = model.denoise(&x_mid, mid as f32)?;
        ((x * (down / s))? - (denoised_mid * (-h).exp_m1())?)?
    };
    if next > 0.0 {
        let noise = ctx.noise_like(&x)?;
        return Ok((x + (noise * up)?)?);
    }
    Ok(x)
}

/// UniPC's update from σ_s to σ_t (bh2 weights, x̂₀ prediction): the
/// first-order DPM-Solver++ step plus weighted differences of earlier x̂₀.
/// `earlier` holds (x̂₀, σ) of steps before `s`, newest first; `current` is
/// the corrector's x̂₀ at σ_t (None for the predictor).
fn unipc_update(
    x: &Tensor,
    (s, t): (f64, f64),
    m0: &Tensor,
    earlier: &[(&Tensor, f64)],
    current: Option<&Tensor>,
) -> anyhow::Result<Tensor> {
    let ratio = t / s;
    let base = ((x * ratio)? + (m0 * (1.0 - ratio))?)?;
    if t == 0.0 {
        return Ok(base);
    }
    let h = lambda(t) - lambda(s);
    let hh = -h;
    let b_h = hh.exp_m1();
    let rks: Vec<f64> = earlier.iter().map(|(_, sk)| (lambda(*sk) - lambda(s)) / h).collect();
    let diffs: Vec<Tensor> =
        earlier.iter().zip(&rks).map(|((m, _), rk)| Ok((((*m) - m0)? / *rk)?)).collect::<anyhow::Result<_>>()?;
    // b_k = k! · φ_{k+1}(h) / B(h), from φ₁ recursively.
    let order = earlier.len() + usize::from(current.is_some());
    let mut b = Vec::with_capacity(order);
    let (mut phi, mut factorial) = (hh.exp_m1() / hh - 1.0, 1.0);
    for k in 1..=order.max(1) {
        b.push(phi * factorial / b_h);
        factorial *= (k + 1) as f64;
        phi = phi / hh - 1.0 / factorial;
    }
    let rhos: Vec<f64> = match (earlier.len(), current) {
        (0, _) => vec![0.5],
        // The predictor's order-2 weight is fixed in diffusers.
        (1, None) => vec![0.5],
        (1, Some(_)) => {
            // Solve [[1, 1], [r, 1]] ρ = b.
            let r = rks[0];
            let det = 1.0 - r;
            vec![(b[0] - b[1]) / det, (b[1] - r * b[0]) / det]
        }
        (n, _) => bail!("UniPC order {} is not supported", n + 1),
    };
    let mut correction = Tensor::zeros_like(x)?;
    for (d, rho) in diffs.iter().zip(&rhos) {
        correction = (correction + (d * *rho)?)?;
    }
    if let Some(m_t) = current {
        let rho_t = *rhos.last().expect("one weight at least");
        correction = (correction + ((m_t - m0)? * rho_t)?)?;
    }
    Ok((base - (correction * b_h)?)?)
}

fn unipc(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let denoised = model.denoise(x, ctx.sigmas[i])?;
    let sigma = |k: usize| ctx.sigmas[k] as f64;
    // Correct the sample the last predictor produced, with the new x̂₀.
    let x = match (ctx.last_sample.take(), ctx.history.last()) {
        (Some((last, order)), Some(m0)) => {
            let earlier: Vec<(&Tensor, f64)> =
                ctx.history.iter().rev().skip(1).take(order - 1).zip([sigma(i.saturating_sub(2))]).collect();
            unipc_update(&last, (sigma(i - 1), sigma(i)), m0, &earlier, Some(&denoised))?
        }
        _ => x.clone(),
    };
    let steps_done = ctx.history.len();
    ctx.remember(denoised, 2);
    // Order 2 once a previous x̂₀ exists, first order into the last step.
    let remaining = ctx.sigmas.len() - 1 - i;
    let order = 2.min(remaining).min(steps_done + 1);
    ctx.last_sample = Some((x.clone(), order));
    let m0 = ctx.history.last().expect("just pushed");
    let earlier: Vec<(&Tensor, f64)> = if order == 2 { vec![(&ctx.history[0], sigma(i - 1))] } else { Vec::new() };
    unipc_update(&x, (sigma(i), sigma(i + 1)), m0, &earlier, None)
}

/// DEIS (log-ρ, order 2) on ε = (x − x̂₀)/σ: first order is an Euler step;
/// second order integrates the ε polynomial in log σ.
fn deis(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, t) = ctx.pair(i);
    let eps = ((x - model.denoise(x, s as f32)?)? / s)?;
    let last_step = i + 2 == ctx.sigmas.len() && ctx.sigmas.len() - 1 < 15;
    let out = match ctx.history.last() {
        Some(eps_prev) if !last_step => {
            let s1 = ctx.sigmas[i - 1] as f64;
            let ind = |t: f64, b: f64, c: f64| t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln());
            let coef0 = ind(t, s, s1) - ind(s, s, s1);
            let coef1 = ind(t, s1, s) - ind(s, s1, s);
            ((x + (&eps * coef0)?)? + (eps_prev * coef1)?)?
        }
        _ => advance(x, &eps, t - s)?,
    };
    ctx.remember(eps, 1);
    Ok(out)
}

/// PNDMScheduler with `skip_prk_steps` (PLMS) on ε: the first step is a
/// trapezoid (a second UNet call at the predicted sample, whose ε is not
/// remembered), later ones Adams–Bashforth of order 2, 3, 4 over the ε of
/// the steps run; each step is a DDIM (σ-space Euler) step with that ε.
fn plms(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    let eps = ((x - model.denoise(x, s as f32)?)? / s)?;
    if ctx.history.is_empty() {
        let predicted = advance(x, &eps, next - s)?;
        let eps_next = ((&predicted - model.denoise(&predicted, next as f32)?)? / next)?;
        let combined = ((&eps + eps_next)? * 0.5)?;
        ctx.remember(eps, 4);
        return advance(x, &combined, next - s);
    }
    ctx.remember(eps, 4);
    let e: Vec<&Tensor> = ctx.history.iter().rev().collect();
    let combined = match e.len() {
        2 => ((e[0] * 1.5)? - (e[1] * 0.5)?)?,
        3 => (((e[0] * (23.0 / 12.0))? - (e[1] * (16.0 / 12.0))?)? + (e[2] * (5.0 / 12.0))?)?,
        _ => {
            ((((e[0] * (55.0 / 24.0))? - (e[1] * (59.0 / 24.0))?)? + (e[2] * (37.0 / 24.0))?)?
                - (e[3] * (9.0 / 24.0))?)?
        }
    };
    advance(x, &combined, next - s)
}

/// DDPMScheduler ("fixed_small" variance): the posterior mean of x at ᾱ'
/// given x̂₀, plus its standard deviation of fresh noise (drawn whenever the
/// timestep is above 0, as diffusers does), written in σ-space.
fn ddpm(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    let denoised = model.denoise(x, s as f32)?;
    let (a, a_prev) = (1.0 / (1.0 + s * s), 1.0 / (1.0 + next * next));
    let (b, b_prev) = (1.0 - a, 1.0 - a_prev);
    let (a_cur, b_cur) = (a / a_prev, 1.0 - a / a_prev);
    let x_ddpm = (x * a.sqrt())?;
    let mean = ((denoised * (a_prev.sqrt() * b_cur / b))? + (x_ddpm * (a_cur.sqrt() * b_prev / b))?)?;
    let mean = if ctx.timesteps[i] > 0.0 {
        let std = (b_prev / b * b_cur).max(1e-20).sqrt();
        (mean + (ctx.noise_like(x)? * std)?)?
    } else {
        mean
    };
    Ok((mean / a_prev.sqrt())?)
}

/// LCMScheduler: the consistency function `c_skip·x + c_out·x̂₀` (boundary
/// scalings at 10·t), re-noised to the next timestep with fresh noise except
/// after the last step.
fn lcm(model: &mut dyn Denoise, x: &Tensor, i: usize, ctx: &mut StepContext) -> anyhow::Result<Tensor> {
    let (s, next) = ctx.pair(i);
    let denoised = model.denoise(x, s as f32)?;
    let scaled = ctx.timesteps[i] as f64 * 10.0;
    let c_skip = 0.25 / (scaled * scaled + 0.25);
    let c_out = scaled / (scaled * scaled + 0.25).sqrt();
    let consistent = ((denoised * c_out)? + (x * (c_skip / (s * s + 1.0).sqrt()))?)?;
    if i + 2 == ctx.sigmas.len() {
        return Ok(consistent);
    }
    let noise = ctx.noise_like(x)?;
    Ok((consistent + (noise * next)?)?)
}

/// Runs `sampler` over the schedule's steps from `x` (already scaled by the
/// schedule's initial noise factor, or noised to its first step), calling
/// `hook(step, x)` after every step; the hook may replace the latents.
/// Returns σ-space latents at the last σ.
pub fn sample(
    sampler: Sampler,
    model: &mut dyn Denoise,
    x: Tensor,
    schedule: &Schedule,
    rngs: &mut [TorchRng],
    hook: &mut dyn FnMut(usize, Tensor) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Tensor> {
    let step = sampler.step_fn();
    let device = x.device().clone();
    let mut ctx = StepContext {
        sigmas: &schedule.sigmas,
        landing: &schedule.landing,
        timesteps: &schedule.timesteps,
        rngs,
        device: &device,
        history: Vec::new(),
        last_sample: None,
        flow: schedule.is_flow(),
    };
    let mut x = x;
    for i in schedule.steps() {
        let mut next = step(model, &x, i, &mut ctx)?;
        let (landed, expected) = (schedule.landing[i] as f64, schedule.sigmas[i + 1] as f64);
        if landed != expected {
            // Same DDPM-space sample, read at the next step's σ.
            next = (next * ((1.0 + expected * expected) / (1.0 + landed * landed)).sqrt())?;
        }
        x = hook(i, next)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_aliases_and_suggestions() {
        assert_eq!("DPM++ 2M".parse::<Sampler>().unwrap(), Sampler::DpmPP2M);
        assert_eq!("euler a".parse::<Sampler>().unwrap(), Sampler::EulerAncestral);
        assert_eq!(
            "DPM++ 2M Karras".parse::<SamplerName>().unwrap(),
            SamplerName { sampler: Sampler::DpmPP2M, schedule: Some(ScheduleKind::Karras) }
        );
        let err = "dpmpp_2n".parse::<Sampler>().unwrap_err().to_string();
        assert!(err.contains("did you mean dpmpp_2m"), "{err}");
        for row in SAMPLERS {
            assert_eq!(row.1.parse::<Sampler>().unwrap(), row.0);
            assert_eq!(row.2.parse::<Sampler>().unwrap(), row.0);
        }
    }

    #[test]
    fn model_calls_counts_what_each_sampler_calls() {
        struct Counting(usize);
        impl Denoise for Counting {
            fn denoise(&mut self, x: &Tensor, _: f32) -> anyhow::Result<Tensor> {
                self.0 += 1;
                Ok((x * 0.5)?)
            }
        }
        let cfg: SchedulerConfig = serde_json::from_str("{}").unwrap();
        for &(sampler, ..) in SAMPLERS {
            for start in [0, 3] {
                let schedule = sampler.schedule(&cfg, 7, ScheduleKind::Normal).unwrap().from_step(start);
                let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
                let mut model = Counting(0);
                let mut rngs = [TorchRng::new(1)];
                sample(sampler, &mut model, x, &schedule, &mut rngs, &mut |_, x| Ok(x)).unwrap();
                assert_eq!(model.0, sampler.model_calls(&schedule), "{}", sampler.name());
            }
        }
    }

    #[test]
    fn lagrange_weights_integrate_polynomials_exactly() {
        // Weights of a 3-node rule reproduce ∫ τ² over [a, b].
        let nodes = [3.0, 2.0, 1.5];
        let (a, b) = (3.0, 1.0);
        let exact = (b * b * b - a * a * a) / 3.0;
        let rule: f64 = (0..3).map(|j| lagrange_integral(&nodes, j, a, b) * nodes[j] * nodes[j]).sum();
        assert!((rule - exact).abs() < 1e-12, "{rule} vs {exact}");
    }
}
