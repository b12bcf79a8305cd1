#!/usr/bin/env python3
"""Tiny random ESRGAN-family upscalers and what spandrel (the loader ComfyUI uses) makes of them.

    /root/venv-ref/bin/python tests/reference/make_upscalers.py

(torch 2.15.0, spandrel 0.4.2 with einops, safetensors, Pillow; CPU, float32; byte-identical on every run.) Reads
tests/fixtures/images/init.png and deletes and rewrites only tests/fixtures/upscalers/:

    rrdb_x4_old.safetensors     RRDBNet (ESRGAN) in the old key names (model.0, model.1.sub.N.RDBk.convj.0, ...), x4
    rrdb_x2_new.safetensors     RRDBNet in the new names (conv_first, body.N.rdbk.convj, conv_body, conv_up1, conv_hr,
                                conv_last), x2
    anime_6b_x4.safetensors     the 6-block variant (RealESRGAN_x4plus_anime_6B's shape), new names, x4
    realesrgan_x2plus.pth       Real-ESRGAN x2plus: pixel-unshuffled input (12 channels), two upconvs, scale 2;
                                torch.save({"params_ema": ..., "params": ...}) as the official file
    compact_x4.safetensors      SRVGGNetCompact (realesr-general-x4v3's shape: convs with PReLU, pixel shuffle)
    cases.json + *.png          spandrel's output on a 32x24 crop of init.png, and what it detects

Every model is 8 features wide. Real RRDBNets grow their dense blocks by 32 channels (spandrel hard-codes gc=32);
these grow by 4, so that six blocks fit the fixture budget: spandrel's RRDB class is built with gc=4 here, and
sdgen reads the growth from the tensors. Pixels go in as RGB in [0, 1] (as spandrel, ComfyUI and Real-ESRGAN feed
them) and come out clamped to [0, 1], times 255, rounded.
"""

import functools
import hashlib
import json
import shutil
import sys
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import spandrel
from spandrel.architectures.__arch_helpers import block as B

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "upscalers"
GROWTH = 4
FEATURES = 8
B.RRDB.__init__ = functools.partialmethod(B.RRDB.__init__, gc=GROWTH)  # see the docstring
_RDB = B.ResidualDenseBlock_5C.__init__
B.ResidualDenseBlock_5C.__init__ = lambda self, nf=64, kernel_size=3, gc=32, *a, **k: _RDB(
    self, nf, kernel_size, GROWTH, *a, **k)


def fp16_randn(name, shape, scale):
    g = torch.Generator().manual_seed(zlib.crc32(("upscaler." + name).encode()))
    return (scale * torch.randn(shape, generator=g)).half().float()


@torch.no_grad()
def randomise(model, tag):
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_(fp16_randn(f"{tag}.{name}", p.shape, 0.05))
        elif p.ndim == 1:  # PReLU slopes
            p.copy_(fp16_randn(f"{tag}.{name}", p.shape, 0.05) + 0.25)
        else:
            fan_in = p[0].numel()
            p.copy_(fp16_randn(f"{tag}.{name}", p.shape, 1.0 / fan_in ** 0.5))
    return model


def old_to_new(sd, num_blocks, upconvs):
    """Old ESRGAN names -> the new (Real-ESRGAN) ones; spandrel maps the other way when it loads."""
    out = OrderedDict()
    last = 3 * upconvs
    for k, v in sd.items():
        parts = k.split(".")
        if k.startswith("model.0."):
            nk = "conv_first." + parts[-1]
        elif k.startswith("model.1.sub.") and parts[3] == str(num_blocks):
            nk = "conv_body." + parts[-1]
        elif k.startswith("model.1.sub."):
            nk = f"body.{parts[3]}.rdb{parts[4][3:]}.{parts[5]}.{parts[-1]}"
        elif int(parts[1]) in range(3, last + 1, 3):
            nk = f"conv_up{int(parts[1]) // 3}.{parts[-1]}"
        elif int(parts[1]) == last + 2:
            nk = "conv_hr." + parts[-1]
        elif int(parts[1]) == last + 4:
            nk = "conv_last." + parts[-1]
        else:
            raise KeyError(k)
        out[nk] = v
    return out


@torch.no_grad()
def rrdb(tag, num_blocks, scale, in_nc=3, shuffle=None):
    from spandrel.architectures.ESRGAN import ESRGAN
    model = ESRGAN(in_nc=in_nc, out_nc=3, num_filters=FEATURES, num_blocks=num_blocks, scale=scale,
                   shuffle_factor=shuffle)
    randomise(model, tag).eval()
    # The last convolution makes the image itself: centred on mid-grey and gentle, so that little is clipped.
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    last.weight.mul_(0.25)
    last.bias.add_(0.5)
    return model


def compact(tag, num_conv, scale):
    from spandrel.architectures.Compact import Compact
    return randomise(Compact(num_in_ch=3, num_out_ch=3, num_feat=FEATURES, num_conv=num_conv, upscale=scale), tag).eval()


def image():
    img = np.asarray(Image.open(FIXTURES / "images" / "init.png").convert("RGB"))
    return img[20:44, 16:48]  # 32 wide, 24 high


@torch.no_grad()
def run(descriptor, u8):
    x = torch.from_numpy(u8.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    y = descriptor(x)
    return np.round(y[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    models = {}
    # (file, model, state dict as written, what sdgen must detect)
    m = rrdb("x4old", 2, 4)
    models["rrdb_x4_old.safetensors"] = (m.state_dict(), dict(arch="RRDBNet", scale=4, blocks=2, naming="old"))
    m = rrdb("x2new", 1, 2)
    models["rrdb_x2_new.safetensors"] = (old_to_new(m.state_dict(), 1, 1),
                                         dict(arch="RRDBNet", scale=2, blocks=1, naming="new"))
    m = rrdb("anime6b", 6, 4)
    models["anime_6b_x4.safetensors"] = (old_to_new(m.state_dict(), 6, 2),
                                         dict(arch="RRDBNet", scale=4, blocks=6, naming="new"))
    m = rrdb("x2plus", 1, 4, in_nc=12, shuffle=2)
    models["realesrgan_x2plus.pth"] = (old_to_new(m.state_dict(), 1, 2),
                                       dict(arch="RRDBNet", scale=2, blocks=1, naming="new", unshuffle=2))
    m = compact("compact", 2, 4)
    models["compact_x4.safetensors"] = (m.state_dict(), dict(arch="SRVGGNetCompact", scale=4, blocks=2))
    src = image()
    Image.fromarray(src).save(OUT / "input.png")
    cases = {}
    for name, (sd, detect) in models.items():
        sd = OrderedDict((k, v.half().contiguous()) for k, v in sd.items())
        path = OUT / name
        if name.endswith(".pth"):
            # As the official Real-ESRGAN files: both weight sets, params_ema the one to use.
            noise = OrderedDict((k, (v.float() + 0.5).half()) for k, v in sd.items())
            torch.save({"params_ema": sd, "params": noise}, path)
            loaded = torch.load(path, weights_only=True)
        else:
            save_file(sd, str(path), metadata={"format": "pt"})
            loaded = load_file(str(path))
        desc = spandrel.ModelLoader(device="cpu").load_from_state_dict(loaded).eval()
        desc.model.float()
        assert desc.scale == detect["scale"], (name, desc.scale)
        if detect["arch"] == "RRDBNet":
            assert f"{detect['blocks']}nb" in desc.tags, (name, desc.tags)
        out = run(desc, src)
        png = name.split(".")[0] + ".png"
        Image.fromarray(out).save(OUT / png)
        assert out.shape == (24 * detect["scale"], 32 * detect["scale"], 3)
        assert out.std() > 5 and (out == 0).mean() < 0.05 and (out == 255).mean() < 0.05, (name, out.std())
        cases[name] = dict(detect, png=png, spandrel_architecture=desc.architecture.id, spandrel_tags=desc.tags,
                           parameters=sum(v.numel() for v in sd.values()))
        print(f"{name}: {desc.architecture.id} x{desc.scale} {desc.tags}, std {out.std():.1f}")
    # A1111's Lanczos / Nearest upscalers at 2.5x (modules/upscaler.py): resize to int(side * 2.5), then Lanczos to
    # the target, the side * 2.5 rounded down to a multiple of 8: 32 x 24 -> 80 x 60 -> 80 x 56.
    pil = Image.fromarray(src)
    resamplers = {}
    for name, f in (("lanczos", Image.LANCZOS), ("nearest", Image.NEAREST)):
        out = pil.resize((80, 60), f).resize((80, 56), Image.LANCZOS)
        out.save(OUT / f"a1111_{name}_2.5.png")
        resamplers[name] = f"a1111_{name}_2.5.png"
    meta = {"produced_by": "tests/reference/make_upscalers.py", "spandrel": spandrel.__version__,
            "torch": torch.__version__, "input": "input.png (init.png[20:44, 16:48]: 32 x 24)",
            "conversion": "RGB / 255 in, clamp(0, 1) * 255 rounded out, float32", "growth_channels": GROWTH,
            "cases": cases,
            "resamplers_2.5x": {"files": resamplers, "how": "Image.resize((80, 60), LANCZOS or NEAREST), then "
                                "resize((80, 56), LANCZOS): A1111's Upscaler.upscale with scale 2.5 on 32 x 24"}}
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    for p in OUT.iterdir():
        p.chmod(0o644)
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{total} bytes")


if __name__ == "__main__":
    main()
