//! File hashes as A1111 shows them (model, LoRA, VAE, embedding hashes),
//! cached in a small sidecar beside the hashed file (`NAME.sdgen.json`, keyed
//! by the file's size and modification time) so that listing and generating
//! do not re-read gigabytes each time. The sidecar also keeps other answers
//! that cost a pass over a file (an SD 2.x single file's prediction type).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What the sidecar remembers about a file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Sidecar {
    size: u64,
    modified_ns: u128,
    sha256: Option<String>,
    /// SD 2.x single files: the v/ε probe's answer.
    pub(crate) prediction: Option<String>,
}

fn sidecar_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".sdgen.json");
    file.with_file_name(name)
}

/// The file's size and modification time, which a sidecar must match.
pub(crate) fn stamp(file: &Path) -> anyhow::Result<(u64, u128)> {
    let meta = std::fs::metadata(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    Ok((meta.len(), modified.map_or(0, |d| d.as_nanos())))
}

/// The sidecar of `file` if it still describes it.
pub(crate) fn read_sidecar(file: &Path) -> anyhow::Result<Sidecar> {
    let (size, modified_ns) = stamp(file)?;
    let fresh = Sidecar { size, modified_ns, ..Sidecar::default() };
    let cached =
        std::fs::read_to_string(sidecar_path(file)).ok().and_then(|t| serde_json::from_str::<Sidecar>(&t).ok());
    Ok(cached.filter(|c| c.size == size && c.modified_ns == modified_ns).unwrap_or(fresh))
}

/// Writes the sidecar atomically; a read-only models dir only loses the cache.
pub(crate) fn write_sidecar(file: &Path, sidecar: &Sidecar) {
    let path = sidecar_path(file);
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let written = serde_json::to_vec(sidecar).ok().is_some_and(|bytes| std::fs::write(&tmp, bytes).is_ok());
    if !written || std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The full SHA-256 of a file in hex, from its sidecar when that is current.
pub fn sha256(file: &Path) -> anyhow::Result<String> {
    let mut sidecar = read_sidecar(file)?;
    // A sidecar is only a cache: anything but a SHA-256 in it is recomputed.
    if let Some(hash) = sidecar.sha256.as_ref().filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Ok(hash.clone());
    }
    let mut f = std::fs::File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("{}: read failed", file.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex = hex(&hasher.finalize());
    sidecar.sha256 = Some(hex.clone());
    write_sidecar(file, &sidecar);
    Ok(hex)
}

/// The SHA-256 of `bytes` in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first `digits` hex digits of a file's SHA-256: 10 for A1111's model
/// hash, 12 for its LoRA, VAE and embedding hashes.
pub fn short_sha256(path: &Path, digits: usize) -> anyhow::Result<String> {
    Ok(sha256(path).with_context(|| format!("{}: hashing", path.display()))?[..digits].to_string())
}

/// Digits of A1111's model and VAE hashes ("Model hash", "VAE hash").
pub const MODEL_HASH_DIGITS: usize = 10;
/// Digits of A1111's LoRA and embedding hashes.
pub const ADAPTER_HASH_DIGITS: usize = 12;

/// A1111's legacy model hash, which its ControlNet extension still writes:
/// the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB
/// (of nothing, for a file shorter than 1 MiB).
pub fn legacy_hash(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut buf = vec![0u8; 0x10000];
    let mut n = 0;
    while n < buf.len() {
        match f
            .read_at(&mut buf[n..], 0x100000 + n as u64)
            .with_context(|| format!("{}: read failed", path.display()))?
        {
            0 => break,
            k => n += k,
        }
    }
    Ok(sha256_hex(&buf[..n])[..8].to_string())
}
