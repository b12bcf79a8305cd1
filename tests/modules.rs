//! Per-module parity with diffusers/transformers on the tiny SD1 model: text
//! encoder, UNet (also at an odd latent size), VAE decoder, and the σ
//! schedules of each sampler.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{fixture, relative_error, TOLERANCE};
use sdgen::loading::Model;
use sdgen::sampling::samplers::Sampler;
use sdgen::sampling::schedule::{ScheduleKind, SchedulerConfig};

fn references() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("reference/sd1/modules.safetensors"), &Device::Cpu).unwrap()
}

fn model() -> Model {
    Model::load(&fixture("tiny-sd1"), &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn text_encoder_matches_transformers() {
    let r = references();
    let m = model();
    let ids = m.text.clip().tokenizer.encode_padded("a red fox in the snow").ids;
    let expected: Vec<i64> = r["clip.input_ids"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), expected, "token ids");
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let out = m.text.clip().encoder.forward(&ids).unwrap();
    let err = relative_error(&out, &r["clip.last_hidden_state"]);
    eprintln!("text encoder: relative error {err:e}");
    assert!(err < TOLERANCE, "text encoder relative error {err}");
}

#[test]
fn unet_matches_diffusers_including_odd_latent_sizes() {
    let r = references();
    let m = model();
    for prefix in ["unet", "unet_odd"] {
        let t = r[&format!("{prefix}.timestep")].to_vec1::<f32>().unwrap()[0];
        let out = m
            .backbone
            .unet()
            .unwrap()
            .forward(&r[&format!("{prefix}.sample")], t, &r[&format!("{prefix}.context")], None)
            .unwrap();
        let err = relative_error(&out, &r[&format!("{prefix}.out")]);
        eprintln!("{prefix}: relative error {err:e}");
        assert!(err < TOLERANCE, "{prefix}: relative error {err}");
    }
}

#[test]
fn vae_decoder_matches_diffusers() {
    let r = references();
    let m = model();
    let out = m.vae.decode(&r["vae.latent"]).unwrap();
    let err = relative_error(&out, &r["vae.image"]);
    eprintln!("vae: relative error {err:e}");
    assert!(err < TOLERANCE, "VAE relative error {err}");
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1e-6)
}

#[test]
fn schedules_match_diffusers_arrays() {
    let r = references();
    let cfg = SchedulerConfig::sd15();
    let ac: Vec<f32> = r["sched.alphas_cumprod"].to_vec1().unwrap();
    let ours = cfg.alphas_cumprod().unwrap();
    assert!(ours.iter().zip(&ac).all(|(a, b)| close(*a, *b)), "alphas_cumprod");
    for steps in [10, 20] {
        for name in ["euler", "euler_a"] {
            let s = name.parse::<Sampler>().unwrap().schedule(&cfg, steps, ScheduleKind::Normal).unwrap();
            let key = |k: &str| format!("sched.{name}.{steps}.{k}");
            let sigmas: Vec<f32> = r[&key("sigmas")].to_vec1().unwrap();
            let timesteps: Vec<f32> = r[&key("timesteps")].to_vec1().unwrap();
            let init = r[&key("init_noise_sigma")].to_vec1::<f32>().unwrap()[0];
            assert_eq!(s.sigmas.len(), sigmas.len());
            for (a, b) in s.sigmas.iter().zip(&sigmas) {
                assert!(close(*a, *b), "{name}/{steps}: sigma {a} vs {b}");
            }
            for (a, b) in s.timesteps.iter().zip(&timesteps) {
                assert!(close(*a, *b), "{name}/{steps}: timestep {a} vs {b}");
            }
            assert!(close(s.init_noise_scale, init), "{name}/{steps}: init noise {} vs {init}", s.init_noise_scale);
        }
        // DDIM: σ at each ᾱ_t, then at ᾱ_final; diffusers' init_noise_sigma is
        // 1 in DDPM-space, i.e. √(σ₀² + 1) in σ-space.
        let s = Sampler::Ddim.schedule(&cfg, steps, ScheduleKind::Normal).unwrap();
        let key = |k: &str| format!("sched.ddim.{steps}.{k}");
        let ts: Vec<i64> = r[&key("timesteps")].to_vec1().unwrap();
        assert_eq!(s.timesteps, ts.iter().map(|&t| t as f32).collect::<Vec<_>>());
        let mut alphas: Vec<f32> = r[&key("alphas_cumprod")].to_vec1().unwrap();
        alphas.push(r[&key("final_alpha_cumprod")].to_vec1::<f32>().unwrap()[0]);
        for (sigma, a) in s.sigmas.iter().zip(&alphas) {
            assert!(close(*sigma, ((1.0 - a) / a).sqrt()), "ddim/{steps}: sigma {sigma} for alpha {a}");
        }
        let init = r[&key("init_noise_sigma")].to_vec1::<f32>().unwrap()[0];
        assert!(close(s.init_noise_scale / (s.sigmas[0] * s.sigmas[0] + 1.0).sqrt(), init));
    }
}

fn edit_references() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("reference/edit/modules.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn vae_encoder_mean_matches_diffusers() {
    let r = edit_references();
    let mean = model().vae.encode_mean(&r["vae_encode.image"]).unwrap();
    let err = relative_error(&mean, &r["vae_encode.mean"]);
    eprintln!("vae encoder: relative error {err:e}");
    assert!(err < TOLERANCE, "VAE encoder relative error {err}");
}

#[test]
fn inpainting_unet_matches_diffusers() {
    let r = edit_references();
    let m = Model::load(&fixture("tiny-sd1-inpaint"), &Device::Cpu, DType::F32).unwrap();
    assert!(m.is_inpainting());
    let t = r["unet9.timestep"].to_vec1::<f32>().unwrap()[0];
    let out = m.backbone.unet().unwrap().forward(&r["unet9.sample"], t, &r["unet9.context"], None).unwrap();
    let err = relative_error(&out, &r["unet9.out"]);
    eprintln!("unet9: relative error {err:e}");
    assert!(err < TOLERANCE, "inpainting UNet relative error {err}");
}

#[test]
fn lcm_guidance_embedding_and_unet_match_diffusers() {
    let r = candle_core::safetensors::load(fixture("reference/samplers/modules.safetensors"), &Device::Cpu).unwrap();
    // The reference cases use cfg 8: w = 7.
    let w = sdgen::models::unet::guidance_embedding(7.0, 32, &Device::Cpu).unwrap();
    let err = relative_error(&w, &r["lcm.w_embedding"]);
    assert!(err < TOLERANCE, "guidance embedding relative error {err}");
    let m = Model::load(&fixture("tiny-lcm"), &Device::Cpu, DType::F32).unwrap();
    let t = r["lcm.timestep"].to_vec1::<f32>().unwrap()[0];
    let out = m
        .backbone
        .unet()
        .unwrap()
        .forward(&r["lcm.sample"], t, &r["lcm.context"], Some(&r["lcm.w_embedding"]))
        .unwrap();
    let err = relative_error(&out, &r["lcm.out"]);
    eprintln!("lcm unet: relative error {err:e}");
    assert!(err < TOLERANCE, "LCM UNet relative error {err}");
}

#[test]
fn tiled_vae_decode_blends_tiles_and_equals_whole_with_one_tile() {
    let r = references();
    let m = model();
    let z = &r["vae.latent"]; // (1, 4, 8, 8)
    let whole = m.vae.decode(z).unwrap();
    let one_tile = m.vae.decode_tiled(z, 8, 2).unwrap();
    assert_eq!(relative_error(&one_tile, &whole), 0.0, "a single tile is the whole decode");
    // Tiles of 6 overlapping by 2 start at 0 and 2 on each axis; pixels that
    // only the first tile covers are exactly that tile's decode.
    let tiled = m.vae.decode_tiled(z, 6, 2).unwrap();
    let first = m.vae.decode(&z.narrow(2, 0, 6).unwrap().narrow(3, 0, 6).unwrap()).unwrap();
    let corner = |t: &Tensor| t.narrow(2, 0, 16).unwrap().narrow(3, 0, 16).unwrap();
    assert_eq!(relative_error(&corner(&tiled), &corner(&first)), 0.0);
    let mean = (&tiled - &whole).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    eprintln!("tiled (6/2) vs whole decode of the tiny VAE: mean |Δ| = {mean} (levels: {})", mean * 127.5);
    assert!(mean > 0.0, "overlapping tiles of this decoder differ from the whole image");
}

#[test]
fn tiled_vae_encode_blends_tiles_and_equals_whole_with_one_tile() {
    let m = model();
    let image = Tensor::rand(-1f32, 1.0, (1, 3, 64, 64), &Device::Cpu).unwrap();
    let whole = m.vae.encode_mean(&image).unwrap(); // (1, 4, 8, 8)
    let one_tile = m.vae.encode_tiled(&image, 8, 2).unwrap();
    assert_eq!(relative_error(&one_tile, &whole), 0.0, "a single tile is the whole encode");
    // Tiles of 6 latents (48 px) overlapping by 2 start at latents 0 and 2;
    // latents 0..2 belong to the first tile alone.
    let tiled = m.vae.encode_tiled(&image, 6, 2).unwrap();
    let first = m.vae.encode_mean(&image.narrow(2, 0, 48).unwrap().narrow(3, 0, 48).unwrap()).unwrap();
    let corner = |t: &Tensor| t.narrow(2, 0, 2).unwrap().narrow(3, 0, 2).unwrap();
    assert_eq!(relative_error(&corner(&tiled), &corner(&first)), 0.0);
    let mean = (&tiled - &whole).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    eprintln!("tiled (6/2) vs whole encode of the tiny VAE: mean |Δ| = {mean}");
    assert!(mean > 0.0, "overlapping tiles of this encoder differ from the whole image");
}

/// SDXL's added conditioning path (pooled text + sinusoids of the six size
/// numbers → linear–SiLU–linear, added to the timestep embedding) on a tiny
/// SDXL-shaped UNet, tiny-sdxl's (tests/reference/make_sdxl_unet.py).
#[test]
fn sdxl_unet_add_embedding_matches_diffusers() {
    use sdgen::loading::weights::{Checkpoint, Component, NameMap};
    use sdgen::models::unet::{TextTime, UNet, UNetConfig};
    let dir = fixture("tiny-sdxl/unet");
    let cfg: UNetConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let ckpt = Checkpoint::open(&[dir.join("diffusion_pytorch_model.safetensors")]).unwrap();
    let unet =
        UNet::new(&cfg, ckpt.var_builder(NameMap::prefixed(""), Component::Unet, DType::F32, &Device::Cpu)).unwrap();
    assert!(ckpt.unused().is_empty(), "unused: {:?}", ckpt.unused());
    let r = candle_core::safetensors::load(fixture("reference/sdxl/unet.safetensors"), &Device::Cpu).unwrap();
    let t = r["timestep"].to_vec1::<f32>().unwrap()[0];
    let run = |text_embeds: &Tensor, time_ids: &Tensor| {
        let time_ids: Vec<f32> = time_ids.flatten_all().unwrap().to_vec1().unwrap();
        let tt = TextTime { text_embeds, time_ids: &time_ids };
        unet.forward_with(&r["sample"], t, &r["context"], None, Some(&tt), None).unwrap()
    };
    let out = run(&r["text_embeds"], &r["time_ids"]);
    let err = relative_error(&out, &r["out"]);
    eprintln!("sdxl unet: relative error {err:e}");
    assert!(err < TOLERANCE, "SDXL UNet relative error {err}");
    let zeros = run(&r["text_embeds"].zeros_like().unwrap(), &r["time_ids"].zeros_like().unwrap());
    assert!(relative_error(&zeros, &r["out_no_added"]) < TOLERANCE);
    assert!(relative_error(&out, &zeros) > 1e-2, "the added conditioning must change the output");
    assert!(unet.forward(&r["sample"], t, &r["context"], None).is_err(), "an SDXL UNet needs its added conditioning");
}

/// SDXL's text conditioning from its two encoders (tests/reference/make_sdxl_text.py):
/// each encoder's penultimate hidden state without the final norm,
/// concatenated into the context, and encoder 2's pooled, projected output.
#[test]
fn sdxl_text_encoders_match_transformers() {
    use sdgen::loading::weights::{Checkpoint, Component, NameMap};
    use sdgen::models::clip::{ClipConfig, ClipTextModel};
    let r = candle_core::safetensors::load(fixture("reference/sdxl/text.safetensors"), &Device::Cpu).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let load = |sub: &str| {
        let dir = fixture(&format!("tiny-sdxl-text/{sub}"));
        let cfg: ClipConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let ckpt = Checkpoint::open(&[dir.join("model.safetensors")]).unwrap();
        // transformers names CLIPTextModelWithProjection's tower `text_model.`.
        let prefix = if ckpt.shapes().iter().any(|(n, _)| n.starts_with("text_model.")) { "text_model." } else { "" };
        let vb = ckpt.var_builder(NameMap::prefixed(prefix), Component::TextEncoder, DType::F32, &Device::Cpu);
        let model = ClipTextModel::new(&cfg, vb).unwrap();
        (model, ckpt)
    };
    let (enc1, ckpt1) = load("text_encoder");
    let (enc2, ckpt2) = load("text_encoder_2");
    let (pen1, _) = enc1.hidden_states(&ids, enc1.config.num_hidden_layers - 1).unwrap();
    let (pen2, last2) = enc2.hidden_states(&ids, enc2.config.num_hidden_layers - 1).unwrap();
    let projection = candle_nn::linear_no_bias(
        64,
        32,
        ckpt2
            .var_builder(NameMap::prefixed(""), Component::TextEncoder2, DType::F32, &Device::Cpu)
            .pp("text_projection"),
    )
    .unwrap();
    let pooled = enc2.pooled(&last2, &ids, Some(&projection)).unwrap();
    let context = Tensor::cat(&[&pen1, &pen2], 2).unwrap();
    for (what, ours, theirs) in [
        ("encoder 1 penultimate", &pen1, "enc1.penultimate"),
        ("encoder 1 last (normed)", &enc1.forward(&ids).unwrap(), "enc1.last_hidden_state"),
        ("encoder 2 penultimate", &pen2, "enc2.penultimate"),
        ("pooled text embeds", &pooled, "enc2.text_embeds"),
        ("context", &context, "context"),
    ] {
        let err = relative_error(ours, &r[theirs]);
        eprintln!("sdxl {what}: relative error {err:e}");
        assert!(err < TOLERANCE, "{what}: relative error {err}");
    }
    assert!(ckpt1.unused().is_empty() && ckpt2.unused().is_empty(), "{:?} {:?}", ckpt1.unused(), ckpt2.unused());
    assert!(relative_error(&pen2, &last2) > 1e-2, "the penultimate state differs from the last");
}
