//! Wall-clock seconds per phase of a run (`--timings`), from the times of
//! the pipeline's events, and the process's peak memory.

use std::time::Instant;

use crate::pipeline::Event;

#[derive(Debug, Default)]
pub struct Timings {
    load: f64,
    encode: f64,
    steps: Vec<f64>,
    decode: f64,
    /// The last event's time.
    last: Option<Instant>,
}

impl Timings {
    /// Starts with the model's load time.
    pub fn new(load: f64) -> Self {
        Self { load, ..Self::default() }
    }

    pub fn event(&mut self, e: &Event) {
        let now = Instant::now();
        let since = self.last.map_or(0.0, |t| (now - t).as_secs_f64());
        match e {
            Event::Warning(_) => return,
            Event::EncodingText | Event::Decoding => {}
            Event::Sampling => self.encode += since,
            Event::Step { .. } => self.steps.push(since),
            Event::Decoded => {
                self.decode += since;
                self.last = None;
                return;
            }
        }
        self.last = Some(now);
    }

    /// One JSON line; `total` is the whole run's seconds.
    pub fn json(&self, total: f64) -> String {
        let peak = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<u64>().ok());
        serde_json::json!({
            "load_s": self.load,
            "text_encode_s": self.encode,
            "unet_steps_s": self.steps,
            "vae_decode_s": self.decode,
            "total_s": total,
            "peak_rss_mb": peak.map(|kb| kb / 1024),
        })
        .to_string()
    }
}
