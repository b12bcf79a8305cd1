#!/usr/bin/env python3
"""Absolute per-channel difference of two 8-bit images of the same size, in
levels (0..255); prints one JSON line {"max": int, "mean": float}. Both are
compared as RGB. Needs Pillow (numpy is used when present).

Usage: image_diff.py A.png B.png
"""
import json
import sys

from PIL import Image

a, b = (Image.open(p).convert("RGB") for p in sys.argv[1:3])
if a.size != b.size:
    sys.exit(f"sizes differ: {a.size} vs {b.size}")
try:
    import numpy as np

    d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    mx, mean = int(d.max()), float(d.mean())
except ImportError:
    d = [abs(x - y) for x, y in zip(a.tobytes(), b.tobytes())]
    mx, mean = max(d), sum(d) / len(d)
print(json.dumps({"max": mx, "mean": round(mean, 4)}))
