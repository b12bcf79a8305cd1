//! Any bytes as a `.safetensors` model: the header check, the name mapping,
//! config inference and shape checks must answer with an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = sdgen_fuzz_file(data);
    let _ = sdgen::loading::catalog::describe(&path);
    let _ = sdgen::loading::Model::load(&path, &candle_core::Device::Cpu, candle_core::DType::F32);
});

/// The input as a file (the loader reads files), in memory-backed /dev/shm.
fn sdgen_fuzz_file(data: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sdgen-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    std::fs::write(&path, data).unwrap();
    let _ = std::fs::remove_file(dir.join("model.safetensors.sdgen.json"));
    path
}
