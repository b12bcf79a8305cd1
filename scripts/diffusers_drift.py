#!/usr/bin/env python3
"""How far diffusers itself lands from the committed f32 CPU references when
run on another device or dtype (e.g. CUDA fp16) on the tiny SD1 model: the
baseline that sdgen's own GPU/f16 differences are judged against. Prints
per-case max/mean level differences and a JSON summary line.

Usage: diffusers_drift.py DEVICE DTYPE   (e.g. cuda f16)   Needs torch, diffusers, Pillow.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image

SCHEDULERS = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler, "ddim": DDIMScheduler}
REF = Path("tests/fixtures/reference/sd1")

device, dtype_name = sys.argv[1], sys.argv[2]
dtype = {"f16": torch.float16, "f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
# As in sdgen's f32 mode: no TF32 matmuls.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
pipe = StableDiffusionPipeline.from_pretrained(
    "tests/fixtures/tiny-sd1", variant="fp16", dtype=dtype, safety_checker=None, local_files_only=True
).to(device)
pipe.set_progress_bar_config(disable=True)
config = pipe.scheduler.config
rows = []
for case in json.loads((REF / "cases.json").read_text())["cases"]:
    pipe.scheduler = SCHEDULERS[case["sampler"]].from_config(config)
    with torch.no_grad():
        img = pipe(prompt=case["prompt"], negative_prompt=case["negative_prompt"], num_inference_steps=case["steps"],
                   guidance_scale=case["cfg_scale"], width=case["width"], height=case["height"],
                   generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np").images[0]
    ours = np.round(np.clip(img.astype(np.float64), 0, 1) * 255).astype(np.int16)
    ref = np.asarray(Image.open(REF / case["png"]).convert("RGB"), dtype=np.int16)
    d = np.abs(ours - ref)
    rows.append((case["name"], int(d.max()), float(d.mean())))
    print(f"diffusers {case['name']:<28} max {d.max():>3} mean {d.mean():.4f}", flush=True)
print(json.dumps({"tool": "diffusers", "device": device, "dtype": dtype_name, "cases": len(rows),
                  "worst_max_levels": max(r[1] for r in rows), "worst_mean_levels": round(max(r[2] for r in rows), 4),
                  "average_mean_levels": round(sum(r[2] for r in rows) / len(rows), 4)}))
