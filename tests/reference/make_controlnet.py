#!/usr/bin/env python3
"""Tiny ControlNets for SD 1.x and SDXL, and what diffusers' ControlNet pipelines make with them.

Usage (from anywhere; paths come from this file's location):

    /root/venv-ref/bin/python tests/reference/make_controlnet.py

(torch, diffusers, Pillow and opencv-python-headless as pinned in requirements.txt; CPU, float32.)
It deletes and rewrites only:

    tests/fixtures/controlnet/tiny-cn-sd1/            ControlNetModel folder (config.json + F16 safetensors), net A
    tests/fixtures/controlnet/tiny-cn-sd1-pool/       net A's weights (a symlink) with global_pool_conditions: true
    tests/fixtures/controlnet/control_tiny_sd1.safetensors   net B in the original format (`control_model.*`)
    tests/fixtures/controlnet/tiny-cn-sdxl/           ControlNetModel folder for tiny-sdxl, net C
    tests/fixtures/images/control_edges.png           an 80x72 edge map (a control image that is not the output size)
    tests/fixtures/images/control_lines.png           a 56x64 line drawing (the second ControlNet's image)
    tests/fixtures/reference/controlnet/              cases.json, the pipelines' PNGs, canny/ (cv2.Canny maps)

It needs the committed tiny-sd1/, tiny-sdxl/ and images/init.png, small.png.

Each ControlNet is diffusers' `ControlNetModel.from_unet` of the tiny UNet with a narrower conditioning embedding
(8, 8, 16, 16 channels instead of 16, 32, 96, 256, to keep the files small), then every weight randomised (the zero
convolutions too: a trained ControlNet's are not zero) and rounded to fp16 values. The zero convolutions' gain is
chosen so that the ControlNet moves the image far beyond the parity tolerance while sampling stays tame.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402  (sets torch threads, imports diffusers/transformers quietly)
import make_families as mfam  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers import (  # noqa: E402
    ControlNetModel,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)

FIXTURES = mf.FIXTURES
CN = FIXTURES / "controlnet"
NET_A, NET_POOL, NET_B, NET_C = (CN / "tiny-cn-sd1", CN / "tiny-cn-sd1-pool", CN / "control_tiny_sd1.safetensors",
                                 CN / "tiny-cn-sdxl")
IMAGES = FIXTURES / "images"
EDGES, LINES = IMAGES / "control_edges.png", IMAGES / "control_lines.png"
REF = FIXTURES / "reference" / "controlnet"
OUTPUTS = (CN, EDGES, LINES, REF)

EMBEDDING_CHANNELS = (8, 8, 16, 16)
ZERO_GAIN = 0.5  # the zero convolutions' weights, times init_random's
HINT_GAIN = 1.8  # each convolution of the control image's embedding (SiLU halves small values), times init_random's
SEEDS = {"a": "controlnet_a.", "b": "controlnet_b.", "c": "controlnet_c."}
FOX, CASTLE = "a red fox in the snow", mf.CASTLE
MIN_EFFECT = 4.0  # levels: mean |image with ControlNet - without| in every case
MIN_IMAGE_EFFECT = 2.0  # ... and with other control images (mirrored, inverted)


def log(*a):
    print(*a, flush=True)


def diff(a, b):
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return int(d.max()), float(d.mean())


def save_png(u8, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(u8).save(path)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), u8), path


# =====================================================================================================================
# Control images
# =====================================================================================================================


def edge_map():
    """80x72: white outlines (a box, a circle, a diagonal) on black, as an edge detector would give."""
    img = np.zeros((72, 80, 3), np.uint8)
    cv2.rectangle(img, (8, 10), (40, 50), (255, 255, 255), 1)
    cv2.circle(img, (56, 30), 14, (255, 255, 255), 1)
    cv2.line(img, (4, 66), (76, 40), (255, 255, 255), 2)
    return img


def line_drawing():
    """56x64: gray strokes of several widths on white (a scribble)."""
    img = np.full((64, 56, 3), 255, np.uint8)
    cv2.ellipse(img, (28, 22), (18, 12), 20, 0, 300, (40, 40, 40), 3)
    cv2.line(img, (6, 60), (50, 36), (90, 90, 90), 2)
    cv2.line(img, (10, 40), (20, 58), (0, 0, 0), 1)
    return img


def lanczos(u8, size):
    """diffusers' control image processor (and sdgen): Pillow's LANCZOS to (width, height)."""
    return np.asarray(Image.fromarray(u8).resize(size, Image.LANCZOS))


def canny(u8, low=100, high=200):
    """As diffusers' and A1111's examples do: cv2.Canny on RGB uint8, the map replicated to three channels."""
    edges = cv2.Canny(u8, low, high)
    return np.stack([edges] * 3, axis=-1)


def noise_image(w, h, seed):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (h, w, 3), dtype=np.uint8)


CANNY_CASES = [  # (name, source, width, height, low, high): the source resized to WxH, then cv2.Canny
    ("init_64_100_200", "images/init.png", 64, 64, 100, 200),
    ("init_96x80_50_150", "images/init.png", 96, 80, 50, 150),
    ("init_40x56_10_30", "images/init.png", 40, 56, 10, 30),
    ("small_64_100_200", "images/small.png", 64, 64, 100, 200),
    ("lines_64_100_200", "images/control_lines.png", 64, 64, 100, 200),
    ("noise_72x64_200_100", "reference/controlnet/canny/noise.png", 72, 64, 200, 100),
    ("noise_64_0_0", "reference/controlnet/canny/noise.png", 64, 64, 0, 0),
    ("noise_64_300_600", "reference/controlnet/canny/noise.png", 64, 64, 300, 600),
]


def write_canny_cases():
    save_png(noise_image(61, 67, 5), REF / "canny" / "noise.png")
    out = []
    for name, src, w, h, low, high in CANNY_CASES:
        u8 = np.asarray(Image.open(FIXTURES / src).convert("RGB"))
        edges = canny(lanczos(u8, (w, h)), low, high)
        save_png(edges, REF / "canny" / f"{name}.png")
        out.append(dict(name=name, source=src, width=w, height=h, low=low, high=high, png=f"canny/{name}.png",
                        edge_pixels=int((edges[..., 0] > 0).sum())))
        log(f"  canny {name}: {out[-1]['edge_pixels']} edge pixels")
    return out


# =====================================================================================================================
# ControlNets
# =====================================================================================================================


@torch.no_grad()
def build_controlnet(unet, prefix):
    torch.manual_seed(0)  # (from_unet's copied weights and default init are all overwritten)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS)
    mf.init_random(cn, prefix)
    for m in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block]:
        m.weight.mul_(ZERO_GAIN)
    e = cn.controlnet_cond_embedding
    for m in [e.conv_in, *e.blocks, e.conv_out]:
        m.weight.mul_(HINT_GAIN)
    mf.round_to_fp16(cn)
    return cn.eval()


def save_folder(cn, folder: Path):
    folder.mkdir(parents=True)
    cn.save_config(str(folder))
    save_file({k: v.half().contiguous() for k, v in cn.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    loaded = ControlNetModel.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True).eval()
    mf.state_dicts_equal(loaded, cn, folder.name)
    return loaded


def key_to_original(key, cfg):
    """diffusers' ControlNet names -> the original ControlNet's (`control_model.` comes on top)."""
    n = 2 * (len(cfg["conditioning_embedding_out_channels"]) - 1)
    fixed = {
        "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
        "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * (n + 1)}.",
        "controlnet_mid_block.": "middle_block_out.0.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
    }
    for a, b in fixed.items():
        if key.startswith(a):
            return b + key[len(a):]
    parts = key.split(".")
    if parts[0] == "controlnet_cond_embedding" and parts[1] == "blocks":
        return f"input_hint_block.{2 * (int(parts[2]) + 1)}." + ".".join(parts[3:])
    if parts[0] == "controlnet_down_blocks":
        return f"zero_convs.{parts[1]}.0." + ".".join(parts[2:])
    # The UNet's encoder half: its names as in a full checkpoint (up blocks never occur here).
    return mf.unet_key_to_ldm(key, dict(cfg, up_block_types=list(reversed(cfg["down_block_types"]))))


def save_original(cn, path: Path):
    cfg = dict(cn.config)
    sd = {"control_model." + key_to_original(k, cfg): v.half().contiguous() for k, v in cn.state_dict().items()}
    assert len(sd) == len(cn.state_dict())
    save_file(sd, str(path))
    # An independent check of the names: every original-format key the ControlNet 1.0/1.1 files have.
    keys = set(load_file(str(path)))
    assert "control_model.input_hint_block.14.weight" in keys and "control_model.middle_block_out.0.weight" in keys
    assert "control_model.zero_convs.0.0.weight" in keys and "control_model.input_blocks.0.0.weight" in keys


# =====================================================================================================================
# Cases
# =====================================================================================================================


def case(name, nets, steps=6, sampler="euler", seed=42, cfg=5.0, guess=False, preprocess="none", mode="txt2img",
         strength=None, model="tiny-sd1", prompt=FOX, negative="", image=None):
    """nets: [(net, control image, weight, start, end)], nets and images as fixture paths."""
    return dict(name=name, model=model, mode=mode, prompt=prompt, negative_prompt=negative, seed=seed, steps=steps,
                cfg_scale=cfg, width=64, height=64, sampler=sampler, guess_mode=guess, preprocess=preprocess,
                strength=strength, image=image,
                controls=[dict(net=n, image=i, weight=w, start=s, end=e) for n, i, w, s, e in nets],
                png=f"{name}.png")


A, POOL, B, C = ("controlnet/tiny-cn-sd1", "controlnet/tiny-cn-sd1-pool", "controlnet/control_tiny_sd1.safetensors",
                 "controlnet/tiny-cn-sdxl")
E, L, INIT = "images/control_edges.png", "images/control_lines.png", "images/init.png"
CASES = [
    case("one", [(A, E, 1.0, 0.0, 1.0)]),
    case("weight", [(A, E, 0.6, 0.0, 1.0)]),
    case("start_end", [(A, E, 1.0, 0.1, 0.9)]),
    case("single_file", [(B, L, 1.0, 0.0, 1.0)], seed=7),
    case("two", [(A, E, 1.0, 0.0, 1.0), (B, L, 0.8, 0.0, 0.9)]),
    case("guess", [(A, E, 1.0, 0.0, 1.0)], guess=True),
    case("pool", [(POOL, E, 1.0, 0.0, 1.0)]),
    case("canny", [(B, INIT, 1.0, 0.0, 1.0)], preprocess="canny", seed=3),
    case("heun_start_end", [(A, E, 1.0, 0.0, 0.5)], sampler="heun", steps=4),
    case("img2img", [(A, E, 1.0, 0.1, 1.0)], mode="img2img", strength=0.6, prompt=CASTLE, image=INIT),
    case("sdxl", [(C, E, 1.0, 0.0, 1.0)], model="tiny-sdxl"),
    case("sdxl_guess", [(C, L, 0.7, 0.0, 1.0)], model="tiny-sdxl", guess=True, seed=9),
]
SCHEDULERS = {"euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler}


def control_image(c, preprocess):
    u8 = np.asarray(Image.open(FIXTURES / c["image"]).convert("RGB"))
    if preprocess == "canny":
        return Image.fromarray(canny(lanczos(u8, (64, 64))))
    return Image.fromarray(u8)  # the pipeline resizes it (Lanczos, stretched)


@torch.no_grad()
def run(pipes, nets, c, images=None, without_control=False):
    base = pipes[c["model"]]
    xl = c["model"] == "tiny-sdxl"
    config = mfam.XL_SCHEDULER_CONFIG if xl else mf.SCHEDULER_CONFIG
    gen = torch.Generator("cpu").manual_seed(c["seed"])
    kw = dict(prompt=c["prompt"], negative_prompt=(c["negative_prompt"] or None) if xl else c["negative_prompt"],
              num_inference_steps=c["steps"], guidance_scale=c["cfg_scale"], width=c["width"], height=c["height"],
              generator=gen, output_type="np")
    if without_control:
        base.scheduler = SCHEDULERS[c["sampler"]].from_config(config)
        if c["mode"] == "img2img":
            raise ValueError("no plain img2img reference here")
        return mf.to_uint8(base(**kw).images[0])
    models = [nets[x["net"]] for x in c["controls"]]
    images = images or [control_image(x, c["preprocess"]) for x in c["controls"]]
    one = len(models) == 1
    pick = (lambda v: v[0]) if one else (lambda v: v)
    kw.update(controlnet_conditioning_scale=pick([x["weight"] for x in c["controls"]]),
              control_guidance_start=pick([x["start"] for x in c["controls"]]),
              control_guidance_end=pick([x["end"] for x in c["controls"]]), guess_mode=c["guess_mode"])
    if xl:
        pipe = StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=pick(models))
        kw["image"] = pick(images)
    elif c["mode"] == "img2img":
        pipe = StableDiffusionControlNetImg2ImgPipeline.from_pipe(base, controlnet=pick(models))
        # The image goes in as VAE posterior-mean latents, so that encoding draws nothing from the generator (as in
        # make_fixtures' img2img references): sdgen encodes with the mean.
        u8 = np.asarray(Image.open(FIXTURES / c["image"]).convert("RGB"))
        latents = mf.vae_mean(base.vae, mf.pixels_to_tensor(u8)) * base.vae.config.scaling_factor
        kw.update(image=latents, control_image=pick(images), strength=c["strength"])
    else:
        pipe = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=pick(models))
        kw["image"] = pick(images)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SCHEDULERS[c["sampler"]].from_config(config)
    return mf.to_uint8(pipe(**kw).images[0])


def legacy_hash(path: Path):
    """A1111's model_hash: SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def main():
    for p in OUTPUTS:
        mfam.remove(p)
    CN.mkdir(parents=True)
    save_png(edge_map(), EDGES)
    save_png(line_drawing(), LINES)

    sd1 = mf.load_folder_pipeline()
    xl = StableDiffusionXLPipeline.from_pretrained(str(mfam.XL_DIR), dtype=torch.float32, local_files_only=True,
                                                   add_watermarker=False)
    xl.set_progress_bar_config(disable=True)
    pipes = {"tiny-sd1": sd1, "tiny-sdxl": xl}

    net_a = save_folder(build_controlnet(sd1.unet, SEEDS["a"]), NET_A)
    NET_POOL.mkdir()
    config = json.loads((NET_A / "config.json").read_text())
    config["global_pool_conditions"] = True
    (NET_POOL / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.symlink("../tiny-cn-sd1/diffusion_pytorch_model.safetensors", NET_POOL / "diffusion_pytorch_model.safetensors")
    net_pool = ControlNetModel.from_pretrained(str(NET_POOL), torch_dtype=torch.float32, local_files_only=True).eval()
    assert net_pool.config.global_pool_conditions
    net_b = build_controlnet(sd1.unet, SEEDS["b"])
    save_original(net_b, NET_B)
    net_c = save_folder(build_controlnet(xl.unet, SEEDS["c"]), NET_C)
    nets = {A: net_a, POOL: net_pool, B: net_b, C: net_c}

    log("cases (max/mean levels against the same job without ControlNet, and with other control images):")
    cases = []
    for c in CASES:
        img = run(pipes, nets, c)
        save_png(img, REF / c["png"])
        effect = "-"
        if c["mode"] == "txt2img":
            effect = diff(img, run(pipes, nets, c, without_control=True))
            assert effect[1] >= MIN_EFFECT, (c["name"], effect)
        # Other control images (mirrored, inverted) must change the image beyond the tolerance too.
        flipped = [Image.fromarray(255 - np.asarray(control_image(x, c["preprocess"]))[:, ::-1])
                   for x in c["controls"]]
        other = diff(img, run(pipes, nets, c, images=flipped))
        assert other[1] >= MIN_IMAGE_EFFECT, (c["name"], other)
        f = img.astype(np.float64)
        log(f"  {c['name']:16s} mean {f.mean():6.1f} std {f.std():5.1f}  vs none {effect}  vs flipped {other}")
        assert f.std() >= 10 and np.mean((img == 0) | (img == 255)) <= 0.02, c["name"]
        cases.append(c)

    hashes = {p: legacy_hash(FIXTURES / p / "diffusion_pytorch_model.safetensors" if (FIXTURES / p).is_dir()
                             else FIXTURES / p) for p in (A, B, C)}
    hashes["tiny-sdxl.safetensors"] = legacy_hash(FIXTURES / "tiny-sdxl.safetensors")  # a file over 1 MiB
    canny_cases = write_canny_cases()
    mfam.write_json(REF / "cases.json", {"cases": cases, "legacy_hashes": hashes, "canny": canny_cases})
    mf.check_file_sizes()
    total = 0
    for p in OUTPUTS:
        for rel, size in mf.file_sizes(p):
            total += size
    log(f"written: {total} bytes")


if __name__ == "__main__":
    main()
