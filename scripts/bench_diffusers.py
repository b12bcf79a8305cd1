#!/usr/bin/env python3
"""Times diffusers (PyTorch, CPU, float32) on a diffusers folder, phase by
phase, the way `sdgen --timings` reports itself; prints one JSON line.

Usage: bench_diffusers.py MODEL_DIR TOKENIZER_DIR SIZE STEPS THREADS
"""
import json
import resource
import sys
import time

import torch

model_dir, tokenizer_dir, size, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

t0 = time.perf_counter()
kw = dict(dtype=torch.float32, local_files_only=True)
pipe = StableDiffusionPipeline.from_pretrained(
    model_dir,
    unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", variant="fp16", **kw),
    vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant="fp16", **kw),
    text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", variant="fp16", **kw),
    tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
    safety_checker=None,
    **kw,
)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
load = time.perf_counter() - t0

marks = []


def on_step(p, i, t, kwargs):
    marks.append(time.perf_counter())
    return kwargs


with torch.no_grad():
    t1 = time.perf_counter()
    pipe.encode_prompt("a photo of a cat", "cpu", 1, True, "")
    encode = time.perf_counter() - t1
    g = torch.Generator("cpu").manual_seed(1)
    t2 = time.perf_counter()
    latents = pipe(
        "a photo of a cat",
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
    t3 = time.perf_counter()
    pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    decode = time.perf_counter() - t3

print(
    json.dumps(
        {
            "load_s": load,
            "text_encode_s": encode,
            "unet_steps_s": unet_steps,
            "vae_decode_s": decode,
            "total_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    )
)
