#!/usr/bin/env python3
"""Times diffusers (PyTorch) on a diffusers folder, phase by phase, the way
`sdgen --timings` reports itself; prints one JSON line. SD 1.x and SDXL run
with the Euler scheduler; SD 3 folders (a `transformer/`) with their flow
matching Euler scheduler and without T5 (`text_encoder_3=None`, as
`sdgen --no-t5`): the random benchmark model has none.

Usage: bench_diffusers.py MODEL_DIR TOKENIZER_DIR SIZE STEPS THREADS [--device cuda --dtype f16 --batch N]
                          [--out PNG]
  --out  save the decoded image as diffusers' pipeline would make it ((x/2+0.5).clamp(0,1), *255,
         round, uint8); with --batch N > 1, image i goes to PNG's stem + "-i". The conversion and
         the write come after vae_decode_s and count in total_s only, as sdgen's PNG write does.
"""
import argparse
import json
import resource
import time

import torch

ap = argparse.ArgumentParser()
for name in ("model_dir", "tokenizer_dir"):
    ap.add_argument(name)
for name in ("size", "steps", "threads"):
    ap.add_argument(name, type=int)
ap.add_argument("--device", default="cpu")
ap.add_argument("--dtype", default="f32", choices=["f32", "f16"])
ap.add_argument("--batch", type=int, default=1, help="images per prompt, in one UNet batch")
ap.add_argument("--out", help="write the decoded image to this PNG")
a = ap.parse_args()
model_dir, tokenizer_dir, size, steps, device = a.model_dir, a.tokenizer_dir, a.size, a.steps, a.device
dtype = torch.float16 if a.dtype == "f16" else torch.float32
torch.set_num_threads(a.threads)
cuda = device.startswith("cuda")


def now():
    # GPU work is queued: wait for it so each phase gets its own time.
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()

from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

t0 = now()
kw = dict(dtype=dtype, local_files_only=True)
with open(f"{model_dir}/model_index.json") as f:
    pipeline_class = json.load(f)["_class_name"]
xl, sd3 = pipeline_class.startswith("StableDiffusionXL"), pipeline_class == "StableDiffusion3Pipeline"
parts = dict(
    vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant="fp16", **kw),
    text_encoder=(CLIPTextModelWithProjection if sd3 else CLIPTextModel).from_pretrained(
        model_dir, subfolder="text_encoder", variant="fp16", **kw),
    tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
)
if sd3:
    parts["transformer"] = SD3Transformer2DModel.from_pretrained(
        model_dir, subfolder="transformer", variant="fp16", **kw)
else:
    parts["unet"] = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", variant="fp16", **kw)
if xl or sd3:
    # A random model's folder has no tokenizers: CLIP's serves both, the second padding with "!" as OpenCLIP-G's does.
    parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
        model_dir, subfolder="text_encoder_2", variant="fp16", **kw)
    parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")
if sd3:
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, **parts, text_encoder_3=None, tokenizer_3=None, **kw)
elif xl:
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, **parts, **kw)
else:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, **parts, safety_checker=None, **kw)
# SDXL's VAE overflows in f16: diffusers decodes it in f32 (force_upcast), as sdgen does.
upcast_vae = dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False)
if upcast_vae:
    pipe.vae.to(torch.float32)
if not sd3:
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
pipe.to(device)
load = now() - t0

marks = []


def on_step(p, i, t, kwargs):
    marks.append(now())
    return kwargs


with torch.no_grad():
    t1 = now()
    more = dict(prompt_2=None, prompt_3=None) if sd3 else {}  # SD 3: the same prompt for every encoder
    pipe.encode_prompt(prompt="a photo of a cat", device=device, num_images_per_prompt=a.batch,
                       do_classifier_free_guidance=True, negative_prompt="", **more)
    encode = now() - t1
    g = torch.Generator("cpu").manual_seed(1)
    t2 = now()
    latents = pipe(
        "a photo of a cat",
        num_images_per_prompt=a.batch,
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=size,
        height=size,
        generator=g,
        output_type="latent",
        callback_on_step_end=on_step,
    ).images
    # The pipeline encodes the prompt again before its first step.
    starts = [t2 + encode] + marks[:-1]
    unet_steps = [end - start for start, end in zip(starts, marks)]
    t3 = now()
    shift = pipe.vae.config.shift_factor or 0.0  # SD 3's latents are (z - shift) * scale
    z = (latents.float() if upcast_vae else latents) / pipe.vae.config.scaling_factor + shift
    decoded = pipe.vae.decode(z).sample
    decode = now() - t3

if a.out:
    from pathlib import Path

    from PIL import Image

    # diffusers' VaeImageProcessor.postprocess, output_type="pil".
    pixels = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    pixels = (pixels * 255).round().astype("uint8")
    out = Path(a.out)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(out if len(pixels) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}"))

print(
    json.dumps(
        {
            "load_s": load,
            "text_encode_s": encode,
            "unet_steps_s": unet_steps,
            "vae_decode_s": decode,
            "total_s": now() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "peak_gpu_allocated_mb": torch.cuda.max_memory_allocated() // 2**20 if cuda else None,
            "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved() // 2**20 if cuda else None,
            "batch": a.batch,
            "dtype": a.dtype,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    )
)
