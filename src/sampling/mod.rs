//! Sampling: σ schedules, the denoiser wrapper and the samplers.

pub mod denoiser;
pub mod samplers;
pub mod schedule;
