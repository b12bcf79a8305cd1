//! The compute device and precision, parsed from their words once and
//! opened (which probes the hardware) only when a model is about to load.

use std::str::FromStr;

use anyhow::bail;
use candle_core::{DType, Device};

/// `auto` (CUDA, then Metal, then CPU), `cpu`, `cuda`, `cuda:N` or `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> anyhow::Result<Self> {
        let spec = spec.trim().to_ascii_lowercase();
        Ok(match spec.as_str() {
            "auto" => DeviceSpec::Auto,
            "cpu" => DeviceSpec::Cpu,
            "metal" => DeviceSpec::Metal,
            "cuda" => DeviceSpec::Cuda(0),
            s => match s.strip_prefix("cuda:") {
                Some(n) => DeviceSpec::Cuda(
                    n.parse().map_err(|_| anyhow::anyhow!("--device {s}: expected cuda:N with N a GPU number"))?,
                ),
                None => bail!("unknown device {s:?}; use auto, cpu, cuda, cuda:N or metal"),
            },
        })
    }
}

impl DeviceSpec {
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            // A GPU build on a machine without a usable GPU still runs, on the CPU.
            DeviceSpec::Auto => Ok(if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0).unwrap_or(Device::Cpu)
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            }),
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Metal => {
                if !candle_core::utils::metal_is_available() {
                    bail!("--device metal: this sdgen was built without Metal support; rebuild with `cargo build --release --features metal` on macOS");
                }
                Ok(Device::new_metal(0)?)
            }
            DeviceSpec::Cuda(index) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!("--device cuda:{index}: this sdgen was built without CUDA support; rebuild with `cargo build --release --features cuda` (README: \"Building with CUDA\")");
                }
                Device::new_cuda(index)
                    .map_err(|e| anyhow::anyhow!("--device cuda:{index}: no usable CUDA GPU number {index}: {e}"))
            }
        }
    }
}

/// `f32`, `f16` or `bf16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision(pub DType);

impl FromStr for Precision {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(Precision(match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => DType::F32,
            "f16" | "fp16" | "float16" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            other => bail!("unknown dtype {other:?}; use f32, f16 or bf16"),
        }))
    }
}

/// The compute dtype on `device`: the one asked for, else f32 on the CPU
/// and f16 on GPUs.
pub fn dtype_on(precision: Option<Precision>, device: &Device) -> anyhow::Result<DType> {
    Ok(match precision {
        None if device.is_cpu() => DType::F32,
        None => DType::F16,
        // candle's CPU matmul has no bf16 kernel.
        Some(Precision(DType::BF16)) if device.is_cpu() => {
            bail!("--dtype bf16 is not supported on the CPU; use f32 or f16")
        }
        Some(Precision(dtype)) => dtype,
    })
}
