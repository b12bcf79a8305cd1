//! `sdgen convert`: a weight file (a PyTorch pickle read as data, or
//! safetensors) written as one safetensors file: tensors sorted by name,
//! the source's SHA-256 and its small values in the metadata, float tensors
//! optionally cast as `torch.Tensor.to` casts them; written atomically.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::bail;
use half::{bf16, f16};
use safetensors::Dtype;

use super::weights::Checkpoint;
use crate::failure::{Failure, Tag};

/// What the file holds, for the report.
pub struct Converted {
    pub tensors: usize,
    pub bytes: u64,
}

/// The float types `--dtype` takes.
pub fn parse_dtype(s: &str) -> anyhow::Result<Dtype> {
    Ok(match s {
        "f16" => Dtype::F16,
        "bf16" => Dtype::BF16,
        "f32" => Dtype::F32,
        other => bail!("--dtype {other:?}: use f16, bf16 or f32"),
    })
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// `bytes` of dtype `from` as `to`, rounding as torch does: through f32
/// (exact from f16 and bf16, rounded to nearest even from f64), then to
/// nearest even.
fn cast(bytes: &[u8], from: Dtype, to: Dtype) -> Vec<u8> {
    if from == to {
        return bytes.to_vec();
    }
    let values: Vec<f32> = match from {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4"))).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes(b.try_into().expect("2")).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes(b.try_into().expect("2")).to_f32()).collect(),
        Dtype::F64 => bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8")) as f32).collect(),
        _ => unreachable!("only float tensors are cast"),
    };
    match to {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        _ => unreachable!("casts go to f16, bf16 or f32"),
    }
}

/// Converts `input` into the safetensors file `output`.
pub fn convert(input: &Path, output: &Path, dtype: Option<Dtype>) -> anyhow::Result<Converted> {
    if !output.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
        return Err(anyhow::anyhow!("{}: the output must be a .safetensors file", output.display()))
            .tag(Failure::Usage);
    }
    let ckpt = Checkpoint::open(&[input.to_path_buf()]).tag(Failure::Model)?;
    let names = ckpt.names();
    let stored = ckpt.dtypes().into_iter().map(|(n, d, s)| (n, (d, s))).collect::<BTreeMap<_, _>>();
    let target = |d: Dtype| dtype.filter(|_| is_float(d)).unwrap_or(d);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for name in &names {
        let (d, shape) = &stored[name];
        let size = shape.iter().product::<usize>() * super::pickle::element_size(target(*d));
        let entry = serde_json::json!({"dtype": target(*d), "shape": shape, "data_offsets": [offset, offset + size]});
        header.insert(name.clone(), entry);
        offset += size;
    }
    let mut metadata = ckpt.metadata().clone();
    metadata.insert("format".into(), "pt".into());
    metadata.insert("source_sha256".into(), super::hashing::sha256(input).tag(Failure::Model)?);
    header.insert("__metadata__".into(), serde_json::to_value(&metadata)?);
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // The data starts 8-aligned, as safetensors writers pad it.
    text.resize(text.len().next_multiple_of(8), b' ');
    crate::files::write_atomically(output, |out| {
        out.write_all(&(text.len() as u64).to_le_bytes())?;
        out.write_all(&text)?;
        for name in &names {
            let (d, bytes) = ckpt.raw(name).map(|(d, _, b)| (d, b))?;
            out.write_all(&cast(&bytes, d, target(d)))?;
        }
        Ok(())
    })
    .tag(Failure::Output)?;
    Ok(Converted { tensors: names.len(), bytes: 8 + text.len() as u64 + offset as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn casts_round_to_nearest_even_through_f32() {
        // 1 + 2^-11 is halfway between two f16 values: ties go to the even one (1.0).
        let halfway = (1.0f32 + 2f32.powi(-11)).to_le_bytes();
        assert_eq!(cast(&halfway, Dtype::F32, Dtype::F16), f16::from_f32(1.0).to_le_bytes());
        // f64 → f16 goes through f32 as torch does: x rounds to the tie 1 + 2^-11 in f32, then to 1.0;
        // one rounding would give 1 + 2^-10.
        let x = 1.0f64 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(cast(&x.to_le_bytes(), Dtype::F64, Dtype::F16), f16::from_f32(1.0).to_le_bytes());
        let b = bf16::from_f32(2.5).to_le_bytes();
        assert_eq!(cast(&b, Dtype::BF16, Dtype::BF16), b);
    }
}
