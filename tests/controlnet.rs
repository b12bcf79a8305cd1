//! ControlNet against diffusers' ControlNet pipelines on the tiny models
//! (tests/reference/make_controlnet.py), Canny against OpenCV, the legacy
//! hash, PNG parameters and replay, and bad ControlNet input.

mod common;

use std::path::Path;

use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Unit {
    net: String,
    image: String,
    weight: f64,
    start: f64,
    end: f64,
}

#[derive(Deserialize)]
struct Extra {
    model: String,
    mode: String,
    guess_mode: bool,
    preprocess: String,
    strength: Option<f64>,
    image: Option<String>,
    controls: Vec<Unit>,
}

type Case = CaseWith<Extra>;

#[derive(Deserialize)]
struct Canny {
    name: String,
    source: String,
    width: usize,
    height: usize,
    low: f64,
    high: f64,
    png: String,
}

#[derive(Deserialize)]
struct Suite {
    cases: Vec<Case>,
    legacy_hashes: std::collections::BTreeMap<String, String>,
    canny: Vec<Canny>,
}

fn suite() -> Suite {
    let text = std::fs::read_to_string(fixture("reference/controlnet/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn path_str(rel: &str) -> String {
    fixture(rel).to_str().unwrap().to_string()
}

/// `--control NET:IMAGE:WEIGHT:START:END` per unit, with `images` in place
/// of the case's control images when given.
fn control_args(case: &Case, nets: &[String], images: &[String]) -> Vec<String> {
    let mut a = Vec::new();
    for (i, u) in case.extra.controls.iter().enumerate() {
        let image = images.get(i).cloned().unwrap_or_else(|| path_str(&u.image));
        a.extend(["--control".into(), format!("{}:{image}:{}:{}:{}", nets[i], u.weight, u.start, u.end)]);
    }
    if case.extra.preprocess != "none" {
        a.extend(["--control-preprocess".into(), case.extra.preprocess.clone()]);
    }
    if case.extra.guess_mode {
        a.extend(["--control-guess-mode".into(), "true".into()]);
    }
    a
}

/// The subcommand and its options before the common ones.
fn before(case: &Case) -> Vec<String> {
    match case.extra.mode.as_str() {
        "img2img" => vec![
            "img2img".into(),
            "--init-image".into(),
            path_str(case.extra.image.as_deref().unwrap()),
            "--strength".into(),
            case.extra.strength.unwrap().to_string(),
        ],
        _ => case.size_args(),
    }
}

/// Runs `case` through the library into `out`, with other ControlNet
/// paths or control images when given.
fn run(case: &Case, out: &Path, nets: Option<&[String]>, images: &[String]) -> image::RgbImage {
    let default_nets: Vec<String> = case.extra.controls.iter().map(|u| path_str(&u.net)).collect();
    let mut args = before(case);
    args.extend(control_args(case, nets.unwrap_or(&default_nets), images));
    let model = fixture(&case.extra.model);
    case.job(&model, out).run(&args, &case.name)
}

#[test]
fn controlnets_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let mut parity = Parity::default();
    let suite = suite();
    for case in &suite.cases {
        let out = dir.path().join(format!("{}.png", case.name));
        let ours = run(case, &out, None, &[]);
        parity.check(&case.name, &ours, &read_rgb(&fixture(&format!("reference/controlnet/{}", case.png))));
        // The parameters record each unit as A1111's extension does.
        let text = sdgen::image_io::read_parameters(&out).unwrap().unwrap();
        for (i, u) in case.extra.controls.iter().enumerate() {
            let name = Path::new(&u.net).file_stem().unwrap().to_str().unwrap();
            let unit = format!(
                "ControlNet {i}: \"Module: {}, Model: {name} [e3b0c442], Weight: {:?}",
                case.extra.preprocess, u.weight
            );
            assert!(text.contains(&unit), "{}: {unit:?} not in {text}", case.name);
        }
    }
    parity.assert_within_tolerance();
}

/// Another control image moves the image far beyond the tolerance, so the
/// parity above is not met by ignoring it.
#[test]
fn the_control_image_matters() {
    let dir = tempfile::tempdir().unwrap();
    let suite = suite();
    let case = suite.cases.iter().find(|c| c.name == "one").unwrap();
    let out = dir.path().join("other.png");
    let ours = run(case, &out, None, &[path_str("images/control_lines.png")]);
    let (max, mean) = level_diff(&ours, &read_rgb(&fixture("reference/controlnet/one.png")));
    assert!(max > 3 * MAX_LEVELS && mean > 4.0 * MEAN_LEVELS, "another control image changed little: {max} {mean}");
}

/// The original format's names without `control_model.` (diffusers reads
/// both) give the very same image.
#[test]
fn unprefixed_single_files_load_alike() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("controlnet/control_tiny_sd1.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().map(|(n, v)| (n.strip_prefix("control_model.").unwrap().to_string(), v)).collect();
    let unprefixed = dir.path().join("control_unprefixed.safetensors");
    safetensors::serialize_to_file(tensors, None, &unprefixed).unwrap();
    let suite = suite();
    let case = suite.cases.iter().find(|c| c.name == "single_file").unwrap();
    let prefixed = run(case, &dir.path().join("a.png"), None, &[]);
    let other = run(case, &dir.path().join("b.png"), Some(&[unprefixed.to_str().unwrap().to_string()]), &[]);
    assert_eq!(prefixed, other);
}

#[test]
fn canny_equals_opencv() {
    for c in suite().canny {
        let source = sdgen::image_io::read_image(&fixture(&c.source)).unwrap();
        let preprocess = sdgen::preprocess::Preprocess::Canny { low: c.low, high: c.high };
        let ours = preprocess.control_image(&source, c.width, c.height);
        let theirs = read_rgb(&fixture(&format!("reference/controlnet/{}", c.png)));
        let differing = ours.rgb.chunks(3).zip(theirs.as_raw().chunks(3)).filter(|(a, b)| a != b).count();
        let edges = theirs.as_raw().chunks(3).filter(|p| p[0] > 0).count();
        eprintln!("{:<22} {edges:>5} edge pixels, {differing} differ", c.name);
        assert_eq!((ours.width, ours.height), (c.width, c.height));
        assert_eq!(differing, 0, "{}: pixels differ from cv2.Canny", c.name);
    }
}

#[test]
fn legacy_hashes_are_a1111s() {
    for (rel, want) in suite().legacy_hashes {
        let path = fixture(&rel);
        let file = if path.is_dir() { path.join("diffusion_pytorch_model.safetensors") } else { path };
        assert_eq!(sdgen::loading::hashing::legacy_hash(&file).unwrap(), want, "{rel}");
    }
}

/// Replay needs the control image again; given it, the image comes back.
#[test]
fn replay_asks_for_the_control_image() {
    let dir = tempfile::tempdir().unwrap();
    let (out, again) = (dir.path().join("cn.png"), dir.path().join("again.png"));
    let (model, net, edges) =
        (path_str("tiny-sd1"), path_str("controlnet/tiny-cn-sd1"), path_str("images/control_edges.png"));
    let control = format!("{net}:{edges}:0.8:0.1:0.9");
    let common = ["--model", &model, "--steps", "3", "-W", "64", "-H", "64", "--quiet"];
    let o = sdgen(
        &[&["-p", "a fox", "--seed", "5", "--control", &control, "--out", out.to_str().unwrap()][..], &common].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = sdgen(&[&["replay", out.to_str().unwrap(), "--out", again.to_str().unwrap()][..], &common].concat());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("ControlNet 0 (tiny-cn-sd1): the control image is missing"), "{err}");
    assert!(!again.exists());
    // Weight and range come from the PNG; the command line names the net and its image.
    let o = sdgen(
        &[
            &[
                "replay",
                out.to_str().unwrap(),
                "--out",
                again.to_str().unwrap(),
                "--control",
                &format!("{net}:{edges}"),
            ][..],
            &common,
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_rgb(&out), read_rgb(&again));
}

#[test]
fn bad_controlnet_input_fails_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let not_image = dir.path().join("edges.png");
    std::fs::write(&not_image, b"not a png").unwrap();
    let (model, net, edges) =
        (path_str("tiny-sd1"), path_str("controlnet/tiny-cn-sd1"), path_str("images/control_edges.png"));
    let xl_net = path_str("controlnet/tiny-cn-sdxl");
    let cases: Vec<(String, i32, Vec<&str>)> = vec![
        ("no-colon".into(), 2, vec!["expected PATH:IMAGE[:WEIGHT[:START:END]]"]),
        (format!("{net}:{edges}:1:0.2"), 2, vec!["expected PATH:IMAGE"]),
        (format!("{net}:{edges}:heavy"), 2, vec!["WEIGHT \"heavy\" is not a number"]),
        (format!("{net}:{edges}:1:0.6:0.4"), 2, vec!["0 ≤ START < END ≤ 1"]),
        (format!("{net}:{}", not_image.display()), 3, vec!["edges.png"]),
        (format!("{net}:/no/such/image.png"), 3, vec!["image.png"]),
        (format!("{xl_net}:{edges}"), 4, vec!["tiny-cn-sdxl", "does not fit the model", "size conditioning"]),
        (format!("{}:{edges}", dir.path().join("missing-net").display()), 4, vec!["missing-net", "no such file"]),
        (format!("{}:{edges}", path_str("tiny-sd1.safetensors")), 4, vec!["not a ControlNet"]),
    ];
    for (control, code, words) in cases {
        let args = ["--model", &model, "-p", "a fox", "--steps", "1", "-W", "64", "-H", "64", "--quiet"];
        let o = sdgen(&[&args[..], &["--control", &control, "--out", out.to_str().unwrap()]].concat());
        let err = stderr(&o);
        eprintln!("{control}: {}", err.trim_end());
        assert_eq!(o.status.code(), Some(code), "{control}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{control}: one line: {err}");
        for w in words {
            assert!(err.contains(w), "{control}: expected {w:?} in {err}");
        }
        assert!(!out.exists(), "{control}: no output");
    }
    let o =
        sdgen(&["--model", &model, "-p", "x", "--control", &format!("{net}:{edges}"), "--control-preprocess", "sobel"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not a control preprocessor"), "{}", stderr(&o));
}

/// Job lines take `--control` (and the switch) like the command line.
#[test]
fn batch_lines_take_controlnets() {
    let dir = tempfile::tempdir().unwrap();
    let (net, edges) = (path_str("controlnet/tiny-cn-sd1"), path_str("images/control_edges.png"));
    let file = dir.path().join("jobs.txt");
    let line = format!(
        "--prompt 'a red fox in the snow' --seed 42 --steps 6 --cfg-scale 5 --sampler euler --control {net}:{edges}:1:0:1\n\
         --prompt 'a red fox in the snow' --seed 42 --steps 6 --cfg-scale 5 --sampler euler --control {net}:{edges} --control-guess-mode\n"
    );
    std::fs::write(&file, line).unwrap();
    let out = dir.path().join("out");
    let model = path_str("tiny-sd1");
    let o = sdgen(&[
        "batch",
        file.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--model",
        &model,
        "-W",
        "64",
        "-H",
        "64",
        "--prompt-syntax",
        "plain",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut parity = Parity::default();
    for (file, reference) in [("00000-42.png", "one.png"), ("00001-42.png", "guess.png")] {
        let ours = read_rgb(&out.join(file));
        parity.check(file, &ours, &read_rgb(&fixture(&format!("reference/controlnet/{reference}"))));
    }
    parity.assert_within_tolerance();
}

/// Inpainting with a ControlNet repaints the masked area under its
/// guidance and keeps every other pixel.
#[test]
fn inpainting_takes_controlnets() {
    let dir = tempfile::tempdir().unwrap();
    let (with, without) = (dir.path().join("with.png"), dir.path().join("without.png"));
    let (net, edges) = (path_str("controlnet/tiny-cn-sd1"), path_str("images/control_edges.png"));
    let (model, image, mask) = (path_str("tiny-sd1"), path_str("images/init.png"), path_str("images/mask_rect.png"));
    let control = format!("{net}:{edges}");
    let args = ["inpaint", "--image", &image, "--mask", &mask, "--model", &model, "-p", "an apple", "--steps", "4"];
    for (out, extra) in [(&with, vec!["--control", control.as_str()]), (&without, vec![])] {
        let o = sdgen(&[&args[..], &extra, &["--seed", "3", "--quiet", "--out", out.to_str().unwrap()]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (a, b, input) = (read_rgb(&with), read_rgb(&without), read_rgb(Path::new(&image)));
    let mask = read_rgb(Path::new(&mask));
    let (mut changed, mut kept) = (0, true);
    for ((pa, pb), (pi, pm)) in a.pixels().zip(b.pixels()).zip(input.pixels().zip(mask.pixels())) {
        if pm[0] >= 128 {
            changed += usize::from(pa != pb);
        } else {
            kept &= pa == pi;
        }
    }
    assert!(kept, "pixels outside the mask changed");
    assert!(changed > 100, "the ControlNet changed only {changed} masked pixels");
}
