//! A1111's prompt syntax: parsing, chunking and weighted conditioning,
//! against expectations written down from A1111's own algorithm
//! (tests/reference/make_prompts.py), and the `tokenize` command.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use sdgen::loading::Model;
use sdgen::prompt::{chunk, parse_attention, Syntax};
use sdgen::request::{Init, Request, TextOptions};
use sdgen::tokenizer::ClipTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct ChunkCases {
    cases: Vec<ChunkCase>,
}

#[derive(Deserialize)]
struct ChunkCase {
    name: String,
    prompt: String,
    parsed: Vec<(String, f64)>,
    token_count: usize,
    chunks: Vec<Ids>,
}

#[derive(Deserialize)]
struct Ids {
    ids: Vec<u32>,
    weights: Vec<f64>,
}

fn chunk_cases() -> Vec<ChunkCase> {
    let text = std::fs::read_to_string(fixture("reference/prompts/chunks.json")).unwrap();
    serde_json::from_str::<ChunkCases>(&text).unwrap().cases
}

#[test]
fn parsing_and_chunking_equal_a1111() {
    // CLIP's full vocabulary (chunks.json is written with it, so every word is one token).
    let tokenizer = ClipTokenizer::embedded().unwrap();
    let cases = chunk_cases();
    assert!(cases.len() >= 20);
    for case in cases {
        let (parsed, _) = parse_attention(&case.prompt);
        assert_eq!(parsed.len(), case.parsed.len(), "{}: {parsed:?} vs {:?}", case.name, case.parsed);
        for ((text, w), (t, e)) in parsed.iter().zip(&case.parsed) {
            assert_eq!(text, t, "{}", case.name);
            assert!((w - e).abs() <= 1e-12 * e.abs(), "{}: weight {w} vs {e}", case.name);
        }
        let ours = chunk(&tokenizer, &case.prompt, Syntax::A1111);
        assert_eq!(ours.token_count, case.token_count, "{}: token count", case.name);
        assert_eq!(ours.chunks.len(), case.chunks.len(), "{}: chunks", case.name);
        for (a, b) in ours.chunks.iter().zip(&case.chunks) {
            assert_eq!(a.ids, b.ids, "{}: ids", case.name);
            let expected: Vec<f32> = b.weights.iter().map(|&w| w as f32).collect();
            assert_eq!(a.weights, expected, "{}: weights", case.name);
        }
    }
}

fn request(prompt: &str, negative: &str, clip_skip: usize) -> Request {
    Request {
        prompt: prompt.into(),
        negative_prompt: negative.into(),
        seed: 0,
        steps: 1,
        cfg_scale: 7.5,
        width: 64,
        height: 64,
        sampler: sdgen::sampling::samplers::Sampler::Euler,
        schedule: sdgen::sampling::schedule::ScheduleKind::Normal,
        init: Init::Noise,
        size_conditioning: Default::default(),
        text: TextOptions { syntax: Syntax::A1111, clip_skip },
        controls: Vec::new(),
        control_options: Default::default(),
        hires: None,
    }
}

#[derive(Deserialize)]
struct Conditioning {
    sd1: Section,
    sdxl: Section,
}

#[derive(Deserialize)]
struct Section {
    cases: Vec<CondCase>,
}

#[derive(Deserialize)]
struct CondCase {
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
    tensors: Vec<String>,
}

/// Weighted, nested, two-chunk, BREAK and padded-negative conditioning of
/// the tiny SD 1.x model, clip skip 2, and SDXL's per-encoder emphasis with
/// the first chunk's pooled output.
#[test]
fn weighted_conditioning_equals_a1111() {
    let r =
        candle_core::safetensors::load(fixture("reference/prompts/conditioning.safetensors"), &Device::Cpu).unwrap();
    let text = std::fs::read_to_string(fixture("reference/prompts/conditioning.json")).unwrap();
    let cases: Conditioning = serde_json::from_str(&text).unwrap();
    let check = |what: &str, ours: &Tensor, key: &str| {
        let err = relative_error(ours, &r[key]);
        eprintln!("{what}: relative error {err:e}");
        assert!(err < TOLERANCE, "{what}: relative error {err}");
    };
    let sd1 = Model::load(&fixture("tiny-sd1"), &Device::Cpu, DType::F32).unwrap();
    for case in &cases.sd1.cases {
        let neg = case.negative_prompt.as_deref().unwrap_or("");
        let guided = case.negative_prompt.is_some();
        let (cond, uncond) =
            sd1.encode_prompts(&[request(&case.prompt, neg, 1)], guided, &Device::Cpu, &mut |_| {}).unwrap();
        check(&format!("{} cond", case.name), &cond.context, &format!("{}.cond", case.name));
        if let Some(u) = uncond {
            check(&format!("{} uncond", case.name), &u.context, &format!("{}.uncond", case.name));
        }
        let skipped = format!("{}.clip_skip2.cond", case.name);
        if case.tensors.contains(&skipped) {
            let (cond, _) =
                sd1.encode_prompts(&[request(&case.prompt, "", 2)], false, &Device::Cpu, &mut |_| {}).unwrap();
            check(&skipped, &cond.context, &skipped);
            assert!(relative_error(&cond.context, &r[&format!("{}.cond", case.name)]) > 1e-2);
        }
    }
    let xl = Model::load(&fixture("tiny-sdxl"), &Device::Cpu, DType::F32).unwrap();
    for case in &cases.sdxl.cases {
        let (cond, _) = xl.encode_prompts(&[request(&case.prompt, "", 1)], false, &Device::Cpu, &mut |_| {}).unwrap();
        check(&format!("sdxl {}", case.name), &cond.context, &format!("{}.sdxl.cond", case.name));
        check(
            &format!("sdxl {} pooled", case.name),
            cond.pooled.as_ref().unwrap(),
            &format!("{}.sdxl.pooled", case.name),
        );
    }
}

/// `--clip-skip` beyond the text encoder's depth is a clear error.
#[test]
fn clip_skip_beyond_the_encoder_is_refused() {
    let sd1 = Model::load(&fixture("tiny-sd1"), &Device::Cpu, DType::F32).unwrap();
    let err = sd1.encode_prompts(&[request("a cat", "", 4)], false, &Device::Cpu, &mut |_| {}).err().unwrap();
    assert!(err.to_string().contains("--clip-skip 4"), "{err}");
}

#[test]
fn tokenize_prints_chunks_and_json() {
    let prompt = "a (red:1.5) fox BREAK in the snow";
    let o = sdgen(&["tokenize", "--prompt", prompt, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let chunks = v["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0]["ids"].as_array().unwrap().len(), 77);
    assert_eq!(chunks[0]["ids"][0], 49406);
    assert_eq!(chunks[0]["weights"][2], 1.5);
    assert_eq!(v["token_count"], 75 + 3);

    let o = sdgen(&["tokenize", "--prompt", prompt, "--prompt-syntax", "plain", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["chunks"].as_array().unwrap().len(), 1);

    // A model's own tokenizer: SD 2.x pads with `!` (0).
    let model = fixture("tiny-sd2.safetensors");
    let o = sdgen(&["tokenize", "--prompt", "a fox", "--model", model.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["chunks"][0]["ids"][76], 0);

    let o = sdgen(&["tokenize", "--prompt", "a (fox"]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("unbalanced"), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("fox</w>") && text.contains("token count: 3"), "{text}");
}

#[derive(Deserialize)]
struct ClipSkip {
    model: String,
    schedule: String,
    clip_skip: usize,
}

/// `--clip-skip N` equals diffusers' `clip_skip = N − 1` on SD 1.x and SDXL
/// (unguided on SD 1.x: diffusers skips layers for the prompt only, A1111
/// and sdgen for the negative prompt too), and changes the image.
#[test]
fn clip_skip_matches_diffusers() {
    let cases: Vec<CaseWith<ClipSkip>> = read_cases("reference/prompts/clip_skip.json");
    let dir = tempfile::tempdir().unwrap();
    let mut parity = Parity::default();
    for case in &cases {
        let out = dir.path().join(format!("{}.png", case.base.name));
        let mut before = case.size_args();
        before.extend([
            "--schedule".into(),
            case.extra.schedule.clone(),
            "--clip-skip".into(),
            case.extra.clip_skip.to_string(),
        ]);
        let ours = case.job(&fixture(&case.extra.model), &out).run(&before, &case.name);
        parity.check(&case.name, &ours, &read_rgb(&fixture(&format!("reference/prompts/{}", case.png))));
        if case.extra.clip_skip > 1 {
            let text = sdgen::image_io::read_parameters(&out).unwrap().unwrap();
            assert!(text.contains(&format!("Clip skip: {}", case.extra.clip_skip)), "{text}");
        }
    }
    parity.assert_within_tolerance();
    for model in ["tiny-sd1", "tiny-sdxl"] {
        let png = |skip: usize| {
            let c = cases.iter().find(|c| c.extra.model == model && c.extra.clip_skip == skip).unwrap();
            read_rgb(&fixture(&format!("reference/prompts/{}", c.png)))
        };
        let (max, mean) = level_diff(&png(1), &png(2));
        assert!(max > 10 * MAX_LEVELS && mean > MEAN_LEVELS, "{model}: clip skip 2 vs 1: max {max}, mean {mean}");
    }
}
