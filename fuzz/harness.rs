//! What each fuzz target does with its input, shared with the regression
//! test that replays every past crash (`tests/fuzz_regressions.rs`): any
//! input must end in `Ok` or `Err`, never a panic.

#![allow(dead_code)] // each fuzz target uses one of these

use std::sync::OnceLock;

use sdgen::batch::{parse_jobs, plan};
use sdgen::prompt::{chunk, network_tags, parse_attention, Syntax};
use sdgen::request::Init;
use sdgen::settings::Settings;
use sdgen::tokenizer::ClipTokenizer;

/// Any bytes as a `.safetensors` model: header checks, name mapping, config
/// inference, shape checks, the listing's description.
pub fn checkpoint(data: &[u8]) {
    let dir = std::env::temp_dir().join(format!("sdgen-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("model.safetensors");
    std::fs::write(&path, data).expect("temp file");
    let _ = std::fs::remove_file(dir.join("model.safetensors.sdgen.json"));
    let _ = sdgen::loading::catalog::describe(&path);
    let _ = sdgen::loading::Model::load(&path, &candle_core::Device::Cpu, candle_core::DType::F32);
}

/// Any bytes as a PyTorch pickle file (`.pt`): the opcode interpreter, the
/// zip and legacy containers, flattening, and every tensor view read back.
pub fn pickle(data: &[u8]) {
    let dir = std::env::temp_dir().join(format!("sdgen-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("model.pt");
    std::fs::write(&path, data).expect("temp file");
    if let Ok(read) = sdgen::loading::pickle::read(&path) {
        let file = std::fs::File::open(&path).expect("temp file");
        for (_, t) in &read.tensors {
            let bytes = t.read(&file).expect("a checked view reads");
            let count: usize = t.shape.iter().product();
            assert_eq!(bytes.len(), count * sdgen::loading::pickle::element_size(t.dtype));
        }
    }
    let _ = sdgen::loading::pickle::take_notices();
}

/// Any text as an A1111 prompt: weights, brackets, BREAK, `<lora:…>` tags,
/// chunking; chunks always hold 77 ids and 77 weights.
pub fn prompt(data: &[u8]) {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    let tokenizer = TOKENIZER.get_or_init(|| ClipTokenizer::embedded().expect("embedded vocabulary"));
    let text = String::from_utf8_lossy(data);
    let _ = parse_attention(&text);
    let _ = network_tags(&text);
    for syntax in [Syntax::A1111, Syntax::Plain] {
        let chunked = chunk(tokenizer, &text, syntax);
        assert!(!chunked.chunks.is_empty());
        assert!(chunked.chunks.iter().all(|c| c.ids.len() == 77 && c.weights.len() == 77));
    }
}

/// Any text as a batch prompt file, plain and JSON Lines, then planned.
pub fn prompt_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let defaults = Settings::default();
    for jsonl in [false, true] {
        if let Ok(jobs) = parse_jobs(text, "fuzz", jsonl, &defaults) {
            let _ = plan(&jobs, &defaults, 0, None);
        }
    }
}

/// Any text as a PNG's `parameters` chunk, as `sdgen replay` reads it.
pub fn infotext(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(recorded) = sdgen::infotext::parse(&text).to_settings() {
        let _ = recorded.settings.validate(&Init::Noise);
    }
}
