//! Batch generation from a prompt file: parsing and validating the whole
//! file up front, seeds and file names fixed by the file alone, a manifest
//! that makes runs resumable, and sharding across machines.
//!
//! File formats: plain text (one job per line; `#` comments and blank lines
//! skipped; a line starting with `--` holds shell-quoted options, any other
//! line is the prompt) or JSON Lines (one object per line with the same
//! option names, snake_case or kebab-case).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::loading::{Defaults, STANDARD_512};
use crate::pipeline::{Init, Request, SizeConditioning, TextOptions};
use crate::prompt::Syntax;
use crate::sampling::samplers::{resolve, Sampler};
use crate::sampling::schedule::ScheduleKind;

/// The per-image options a job line may set; unset ones take the command
/// line's values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobOptions {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub sampler: Option<String>,
    pub schedule: Option<String>,
    pub batch_count: Option<usize>,
    pub clip_skip: Option<usize>,
    pub prompt_syntax: Option<String>,
    /// SDXL's size conditioning, as on the command line (`WxH`, `TOP,LEFT`).
    pub original_size: Option<String>,
    pub crop_top_left: Option<String>,
    pub target_size: Option<String>,
}

/// More images than this from one job is surely a typo.
pub const MAX_BATCH_COUNT: usize = 10_000;

/// The option names a job may use (kebab-case; snake_case is accepted too).
pub const JOB_OPTIONS: &[&str] = &[
    "prompt",
    "negative-prompt",
    "seed",
    "steps",
    "cfg-scale",
    "width",
    "height",
    "sampler",
    "schedule",
    "batch-count",
    "clip-skip",
    "prompt-syntax",
    "original-size",
    "crop-top-left",
    "target-size",
];

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> anyhow::Result<T> {
    value.trim().parse().map_err(|_| anyhow::anyhow!("--{key}: {value:?} is not a valid number"))
}

impl JobOptions {
    /// Sets one option from its text value, checking it.
    pub fn set(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        let key = key.replace('_', "-");
        match key.as_str() {
            "prompt" => self.prompt = Some(value.to_string()),
            "negative-prompt" => self.negative_prompt = Some(value.to_string()),
            "seed" => self.seed = Some(parse_num(&key, value)?),
            "steps" => self.steps = Some(parse_num(&key, value)?),
            "cfg-scale" => self.cfg_scale = Some(parse_num(&key, value)?),
            "width" => self.width = Some(parse_num(&key, value)?),
            "height" => self.height = Some(parse_num(&key, value)?),
            "sampler" => {
                Sampler::parse_with_schedule(value)?;
                self.sampler = Some(value.to_string());
            }
            "schedule" => self.schedule = Some(ScheduleKind::parse(value)?.name().to_string()),
            "batch-count" => self.batch_count = Some(parse_num(&key, value)?),
            "clip-skip" => self.clip_skip = Some(parse_num(&key, value)?),
            "prompt-syntax" => self.prompt_syntax = Some(Syntax::parse(value)?.name().to_string()),
            "original-size" | "target-size" => {
                SizeConditioning::parse_size(value).with_context(|| format!("--{key}"))?;
                let slot = if key == "original-size" { &mut self.original_size } else { &mut self.target_size };
                *slot = Some(value.to_string());
            }
            "crop-top-left" => {
                SizeConditioning::parse_top_left(value).context("--crop-top-left")?;
                self.crop_top_left = Some(value.to_string());
            }
            other => bail!("unknown option --{other} (job options: {})", JOB_OPTIONS.join(", ")),
        }
        Ok(())
    }

    /// These options over `defaults`.
    pub fn or(&self, defaults: &JobOptions) -> JobOptions {
        JobOptions {
            prompt: self.prompt.clone().or_else(|| defaults.prompt.clone()),
            negative_prompt: self.negative_prompt.clone().or_else(|| defaults.negative_prompt.clone()),
            seed: self.seed.or(defaults.seed),
            steps: self.steps.or(defaults.steps),
            cfg_scale: self.cfg_scale.or(defaults.cfg_scale),
            width: self.width.or(defaults.width),
            height: self.height.or(defaults.height),
            sampler: self.sampler.clone().or_else(|| defaults.sampler.clone()),
            schedule: self.schedule.clone().or_else(|| defaults.schedule.clone()),
            batch_count: self.batch_count.or(defaults.batch_count),
            clip_skip: self.clip_skip.or(defaults.clip_skip),
            prompt_syntax: self.prompt_syntax.clone().or_else(|| defaults.prompt_syntax.clone()),
            original_size: self.original_size.clone().or_else(|| defaults.original_size.clone()),
            crop_top_left: self.crop_top_left.clone().or_else(|| defaults.crop_top_left.clone()),
            target_size: self.target_size.clone().or_else(|| defaults.target_size.clone()),
        }
    }

    /// The prompt reading and SDXL size conditioning these options ask for.
    pub fn text_and_size(&self) -> anyhow::Result<(TextOptions, SizeConditioning)> {
        let text = TextOptions::from_options(self.prompt_syntax.as_deref(), self.clip_skip)?;
        let size_conditioning = SizeConditioning::from_texts(
            self.original_size.as_deref(),
            self.crop_top_left.as_deref(),
            self.target_size.as_deref(),
        )?;
        Ok((text, size_conditioning))
    }

    /// Checks values that can be checked without the model.
    fn check(&self) -> anyhow::Result<()> {
        if self.prompt.is_none() {
            bail!("no prompt");
        }
        for (what, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v.filter(|v| *v == 0 || v % 8 != 0 || *v > crate::image_io::MAX_SIDE as usize) {
                bail!("--{what} must be a positive multiple of 8 up to {}, got {v}", crate::image_io::MAX_SIDE);
            }
        }
        if self.steps == Some(0) {
            bail!("--steps must be at least 1");
        }
        if let Some(n) = self.batch_count.filter(|n| !(1..=MAX_BATCH_COUNT).contains(n)) {
            bail!("--batch-count must be between 1 and {MAX_BATCH_COUNT}, got {n}");
        }
        if self.clip_skip == Some(0) {
            bail!("--clip-skip must be at least 1");
        }
        self.text_and_size()?;
        if let Some(c) = self.cfg_scale.filter(|c| !c.is_finite() || *c < 0.0) {
            bail!("--cfg-scale must be a number ≥ 0, got {c}");
        }
        resolve(self.sampler.as_deref(), self.schedule.as_deref(), STANDARD_512.sampling())?;
        Ok(())
    }
}

/// Splits a line as a POSIX shell would split words: whitespace separates,
/// single quotes are literal, double quotes allow `\"` and `\\`, a backslash
/// outside quotes escapes the next character.
pub fn shell_words(line: &str) -> anyhow::Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => bail!("unterminated single quote"),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => bail!("unterminated double quote"),
                        },
                        Some(c) => w.push(c),
                        None => bail!("unterminated double quote"),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// `--key value` / `--key=value` words into options.
fn options_from_words(words: &[String]) -> anyhow::Result<JobOptions> {
    let mut opts = JobOptions::default();
    let mut i = 0;
    while i < words.len() {
        let Some(flag) = words[i].strip_prefix("--") else {
            bail!("expected an option, found {:?}", words[i]);
        };
        let (key, value) = match flag.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                i += 1;
                let v = words.get(i).with_context(|| format!("--{flag} needs a value"))?;
                (flag.to_string(), v.clone())
            }
        };
        opts.set(&key, &value)?;
        i += 1;
    }
    Ok(opts)
}

/// One job of the file, with its 1-based line number.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLine {
    pub line: usize,
    pub options: JobOptions,
}

/// Parses and checks a whole job file. `source` names it in errors;
/// `jsonl` selects JSON Lines. Every error names the line.
pub fn parse_jobs(text: &str, source: &str, jsonl: bool, defaults: &JobOptions) -> anyhow::Result<Vec<JobLine>> {
    let mut jobs = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || (!jsonl && trimmed.starts_with('#')) {
            continue;
        }
        let at = || format!("{source}:{line}");
        let options = if jsonl {
            let object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(trimmed).with_context(|| format!("{}: not a JSON object", at()))?;
            let mut opts = JobOptions::default();
            for (k, v) in &object {
                let value = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    other => bail!("{}: {k}: expected a string or number, got {other}", at()),
                };
                opts.set(k, &value).with_context(at)?;
            }
            opts
        } else if trimmed.starts_with("--") {
            options_from_words(&shell_words(trimmed).with_context(at)?).with_context(at)?
        } else {
            JobOptions { prompt: Some(trimmed.to_string()), ..Default::default() }
        };
        options.or(defaults).check().with_context(at)?;
        jobs.push(JobLine { line, options });
    }
    Ok(jobs)
}

/// Reads a job file (`-` = standard input); `.jsonl` files, and standard
/// input whose first job line starts with `{`, are JSON Lines.
pub fn read_jobs(path: &Path, defaults: &JobOptions) -> anyhow::Result<Vec<JobLine>> {
    let (text, name) = if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).context("reading standard input")?;
        (bytes, "<stdin>".to_string())
    } else {
        (std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?, path.display().to_string())
    };
    let text = String::from_utf8(text).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|b| **b == b'\n').count();
        anyhow::anyhow!("{name}:{line}: not valid UTF-8 text")
    })?;
    let jsonl = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
        || (path == Path::new("-")
            && text.lines().map(str::trim).find(|l| !l.is_empty()).is_some_and(|l| l.starts_with('{')));
    parse_jobs(&text, &name, jsonl, defaults)
}

/// `K/N`: this machine's share of the jobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let parsed = s.split_once('/').and_then(|(k, n)| Some((k.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if count > 0 && index < count => Ok(Self { index, count }),
            _ => bail!("--shard {s:?}: expected K/N with 0 ≤ K < N (e.g. 0/4)"),
        }
    }

    pub fn manifest_name(&self) -> String {
        format!("manifest-{}-of-{}.jsonl", self.index, self.count)
    }
}

/// One image to make: its job, its seed, its file name.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub job: usize,
    pub line: usize,
    /// Index of the image within its job.
    pub k: usize,
    pub seed: u64,
    pub file: String,
    pub options: JobOptions,
}

/// Every image of the file, in order. A job without a seed starts at
/// `base_seed` + the number of images of all earlier jobs; its k-th image
/// uses start + k. Only jobs of `shard` are returned, but seeds and names
/// are those of the whole file.
pub fn plan(jobs: &[JobLine], defaults: &JobOptions, base_seed: u64, shard: Option<Shard>) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut images_before = 0u64;
    for (job, j) in jobs.iter().enumerate() {
        let opts = j.options.or(defaults);
        let count = opts.batch_count.unwrap_or(1);
        let start = j.options.seed.unwrap_or(base_seed.wrapping_add(images_before));
        images_before += count as u64;
        if shard.is_some_and(|s| job % s.count != s.index) {
            continue;
        }
        for k in 0..count {
            let seed = start.wrapping_add(k as u64);
            let file = if count > 1 { format!("{job:05}-{seed}-{k}.png") } else { format!("{job:05}-{seed}.png") };
            out.push(Planned { job, line: j.line, k, seed, file, options: opts.clone() });
        }
    }
    out
}

impl Planned {
    /// The generation request, with the model's defaults for what the job
    /// and the command line leave out.
    pub fn request(&self, defaults: &Defaults) -> anyhow::Result<Request> {
        let o = &self.options;
        let (sampler, schedule) = resolve(o.sampler.as_deref(), o.schedule.as_deref(), defaults.sampling())?;
        let (text, size_conditioning) = o.text_and_size()?;
        Ok(Request {
            prompt: o.prompt.clone().unwrap_or_default(),
            negative_prompt: o.negative_prompt.clone().unwrap_or_default(),
            seed: self.seed,
            steps: o.steps.unwrap_or(defaults.steps),
            cfg_scale: o.cfg_scale.unwrap_or(defaults.cfg_scale),
            width: o.width.unwrap_or(defaults.size),
            height: o.height.unwrap_or(defaults.size),
            sampler,
            schedule,
            init: Init::Noise,
            size_conditioning,
            text,
        })
    }
}

/// One line of the manifest: a finished image and how it was made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestEntry {
    pub job: usize,
    pub line: usize,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub cfg_scale: f64,
    pub width: usize,
    pub height: usize,
    pub sampler: String,
    pub schedule: String,
    pub file: String,
    pub sha256: String,
    pub seconds: f64,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The manifest of an output folder: append-only JSON Lines, one line per
/// finished image, each flushed to disk after its PNG is in place.
pub struct Manifest {
    path: PathBuf,
    done: HashMap<String, String>,
}

impl Manifest {
    /// Opens (or, with `fresh`, empties) the manifest at `path`. Lines that
    /// do not parse (a line cut by a crash) are ignored.
    pub fn open(path: &Path, fresh: bool) -> anyhow::Result<Self> {
        let mut done = HashMap::new();
        if fresh {
            std::fs::write(path, b"").with_context(|| format!("{}: cannot write", path.display()))?;
        } else if path.exists() {
            let file = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
            for line in std::io::BufReader::new(file).lines() {
                let line = line.with_context(|| format!("{}: cannot read", path.display()))?;
                if let Ok(e) = serde_json::from_str::<ManifestEntry>(&line) {
                    done.insert(e.file, e.sha256);
                }
            }
        }
        Ok(Self { path: path.to_path_buf(), done })
    }

    /// Whether `file` in `dir` is finished: recorded, present, same hash.
    pub fn is_done(&self, dir: &Path, file: &str) -> bool {
        self.done.get(file).is_some_and(|hash| std::fs::read(dir.join(file)).is_ok_and(|b| sha256_hex(&b) == *hash))
    }

    /// Appends one entry and syncs it to disk.
    pub fn append(&mut self, entry: &ManifestEntry) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)
            .with_context(|| format!("{}: cannot open", self.path.display()))?;
        // A crash can leave a cut line: start ours on a line of its own.
        let len = f.metadata()?.len();
        let mut text = String::new();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8];
            f.seek(SeekFrom::Start(len - 1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                text.push('\n');
            }
        }
        text.push_str(&serde_json::to_string(entry)?);
        text.push('\n');
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_data())
            .with_context(|| format!("{}: write failed", self.path.display()))?;
        self.done.insert(entry.file.clone(), entry.sha256.clone());
        Ok(())
    }
}

/// What a batch run reports.
#[derive(Debug)]
pub enum BatchEvent<'a> {
    /// Images `files` start generating together; `done` of `total` are finished.
    Started {
        files: &'a [String],
        done: usize,
        total: usize,
    },
    Pipeline(crate::pipeline::Event),
    Finished {
        file: &'a str,
        seconds: f64,
    },
    Failed {
        file: &'a str,
        error: String,
    },
}

/// Counts for the final summary.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub done: usize,
    pub skipped: usize,
    pub failed: usize,
    pub interrupted: bool,
}

/// What a run needs besides the plan.
pub struct RunOptions<'a> {
    pub out_dir: &'a Path,
    pub batch_size: usize,
    pub model_hash: &'a str,
    /// Set (e.g. by Ctrl-C) to stop after the images in progress.
    pub stop: &'a std::sync::atomic::AtomicBool,
}

/// Generates every planned image not yet in the manifest, `batch_size` at a
/// time when consecutive images share size, steps, sampler and guidance.
/// Each PNG is written atomically and then recorded in the manifest.
pub fn run(
    model: &crate::loading::Model,
    device: &candle_core::Device,
    planned: &[Planned],
    manifest: &mut Manifest,
    opts: &RunOptions,
    events: &mut dyn FnMut(BatchEvent),
) -> anyhow::Result<Summary> {
    use std::sync::atomic::Ordering;
    let mut summary = Summary::default();
    let mut todo = Vec::new();
    for p in planned {
        // Only this run writes these names (shards have their own jobs).
        let path = opts.out_dir.join(&p.file);
        crate::image_io::remove_stale_temp_files(&path)
            .with_context(|| format!("{}: cannot clean up temporary files", opts.out_dir.display()))?;
        if manifest.is_done(opts.out_dir, &p.file) {
            summary.skipped += 1;
        } else {
            todo.push((p, p.request(&model.defaults())?));
        }
    }
    let total = planned.len();
    let mut i = 0;
    while i < todo.len() {
        if opts.stop.load(Ordering::SeqCst) {
            summary.interrupted = true;
            break;
        }
        let key = todo[i].1.batch_key();
        let n = todo[i..].iter().take(opts.batch_size.max(1)).take_while(|(_, r)| r.batch_key() == key).count();
        let group = &todo[i..i + n];
        i += n;
        let files: Vec<String> = group.iter().map(|(p, _)| p.file.clone()).collect();
        events(BatchEvent::Started { files: &files, done: summary.done + summary.skipped, total });
        let started = std::time::Instant::now();
        let requests: Vec<Request> = group.iter().map(|(_, r)| r.clone()).collect();
        let images = match model.generate_batch(&requests, device, &mut |e| events(BatchEvent::Pipeline(e))) {
            Ok(images) => images,
            Err(e) => {
                for f in &files {
                    events(BatchEvent::Failed { file: f, error: format!("{e:#}") });
                }
                summary.failed += n;
                continue;
            }
        };
        let seconds = started.elapsed().as_secs_f64() / n as f64;
        for ((p, r), image) in group.iter().zip(images) {
            let path = opts.out_dir.join(&p.file);
            let params = crate::infotext::Parameters {
                request: r,
                model_name: &model.name,
                model_hash: opts.model_hash,
                family: model.family.name(),
                applied: &model.applied,
            };
            crate::image_io::write_png(&path, &image, &params.infotext())?;
            let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read back", path.display()))?;
            manifest.append(&ManifestEntry {
                job: p.job,
                line: p.line,
                prompt: r.prompt.clone(),
                negative_prompt: r.negative_prompt.clone(),
                seed: r.seed,
                steps: r.steps,
                cfg_scale: r.cfg_scale,
                width: r.width,
                height: r.height,
                sampler: r.sampler.name().to_string(),
                schedule: r.schedule.name().to_string(),
                file: p.file.clone(),
                sha256: sha256_hex(&bytes),
                seconds,
            })?;
            summary.done += 1;
            events(BatchEvent::Finished { file: &p.file, seconds });
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_follow_posix_quoting() {
        let w = shell_words(r#"--prompt "a \"red\" fox" --negative-prompt 'it''s' a\ b"#).unwrap();
        assert_eq!(w, vec!["--prompt", "a \"red\" fox", "--negative-prompt", "its", "a b"]);
        assert!(shell_words("--prompt \"open").is_err());
        assert!(shell_words("--prompt 'open").is_err());
    }

    #[test]
    fn plain_files_have_comments_options_and_prompts() {
        let text = "# comment\n\na red fox\n--prompt \"a cat\" --seed 5 --batch-count 2\n--prompt=dog --steps=3\n";
        let jobs = parse_jobs(text, "f.txt", false, &JobOptions::default()).unwrap();
        assert_eq!(jobs.iter().map(|j| j.line).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(jobs[0].options.prompt.as_deref(), Some("a red fox"));
        assert_eq!(jobs[1].options.seed, Some(5));
        assert_eq!(jobs[2].options.steps, Some(3));
    }

    #[test]
    fn errors_name_the_line() {
        let defaults = JobOptions::default();
        for (text, want) in [
            ("fox\n--prompt x --bogus 1\n", "f:2: unknown option --bogus"),
            ("fox\n\n--prompt x --width 65\n", "f:3: --width must be a positive multiple of 8"),
            ("--prompt 'x\n", "f:1: unterminated single quote"),
            ("--prompt x --steps many\n", "f:1: --steps: \"many\" is not a valid number"),
            ("--seed 3\n", "f:1: no prompt"),
        ] {
            let err = format!("{:#}", parse_jobs(text, "f", false, &defaults).unwrap_err());
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
        let err =
            format!("{:#}", parse_jobs("{\"prompt\": \"a\"}\n{\"steps\": true}\n", "j", true, &defaults).unwrap_err());
        assert!(err.starts_with("j:2:"), "{err}");
    }

    #[test]
    fn jsonl_accepts_snake_and_kebab_case() {
        let text = "{\"prompt\": \"a\", \"cfg_scale\": 6, \"negative-prompt\": \"b\"}\n";
        let jobs = parse_jobs(text, "j", true, &JobOptions::default()).unwrap();
        assert_eq!(jobs[0].options.cfg_scale, Some(6.0));
        assert_eq!(jobs[0].options.negative_prompt.as_deref(), Some("b"));
    }

    #[test]
    fn seeds_follow_image_counts_and_shards_partition_jobs() {
        let text = "a\n--prompt b --batch-count 3\n--prompt c --seed 100 --batch-count 2\nd\n";
        let jobs = parse_jobs(text, "f", false, &JobOptions::default()).unwrap();
        let all = plan(&jobs, &JobOptions::default(), 10, None);
        let seeds: Vec<u64> = all.iter().map(|p| p.seed).collect();
        assert_eq!(seeds, vec![10, 11, 12, 13, 100, 101, 16]);
        assert_eq!(all[1].file, "00001-11-0.png");
        assert_eq!(all[6].file, "00003-16.png");
        let s0 = plan(&jobs, &JobOptions::default(), 10, Some(Shard { index: 0, count: 2 }));
        let s1 = plan(&jobs, &JobOptions::default(), 10, Some(Shard { index: 1, count: 2 }));
        let mut union: Vec<_> = s0.iter().chain(&s1).map(|p| p.file.clone()).collect();
        union.sort();
        let mut every: Vec<_> = all.iter().map(|p| p.file.clone()).collect();
        every.sort();
        assert_eq!(union, every);
        assert!(s0.iter().all(|p| p.job % 2 == 0) && s1.iter().all(|p| p.job % 2 == 1));
        assert!(Shard::parse("2/2").is_err() && Shard::parse("x").is_err());
    }

    #[test]
    fn manifest_survives_a_cut_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.jsonl");
        std::fs::write(dir.path().join("a.png"), b"png").unwrap();
        let entry = ManifestEntry {
            job: 0,
            line: 1,
            prompt: "p".into(),
            negative_prompt: String::new(),
            seed: 1,
            steps: 1,
            cfg_scale: 7.5,
            width: 8,
            height: 8,
            sampler: "euler".into(),
            schedule: "normal".into(),
            file: "a.png".into(),
            sha256: sha256_hex(b"png"),
            seconds: 0.1,
        };
        std::fs::write(&path, b"{\"job\": 0, \"li").unwrap();
        let mut m = Manifest::open(&path, false).unwrap();
        assert!(!m.is_done(dir.path(), "a.png"));
        m.append(&entry).unwrap();
        let m = Manifest::open(&path, false).unwrap();
        assert!(m.is_done(dir.path(), "a.png"));
        std::fs::write(dir.path().join("a.png"), b"changed").unwrap();
        assert!(!m.is_done(dir.path(), "a.png"), "a changed file is not done");
    }
}
