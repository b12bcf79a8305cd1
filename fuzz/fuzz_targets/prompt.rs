//! Any text as an A1111 prompt: weights, brackets, BREAK, `<lora:…>` tags
//! and chunking.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sdgen::prompt::{chunk, network_tags, parse_attention, Syntax};
use sdgen::tokenizer::ClipTokenizer;

fuzz_target!(|data: &[u8]| {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    let tokenizer = TOKENIZER.get_or_init(|| ClipTokenizer::embedded().unwrap());
    let text = String::from_utf8_lossy(data);
    let _ = parse_attention(&text);
    let _ = network_tags(&text);
    for syntax in [Syntax::A1111, Syntax::Plain] {
        let chunked = chunk(tokenizer, &text, syntax);
        assert!(!chunked.chunks.is_empty());
        assert!(chunked.chunks.iter().all(|c| c.ids.len() == 77 && c.weights.len() == 77));
    }
});
