#!/usr/bin/env python3
"""Times stable-diffusion.cpp (through its Python binding,
stable-diffusion-cpp-python) on a single-file SD 1.x checkpoint (LDM/CompVis
key names, .safetensors), phase by phase, the way `sdgen --timings` reports
itself; prints one JSON line with the keys of bench_diffusers.py.

Settings as bench_diffusers.py and scripts/bench give sdgen: prompt "a photo
of a cat", negative "", seed 1, Euler, the discrete (linspace) schedule, CFG
7.5, weights converted to f32 at load (wtype f32), latent noise from the
torch-CPU-compatible generator (rng_type "cpu", the same noise as diffusers
and sdgen for the same seed). sd.cpp keeps every convolution kernel in f16
whatever wtype says (its Conv2d blocks are f16, and its CPU matmul then rounds
the im2col'd activations to f16): wtype f32 applies to the linear layers,
attention and norms; its parameter memory is 2.7 GB, not the 4.3 GB of an
all-f32 SD 1.5. Its schedule equals diffusers' linspace one from 2 steps on;
with 1 step diffusers (and sdgen) take their only step at t=0, sd.cpp at
t=999, so the images differ.

Where the figures come from:
  load_s         wall time of StableDiffusion(...) (reading + f16 → f32 conversion)
  text_encode_s  sd.cpp's "get_learned_condition completed, taking Xs" (prompt and negative)
  unet_steps_s   per step (one denoiser call: both CFG passes), from sd.cpp's progress callback,
                 which gets step k and the mean seconds per step of steps 1..k: step k took
                 k·mean_k - (k-1)·mean_(k-1). If the callback does not report every step,
                 "sampling completed, taking Xs" divided equally over the steps
                 ("steps_from": "sampling_total")
  vae_decode_s   sd.cpp's "decode_first_stage completed, taking Xs"
  total_s        wall time from before the load to after the PNG is written
sd.cpp prints its times with 2 decimals (10 ms resolution).

Usage: bench_sdcpp.py MODEL SIZE STEPS THREADS [--out PNG] [--wtype f32] [--rng cpu] [--log FILE]
  MODEL  the checkpoint file, or a folder holding model.safetensors (as `sdgen dev random-model` writes)
"""
import argparse
import ctypes
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("model")
for name in ("size", "steps", "threads"):
    ap.add_argument(name, type=int)
ap.add_argument("--out", help="write the image to this PNG")
ap.add_argument("--wtype", default="f32", help="weight type sd.cpp converts to at load (default f32)")
ap.add_argument("--rng", default="cpu", help="sd.cpp rng_type: cpu (torch CPU randn), cuda (Philox) or default")
ap.add_argument("--log", help="write sd.cpp's log lines to this file (else they are dropped)")
a = ap.parse_args()
model = Path(a.model)
if model.is_dir():
    model = model / "model.safetensors"
if not model.is_file():
    sys.exit(f"{model}: no such checkpoint")

# sd.cpp and its binding print progress bars and system info on stdout: send
# them to stderr so that stdout holds only the JSON line.
stdout_fd = os.dup(1)
os.dup2(2, 1)

t0 = time.perf_counter()
import stable_diffusion_cpp as sdcpp  # noqa: E402
from stable_diffusion_cpp import StableDiffusion  # noqa: E402

log = []  # sd.cpp's log lines


@sdcpp.sd_log_callback
def on_log(level, text, data):
    log.append(text.decode("utf-8", errors="replace"))


# Replaces the binding's own callback (set when it is imported), which prints to stderr.
sdcpp.sd_set_log_callback(on_log, ctypes.c_void_p(0))

means = {}  # step → mean seconds per step so far, from the progress callback


def on_progress(step, total, mean):
    means[abs(step)] = mean


sd = StableDiffusion(model_path=str(model), n_threads=a.threads, wtype=a.wtype, rng_type=a.rng,
                     sampler_rng_type=a.rng, verbose=True)
load = time.perf_counter() - t0
loaded_at = len(log)
images = sd.generate_image(
    prompt="a photo of a cat",
    negative_prompt="",
    width=a.size,
    height=a.size,
    cfg_scale=7.5,
    sample_method="euler",
    scheduler="discrete",
    sample_steps=a.steps,
    seed=1,
    progress_callback=on_progress,
)
if a.out:
    images[0].save(a.out)
total = time.perf_counter() - t0
sys.stdout.flush()
ctypes.CDLL(None).fflush(None)  # C stdio's buffer, before stdout is the real one again
os.dup2(stdout_fd, 1)


def taking(pattern, lines):
    """The seconds of the last log line that matches `pattern` ... "taking Xs"."""
    found = [float(m.group(1)) for t in lines if (m := re.search(pattern + r".*?taking ([0-9.]+)s", t))]
    if not found:
        sys.exit(f"sd.cpp logged no '{pattern} ... taking' line; its log:\n" + "".join(log))
    return found[-1]


run = log[loaded_at:]
sampling = taking("sampling completed", run)
# The sampler reports step 0 when it starts, then each step k with the mean of 1..k.
steps_from = "progress_callback"
if all(k in means for k in range(1, a.steps + 1)):
    per_step = [k * means[k] - (k - 1) * means.get(k - 1, 0.0) for k in range(1, a.steps + 1)]
else:
    # Only a total is known: share it equally.
    per_step, steps_from = [sampling / a.steps] * a.steps, "sampling_total"
if a.log:
    Path(a.log).write_text("".join(log))
print(
    json.dumps(
        {
            "load_s": load,
            "text_encode_s": taking("get_learned_condition completed", run),
            "unet_steps_s": per_step,
            "vae_decode_s": taking("decode_first_stage completed", run),
            "total_s": total,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "sampling_s": sampling,
            "steps_from": steps_from,
            "loading_tensors_s": taking("loading tensors completed", log[:loaded_at]),
            "wtype": a.wtype,
            "threads": a.threads,
            "sdcpp_python": getattr(sdcpp, "__version__", None),
        }
    )
)
