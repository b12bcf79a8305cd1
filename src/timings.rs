//! Seconds per phase of a run (`--timings`), from the times of the
//! pipeline's events, and the process's peak memory. On a CUDA device the
//! times are events recorded on the device's stream and read after the
//! run, so timing adds no wait inside the step loop; elsewhere they are the
//! host clock after the device has finished its queue.

use std::time::Instant;

use candle_core::Device;

use crate::pipeline::Event;

/// A point in a run's time.
enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda::cudarc::driver::CudaEvent),
}

impl Mark {
    fn now(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            use candle_core::cuda::cudarc::driver::sys::CUevent_flags;
            if let Ok(e) = d.cuda_stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)) {
                return Mark::Cuda(e);
            }
        }
        device.synchronize().ok();
        Mark::Host(Instant::now())
    }

    /// Seconds from `self` to `end` (0 when the two clocks differ).
    fn seconds_to(&self, end: &Mark) -> f64 {
        match (self, end) {
            (Mark::Host(a), Mark::Host(b)) => (*b - *a).as_secs_f64(),
            #[cfg(feature = "cuda")]
            (Mark::Cuda(a), Mark::Cuda(b)) => a.elapsed_ms(b).map_or(0.0, |ms| ms as f64 / 1e3),
            #[cfg(feature = "cuda")]
            _ => 0.0,
        }
    }
}

#[derive(Clone, Copy)]
enum Phase {
    Encode,
    Step,
    Decode,
}

pub struct Timings {
    load: f64,
    /// The events' times, read when the report is made.
    marks: Vec<Mark>,
    /// Each phase's span, as indices into `marks`.
    spans: Vec<(Phase, usize, usize)>,
    /// The last event's mark.
    last: Option<usize>,
}

impl Timings {
    /// Starts with the model's load time.
    pub fn new(load: f64) -> Self {
        Self { load, marks: Vec::new(), spans: Vec::new(), last: None }
    }

    pub fn event(&mut self, e: &Event, device: &Device) {
        let phase = match e {
            Event::Warning(_) => return,
            Event::EncodingText | Event::Decoding => None,
            Event::Sampling => Some(Phase::Encode),
            Event::Step { .. } => Some(Phase::Step),
            Event::Decoded => Some(Phase::Decode),
        };
        let now = self.marks.len();
        self.marks.push(Mark::now(device));
        if let (Some(phase), Some(last)) = (phase, self.last) {
            self.spans.push((phase, last, now));
        }
        self.last = if matches!(e, Event::Decoded) { None } else { Some(now) };
    }

    /// One JSON line; `total` is the whole run's seconds.
    pub fn json(&self, total: f64) -> String {
        let peak = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<u64>().ok());
        let (mut encode, mut steps, mut decode) = (0.0, Vec::new(), 0.0);
        for &(phase, start, end) in &self.spans {
            let s = self.marks[start].seconds_to(&self.marks[end]);
            match phase {
                Phase::Encode => encode += s,
                Phase::Step => steps.push(s),
                Phase::Decode => decode += s,
            }
        }
        serde_json::json!({
            "load_s": self.load,
            "text_encode_s": encode,
            "unet_steps_s": steps,
            "vae_decode_s": decode,
            "total_s": total,
            "peak_rss_mb": peak.map(|kb| kb / 1024),
        })
        .to_string()
    }
}
