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
    /// SD 1.5's `scheduler_config.json`, used for single-file SD 1.x checkpoints.
    pub fn sd15() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            steps_offset: 1,
            set_alpha_to_one: false,
            timestep_spacing: None,
        }
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

    /// Descending timesteps for `k` steps, as f64 like diffusers' numpy arrays.
    fn timesteps(self, cfg: &SchedulerConfig, k: usize) -> Vec<f64> {
        let t = cfg.num_train_timesteps;
        match self {
            Spacing::Linspace => linspace_f64(0.0, (t - 1) as f64, k).into_iter().rev().collect(),
            Spacing::Leading => {
                let ratio = t / k;
                (0..k).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect()
            }
            Spacing::Trailing => {
                let ratio = t as f64 / k as f64;
                (0..k).map(|i| (t as f64 - i as f64 * ratio).round_ties_even() - 1.0).collect()
            }
        }
    }
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
}

impl Schedule {
    /// EulerDiscreteScheduler / EulerAncestralDiscreteScheduler: σ interpolated
    /// linearly in t from the training σ table, then 0. The initial noise is
    /// σ_max for linspace/trailing spacing and √(σ_max² + 1) for leading.
    pub fn euler(cfg: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        check_steps(cfg, steps)?;
        let spacing = Spacing::parse(cfg.timestep_spacing.as_deref().unwrap_or("linspace"))?;
        let table: Vec<f64> = cfg.alphas_cumprod()?.into_iter().map(|a| sigma_of(a) as f64).collect();
        let ts = spacing.timesteps(cfg, steps);
        let mut sigmas: Vec<f32> = ts.iter().map(|&t| interp(t, &table) as f32).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(0f32, f32::max);
        let init_noise_scale = match spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Self { sigmas, timesteps: ts.iter().map(|&t| t as f32).collect(), init_noise_scale })
    }

    /// DDIMScheduler with η = 0, which in σ-space is an Euler step from
    /// σ(ᾱ_t) to σ(ᾱ_prev). Its sample starts as plain unit noise in
    /// DDPM-space, i.e. `√(σ₀² + 1)` in σ-space, and the last step lands on
    /// ᾱ₀ (`set_alpha_to_one = false`), not on σ = 0.
    pub fn ddim(cfg: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        check_steps(cfg, steps)?;
        let spacing = Spacing::parse(cfg.timestep_spacing.as_deref().unwrap_or("leading"))?;
        if spacing != Spacing::Leading {
            // With other spacings diffusers steps to t − T/k, which is not the
            // next timestep; that is not one σ list.
            bail!("the ddim sampler supports leading timestep spacing only");
        }
        let ac = cfg.alphas_cumprod()?;
        let ts: Vec<usize> = spacing.timesteps(cfg, steps).into_iter().map(|t| t as usize).collect();
        if let Some(&t) = ts.iter().find(|&&t| t >= ac.len()) {
            bail!("timestep {t} is outside the {} training steps (steps_offset too large)", ac.len());
        }
        let final_alpha = if cfg.set_alpha_to_one { 1.0 } else { ac[0] };
        let mut sigmas: Vec<f32> = ts.iter().map(|&t| sigma_of(ac[t])).collect();
        sigmas.push(sigma_of(final_alpha));
        let init_noise_scale = (sigmas[0] * sigmas[0] + 1.0).sqrt();
        Ok(Self { sigmas, timesteps: ts.iter().map(|&t| t as f32).collect(), init_noise_scale })
    }

    /// The schedule from step `start` on (img2img's partial denoising).
    pub fn tail(mut self, start: usize) -> Self {
        self.sigmas.drain(..start);
        self.timesteps.drain(..start);
        self
    }

    /// The UNet timestep for a σ of this schedule.
    pub fn timestep(&self, sigma: f32) -> anyhow::Result<f32> {
        match self.sigmas.iter().position(|&s| s == sigma) {
            Some(i) if i < self.timesteps.len() => Ok(self.timesteps[i]),
            _ => bail!("σ = {sigma} is not a step of this schedule"),
        }
    }

    /// Converts the final σ-space sample to the DDPM-space latents diffusers
    /// decodes (a no-op when the schedule ends at σ = 0).
    pub fn final_scale(&self) -> f32 {
        let s = *self.sigmas.last().expect("schedules are never empty");
        1.0 / (s * s + 1.0).sqrt()
    }
}

fn check_steps(cfg: &SchedulerConfig, steps: usize) -> anyhow::Result<()> {
    if steps == 0 || steps > cfg.num_train_timesteps {
        bail!("steps must be between 1 and {}, got {steps}", cfg.num_train_timesteps);
    }
    Ok(())
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
    fn ddim_leading_timesteps_match_diffusers() {
        let s = Schedule::ddim(&SchedulerConfig::sd15(), 10).unwrap();
        assert_eq!(s.timesteps, vec![901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]);
        assert_eq!(s.sigmas.len(), 11);
        assert!(*s.sigmas.last().unwrap() > 0.0);
    }

    #[test]
    fn euler_linspace_ends_at_zero_and_starts_at_sigma_max() {
        let s = Schedule::euler(&SchedulerConfig::sd15(), 20).unwrap();
        assert_eq!(s.timesteps[0], 999.0);
        assert_eq!(*s.timesteps.last().unwrap(), 0.0);
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
        assert_eq!(s.init_noise_scale, s.sigmas[0]);
        assert!((s.sigmas[0] - 14.6146).abs() < 1e-3, "{}", s.sigmas[0]);
    }

    #[test]
    fn zero_steps_is_an_error() {
        assert!(Schedule::euler(&SchedulerConfig::sd15(), 0).is_err());
    }
}
