//! The listing commands: `sdgen models`, `sdgen tokenize`, `sdgen samplers`.

use std::path::Path;
use std::process::ExitCode;

use sdgen::failure::{self, Failure};

/// `sdgen models`: a table (or JSON lines) of what the models dir holds; a
/// model that cannot be read is reported on stderr and makes the exit
/// status non-zero, after the others are listed.
pub fn list_models(models_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let paths = sdgen::loading::assets::list_models(models_dir);
    if paths.is_empty() {
        eprintln!("{}: no models (.safetensors files or diffusers folders)", models_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let row = |cells: [&str; 8]| {
        let [name, format, family, inpaint, pred, dtype, size, hash] = cells;
        println!("{name:<28} {format:<6} {family:<6} {inpaint:<7} {pred:<4} {dtype:<5} {size:>9} {hash}");
    };
    if !json {
        row(["NAME", "FORMAT", "FAMILY", "INPAINT", "PRED", "DTYPE", "SIZE", "HASH"]);
    }
    let mut failed = false;
    for path in paths {
        match sdgen::loading::catalog::describe(&path) {
            Ok(e) if json => println!("{}", serde_json::to_string(&e)?),
            Ok(e) => {
                let size = format!("{:.1} MB", e.size as f64 / 1e6);
                let inpainting = if e.inpainting { "yes" } else { "no" };
                row([&e.name, e.format, e.family, inpainting, e.prediction, &e.dtype, &size, &e.hash]);
            }
            Err(err) => {
                failed = true;
                eprintln!("error: {}", failure::one_line(&err));
            }
        }
    }
    Ok(if failed { ExitCode::from(Failure::Model.code()) } else { ExitCode::SUCCESS })
}

/// `sdgen tokenize`: each chunk's tokens (id, weight, text) as the text
/// encoder gets them, or the ids and weights as JSON.
pub fn tokenize(
    prompt: &str,
    model: Option<&str>,
    models_dir: &Path,
    syntax: sdgen::prompt::Syntax,
    json: bool,
) -> anyhow::Result<()> {
    let tokenizer = match model {
        Some(m) => {
            let path = sdgen::loading::assets::find(sdgen::loading::assets::Asset::Model, m, models_dir);
            sdgen::loading::tokenizer_of(&path?)?
        }
        None => sdgen::tokenizer::ClipTokenizer::embedded()?,
    };
    let chunked = sdgen::prompt::chunk(&tokenizer, prompt, syntax);
    for w in &chunked.warnings {
        eprintln!("warning: {w}");
    }
    if json {
        let chunks: Vec<_> =
            chunked.chunks.iter().map(|c| serde_json::json!({"ids": c.ids, "weights": c.weights})).collect();
        println!("{}", serde_json::json!({"chunks": chunks, "token_count": chunked.token_count}));
        return Ok(());
    }
    for (i, c) in chunked.chunks.iter().enumerate() {
        let end = c.tokens + 2;
        println!("chunk {} ({} tokens + BOS/EOS, {} padding):", i + 1, c.tokens, c.ids.len() - end);
        for (id, w) in c.ids[..end].iter().zip(&c.weights) {
            println!("  {id:>6}  {w:<6.4}  {}", tokenizer.token_text(*id).unwrap_or("?"));
        }
    }
    println!("token count: {}", chunked.token_count);
    Ok(())
}

pub fn list_samplers() {
    use sdgen::sampling::samplers::SAMPLERS;
    println!("samplers (--sampler; A1111 names work too):");
    for (_, name, a1111, deterministic, what) in SAMPLERS {
        let kind = if *deterministic { "deterministic" } else { "ancestral" };
        println!("  {name:<14} {a1111:<14} {kind:<13} {what}");
    }
    println!("schedules (--schedule):");
    for (name, what) in sdgen::sampling::schedule::SCHEDULE_NAMES {
        println!("  {name:<14} {what}");
    }
}
