//! Checks `TorchRng::randn` against tensors recorded from real torch
//! (torch 2.15, Linux x86-64, AVX2 kernel): tests/fixtures/rng/vectors.json.

use sdgen::rng::TorchRng;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixture() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rng/vectors.json");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The `fsum` literals in file order, parsed with std's correctly rounded
/// `f64::from_str`. serde_json's default float parser is only best-effort
/// (it may be off by an ulp on 17-digit values), which would defeat an exact
/// comparison.
fn fsum_literals(text: &str) -> Vec<f64> {
    text.split("\"fsum\":")
        .skip(1)
        .map(|rest| {
            let end = rest.find([',', '}', '\n']).expect("unterminated fsum");
            rest[..end].trim().parse().expect("fsum is not a number")
        })
        .collect()
}

/// Correctly rounded sum of `xs` (Shewchuk's algorithm, as Python's
/// `math.fsum`): the partials hold the running sum exactly, and the final
/// step rounds their total once, half-way cases included.
fn exact_sum(xs: impl IntoIterator<Item = f64>) -> f64 {
    let mut partials: Vec<f64> = Vec::new();
    for mut x in xs {
        let mut kept = 0;
        for i in 0..partials.len() {
            let mut y = partials[i];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                partials[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        partials.truncate(kept);
        partials.push(x);
    }
    // Add the partials from the largest down until the sum becomes inexact.
    let Some(mut hi) = partials.pop() else {
        return 0.0;
    };
    let mut lo = 0.0;
    while let Some(y) = partials.pop() {
        let x = hi;
        hi = x + y;
        lo = y - (hi - x);
        if lo != 0.0 {
            break;
        }
    }
    // If the remainder lies exactly half-way, the rest decides the rounding.
    if let Some(&next) = partials.last() {
        if (lo < 0.0 && next < 0.0) || (lo > 0.0 && next > 0.0) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
    }
    hi
}

#[test]
fn exact_sum_rounds_correctly() {
    assert_eq!(exact_sum([1e100, 1.0, -1e100, 1e-100]), 1.0);
    assert_eq!(exact_sum([0.1; 10]), 1.0);
    // 1 + 2^-53 + 2^-106: just above half an ulp of 1, so it rounds up.
    let tiny = f64::EPSILON / 2.0;
    assert_eq!(exact_sum([1.0, tiny, tiny * tiny]), 1.0 + f64::EPSILON);
    assert_eq!(exact_sum([1.0, tiny]), 1.0);
}

#[test]
fn randn_matches_torch_vectors() {
    let text = fixture();
    let json: Value = serde_json::from_str(&text).expect("vectors.json is not JSON");
    let vectors = json["vectors"].as_array().expect("no vectors");
    let fsums = fsum_literals(&text);
    assert_eq!(fsums.len(), vectors.len());
    assert!(!vectors.is_empty());

    let failures: Vec<String> =
        vectors.iter().zip(&fsums).filter_map(|(v, &want_sum)| check_vector(v, want_sum).err()).collect();
    assert!(failures.is_empty(), "{} of {} vectors failed:\n{}", failures.len(), vectors.len(), failures.join("\n"));
}

/// Regenerates one recorded tensor and compares it; `Err` describes every
/// mismatch so one run reports all failing vectors.
fn check_vector(v: &Value, want_sum: f64) -> Result<(), String> {
    let seed = v["seed"].as_u64().expect("seed");
    let shape: Vec<usize> =
        v["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
    let draw = v["draw"].as_u64().expect("draw");
    let label = format!("seed {seed} shape {shape:?} draw {draw}");
    // Guards the literal scan against picking up another vector's sum.
    let json_sum = v["fsum"].as_f64().expect("fsum");
    assert!((json_sum - want_sum).abs() <= 1e-12 * want_sum.abs().max(1.0), "{label}");

    // `draw` counts successive randn calls of this shape on one generator.
    let numel = shape.iter().product();
    let mut rng = TorchRng::new(seed);
    for _ in 1..draw {
        rng.randn(numel);
    }
    let out = rng.randn(numel);
    if out.len() != numel {
        return Err(format!("{label}: {} values, want {numel}", out.len()));
    }

    let mut errors = Vec::new();
    let want_first: Vec<u32> = v["first8_hex"]
        .as_array()
        .expect("first8_hex")
        .iter()
        .map(|h| u32::from_str_radix(h.as_str().expect("hex"), 16).expect("hex"))
        .collect();
    let got_first: Vec<u32> = out.iter().take(8).map(|x| x.to_bits()).collect();
    if got_first != want_first {
        errors.push(format!("first bits {got_first:08x?} != {want_first:08x?}"));
    }

    let got_sum = exact_sum(out.iter().map(|&x| f64::from(x)));
    if got_sum.to_bits() != want_sum.to_bits() {
        errors.push(format!("sum {got_sum:?} != {want_sum:?}"));
    }

    let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
    let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let want_sha = v["sha256_16"].as_str().expect("sha256_16");
    if !digest.starts_with(want_sha) {
        errors.push(format!("sha256 {} != {want_sha}", &digest[..want_sha.len()]));
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{label}: {}", errors.join("; ")))
    }
}
