//! Reading the small JSON files models and tokenizers come with.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// A JSON file as `T`; errors name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}
