//! Any bytes as a batch prompt file, plain and JSON Lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdgen::batch::{parse_jobs, plan, JobOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let defaults = JobOptions::default();
    for jsonl in [false, true] {
        if let Ok(jobs) = parse_jobs(text, "fuzz", jsonl, &defaults) {
            let _ = plan(&jobs, &defaults, 0, None);
        }
    }
});
