#!/usr/bin/env python3
"""Runs the committed diffusers parity cases (tiny models, txt2img, every
sampler) through an sdgen binary on a chosen device and dtype, and prints the
level differences against the reference PNGs: the CPU tests' check, for a
machine without cargo (the GPU one). Needs numpy and Pillow.

Usage: gpu_parity.py SDGEN DEVICE DTYPE MAX_LEVELS MEAN_LEVELS [--suites sd1,samplers] [--limit N]
Exit status 1 when a case is beyond the given tolerance or sdgen fails.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path("tests/fixtures")


def sd1_args(case):
    yield "tiny-sd1", ["--width", str(case["width"]), "--height", str(case["height"])]


def samplers_args(case):
    before = []
    if case.get("mode") == "img2img":
        before = ["img2img", "--init-image", str(FIXTURES / case["image"]), "--strength", str(case["strength"])]
    else:
        before = ["--width", str(case["width"]), "--height", str(case["height"])]
    yield case.get("model") or "tiny-sd1", before + ["--schedule", case["schedule"]]


SUITES = {"sd1": sd1_args, "samplers": samplers_args}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("sdgen")
    p.add_argument("device")
    p.add_argument("dtype")
    p.add_argument("max_levels", type=int)
    p.add_argument("mean_levels", type=float)
    p.add_argument("--suites", default="sd1,samplers")
    p.add_argument("--limit", type=int, default=0, help="run only the first N cases of each suite")
    a = p.parse_args()
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for suite in a.suites.split(","):
            cases = json.loads((FIXTURES / "reference" / suite / "cases.json").read_text())["cases"]
            for case in cases[: a.limit or None]:
                for model, before in SUITES[suite](case):
                    out = Path(tmp) / f"{case['name']}.png"
                    cmd = [a.sdgen, *before, "--model", str(FIXTURES / model), "--prompt", case["prompt"],
                           "--negative-prompt", case.get("negative_prompt") or "", "--seed", str(case["seed"]),
                           "--steps", str(case["steps"]), "--cfg-scale", str(case["cfg_scale"]),
                           "--sampler", case["sampler"], "--prompt-syntax", "plain", "--out", str(out), "--quiet", "--offline",
                           "--device", a.device, "--dtype", a.dtype]
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    name = f"{suite}/{case['name']}"
                    if r.returncode != 0:
                        failures.append(f"{name}: sdgen failed: {r.stderr.strip()[:300]}")
                        continue
                    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
                    ref = np.asarray(Image.open(FIXTURES / "reference" / suite / case["png"]).convert("RGB"),
                                     dtype=np.int16)
                    d = np.abs(ours - ref)
                    rows.append((name, int(d.max()), float(d.mean())))
                    print(f"{name:<40} max {d.max():>3} mean {d.mean():.4f}", flush=True)
                    if d.max() > a.max_levels or d.mean() > a.mean_levels:
                        failures.append(f"{name}: max {d.max()}, mean {d.mean():.3f}")
    worst_max = max((r[1] for r in rows), default=0)
    worst_mean = max((r[2] for r in rows), default=0.0)
    avg_mean = sum(r[2] for r in rows) / max(len(rows), 1)
    print(json.dumps({"device": a.device, "dtype": a.dtype, "cases": len(rows), "worst_max_levels": worst_max,
                      "worst_mean_levels": round(worst_mean, 4), "average_mean_levels": round(avg_mean, 4),
                      "tolerance": [a.max_levels, a.mean_levels], "failures": failures}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
