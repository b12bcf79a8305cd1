//! Replays the fuzz targets' seed corpora and every input that once crashed
//! one (`fuzz/regressions/TARGET/`) through the same harness the fuzzers
//! run: each must end without a panic. CI runs this, not the fuzzers.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).unwrap();
            eprintln!("{target}: {}", entry.path().display());
            run(&data);
            count += 1;
        }
    }
    assert!(count > 0, "no inputs for {target}");
}

#[test]
fn checkpoint_inputs() {
    replay("checkpoint", harness::checkpoint);
}

#[test]
fn prompt_inputs() {
    replay("prompt", harness::prompt);
}

#[test]
fn prompt_file_inputs() {
    replay("prompt_file", harness::prompt_file);
}

#[test]
fn infotext_inputs() {
    replay("infotext", harness::infotext);
}

#[test]
fn pickle_inputs() {
    replay("pickle", harness::pickle);
}
