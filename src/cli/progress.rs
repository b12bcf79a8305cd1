//! Progress display: a spinner while the model loads, bars over a run's
//! images and steps, per-phase timings when asked for.

use std::path::Path;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sdgen::pipeline::Event;
use sdgen::session::{RunEvent, Session};
use sdgen::timings::Timings;

pub fn draw_target(quiet: bool) -> ProgressDrawTarget {
    if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    }
}

/// Progress bars over a run: images (for batches) and the steps of the
/// current image; per-phase timings when asked for.
pub struct Progress {
    started: Instant,
    pub bars: MultiProgress,
    images: Option<ProgressBar>,
    steps: ProgressBar,
    quiet: bool,
    pub timings: Option<Timings>,
}

impl Progress {
    pub fn new(started: Instant, quiet: bool, images: Option<usize>, timings: Option<Timings>) -> Self {
        let bars = MultiProgress::with_draw_target(draw_target(quiet));
        let images = images.map(|n| {
            let bar = bars.add(ProgressBar::new(n as u64));
            let style = ProgressStyle::with_template("images [{bar:30}] {pos}/{len} ETA {eta} {msg}");
            bar.set_style(style.expect("valid template"));
            bar
        });
        let steps = bars.add(ProgressBar::new(1));
        let style = ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}");
        steps.set_style(style.expect("valid template").progress_chars("=> "));
        Self { started, bars, images, steps, quiet, timings }
    }

    pub fn event(&mut self, session: &Session, e: &RunEvent) {
        match e {
            RunEvent::Started { jobs } => {
                self.steps.reset();
                if let Some(images) = &self.images {
                    let names: Vec<String> = jobs.iter().map(|j| file_name(&j.path)).collect();
                    images.set_message(names.join(" "));
                }
            }
            RunEvent::Pipeline(e) => {
                if let Some(t) = &mut self.timings {
                    t.event(e, &session.device);
                }
                match e {
                    Event::Warning(w) if !self.quiet => self.bars.suspend(|| eprintln!("warning: {w}")),
                    Event::EncodingText => self.steps.set_message("encoding"),
                    Event::Step { done, total } => {
                        self.steps.set_length(*total as u64);
                        self.steps.set_message("denoising");
                        self.steps.set_position(*done as u64);
                    }
                    Event::Decoding => self.steps.set_message("decoding"),
                    _ => {}
                }
            }
            RunEvent::Written { job, .. } => match &self.images {
                Some(images) => images.inc(1),
                None if !self.quiet => {
                    let (path, seed, s) = (job.path.display(), job.request.seed, self.started.elapsed().as_secs_f64());
                    self.bars.suspend(|| println!("{path} (seed {seed}, {s:.1} s)"))
                }
                None => {}
            },
            RunEvent::Failed { job, error } => {
                self.images.as_ref().inspect(|b| b.inc(1));
                self.bars.suspend(|| eprintln!("{}: failed: {error}", file_name(&job.path)));
            }
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}
