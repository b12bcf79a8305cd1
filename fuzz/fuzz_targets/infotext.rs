//! Any text as a PNG's `parameters` chunk, as `sdgen replay` reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(recorded) = sdgen::infotext::parse(&text).to_request() {
        let _ = recorded.request.validate();
    }
});
