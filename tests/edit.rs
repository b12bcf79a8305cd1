//! img2img, inpaint and outpaint against diffusers references on the tiny
//! models, the overlay guarantee, input formats, and bad editing input.

mod common;

use std::path::Path;

use common::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Pads {
    left: usize,
    right: usize,
    top: usize,
    bottom: usize,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    mode: String,
    model: String,
    prompt: String,
    negative_prompt: String,
    seed: u64,
    steps: usize,
    cfg_scale: f64,
    sampler: String,
    strength: f64,
    image: String,
    mask: Option<String>,
    pads: Option<Pads>,
    png: String,
}

/// The SD 1.x editing cases and the inpainting models of the other
/// families (SD 2.x, SDXL); `png` becomes a fixture path.
fn cases() -> Vec<Case> {
    let mut all = Vec::new();
    for (dir, file) in [("edit", "cases.json"), ("families", "edit.json")] {
        let text = std::fs::read_to_string(fixture(&format!("reference/{dir}/{file}"))).unwrap();
        for mut case in serde_json::from_str::<Cases>(&text).unwrap().cases {
            case.png = format!("reference/{dir}/{}", case.png);
            all.push(case);
        }
    }
    all
}

fn path_str(rel: &str) -> String {
    fixture(rel).to_str().unwrap().to_string()
}

/// The subcommand and editing options of a case.
fn edit_args(case: &Case) -> Vec<String> {
    let mut a: Vec<String> = vec![case.mode.clone()];
    let image_flag = if case.mode == "img2img" { "--init-image" } else { "--image" };
    a.extend([image_flag.into(), path_str(&case.image), "--strength".into(), case.strength.to_string()]);
    if let Some(mask) = &case.mask {
        a.extend(["--mask".into(), path_str(mask)]);
    }
    if let Some(p) = &case.pads {
        for (side, v) in [("left", p.left), ("right", p.right), ("top", p.top), ("bottom", p.bottom)] {
            a.extend([format!("--pad-{side}"), v.to_string()]);
        }
    }
    a
}

#[test]
fn editing_matches_diffusers_and_keeps_unmasked_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let mut parity = Parity::default();
    for case in cases() {
        let out = dir.path().join(format!("{}.png", case.name));
        let model = fixture(&case.model);
        let job = Job {
            model: &model,
            prompt: &case.prompt,
            negative_prompt: &case.negative_prompt,
            seed: case.seed,
            steps: case.steps,
            cfg_scale: case.cfg_scale,
            sampler: &case.sampler,
            out: &out,
        };
        let ours = job.run(&edit_args(&case), &case.name);
        parity.check(&case.name, &ours, &read_rgb(&fixture(&case.png)));
        // Outside the mask, the input comes back exactly.
        let input = read_rgb(&fixture(&case.image));
        let (dx, dy) = case.pads.as_ref().map_or((0, 0), |p| (p.left as u32, p.top as u32));
        let mask = case.mask.as_ref().map(|m| image::open(fixture(m)).unwrap().to_luma8());
        for (x, y, px) in input.enumerate_pixels() {
            if mask.as_ref().is_some_and(|m| m.get_pixel(x, y).0[0] >= 128) || case.mode == "img2img" {
                continue;
            }
            assert_eq!(ours.get_pixel(x + dx, y + dy), px, "case {}: pixel ({x}, {y}) changed", case.name);
        }
    }
    parity.assert_within_tolerance();
}

/// References that differ only in sampler, seed or prompt are far apart, so
/// the parity test can fail.
#[test]
fn references_are_sensitive_to_sampler_seed_and_prompt() {
    let cases = cases();
    let mut compared = 0;
    for (i, a) in cases.iter().enumerate() {
        for b in &cases[i + 1..] {
            if (&a.mode, &a.model, &a.image, &a.mask, a.strength) != (&b.mode, &b.model, &b.image, &b.mask, b.strength)
            {
                continue;
            }
            let (ra, rb) = (read_rgb(&fixture(&a.png)), read_rgb(&fixture(&b.png)));
            let (max, mean) = level_diff(&ra, &rb);
            assert!(max > 10 * MAX_LEVELS && mean > MEAN_LEVELS, "{} vs {}: max {max}, mean {mean:.2}", a.name, b.name);
            compared += 1;
        }
    }
    assert!(compared >= 1, "no comparable pairs");
}

fn write_png(dir: &Path, name: &str, img: image::DynamicImage) -> std::path::PathBuf {
    let p = dir.join(name);
    img.save(&p).unwrap();
    p
}

#[test]
fn input_images_in_every_common_mode_load_as_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let rgb = image::open(fixture("images/init.png")).unwrap().to_rgb8();
    let variants = [
        ("rgba.png", image::DynamicImage::ImageRgba8(image::DynamicImage::ImageRgb8(rgb.clone()).to_rgba8())),
        ("rgb16.png", image::DynamicImage::ImageRgb16(image::DynamicImage::ImageRgb8(rgb.clone()).to_rgb16())),
        ("gray.png", image::DynamicImage::ImageLuma8(image::DynamicImage::ImageRgb8(rgb.clone()).to_luma8())),
        ("photo.jpg", image::DynamicImage::ImageRgb8(rgb.clone())),
    ];
    for (name, img) in variants {
        let p = write_png(dir.path(), name, img);
        let loaded = sdgen::image_io::read_image(&p).unwrap();
        assert_eq!((loaded.width, loaded.height), (64, 64), "{name}");
        if name.starts_with("rgb") {
            assert_eq!(loaded.rgb, rgb.as_raw().clone(), "{name}: pixels");
        }
    }
    // A palette PNG (what many editors save small images as): 4 colours.
    let palette = [[255u8, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 250]];
    let path = dir.path().join("palette.png");
    let mut encoder = png::Encoder::new(std::fs::File::create(&path).unwrap(), 4, 2);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(palette.concat());
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&[0, 1, 2, 3, 3, 2, 1, 0]).unwrap();
    writer.finish().unwrap();
    let loaded = sdgen::image_io::read_image(&path).unwrap();
    let expected: Vec<u8> = [0, 1, 2, 3, 3, 2, 1, 0].iter().flat_map(|&i| palette[i]).collect();
    assert_eq!(loaded.rgb, expected, "palette PNG pixels");
    // Gray with alpha, and 16-bit gray.
    let gray = image::DynamicImage::ImageRgb8(rgb.clone()).to_luma8();
    for (name, img) in [
        (
            "gray_alpha.png",
            image::DynamicImage::ImageLumaA8(image::DynamicImage::ImageLuma8(gray.clone()).to_luma_alpha8()),
        ),
        ("gray16.png", image::DynamicImage::ImageLuma16(image::DynamicImage::ImageLuma8(gray.clone()).to_luma16())),
    ] {
        let loaded = sdgen::image_io::read_image(&write_png(dir.path(), name, img)).unwrap();
        let expected: Vec<u8> = gray.as_raw().iter().flat_map(|&g| [g, g, g]).collect();
        assert_eq!(loaded.rgb, expected, "{name}: pixels");
    }
}

#[test]
fn masks_use_luminance_or_the_alpha_of_a_single_colour_image() {
    let dir = tempfile::tempdir().unwrap();
    // Colour mask: white-ish pixels repaint, dark ones keep.
    let colour = image::RgbImage::from_fn(4, 1, |x, _| {
        image::Rgb([[255, 0, 0], [0, 255, 0], [200, 200, 200], [10, 10, 10]][x as usize])
    });
    let p = write_png(dir.path(), "c.png", image::DynamicImage::ImageRgb8(colour));
    let (w, h, levels) = sdgen::image_io::read_mask_levels(&p).unwrap();
    let m = sdgen::editing::Mask::from_levels(w, h, &levels);
    assert_eq!(m.bits, vec![false, true, true, false]); // red: L=76, green: L=150
                                                        // Transparency mask: one colour, alpha carries the shape.
    let alpha = image::RgbaImage::from_fn(3, 1, |x, _| image::Rgba([0, 0, 0, [0, 127, 128][x as usize]]));
    let p = write_png(dir.path(), "a.png", image::DynamicImage::ImageRgba8(alpha));
    let (w, h, levels) = sdgen::image_io::read_mask_levels(&p).unwrap();
    assert_eq!(sdgen::editing::Mask::from_levels(w, h, &levels).bits, vec![false, false, true]);
}

struct Failure {
    stderr: String,
}

fn must_fail(args: &[&str]) -> Failure {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let model = path_str("tiny-sd1.safetensors");
    let mut a = args.to_vec();
    a.extend(["--model", &model, "--prompt", "x", "--steps", "2", "--out", out.to_str().unwrap()]);
    let o = sdgen(&a);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "output or temp file left behind");
    Failure { stderr: err }
}

#[test]
fn bad_editing_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let init = path_str("images/init.png");
    let small = path_str("images/small.png");
    let f = must_fail(&["inpaint", "--image", &init, "--mask", &small]);
    assert!(f.stderr.contains("48x48") && f.stderr.contains("64x64"), "{}", f.stderr);
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not an image at all").unwrap();
    let f = must_fail(&["img2img", "--init-image", junk.to_str().unwrap()]);
    assert!(f.stderr.contains("junk.png"), "{}", f.stderr);
    let f = must_fail(&["outpaint", "--image", &small, "--pad-left", "12"]);
    assert!(f.stderr.contains("multiple of 8"), "{}", f.stderr);
    let f = must_fail(&["outpaint", "--image", &small, "--pad", "40000"]);
    assert!(f.stderr.contains("limited to"), "{}", f.stderr);
    for strength in ["1.5", "0", "-0.2"] {
        let f = must_fail(&["img2img", "--init-image", &init, "--strength", strength]);
        assert!(f.stderr.contains("strength"), "{}", f.stderr);
    }
    let odd = write_png(dir.path(), "odd.png", image::DynamicImage::ImageRgb8(image::RgbImage::new(60, 64)));
    let f = must_fail(&["img2img", "--init-image", odd.to_str().unwrap()]);
    assert!(f.stderr.contains("odd.png") && f.stderr.contains("multiples of 8"), "{}", f.stderr);
}
