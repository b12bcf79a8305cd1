#!/usr/bin/env python3
"""PyTorch's matrix-multiply rate on one device, the ceiling that diffusers'
achieved GFLOP/s is compared against (sdgen's own: `sdgen dev matmul-peak`).
Median of 10 timed products after 3 warm-ups; prints one JSON line.

Usage: torch_matmul_peak.py SIZE DEVICE DTYPE THREADS   (e.g. 2048 cpu f32 2, 8192 cuda f16 8)
"""
import json
import sys
import time

import torch

size, device, dtype, threads = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
a, b = (torch.randn(size, size, device=device, dtype=dt) for _ in range(2))


def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()


for _ in range(3):
    a @ b
times = []
for _ in range(10):
    sync()
    start = time.perf_counter()
    a @ b
    sync()
    times.append(time.perf_counter() - start)
median = sorted(times)[len(times) // 2]
name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
print(json.dumps({"gflops": 2 * size**3 / median / 1e9, "size": size, "dtype": dtype, "device": name,
                  "torch": torch.__version__}))
