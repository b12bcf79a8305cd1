//! ESRGAN-family upscalers against spandrel on the tiny random models of
//! tests/reference/make_upscalers.py: detection, outputs, tiling, A1111's
//! scale loop and resamplers, `sdgen upscale`.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use common::{fixture, level_diff, read_rgb, Parity, MAX_LEVELS, MEAN_LEVELS};
use sdgen::image_io::{read_image, Image};
use sdgen::upscale::{run_tiled, upscale, Upscaling};

#[derive(serde::Deserialize)]
struct Cases {
    cases: BTreeMap<String, Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    arch: String,
    scale: usize,
    blocks: usize,
    png: String,
}

fn cases() -> BTreeMap<String, Case> {
    let text = std::fs::read_to_string(fixture("upscalers/cases.json")).unwrap();
    serde_json::from_str::<Cases>(&text).unwrap().cases
}

fn rgb(image: &Image) -> image::RgbImage {
    image::RgbImage::from_raw(image.width as u32, image.height as u32, image.rgb.clone()).unwrap()
}

fn load(name: &str) -> sdgen::loading::upscaler::LoadedUpscaler {
    sdgen::loading::upscaler::load(&fixture(&format!("upscalers/{name}")), &Device::Cpu).unwrap()
}

#[test]
fn upscalers_match_spandrel() {
    let input = read_image(&fixture("upscalers/input.png")).unwrap();
    let mut parity = Parity::default();
    for (name, case) in cases() {
        let up = load(&name);
        let config = up.model.config();
        assert_eq!(
            (config.architecture(), config.scale(), config.blocks()),
            (case.arch.as_str(), case.scale, case.blocks),
            "{name}: detected"
        );
        let how = Upscaling::Model { model: &up.model, name: &up.name, device: &Device::Cpu };
        let ours = upscale(&input, &how, None, 512).unwrap();
        parity.check(&name, &rgb(&ours), &read_rgb(&fixture(&format!("upscalers/{}", case.png))));
    }
    parity.assert_within_tolerance();
}

/// Tiles of 16 pixels with 8 of context (less than the tiny RRDBNets'
/// receptive field) on a 64×64 image equal the whole image within the
/// tolerance; without the context the tile seams show.
#[test]
fn tiles_with_context_equal_the_whole_image() {
    let input = read_image(&fixture("images/init.png")).unwrap();
    for name in ["rrdb_x4_old.safetensors", "realesrgan_x2plus.pth", "compact_x4.safetensors"] {
        let up = load(name);
        let whole = run_tiled(&up.model, &input, 4096, Some(0), &Device::Cpu).unwrap();
        let tiled = run_tiled(&up.model, &input, 16, Some(8), &Device::Cpu).unwrap();
        let (max, mean) = level_diff(&rgb(&whole), &rgb(&tiled));
        eprintln!("{name}: tiled (16 + 8) vs whole: max {max}, mean {mean:.4}");
        assert!(max <= MAX_LEVELS && mean <= MEAN_LEVELS, "{name}: max {max}, mean {mean}");
        let seams = run_tiled(&up.model, &input, 16, Some(0), &Device::Cpu).unwrap();
        let (max, _) = level_diff(&rgb(&whole), &rgb(&seams));
        assert!(max > MAX_LEVELS, "{name}: tiles without context should show seams (max {max})");
    }
}

/// A1111's resamplers at 2.5×: to int(side·2.5), then Lanczos to the side·2.5
/// rounded down to a multiple of 8 (Pillow's own output, bit for bit).
#[test]
fn resamplers_scale_as_a1111() {
    let input = read_image(&fixture("upscalers/input.png")).unwrap();
    for (how, png) in [(Upscaling::Lanczos, "a1111_lanczos_2.5.png"), (Upscaling::Nearest, "a1111_nearest_2.5.png")] {
        let ours = upscale(&input, &how, Some(2.5), 512).unwrap();
        assert_eq!(rgb(&ours).as_raw(), read_rgb(&fixture(&format!("upscalers/{png}"))).as_raw(), "{png}");
    }
    assert!(upscale(&input, &Upscaling::Lanczos, None, 512).is_err(), "a resampler needs a scale");
}

fn sdgen(args: &[&str]) -> std::process::Output {
    common::sdgen(&[&["upscale"], args, &["--device", "cpu"]].concat())
}

/// `sdgen upscale` by name from `<models>/upscale_models`: a 2× model asked
/// for 3× runs twice and is resized down to the A1111 target; the PNG keeps
/// the input's parameters and gains the postprocessing keys.
#[test]
fn upscale_command_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(fixture("upscalers"), models.join("upscale_models")).unwrap();
    let input = dir.path().join("in.png");
    let source = read_image(&fixture("upscalers/input.png")).unwrap();
    sdgen::image_io::write_png(&input, &source, "a fox\nSteps: 2, Seed: 1").unwrap();
    let out = dir.path().join("out.png");
    let (i, o, m) = (input.to_str().unwrap(), out.to_str().unwrap(), models.to_str().unwrap());
    let r = sdgen(&[i, "--upscaler", "rrdb_x2_new", "--scale", "3", "--out", o, "--models-dir", m]);
    assert!(r.status.success(), "{}", common::stderr(&r));
    let got = read_rgb(&out);
    assert_eq!(got.dimensions(), (96, 72), "32×24 × 3 = 96×72");
    let params = sdgen::image_io::read_parameters(&out).unwrap().unwrap();
    assert_eq!(params, "a fox\nSteps: 2, Seed: 1, Postprocess upscaler: rrdb_x2_new, Postprocess upscale by: 3.0");
    // Twice the model, then Lanczos down: the same as composing the steps here.
    let up = load("rrdb_x2_new.safetensors");
    let twice =
        run_tiled(&up.model, &run_tiled(&up.model, &source, 512, None, &Device::Cpu).unwrap(), 512, None, &Device::Cpu)
            .unwrap();
    assert_eq!(got.as_raw(), &sdgen::editing::resize(&twice, 96, 72).rgb);
}

/// Unknown upscaler files and names get one line naming what is wrong.
#[test]
fn unknown_upscalers_say_what_they_did_not_recognise() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("upscalers/input.png");
    let out = dir.path().join("out.png");
    let weird = dir.path().join("weird.safetensors");
    let t = candle_core::Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("encoder.stem.weight".to_string(), t.clone())].into_iter().collect(), &weird)
        .unwrap();
    // An ESRGAN+ file: RRDBNet names plus 1×1 convolutions sdgen does not run.
    let plus = dir.path().join("plus.safetensors");
    let mut tensors =
        candle_core::safetensors::load(fixture("upscalers/rrdb_x4_old.safetensors"), &Device::Cpu).unwrap();
    tensors.insert("model.1.sub.0.RDB1.conv1x1.weight".into(), t);
    candle_core::safetensors::save(&tensors, &plus).unwrap();
    for (file, words) in [
        (&weird, &["not an upscaler architecture sdgen knows", "`encoder.stem.weight`"][..]),
        (&plus, &["RRDBNet with tensors it does not use", "`model.1.sub.0.RDB1.conv1x1.weight`"]),
    ] {
        let r = sdgen(&[input.to_str().unwrap(), "--upscaler", file.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let err = common::stderr(&r);
        assert_eq!(r.status.code(), Some(4), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(words.iter().all(|w| err.contains(w)), "{err}");
        assert!(!out.exists());
    }
    let r = sdgen(&[input.to_str().unwrap(), "--upscaler", "nosuch", "--out", out.to_str().unwrap()]);
    assert!(common::stderr(&r).contains("upscaler \"nosuch\": not lanczos or nearest"), "{}", common::stderr(&r));
    assert_ne!(r.status.code(), Some(0));
}
