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

use crate::failure::{Failure, Tag};
use crate::loading::lora::LoraArg;
use crate::loading::Defaults;
use crate::request::{Control, Init, Request};
use crate::session::{prompt_loras, Job, RunEvent, RunOptions, Session, Summary};
use crate::settings::Settings;

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

/// `--key value` / `--key=value` words into settings.
fn settings_from_words(words: &[String]) -> anyhow::Result<Settings> {
    let mut opts = Settings::default();
    let mut i = 0;
    while i < words.len() {
        let Some(flag) = words[i].strip_prefix("--") else {
            bail!("expected an option, found {:?}", words[i]);
        };
        let (key, value) = match flag.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            // A switch, as on the command line.
            None if flag == "control-guess-mode" => (flag.to_string(), "true".to_string()),
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
    pub settings: Settings,
    /// Its ControlNets with their control images, read.
    pub controls: Vec<Control>,
}

/// Parses and checks a whole job file. `source` names it in errors;
/// `jsonl` selects JSON Lines. Every error names the line.
pub fn parse_jobs(text: &str, source: &str, jsonl: bool, defaults: &Settings) -> anyhow::Result<Vec<JobLine>> {
    let mut jobs = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || (!jsonl && trimmed.starts_with('#')) {
            continue;
        }
        let at = || format!("{source}:{line}");
        let settings = if jsonl {
            let object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(trimmed).with_context(|| format!("{}: not a JSON object", at()))?;
            let mut opts = Settings::default();
            for (k, v) in &object {
                let value = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    // Several ControlNets: a list of `PATH:IMAGE…` strings.
                    serde_json::Value::Array(items) if k.replace('_', "-") == "control" => {
                        for item in items {
                            let text = item.as_str().with_context(|| format!("{}: {k}: expected strings", at()))?;
                            opts.set(k, text).with_context(at)?;
                        }
                        continue;
                    }
                    other => bail!("{}: {k}: expected a string, number or boolean, got {other}", at()),
                };
                opts.set(k, &value).with_context(at)?;
            }
            opts
        } else if trimmed.starts_with("--") {
            settings_from_words(&shell_words(trimmed).with_context(at)?).with_context(at)?
        } else {
            Settings { prompt: Some(trimmed.to_string()), ..Default::default() }
        };
        let all = settings.over(defaults);
        all.validate(&Init::Noise).with_context(at)?;
        let controls = crate::session::read_controls(&all).with_context(at)?;
        jobs.push(JobLine { line, settings, controls });
    }
    Ok(jobs)
}

/// Reads a job file (`-` = standard input); `.jsonl` files, and standard
/// input whose first job line starts with `{`, are JSON Lines.
pub fn read_jobs(path: &Path, defaults: &Settings) -> anyhow::Result<Vec<JobLine>> {
    read_jobs_untagged(path, defaults).tag(Failure::Input)
}

fn read_jobs_untagged(path: &Path, defaults: &Settings) -> anyhow::Result<Vec<JobLine>> {
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

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let parsed = s.split_once('/').and_then(|(k, n)| Some((k.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if count > 0 && index < count => Ok(Self { index, count }),
            _ => bail!("--shard {s:?}: expected K/N with 0 ≤ K < N (e.g. 0/4)"),
        }
    }
}

impl Shard {
    fn manifest_name(&self) -> String {
        format!("manifest-{}-of-{}.jsonl", self.index, self.count)
    }
}

/// Creates `out_dir` if needed and opens the manifest of `shard` in it
/// (emptied when `fresh`).
pub fn open_out_dir(out_dir: &Path, shard: Option<Shard>, fresh: bool) -> anyhow::Result<Manifest> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create", out_dir.display()))
        .tag(Failure::Output)?;
    let name = shard.map_or_else(|| "manifest.jsonl".to_string(), |s| s.manifest_name());
    Manifest::open(&out_dir.join(name), fresh).tag(Failure::Output)
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
    pub settings: Settings,
    pub controls: Vec<Control>,
}

/// Every image of the file, in order. A job without a seed starts at
/// `base_seed` + the number of images of all earlier jobs; its k-th image
/// uses start + k. Only jobs of `shard` are returned, but seeds and names
/// are those of the whole file.
pub fn plan(jobs: &[JobLine], defaults: &Settings, base_seed: u64, shard: Option<Shard>) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut images_before = 0u64;
    for (job, j) in jobs.iter().enumerate() {
        let opts = j.settings.over(defaults);
        let count = opts.batch_count.unwrap_or(1);
        let start = j.settings.seed.unwrap_or(base_seed.wrapping_add(images_before));
        images_before += count as u64;
        if shard.is_some_and(|s| job % s.count != s.index) {
            continue;
        }
        for k in 0..count {
            let seed = start.wrapping_add(k as u64);
            let file = if count > 1 { format!("{job:05}-{seed}-{k}.png") } else { format!("{job:05}-{seed}.png") };
            out.push(Planned {
                job,
                line: j.line,
                k,
                seed,
                file,
                settings: opts.clone(),
                controls: j.controls.clone(),
            });
        }
    }
    out
}

impl Planned {
    /// The generation request, with the model's defaults for what the job
    /// and the command line leave out.
    pub fn request(&self, defaults: &Defaults) -> anyhow::Result<Request> {
        let mut request = Settings { seed: Some(self.seed), ..self.settings.clone() }.resolve(defaults, Init::Noise)?;
        request.controls = self.controls.clone();
        Ok(request)
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

impl ManifestEntry {
    /// The entry of `file`, a `width × height` PNG (`png` its bytes) made
    /// for `r` in `seconds`, from `job` (at `line` of its file).
    pub fn new(
        (job, line): (usize, usize),
        r: &Request,
        file: String,
        (width, height): (usize, usize),
        png: &[u8],
        seconds: f64,
    ) -> Self {
        Self {
            job,
            line,
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            seed: r.seed,
            steps: r.steps,
            cfg_scale: r.cfg_scale,
            width,
            height,
            sampler: r.sampler.name().to_string(),
            schedule: r.schedule.name().to_string(),
            file,
            sha256: crate::loading::hashing::sha256_hex(png),
            seconds,
        }
    }
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
        self.done.get(file).is_some_and(|hash| {
            std::fs::read(dir.join(file)).is_ok_and(|b| crate::loading::hashing::sha256_hex(&b) == *hash)
        })
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

/// The LoRAs of the jobs' `<lora:…>` tags (and warnings for other network
/// tags): the model loads once, so every job must ask for the same ones.
pub fn common_loras(file: &Path, planned: &[Planned]) -> anyhow::Result<(Vec<LoraArg>, Vec<String>)> {
    common_loras_untagged(file, planned).tag(Failure::Input)
}

fn common_loras_untagged(file: &Path, planned: &[Planned]) -> anyhow::Result<(Vec<LoraArg>, Vec<String>)> {
    let mut common: Option<(Vec<LoraArg>, Vec<String>)> = None;
    for p in planned {
        let s = &p.settings;
        let this = prompt_loras(s.prompt.as_deref().unwrap_or_default(), s.prompt_syntax.unwrap_or_default())?;
        match &common {
            Some((loras, _)) if *loras != this.0 => bail!(
                "{}: jobs use different <lora:…> tags; sdgen loads one set per batch: split the file by LoRA",
                file.display()
            ),
            Some(_) => {}
            None => common = Some(this),
        }
    }
    Ok(common.unwrap_or_default())
}

/// Generates every planned image not yet in the manifest into `out_dir`
/// (see [`Session::run`]), recording each in the manifest once its PNG is
/// in place; `events` sees the run's progress.
pub fn run(
    session: &Session,
    planned: &[Planned],
    manifest: &mut Manifest,
    out_dir: &Path,
    opts: &RunOptions,
    events: &mut dyn FnMut(&RunEvent),
) -> anyhow::Result<Summary> {
    let mut skipped = 0;
    let (mut todo, mut jobs) = (Vec::new(), Vec::new());
    let defaults = session.model.defaults();
    for p in planned {
        let path = out_dir.join(&p.file);
        // Only this run writes these names (shards have their own jobs).
        crate::image_io::remove_stale_temp_files(&path)
            .with_context(|| format!("{}: cannot clean up temporary files", out_dir.display()))?;
        if manifest.is_done(out_dir, &p.file) {
            skipped += 1;
        } else {
            todo.push(p);
            jobs.push(Job { request: p.request(&defaults)?, path });
        }
    }
    let mut summary = session.run(&jobs, opts, &mut |e| {
        if let RunEvent::Written { job, seconds } = &e {
            let i = jobs.iter().position(|j| std::ptr::eq(j, *job)).expect("one of this run's jobs");
            let (p, r) = (todo[i], &job.request);
            let bytes =
                std::fs::read(&job.path).with_context(|| format!("{}: cannot read back", job.path.display()))?;
            let size = (r.width, r.height);
            manifest.append(&ManifestEntry::new((p.job, p.line), r, p.file.clone(), size, &bytes, *seconds))?;
        }
        events(&e);
        Ok(())
    })?;
    summary.skipped = skipped;
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
        let jobs = parse_jobs(text, "f.txt", false, &Settings::default()).unwrap();
        assert_eq!(jobs.iter().map(|j| j.line).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(jobs[0].settings.prompt.as_deref(), Some("a red fox"));
        assert_eq!(jobs[1].settings.seed, Some(5));
        assert_eq!(jobs[2].settings.steps, Some(3));
    }

    #[test]
    fn errors_name_the_line() {
        let defaults = Settings::default();
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
        let jobs = parse_jobs(text, "j", true, &Settings::default()).unwrap();
        assert_eq!(jobs[0].settings.cfg_scale, Some(6.0));
        assert_eq!(jobs[0].settings.negative_prompt.as_deref(), Some("b"));
    }

    #[test]
    fn seeds_follow_image_counts_and_shards_partition_jobs() {
        let text = "a\n--prompt b --batch-count 3\n--prompt c --seed 100 --batch-count 2\nd\n";
        let jobs = parse_jobs(text, "f", false, &Settings::default()).unwrap();
        let all = plan(&jobs, &Settings::default(), 10, None);
        let seeds: Vec<u64> = all.iter().map(|p| p.seed).collect();
        assert_eq!(seeds, vec![10, 11, 12, 13, 100, 101, 16]);
        assert_eq!(all[1].file, "00001-11-0.png");
        assert_eq!(all[6].file, "00003-16.png");
        let s0 = plan(&jobs, &Settings::default(), 10, Some(Shard { index: 0, count: 2 }));
        let s1 = plan(&jobs, &Settings::default(), 10, Some(Shard { index: 1, count: 2 }));
        let mut union: Vec<_> = s0.iter().chain(&s1).map(|p| p.file.clone()).collect();
        union.sort();
        let mut every: Vec<_> = all.iter().map(|p| p.file.clone()).collect();
        every.sort();
        assert_eq!(union, every);
        assert!(s0.iter().all(|p| p.job % 2 == 0) && s1.iter().all(|p| p.job % 2 == 1));
        assert!("2/2".parse::<Shard>().is_err() && "x".parse::<Shard>().is_err());
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
            sha256: crate::loading::hashing::sha256_hex(b"png"),
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
