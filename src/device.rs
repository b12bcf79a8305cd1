//! Choosing the compute device and dtype from the command-line words.

use anyhow::bail;
use candle_core::{DType, Device};

/// `auto` (CUDA, then Metal, then CPU), `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        // A GPU build on a machine without a usable GPU still runs, on the CPU.
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0).unwrap_or(Device::Cpu)
        } else if candle_core::utils::metal_is_available() {
            Device::new_metal(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                bail!("--device metal: this sdgen was built without Metal support; rebuild with `cargo build --release --features metal` on macOS");
            }
            Ok(Device::new_metal(0)?)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let index = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("--device {s}: expected cuda:N with N a GPU number"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this sdgen was built without CUDA support; rebuild with `cargo build --release --features cuda` (README: \"Building with CUDA\")");
            }
            Device::new_cuda(index).map_err(|e| anyhow::anyhow!("--device {s}: no usable CUDA GPU number {index}: {e}"))
        }
        other => bail!("unknown device {other:?}; use auto, cpu, cuda, cuda:N or metal"),
    }
}

/// `f32`, `f16` or `bf16`; without one, f32 on the CPU and f16 on GPUs.
pub fn parse_dtype(spec: Option<&str>, device: &Device) -> anyhow::Result<DType> {
    Ok(match spec.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None => {
            if device.is_cpu() {
                DType::F32
            } else {
                DType::F16
            }
        }
        Some("f32" | "fp32" | "float32") => DType::F32,
        Some("f16" | "fp16" | "float16") => DType::F16,
        // candle's CPU matmul has no bf16 kernel.
        Some("bf16" | "bfloat16") if device.is_cpu() => {
            bail!("--dtype bf16 is not supported on the CPU; use f32 or f16")
        }
        Some("bf16" | "bfloat16") => DType::BF16,
        Some(other) => bail!("unknown dtype {other:?}; use f32, f16 or bf16"),
    })
}
