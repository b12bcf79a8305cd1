//! Our own fused operations for the hot paths of the UNet and the VAE, as
//! candle custom ops: convolution with its bias, per-image channel offsets and
//! residual in the GEMM's initial value ([`Conv2d`]), linear layers that read
//! strided inputs without copies ([`Linear`]), GroupNorm with the SiLU that
//! follows it ([`GroupNorm`]), attention blocked per head and query rows
//! ([`attention`]) and the feed-forward gate ([`geglu`]).
//!
//! Each op has a CPU forward (`cpu_fwd`, f32 and f16) and, with the `cuda`
//! feature, a CUDA forward (`cuda_fwd`, f32 and f16) beside it, on kernels of
//! our own ([`cuda`]) and cuBLAS; on other devices and dtypes the same struct
//! runs the unfused candle composition, which is also the reference the CPU
//! forward is tested against (`tests/ops.rs`), and the CPU forward the
//! reference of the CUDA one (`sdgen dev ops-check`).

mod activation;
mod attention;
pub mod cases;
mod conv;
pub mod cuda;
mod kernels;
mod linear;
mod norm;

pub use activation::{geglu, geglu_reference};
pub use attention::{attention, attention_reference};
pub use conv::Conv2d;
pub use linear::Linear;
pub use norm::GroupNorm;

/// Whether our fused forward runs for `x`: on the CPU always, on a CUDA
/// device (built with the `cuda` feature) for f32 and f16 data.
fn fused(x: &candle_core::Tensor) -> bool {
    match x.device() {
        candle_core::Device::Cpu => true,
        candle_core::Device::Cuda(_) => {
            cfg!(feature = "cuda") && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F16)
        }
        _ => false,
    }
}

/// A layer's weight, with the init hint candle-nn's layers give (random
/// models follow it): a fan-in-scaled normal.
fn weight(
    vb: &candle_nn::VarBuilder,
    shape: impl Into<candle_core::Shape>,
) -> candle_core::Result<candle_core::Tensor> {
    vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)
}

/// A layer's bias over `cout` outputs from `cin` inputs, with candle-nn's
/// init hint: uniform within ±1/√cin.
fn bias(vb: &candle_nn::VarBuilder, cin: usize, cout: usize) -> candle_core::Result<candle_core::Tensor> {
    let bound = 1.0 / (cin as f64).sqrt();
    vb.get_with_hints(cout, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })
}

/// Keeps large freed buffers in the process instead of returning them to the
/// kernel, so that the next step's activations reuse mapped pages rather than
/// fault in fresh zeroed ones (glibc maps every allocation above its
/// threshold anew, and the UNet's activations are all above it). Called when
/// a model is loaded for the CPU.
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds, under glibc's lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
