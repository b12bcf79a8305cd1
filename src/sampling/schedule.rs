//! Noise schedules as diffusers' schedulers compute them, expressed in
//! k-diffusion's σ-space: a decreasing list of σ with the UNet timestep for
//! each, and the factor that turns unit noise into the first latents.
//!
//! σ-space: `x = x₀ + σ ε`. diffusers' DDPM-space sample is `x / √(σ² + 1)`
//! with `σ = √((1 − ᾱ) / ᾱ)`.

use anyhow::bail;
use serde::Deserialize;

/// diffusers' `scheduler_config.json`, the fields the samplers use.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// The diffusers class the folder names (empty for single files).
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "scaled_linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    /// Absent in SD 1.5's file: then each scheduler class uses its own default.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// LCM: the distillation's step count, whose timesteps LCM subsamples.
    #[serde(default)]
    pub original_inference_steps: Option<usize>,
    /// Flow matching (SD 3): the σ shift of `FlowMatchEulerDiscreteScheduler`.
    #[serde(default)]
    pub shift: Option<f64>,
    /// Flow matching with a resolution-dependent shift (Flux), not SD 3's.
    #[serde(default)]
    pub use_dynamic_shifting: bool,
}

fn thousand() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.00085
}
fn beta_end() -> f64 {
    0.012
}
fn scaled_linear() -> String {
    "scaled_linear".into()
}
fn epsilon() -> String {
    "epsilon".into()
}
fn yes() -> bool {
    true
}

impl SchedulerConfig {
    /// Whether it is a flow-matching scheduler (SD 3).
    pub fn is_flow(&self) -> bool {
        self.class_name.starts_with("FlowMatch")
    }

    /// SD 1.5's `scheduler_config.json`, used for single-file SD 1.x checkpoints.
    pub fn sd15() -> Self {
        Self {
            class_name: String::new(),
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            steps_offset: 1,
            set_alpha_to_one: false,
            timestep_spacing: None,
            original_inference_steps: None,
            shift: None,
            use_dynamic_shifting: false,
        }
    }

    /// SD 3.5's `scheduler_config.json`: flow matching with shift 3.
    pub fn sd3() -> Self {
        Self { class_name: "FlowMatchEulerDiscreteScheduler".into(), shift: Some(3.0), ..Self::sd15() }
    }

    /// SD 2.1's `scheduler_config.json` (SD 1.5's with v-prediction), for
    /// single-file SD 2.x checkpoints; the prediction type is then detected
    /// or given (`--prediction`).
    pub fn sd21() -> Self {
        Self { prediction_type: "v_prediction".into(), ..Self::sd15() }
    }

    /// SDXL base's `scheduler_config.json` (EulerDiscreteScheduler, leading
    /// spacing), for single-file SDXL checkpoints. Its leading spacing holds
    /// for every sampler, and scales the initial noise by √(σ_max² + 1).
    pub fn sdxl() -> Self {
        Self { timestep_spacing: Some("leading".into()), ..Self::sd15() }
    }

    /// `ᾱ_t` for t = 0..T as torch computes it: betas in f32, the cumulative
    /// product accumulated in f64 and stored in f32.
    pub fn alphas_cumprod(&self) -> anyhow::Result<Vec<f32>> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = match (&self.trained_betas, self.beta_schedule.as_str()) {
            (Some(b), _) => b.iter().map(|&b| b as f32).collect(),
            (None, "linear") => linspace_f32(self.beta_start as f32, self.beta_end as f32, n),
            (None, "scaled_linear") => {
                let (s, e) = (self.beta_start.sqrt() as f32, self.beta_end.sqrt() as f32);
                linspace_f32(s, e, n).into_iter().map(|b| b * b).collect()
            }
            (None, other) => bail!("beta_schedule {other:?} is not supported"),
        };
        if betas.len() != n || n < 2 {
            bail!("expected {n} betas (at least 2), got {}", betas.len());
        }
        let mut acc = 1f64;
        Ok(betas
            .iter()
            .map(|b| {
                acc *= (1.0 - b) as f64;
                acc as f32
            })
            .collect())
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`: stepping from both ends.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 }).collect()
}

/// `np.linspace(start, end, n)` in f64 (the last value is exact).
fn linspace_f64(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n).map(|i| if i + 1 == n { end } else { start + step * i as f64 }).collect()
}

/// σ(ᾱ) = √((1 − ᾱ)/ᾱ), in f32 as torch evaluates it.
fn sigma_of(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

/// How inference timesteps are spread over the training range (diffusers'
/// `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "linspace" => Spacing::Linspace,
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            other => bail!("timestep_spacing {other:?} is not supported"),
        })
    }
}

/// How σ values are placed (diffusers' `use_*_sigmas` options).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SigmaKind {
    /// σ of each timestep, from the training table.
    Table,
    Karras,
    Exponential,
    Beta,
}

/// `--schedule`: a σ placement or a timestep spacing, each defined by what
/// diffusers does with the matching scheduler option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduleKind {
    /// The scheduler's own spacing from the model config.
    Normal,
    Karras,
    Exponential,
    Beta,
    Trailing,
    Leading,
    Linspace,
}

pub const SCHEDULE_NAMES: &[(&str, &str)] = &[
    ("normal", "the scheduler's own timestep spacing from the model config"),
    ("karras", "Karras et al. σ spacing (use_karras_sigmas): more steps at low noise"),
    ("exponential", "σ evenly spaced in log σ (use_exponential_sigmas)"),
    ("beta", "σ at Beta(0.6, 0.6) quantiles (use_beta_sigmas)"),
    ("trailing", "timesteps ending at the last training step: for Turbo/LCM models"),
    ("leading", "timesteps starting at step 0 (+ steps_offset)"),
    ("linspace", "timesteps evenly spread over the whole training range"),
];

impl std::str::FromStr for ScheduleKind {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> anyhow::Result<Self> {
        Ok(match name.trim().to_ascii_lowercase().as_str() {
            "normal" | "automatic" | "default" => ScheduleKind::Normal,
            "karras" => ScheduleKind::Karras,
            "exponential" => ScheduleKind::Exponential,
            "beta" => ScheduleKind::Beta,
            "trailing" => ScheduleKind::Trailing,
            "leading" => ScheduleKind::Leading,
            "linspace" => ScheduleKind::Linspace,
            other => {
                let names: Vec<&str> = SCHEDULE_NAMES.iter().map(|(n, _)| *n).collect();
                bail!("unknown schedule {other:?}; available: {}", names.join(", "))
            }
        })
    }
}

impl ScheduleKind {
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Normal => "normal",
            ScheduleKind::Karras => "karras",
            ScheduleKind::Exponential => "exponential",
            ScheduleKind::Beta => "beta",
            ScheduleKind::Trailing => "trailing",
            ScheduleKind::Leading => "leading",
            ScheduleKind::Linspace => "linspace",
        }
    }

    /// How AUTOMATIC1111 writes it after `Schedule type:`.
    pub fn a1111_name(self) -> &'static str {
        match self {
            ScheduleKind::Normal => "Automatic",
            ScheduleKind::Karras => "Karras",
            ScheduleKind::Exponential => "Exponential",
            ScheduleKind::Beta => "Beta",
            ScheduleKind::Trailing => "Trailing",
            ScheduleKind::Leading => "Leading",
            ScheduleKind::Linspace => "Linspace",
        }
    }

    fn spacing(self) -> Option<Spacing> {
        match self {
            ScheduleKind::Trailing => Some(Spacing::Trailing),
            ScheduleKind::Leading => Some(Spacing::Leading),
            ScheduleKind::Linspace => Some(Spacing::Linspace),
            _ => None,
        }
    }

    fn sigma_kind(self) -> SigmaKind {
        match self {
            ScheduleKind::Karras => SigmaKind::Karras,
            ScheduleKind::Exponential => SigmaKind::Exponential,
            ScheduleKind::Beta => SigmaKind::Beta,
            _ => SigmaKind::Table,
        }
    }
}

/// How a diffusers scheduler class lays out its timesteps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Grid {
    /// Euler, Euler a, Heun, DPM2, DPM2 a, LMS: K float timesteps, σ
    /// interpolated in t, then 0; unit noise scaled to σ_max (√(σ_max²+1)
    /// with leading spacing).
    Discrete {
        /// Linspace timesteps rounded to f32 (all but EulerDiscreteScheduler).
        f32_linspace: bool,
        /// Karras timesteps rounded to integers (the KDPM2 classes).
        round_karras: bool,
        /// Whether the class has the karras/exponential/beta options.
        conversions: bool,
    },
    /// DPM-Solver, UniPC, DEIS: K integer timesteps out of K + 1 grid points,
    /// samples in DDPM-space (unit initial noise).
    Multistep {
        /// DEIS ends at the training table's smallest σ (normal schedule) or
        /// repeats its last σ (karras/exponential/beta); the others end at 0.
        deis_final: bool,
    },
    /// DDIM, PNDM, DDPM: integer timesteps, DDPM-space. DDIM and PNDM step
    /// by T/K and end at ᾱ₀ (or 1 with `set_alpha_to_one`); DDPM steps to
    /// the next listed timestep and ends at ᾱ = 1.
    Ddim { ddpm: bool },
    /// LCMScheduler: K of the distillation's timesteps (every T/50-th), DDPM-space.
    Lcm,
}

/// A sampling schedule in σ-space.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// σ for each step's start and, last, where the final step lands.
    pub sigmas: Vec<f32>,
    /// The UNet timestep at each `sigmas[i]`, one fewer than `sigmas`.
    pub timesteps: Vec<f32>,
    /// Multiplier of unit noise for the initial latents in σ-space.
    pub init_noise_scale: f32,
    /// Where step i's update lands: `sigmas[i + 1]`, except for DDIM-style
    /// schedulers whose step t → t − T/K misses the next timestep; the
    /// sampler loop then re-reads the DDPM-space sample at `sigmas[i + 1]`,
    /// as diffusers' next step does.
    pub landing: Vec<f32>,
    /// The first step to run (img2img runs only the tail of a schedule, but
    /// multistep samplers still see the earlier σ, as diffusers' do).
    pub start: usize,
    /// log σ of every training timestep (f32), to find the timestep of a σ
    /// between the schedule's (midpoints of second-order samplers).
    log_sigmas: Vec<f32>,
    /// Flow matching: σ ∈ [0, 1] mixes data and noise, `x = (1 − σ)·x₀ + σ·ε`,
    /// and the timestep is σ × this many training steps.
    flow: Option<f32>,
}

impl Schedule {
    /// The schedule diffusers' scheduler class of kind `grid` computes for
    /// `steps` steps with the `--schedule` option `kind`.
    pub fn build(cfg: &SchedulerConfig, steps: usize, kind: ScheduleKind, grid: Grid) -> anyhow::Result<Self> {
        if steps == 0 || steps > cfg.num_train_timesteps {
            bail!("steps must be between 1 and {}, got {steps}", cfg.num_train_timesteps);
        }
        let ac = cfg.alphas_cumprod()?;
        let table32: Vec<f32> = ac.iter().map(|&a| sigma_of(a)).collect();
        let table: Vec<f64> = table32.iter().map(|&s| s as f64).collect();
        let log_sigmas: Vec<f32> = table32.iter().map(|s| s.ln()).collect();
        let default_spacing = match grid {
            Grid::Discrete { .. } | Grid::Multistep { .. } => "linspace",
            Grid::Ddim { .. } | Grid::Lcm => "leading",
        };
        let spacing = match kind.spacing() {
            Some(s) => s,
            None => Spacing::parse(cfg.timestep_spacing.as_deref().unwrap_or(default_spacing))?,
        };
        let sigma_kind = kind.sigma_kind();
        let t_count = cfg.num_train_timesteps;
        let k = steps;
        let mut landing = Vec::new();
        let (mut timesteps, mut sigmas, init) = match grid {
            Grid::Discrete { f32_linspace, round_karras, conversions } => {
                if sigma_kind != SigmaKind::Table && !conversions {
                    bail!("this sampler's diffusers scheduler has no {} schedule", kind.name());
                }
                let mut ts: Vec<f64> = match spacing {
                    Spacing::Linspace => {
                        let ts = linspace_f64(0.0, (t_count - 1) as f64, k).into_iter().rev();
                        ts.map(|t| if f32_linspace { t as f32 as f64 } else { t }).collect()
                    }
                    Spacing::Leading => {
                        let ratio = t_count / k;
                        (0..k).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect()
                    }
                    Spacing::Trailing => trailing(t_count, k),
                };
                let mut sigmas: Vec<f64> = ts.iter().map(|&t| interp(t, &table)).collect();
                if sigma_kind != SigmaKind::Table {
                    let (lo, hi) = (*sigmas.last().expect("k ≥ 1"), sigmas[0]);
                    sigmas = convert_sigmas(sigma_kind, lo, hi, k);
                    ts = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
                    if round_karras && sigma_kind == SigmaKind::Karras {
                        ts.iter_mut().for_each(|t| *t = t.round_ties_even());
                    }
                }
                let mut sigmas32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
                sigmas32.push(0.0);
                let max = sigmas32.iter().copied().fold(0f32, f32::max);
                let init = match spacing {
                    Spacing::Linspace | Spacing::Trailing => max,
                    Spacing::Leading => (max * max + 1.0).sqrt(),
                };
                (ts, sigmas32, init)
            }
            Grid::Multistep { deis_final } => {
                let mut ts: Vec<f64> = match spacing {
                    Spacing::Linspace => {
                        let grid = linspace_f64(0.0, (t_count - 1) as f64, k + 1);
                        grid.into_iter().map(f64::round_ties_even).rev().take(k).collect()
                    }
                    Spacing::Leading => {
                        let ratio = t_count / (k + 1);
                        (1..=k).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect()
                    }
                    Spacing::Trailing => trailing(t_count, k),
                };
                let mut sigmas: Vec<f64> = ts.iter().map(|&t| interp(t, &table)).collect();
                if sigma_kind != SigmaKind::Table {
                    sigmas = convert_sigmas(sigma_kind, table[0], table[t_count - 1], k);
                    // Karras timesteps are rounded; the others are truncated
                    // by the cast to int64.
                    ts = sigmas
                        .iter()
                        .map(|&s| {
                            let t = sigma_to_t(s, &log_sigmas);
                            if sigma_kind == SigmaKind::Karras {
                                t.round_ties_even()
                            } else {
                                t.trunc()
                            }
                        })
                        .collect();
                }
                let mut sigmas32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
                let last = match (deis_final, sigma_kind) {
                    (false, _) => 0.0,
                    (true, SigmaKind::Table) => table32[0],
                    (true, _) => *sigmas32.last().expect("k ≥ 1"),
                };
                sigmas32.push(last);
                let init = (sigmas32[0] * sigmas32[0] + 1.0).sqrt();
                (ts, sigmas32, init)
            }
            Grid::Ddim { ddpm } => {
                if sigma_kind != SigmaKind::Table {
                    bail!("this sampler's diffusers scheduler has no {} schedule", kind.name());
                }
                let ratio = t_count / k;
                let ts: Vec<f64> = match spacing {
                    Spacing::Leading => (0..k).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect(),
                    Spacing::Trailing => trailing(t_count, k),
                    Spacing::Linspace => {
                        linspace_f64(0.0, (t_count - 1) as f64, k).into_iter().rev().map(f64::round_ties_even).collect()
                    }
                };
                if let Some(&t) = ts.iter().find(|&&t| t as usize >= t_count) {
                    bail!("timestep {t} is outside the {t_count} training steps (steps_offset too large)");
                }
                let final_alpha = if ddpm || cfg.set_alpha_to_one { 1.0 } else { ac[0] };
                let mut sigmas: Vec<f32> = ts.iter().map(|&t| sigma_of(ac[t as usize])).collect();
                sigmas.push(sigma_of(final_alpha));
                // diffusers steps from t to t − T/K, which need not be the
                // next timestep (trailing/linspace spacing).
                landing = if ddpm {
                    Vec::new()
                } else {
                    ts.iter()
                        .map(|&t| {
                            let prev = t as i64 - ratio as i64;
                            sigma_of(if prev >= 0 { ac[prev as usize] } else { final_alpha })
                        })
                        .collect()
                };
                let init = (sigmas[0] * sigmas[0] + 1.0).sqrt();
                (ts, sigmas, init)
            }
            Grid::Lcm => {
                if kind != ScheduleKind::Normal {
                    bail!("the lcm sampler's diffusers scheduler has no {} schedule", kind.name());
                }
                let original = cfg.original_inference_steps.unwrap_or(50);
                if k > original {
                    bail!("LCM runs at most {original} steps (original_inference_steps)");
                }
                let stride = t_count / original;
                let origin: Vec<usize> = (1..=original).rev().map(|j| j * stride - 1).collect();
                let ts: Vec<f64> = linspace_f64(0.0, origin.len() as f64, k + 1)
                    .iter()
                    .take(k)
                    .map(|x| origin[*x as usize] as f64)
                    .collect();
                let mut sigmas: Vec<f32> = ts.iter().map(|&t| table32[t as usize]).collect();
                sigmas.push(0.0);
                let init = (sigmas[0] * sigmas[0] + 1.0).sqrt();
                (ts, sigmas, init)
            }
        };
        timesteps.truncate(k);
        sigmas.truncate(k + 1);
        if landing.is_empty() {
            landing = sigmas[1..].to_vec();
        }
        Ok(Self {
            sigmas,
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            init_noise_scale: init,
            landing,
            start: 0,
            flow: None,
            log_sigmas,
        })
    }

    /// This schedule from step `start` on (img2img's partial denoising).
    /// diffusers' `FlowMatchEulerDiscreteScheduler` (shift, no dynamic
    /// shifting) for `steps` steps: timesteps evenly spaced in f64 from the
    /// training table's largest σ to its smallest (itself shifted), shifted
    /// again, then 0; timesteps σ·T in f32.
    pub fn flow(cfg: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        let t_count = cfg.num_train_timesteps;
        if steps == 0 || steps > t_count {
            bail!("steps must be between 1 and {t_count}, got {steps}");
        }
        let shift = cfg.shift.unwrap_or(1.0);
        // The training table's ends, computed in f32 as torch does.
        let shifted32 = |s: f32| (shift as f32 * s) / (1.0 + (shift - 1.0) as f32 * s);
        let (max, min) = (shifted32(1.0) as f64, shifted32(1.0 / t_count as f32) as f64);
        let t = t_count as f64;
        let mut sigmas: Vec<f32> = linspace_f64(max * t, min * t, steps)
            .into_iter()
            .map(|ts| {
                let s = ts / t;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let timesteps = sigmas.iter().map(|&s| s * t_count as f32).collect();
        sigmas.push(0.0);
        Ok(Self {
            landing: sigmas[1..].to_vec(),
            init_noise_scale: sigmas[0],
            sigmas,
            timesteps,
            start: 0,
            log_sigmas: Vec::new(),
            flow: Some(t_count as f32),
        })
    }

    /// diffusers' `DPMSolverMultistepScheduler` with `use_flow_sigmas` and
    /// `flow_shift` = the config's shift: 1 − linspace(1, 1/T, K + 1) shifted
    /// in f64, in descending order without its last (0), then 0; timesteps
    /// σ·T truncated to integers (the σ stay exact). It starts from pure
    /// noise although its first σ is below 1.
    pub fn flow_multistep(cfg: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        let t_count = cfg.num_train_timesteps;
        if steps == 0 || steps > t_count {
            bail!("steps must be between 1 and {t_count}, got {steps}");
        }
        let shift = cfg.shift.unwrap_or(1.0);
        let t = t_count as f64;
        let shifted: Vec<f64> = linspace_f64(1.0, 1.0 / t, steps + 1)
            .into_iter()
            .map(|a| {
                let s = 1.0 - a;
                shift * s / (1.0 + (shift - 1.0) * s)
            })
            .rev()
            .take(steps)
            .collect();
        let timesteps = shifted.iter().map(|s| (s * t).trunc() as f32).collect();
        let mut sigmas: Vec<f32> = shifted.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        Ok(Self {
            landing: sigmas[1..].to_vec(),
            init_noise_scale: 1.0,
            sigmas,
            timesteps,
            start: 0,
            log_sigmas: Vec::new(),
            flow: Some(t_count as f32),
        })
    }

    /// Whether this is a flow-matching schedule.
    pub fn is_flow(&self) -> bool {
        self.flow.is_some()
    }

    /// `x₀` noised with unit noise `noise` to σ: `x₀ + σ·ε` in σ-space,
    /// `(1 − σ)·x₀ + σ·ε` for flow matching.
    pub fn noised(
        &self,
        x0: &candle_core::Tensor,
        noise: &candle_core::Tensor,
        sigma: f32,
    ) -> candle_core::Result<candle_core::Tensor> {
        let s = sigma as f64;
        match self.flow {
            Some(_) => (x0 * (1.0 - s))? + (noise * s)?,
            None => x0 + (noise * s)?,
        }
    }

    /// The schedule of `steps` steps as img2img at `strength` runs it:
    /// diffusers' SD 1.x/XL pipelines run the last min(⌊K·s⌋, K) steps, its
    /// SD 3 pipelines the last K − int(K − K·s).
    pub fn from_strength(self, steps: usize, strength: f64) -> Self {
        let k = steps as f64;
        let run = match self.flow {
            Some(_) => steps - (k - (k * strength).min(k)).max(0.0) as usize,
            None => ((k * strength) as usize).min(steps),
        };
        self.from_step(steps - run)
    }

    pub fn from_step(mut self, start: usize) -> Self {
        self.start = start.min(self.timesteps.len().saturating_sub(1));
        self
    }

    /// k-diffusion's conventions: every timestep from its σ by log-σ
    /// interpolation (its denoiser sees only σ), and initial noise at σ₀.
    pub fn k_diffusion_style(mut self) -> Self {
        for (t, s) in self.timesteps.iter_mut().zip(&self.sigmas) {
            *t = sigma_to_t(*s as f64, &self.log_sigmas) as f32;
        }
        self.init_noise_scale = self.sigmas[0];
        self
    }

    /// The steps that run: `start..len`.
    pub fn steps(&self) -> std::ops::Range<usize> {
        self.start..self.timesteps.len()
    }

    /// The backbone's timestep for σ: the schedule's own where σ is one of
    /// its steps, else σ·T for flow matching, else interpolated in log σ
    /// over the training table (diffusers' and k-diffusion's `sigma_to_t`).
    pub fn timestep(&self, sigma: f32) -> f32 {
        match (self.sigmas.iter().position(|&s| s == sigma), self.flow) {
            (Some(i), _) if i < self.timesteps.len() => self.timesteps[i],
            (_, Some(t)) => sigma * t,
            _ => sigma_to_t(sigma as f64, &self.log_sigmas) as f32,
        }
    }

    /// Converts the final σ-space sample to the DDPM-space latents diffusers
    /// decodes (a no-op when the schedule ends at σ = 0).
    pub fn final_scale(&self) -> f32 {
        let s = *self.sigmas.last().expect("schedules are never empty");
        1.0 / (s * s + 1.0).sqrt()
    }
}

/// Trailing spacing: `round(arange(T, 0, −T/K)) − 1`.
fn trailing(t_count: usize, k: usize) -> Vec<f64> {
    let ratio = t_count as f64 / k as f64;
    (0..k).map(|i| (t_count as f64 - i as f64 * ratio).round_ties_even() - 1.0).collect()
}

/// K σ values from `hi` down to `lo` placed as `kind` says.
fn convert_sigmas(kind: SigmaKind, lo: f64, hi: f64, k: usize) -> Vec<f64> {
    let ramp = linspace_f64(0.0, 1.0, k);
    match kind {
        SigmaKind::Table => unreachable!("only conversions come here"),
        SigmaKind::Karras => {
            let rho = 7.0;
            let (min_inv, max_inv) = (lo.powf(1.0 / rho), hi.powf(1.0 / rho));
            ramp.iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
        }
        SigmaKind::Exponential => linspace_f64(hi.ln(), lo.ln(), k).into_iter().map(f64::exp).collect(),
        SigmaKind::Beta => ramp.iter().map(|r| lo + beta_ppf(1.0 - r, 0.6, 0.6) * (hi - lo)).collect(),
    }
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose σ, interpolated
/// linearly in log σ between training steps, is `sigma`.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let low = log_sigmas.iter().rposition(|&l| l as f64 <= log_sigma).unwrap_or(0).min(n - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The `q`-quantile of the Beta(a, b) distribution (scipy's `beta.ppf`), by
/// bisection on the regularized incomplete beta function.
fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if incomplete_beta(mid, a, b) < q {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= f64::EPSILON * mid.max(1e-300) {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// Regularized incomplete beta I_x(a, b), by its continued fraction.
fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_fraction(x, a, b) / a
    } else {
        1.0 - ln_front.exp() * beta_fraction(1.0 - x, b, a) / b
    }
}

/// Lentz's method for the incomplete beta continued fraction.
fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    let tiny = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    d = 1.0 / if d.abs() < tiny { tiny } else { d };
    let mut h = d;
    for m in 1..500 {
        let m = m as f64;
        for num in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + num * d;
            d = 1.0 / if d.abs() < tiny { tiny } else { d };
            c = 1.0 + num / c;
            c = if c.abs() < tiny { tiny } else { c };
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// ln Γ(x) for x > 0 (Lanczos approximation, g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let series = COEF[1..].iter().enumerate().fold(COEF[0], |acc, (i, c)| acc + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + series.ln()
}

/// `np.interp(x, arange(len), table)`.
fn interp(x: f64, table: &[f64]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0];
    }
    if x >= last as f64 {
        return table[last];
    }
    let j = x.floor() as usize;
    let slope = table[j + 1] - table[j];
    slope * (x - j as f64) + table[j]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_sigmas_equal_flow_match_euler() {
        // FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(4), diffusers 0.42.1.
        let cfg: SchedulerConfig = serde_json::from_str(r#"{"shift": 3.0}"#).unwrap();
        let s = Schedule::flow(&cfg, 4).unwrap();
        // Printed as f64: the values are exact f32s.
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        assert_eq!(s.sigmas, f32s(&[1.0, 0.857692301273346, 0.602150559425354, 0.008928571827709675, 0.0]));
        assert_eq!(s.timesteps[..3], f32s(&[1000.0, 857.6923217773438, 602.1505737304688]));
        assert_eq!((s.timestep(0.5), s.init_noise_scale), (500.0, 1.0));
        let s28 = Schedule::flow(&cfg, 28).unwrap();
        assert_eq!(s28.sigmas[1..4], f32s(&[0.9873806238174438, 0.9741077423095703, 0.9601293206214905]));
        // img2img at strength 0.6 of 4 steps: SD 3 runs K − int(K − K·s) = 3, SD 1.x ⌊K·s⌋ = 2.
        assert_eq!(s.from_strength(4, 0.6).steps(), 1..4);
        let vp =
            Schedule::build(&SchedulerConfig::sd15(), 4, ScheduleKind::Normal, Grid::Ddim { ddpm: false }).unwrap();
        assert_eq!(vp.from_strength(4, 0.6).steps(), 2..4);
    }

    const EULER: Grid = Grid::Discrete { f32_linspace: false, round_karras: false, conversions: true };
    const DDIM: Grid = Grid::Ddim { ddpm: false };

    #[test]
    fn ddim_leading_timesteps_match_diffusers() {
        let s = Schedule::build(&SchedulerConfig::sd15(), 10, ScheduleKind::Normal, DDIM).unwrap();
        assert_eq!(s.timesteps, vec![901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]);
        assert_eq!(s.sigmas.len(), 11);
        assert!(*s.sigmas.last().unwrap() > 0.0);
        let odd = Schedule::build(&SchedulerConfig::sd15(), 6, ScheduleKind::Trailing, DDIM).unwrap();
        assert_eq!(odd.timesteps[..2], [999.0, 832.0]);
        assert!(odd.landing[0] > odd.sigmas[1], "999 − 166 = 833 lands above t = 832");
        assert!(Schedule::build(&SchedulerConfig::sd15(), 10, ScheduleKind::Karras, DDIM).is_err());
    }

    #[test]
    fn euler_linspace_ends_at_zero_and_starts_at_sigma_max() {
        let s = Schedule::build(&SchedulerConfig::sd15(), 20, ScheduleKind::Normal, EULER).unwrap();
        assert_eq!(s.timesteps[0], 999.0);
        assert_eq!(*s.timesteps.last().unwrap(), 0.0);
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
        assert_eq!(s.init_noise_scale, s.sigmas[0]);
        assert!((s.sigmas[0] - 14.6146).abs() < 1e-3, "{}", s.sigmas[0]);
    }

    #[test]
    fn sigma_to_t_inverts_the_table_and_interpolates_between() {
        let s = Schedule::build(&SchedulerConfig::sd15(), 10, ScheduleKind::Normal, EULER).unwrap();
        for t in [0usize, 1, 500, 998, 999] {
            let sigma = s.log_sigmas[t].exp();
            assert!((s.timestep(sigma * 1.0000001) - t as f32).abs() < 1e-2, "t {t}");
        }
        let mid = (s.log_sigmas[100] * 0.5 + s.log_sigmas[101] * 0.5).exp();
        assert!((s.timestep(mid) - 100.5).abs() < 1e-3);
    }

    #[test]
    fn beta_quantiles_match_scipy() {
        // scipy.stats.beta.ppf(q, 0.6, 0.6)
        for (q, want) in [(0.5, 0.5), (0.1, 0.039_584_405_588_780_85), (0.9, 0.960_415_594_411_219_2)] {
            let got = beta_ppf(q, 0.6, 0.6);
            assert!((got - want).abs() < 1e-9, "ppf({q}) = {got}, want {want}");
        }
    }

    #[test]
    fn zero_steps_is_an_error() {
        assert!(Schedule::build(&SchedulerConfig::sd15(), 0, ScheduleKind::Normal, EULER).is_err());
    }
}
