#!/usr/bin/env python3
"""Hires fix references: A1111's txt2img "Hires. fix" composed from diffusers on the tiny SD 1.x model, and torch's
latent interpolations.

    /root/venv-ref/bin/python tests/reference/make_hires.py

(torch, diffusers, spandrel as pinned in requirements.txt; CPU, float32; byte-identical on every run.) It needs the
committed tiny-sd1/ and upscalers/rrdb_x2_new.safetensors, and deletes and rewrites only
tests/fixtures/reference/hires/:

    interpolate.safetensors   a random (1, 4, 7, 5) tensor and torch.nn.functional.interpolate of it, for each of
                              A1111's six latent upscale modes, to 13x11, 14x10 (exactly 2x) and 4x3 (smaller)
    cases.json + *.png        hires-fix images: two with latent upscalers (one to a size of another aspect, cropped)
                              and one with an image upscaler

Each hires case is what A1111's `StableDiffusionProcessingTxt2Img.sample_hr_pass` does, pinned as the issue says:

1. The first pass: diffusers' txt2img at WxH, its final latents.
2. The target: int(W*scale) x int(H*scale), rounded down to a multiple of 8 pixels.
   A size of another aspect (A1111's "Resize width/height to") is covered, and the latents are cropped to it,
   centred, after the upscale.
3. Latent upscalers: `F.interpolate(latents, size=target/8, mode, antialias)`. Image upscalers: the first pass
   decoded and rounded to uint8, enlarged as A1111's `Upscaler.upscale` does (the model, again while the image is
   smaller than ⌊side·scale/8⌋·8, up to three times; then Pillow's Lanczos to that size), Lanczos to the target,
   and encoded to the VAE posterior's mean (A1111 samples the posterior: sdgen and this reference take the mean).
4. The second pass: N = hires steps (0: the first pass's steps) steps, the last N of a schedule of
   ⌊N / min(denoise, 0.999)⌋ steps (A1111's `setup_img2img_steps` with the steps given). diffusers' img2img
   pipeline runs exactly those with strength (N + 0.5) / T (capped at 1), given the latents directly, with a fresh
   `torch.Generator` seeded with the image's seed (the noise, then the ancestral noise).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402  (sets torch threads, imports diffusers quietly)
import make_families as mfam  # noqa: E402
import make_upscalers as mu  # noqa: E402  (spandrel with the tiny models' dense-block growth)
import numpy as np  # noqa: E402
import spandrel  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers import StableDiffusionImg2ImgPipeline  # noqa: E402

OUT = mf.FIXTURES / "reference" / "hires"
UPSCALERS = mf.FIXTURES / "upscalers"

# sdgen's names of A1111's latent upscale modes: (torch mode, antialias).
MODES = {
    "latent": ("bilinear", False),
    "latent-antialiased": ("bilinear", True),
    "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True),
    "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}
SIZES = [(13, 11), (14, 10), (4, 3)]

CASES = [
    dict(name="latent_euler_a", prompt="a red fox in the snow", negative_prompt="", seed=1234, steps=6, cfg_scale=7.5,
         width=64, height=64, sampler="euler_a", schedule="normal", hires_scale=2.0, hires_upscaler="latent",
         hires_steps=0, hires_denoise=0.7, hires_sampler=None, hires_schedule=None, hires_cfg_scale=None,
         hires_prompt=None, hires_negative_prompt=None),
    dict(name="image_rrdb_dpmpp_2m", prompt=mf.CASTLE, negative_prompt="blurry", seed=7, steps=5, cfg_scale=7.5,
         width=64, height=56, sampler="dpmpp_2m", schedule="karras", hires_scale=1.5, hires_upscaler="rrdb_x2_new",
         hires_steps=4, hires_denoise=0.5, hires_sampler="euler", hires_schedule="normal", hires_cfg_scale=5.0,
         hires_prompt="a castle on a hill at dawn", hires_negative_prompt="dark"),
    # Another aspect than the first pass's: A1111 covers 96x96 (128x96) and crops the latents to it, centred.
    dict(name="resize_crop_antialiased", prompt="a lighthouse by the sea", negative_prompt="", seed=11, steps=4,
         cfg_scale=6.0, width=64, height=48, sampler="euler", schedule="normal", hires_size=[96, 96],
         hires_upscaler="latent-antialiased", hires_steps=3, hires_denoise=0.6, hires_sampler=None,
         hires_schedule=None, hires_cfg_scale=None, hires_prompt=None, hires_negative_prompt=None),
]


def interpolation_reference():
    x = torch.randn(1, 4, 7, 5, generator=torch.Generator().manual_seed(0))
    out = {"input": x}
    for name, (mode, aa) in MODES.items():
        for h, w in SIZES:
            out[f"{name}.{h}x{w}"] = F.interpolate(x, size=(h, w), mode=mode, antialias=aa).contiguous()
    save_file(out, str(OUT / "interpolate.safetensors"))


def target_resolution(case):
    """A1111's `calculate_target_resolution`, sizes rounded down to multiples of 8: (width, height) the first pass
    is upscaled to, and the latent columns and rows cropped away after."""
    w, h = case["width"], case["height"]
    if "hires_size" not in case:
        return int(w * case["hires_scale"]) // 8 * 8, int(h * case["hires_scale"]) // 8 * 8, 0, 0
    x, y = case["hires_size"]
    if w / h < x / y:
        to_w, to_h = x, x * h // w
    else:
        to_w, to_h = y * w // h, y
    return to_w // 8 * 8, to_h // 8 * 8, (to_w - x) // 8, (to_h - y) // 8


@torch.no_grad()
def run_model(desc, img):
    x = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    y = desc(x)
    return Image.fromarray(np.round(y[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.uint8))


def a1111_upscale(img, scale, model):
    """A1111's `Upscaler.upscale`: the model while smaller than the destination (at most 3 times), then Lanczos."""
    dest_w, dest_h = int((img.width * scale) // 8 * 8), int((img.height * scale) // 8 * 8)
    for _ in range(3):
        before = img.size
        img = run_model(model, img)
        if img.size == before or (img.width >= dest_w and img.height >= dest_h):
            break
    if img.size != (dest_w, dest_h):
        img = img.resize((dest_w, dest_h), resample=Image.LANCZOS)
    return img


@torch.no_grad()
def hires_case(pipe, img2img, case):
    sf = pipe.vae.config.scaling_factor
    pipe.scheduler = mf.make_scheduler(case["sampler"], case["schedule"])
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    latents = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], num_inference_steps=case["steps"],
                   guidance_scale=case["cfg_scale"], width=case["width"], height=case["height"], generator=gen,
                   output_type="latent").images
    w2, h2, crop_x, crop_y = target_resolution(case)
    if case["hires_upscaler"] in MODES:
        mode, aa = MODES[case["hires_upscaler"]]
        latents = F.interpolate(latents, size=(h2 // 8, w2 // 8), mode=mode, antialias=aa)
    else:
        decoded = pipe.vae.decode(latents / sf).sample
        img = Image.fromarray(mf.to_uint8(decoded[0].permute(1, 2, 0).numpy() / 2 + 0.5))
        sd = load_file(str(UPSCALERS / f"{case['hires_upscaler']}.safetensors"))
        model = spandrel.ModelLoader(device="cpu").load_from_state_dict(sd).eval()
        model.model.float()
        scale = max(w2 / img.width, h2 / img.height)  # A1111's resize_image, "just resize"
        img = a1111_upscale(img, scale, model)
        if img.size != (w2, h2):
            img = img.resize((w2, h2), resample=Image.LANCZOS)
        x = mf.pixels_to_tensor(np.asarray(img))
        latents = mf.vae_mean(pipe.vae, x) * sf
    latents = latents[:, :, crop_y // 2:latents.shape[2] - (crop_y + 1) // 2,
                      crop_x // 2:latents.shape[3] - (crop_x + 1) // 2]
    w2, h2 = latents.shape[3] * 8, latents.shape[2] * 8
    n = case["hires_steps"] or case["steps"]
    total = int(n / min(case["hires_denoise"], 0.999))
    img2img.scheduler = mf.make_scheduler(case["hires_sampler"] or case["sampler"],
                                          case["hires_schedule"] or case["schedule"])
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    prompt = case["hires_prompt"] if case["hires_prompt"] is not None else case["prompt"]
    negative = case["hires_negative_prompt"] if case["hires_negative_prompt"] is not None else case["negative_prompt"]
    cfg = case["hires_cfg_scale"] if case["hires_cfg_scale"] is not None else case["cfg_scale"]
    steps_seen = []
    out = img2img(prompt=prompt, negative_prompt=negative, image=latents, strength=min(1.0, (n + 0.5) / total),
                  num_inference_steps=total, guidance_scale=cfg, generator=gen, output_type="np",
                  callback_on_step_end=lambda p, i, t, kw: steps_seen.append(int(t)) or {})
    assert len(steps_seen) == n, (case["name"], steps_seen, n)
    image = mf.to_uint8(out.images[0])
    assert image.shape == (h2, w2, 3), image.shape
    return image, dict(total_steps=total, timesteps=steps_seen)


def main():
    mfam.remove(OUT)
    OUT.mkdir(parents=True)
    interpolation_reference()
    pipe = mf.load_folder_pipeline()
    pipe.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    cases = []
    images = {}
    for case in CASES:
        image, seen = hires_case(pipe, img2img, case)
        png = f"{case['name']}.png"
        Image.fromarray(image).save(OUT / png)
        images[case["name"]] = image
        cases.append(dict(case, png=png, **seen))
        mf.log(f"{case['name']}: {image.shape[1]}x{image.shape[0]}, second pass {seen}")
    mf.check_image_statistics(images)
    mfam.write_json(OUT / "cases.json", {"cases": cases})
    mf.check_file_sizes()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    mf.log(f"{total} bytes")


if __name__ == "__main__":
    main()
