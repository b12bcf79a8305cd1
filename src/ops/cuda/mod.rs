//! The CUDA forwards' kernels: CUDA C sources beside this file, compiled at
//! run time by NVRTC for the device's compute capability (no nvcc step in the
//! build, no toolkit headers at run time: the sources include nothing). The
//! sources and their compile options are here for every build, so that a test
//! can compile them without a GPU or the `cuda` feature (`tests/nvrtc.rs`).

#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
pub(super) use launch::*;

/// One NVRTC program: its module name, its code (with the prelude) and the
/// `extern "C"` kernels it defines.
pub struct Source {
    pub module: &'static str,
    pub code: &'static str,
    pub entries: &'static [&'static str],
}

macro_rules! source {
    ($module:literal, $file:literal, [$($entry:literal),* $(,)?]) => {
        Source {
            module: $module,
            code: concat!(include_str!("prelude.cuh"), include_str!($file)),
            entries: &[$($entry),*],
        }
    };
}

pub const NORM: Source =
    source!("sdgen_norm", "norm.cu", ["group_stats_f32", "group_apply_f32", "group_stats_f16", "group_apply_f16"]);
pub const CONV: Source = source!(
    "sdgen_conv",
    "conv.cu",
    [
        "fill_initial_f32",
        "fill_initial_vec_f32",
        "im2col_f32",
        "fill_initial_f16",
        "fill_initial_vec_f16",
        "im2col_f16"
    ]
);
pub const ATTENTION: Source = source!(
    "sdgen_attention",
    "attention.cu",
    [
        "flash_attention_d32",
        "flash_attention_d48",
        "flash_attention_d64",
        "flash_attention_d80",
        "flash_attention_d96",
        "flash_attention_d128",
        "flash_attention_d160",
    ]
);
pub const ACTIVATION: Source = source!("sdgen_activation", "activation.cu", ["geglu_f32", "geglu_f16"]);

pub const SOURCES: [&Source; 4] = [&NORM, &CONV, &ATTENTION, &ACTIVATION];

/// NVRTC's options for a device of compute capability `major.minor`.
pub fn nvrtc_options(major: i32, minor: i32) -> Vec<String> {
    vec![format!("--gpu-architecture=sm_{major}{minor}"), "--std=c++17".to_string()]
}
