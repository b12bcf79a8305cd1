//! Reading the small JSON files models and tokenizers come with; writing
//! outputs atomically.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// A JSON file as `T`; errors name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Runs `write` into a temporary file beside `path` and renames it into place.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("{}: cannot create a file in {}", path.display(), dir.display()))?;
    let encode = || -> anyhow::Result<()> {
        let mut out = BufWriter::new(tmp.as_file());
        write(&mut out)?;
        out.flush()?;
        Ok(())
    };
    // The temporary file is removed when `tmp` drops on the error path.
    encode().with_context(|| format!("{}: write failed (disk full?)", path.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("{}: write failed", path.display()))?;
    tmp.persist(path).map_err(|e| anyhow::anyhow!("{}: cannot write: {}", path.display(), e.error))?;
    Ok(())
}

/// Temporary files for `path` are named `.NAME.<random>.tmp` beside it, so
/// a process killed mid-write leaves litter that can be told apart.
pub fn temp_prefix(path: &Path) -> String {
    format!(".{}.", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default())
}
