#!/usr/bin/env python3
"""Adapter fixtures for tiny-sd1: LoRA (kohya/A1111 and diffusers/PEFT formats), textual-inversion
embeddings (A1111 and diffusers formats), a VAE override (LDM and diffusers names), and the diffusers
reference outputs that use them.

    /root/venv-ref/bin/python tests/reference/make_adapters.py

Needs the environment of make_fixtures.py plus peft (diffusers' LoRA loader requires the PEFT
backend; 0.21.2 was used, installed with --no-deps). Reads tests/fixtures/tiny-sd1/ (made by
make_fixtures.py) and deletes and rewrites only

    tests/fixtures/adapters/                 Lora/, embeddings/, VAE/
    tests/fixtures/reference/adapters/       cases.json, *.png, lora_fused.safetensors, ti_cond.safetensors

Deterministic: fixed seeds, CPU, float32, 2 threads; a second run gives byte-identical files.
See tests/reference/README.md.
"""

import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (sets torch threads to 2, quiets diffusers/transformers)

import diffusers  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.utils.constants import USE_PEFT_BACKEND  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

FIXTURES = mf.FIXTURES
ADAPTERS = FIXTURES / "adapters"
LORA_DIR = ADAPTERS / "Lora"
EMB_DIR = ADAPTERS / "embeddings"
VAE_DIR = ADAPTERS / "VAE"
REF = FIXTURES / "reference" / "adapters"

RANK = 4
ALPHA = 2.0  # kohya .alpha; diffusers scales the delta by alpha / rank = 0.5
LORA_WEIGHT = 0.8  # fuse_lora(lora_scale=...)  ==  A1111 <lora:name:0.8>
LORA_UP_GAIN = 0.6  # lora_up ~ LORA_UP_GAIN * N / sqrt(rank); lora_down ~ N / sqrt(fan_in)
# 3x3 conv LoRAs (LoCon: down [r, C, 3, 3], up [C', r, 1, 1]) on two resnet conv1s.
LOCON_MODULES = ("down_blocks.1.resnets.0.conv1", "up_blocks.0.resnets.0.conv1")
FUSED_MODULES = (  # stored in lora_fused.safetensors as <component>.<module>.weight
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.down_blocks.1.attentions.0.proj_in",  # 1x1 conv LoRA
    "unet.down_blocks.1.resnets.0.conv1",  # 3x3 conv LoCon
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
)
TI_PROMPT = "a photo of tinyemb and onevec, best quality"
TI_STD = 0.5  # like tiny-sd1's token embeddings
VAE_PREFIX = "vae_override."  # seed prefix of the override VAE (tiny-sd1's is "vae.")

BASE_CASE = dict(prompt="a photo of a cat", negative_prompt="", seed=42, steps=6, cfg_scale=7.5, width=64, height=64,
                 sampler="euler")
MIN_LORA_MAX_DIFF = 30  # levels: a LoRA / VAE image must differ from base.png by more than this somewhere
MAX_LORA_MEAN_DIFF = 40.0  # ... but not wildly (mean abs)
MIN_TI_MEAN_DIFF = 5.0  # levels: the TI image against the same prompt without embeddings


def log(*a):
    print(*a, flush=True)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fp16_randn(name, shape, scale):
    return (scale * mf.randn(name, shape)).half().float()


def load_pipe():
    return mf.load_folder_pipeline()


def run(pipe, prompt=None):
    c = BASE_CASE
    case = ("x", prompt or c["prompt"], c["negative_prompt"], c["seed"], c["steps"], c["cfg_scale"], c["width"],
            c["height"], c["sampler"])
    return mf.to_uint8(mf.run_case(pipe, case))


def save_png(u8, name):
    path = REF / name
    Image.fromarray(u8).save(path)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), u8), name
    return u8


def diff(a, b):
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return int(d.max()), float(d.mean())


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------

UNET_LORA_RE = re.compile(
    r"(.+\.transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
    r"|.+\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)"
    r"|.+\.attentions\.\d+\.(proj_in|proj_out))"
)
TE_LORA_RE = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


def lora_targets(pipe):
    """[(component, module name, module)], UNet first, in named_modules order."""
    out = []
    for name, mod in pipe.unet.named_modules():
        if UNET_LORA_RE.fullmatch(name) or name in LOCON_MODULES:
            out.append(("unet", name, mod))
    for name, mod in pipe.text_encoder.named_modules():
        # transformers 5's CLIPTextModel has no text_model wrapper; LoRA files (kohya and diffusers
        # alike) name its modules text_model.encoder.layers.N.*, as transformers 4 did.
        name = name if name.startswith("text_model.") else "text_model." + name
        if TE_LORA_RE.fullmatch(name):
            out.append(("text_encoder", name, mod))
    assert sum(1 for c, n, _ in out if n in LOCON_MODULES) == len(LOCON_MODULES)
    return out


def make_lora(targets):
    """{(component, name): (down, up)} in float32 with fp16-exact values (kohya naming: down = A, up = B)."""
    deltas = {}
    for comp, name, mod in targets:
        w = mod.weight
        if w.ndim == 2:
            down_shape, up_shape = (RANK, w.shape[1]), (w.shape[0], RANK)
        else:  # conv: down keeps the kernel, up is 1x1
            down_shape, up_shape = (RANK, w.shape[1], w.shape[2], w.shape[3]), (w.shape[0], RANK, 1, 1)
        fan_in = int(np.prod(down_shape[1:]))
        down = fp16_randn(f"lora.{comp}.{name}.down", down_shape, 1.0 / fan_in**0.5)
        up = fp16_randn(f"lora.{comp}.{name}.up", up_shape, LORA_UP_GAIN / RANK**0.5)
        deltas[(comp, name)] = (down, up)
    return deltas


def kohya_name(comp, name):
    return ("lora_unet_" if comp == "unet" else "lora_te_") + name.replace(".", "_")


def kohya_state_dict(deltas):
    sd = {}
    for (comp, name), (down, up) in deltas.items():
        k = kohya_name(comp, name)
        sd[k + ".lora_down.weight"] = down.half()
        sd[k + ".lora_up.weight"] = up.half()
        sd[k + ".alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    return sd


def peft_state_dict(deltas):
    """diffusers' save_lora_weights layout; no alpha is stored, so diffusers uses lora_alpha = rank (scale 1):
    alpha/rank (= 0.5, exact in binary) is baked into lora_B."""
    sd = {}
    for (comp, name), (down, up) in deltas.items():
        name = peft_module_name(comp, name)
        sd[f"{comp}.{name}.lora_A.weight"] = down.clone()
        sd[f"{comp}.{name}.lora_B.weight"] = up * (ALPHA / RANK)
    return sd


def peft_module_name(comp, name):
    """The module path as get_peft_model_state_dict sees it: transformers 5's CLIPTextModel has no
    text_model wrapper, so save_lora_weights writes text_encoder.encoder.layers.N.* (files written with
    transformers 4 say text_encoder.text_model.encoder.layers.N.*; diffusers loads both)."""
    return name.removeprefix("text_model.") if comp == "text_encoder" else name


def fused_key(full):
    comp, name = full.split(".", 1)
    return f"{comp}.{peft_module_name(comp, name)}"


def delta_weight(down, up):
    """up @ down in float64 (the conv form for a kxk down and a 1x1 up)."""
    d, u = down.double(), up.double()
    if d.ndim == 2:
        return u @ d
    return torch.einsum("or,rckl->ockl", u[:, :, 0, 0], d)


def mismatch_state_dict(deltas):
    """Half of the modules valid (every other one, the same tensors as tiny_kohya), half renamed to
    modules that do not exist (block/layer index out of range)."""
    sd, valid, invalid = {}, [], []
    for i, ((comp, name), (down, up)) in enumerate(deltas.items()):
        k = kohya_name(comp, name)
        if i % 2:
            if comp == "unet":  # block i -> 7 + i (tiny-sd1 has 3), mid attention 0 -> 3, resnet 0 -> 5
                k = re.sub(r"^lora_unet_(down|up)_blocks_(\d+)_", lambda m: f"lora_unet_{m[1]}_blocks_{7 + int(m[2])}_", k)
                k = k.replace("lora_unet_mid_block_attentions_0_", "lora_unet_mid_block_attentions_3_")
                k = k.replace("lora_unet_mid_block_resnets_0_", "lora_unet_mid_block_resnets_5_")
            else:  # layer i -> 5 + i (tiny-sd1 has 2)
                k = re.sub(r"_layers_(\d+)_", lambda m: f"_layers_{5 + int(m[1])}_", k)
            assert k != kohya_name(comp, name) and k not in invalid, k
            invalid.append(k)
        else:
            valid.append(k)
        sd[k + ".lora_down.weight"] = down.half()
        sd[k + ".lora_up.weight"] = up.half()
        sd[k + ".alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    assert len(sd) == 3 * len(deltas)
    return sd, valid, invalid


def module_weight(pipe, full):
    comp, name = full.split(".", 1)
    model = getattr(pipe, comp)
    if comp == "text_encoder" and not hasattr(model, "text_model"):
        name = name.removeprefix("text_model.")
    mod = model.get_submodule(name)
    w = mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight
    return w.detach().clone()


def check_fused(pipe_fused, pipe_base, deltas, what, only=None):
    """Every LoRA module's fused weight equals W + alpha/rank * weight * up@down (float64 reference)."""
    worst = 0.0
    for (comp, name), (down, up) in deltas.items():
        if only is not None and (comp, name) not in only:
            continue
        w0 = module_weight(pipe_base, f"{comp}.{name}").double()
        want = w0 + ALPHA / RANK * LORA_WEIGHT * delta_weight(down, up)
        got = module_weight(pipe_fused, f"{comp}.{name}").double()
        err = float((got - want).abs().max() / want.abs().max())
        worst = max(worst, err)
        assert err < 1e-6, f"{what}: {comp}.{name} fused weight off by {err:.3g} (relative)"
    log(f"  {what}: fused weights of {len(only) if only is not None else len(deltas)} modules match "
        f"W + {ALPHA / RANK * LORA_WEIGHT:g} * up@down (worst relative {worst:.2g})")


def sorted_table(message):
    """transformers' LOAD REPORT lists keys in set order, which changes from run to run (string hashing): the
    table's rows sorted, so the recorded (truncated) message is the same on every run."""
    lines = message.split("\n")
    seps = [i for i, line in enumerate(lines) if set(line.strip()) <= set("-+|") and "-" in line]
    if not seps:
        return message
    body = seps[0] + 1
    end = body
    while end < len(lines) and "|" in lines[end]:
        end += 1
    return "\n".join(lines[:body] + sorted(lines[body:end]) + lines[end:])


class CaptureWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def load_lora_fused(path_or_dict):
    pipe = load_pipe()
    pipe.load_lora_weights(path_or_dict if isinstance(path_or_dict, dict) else str(path_or_dict))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=LORA_WEIGHT)
    return pipe


# --------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------


@torch.no_grad()
def build_override_vae():
    vae = AutoencoderKL(**mf.VAE_CONFIG)
    mf.init_random(vae, VAE_PREFIX)
    vae.decoder.conv_out.weight.mul_(mf.VAE_OUT_GAIN)
    mf.round_to_fp16(vae)
    return vae.eval()


def vae_ldm_state_dict(vae):
    cfg = dict(vae.config)
    sd = {}
    for k, v in vae.state_dict().items():
        lk = mf.vae_key_to_ldm(k, cfg)
        v = v.half()
        if ".mid.attn_1." in lk and lk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM stores the VAE attention projections as 1x1 convs
        assert lk not in sd
        sd[lk] = v.contiguous()
    return sd


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main():
    t0 = time.time()
    assert USE_PEFT_BACKEND, "diffusers' LoRA loading needs peft"
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "safetensors": safetensors.__version__, "numpy": np.__version__}
    log(", ".join(f"{k} {v}" for k, v in versions.items()))
    for d in (ADAPTERS, REF):
        if d.exists():
            shutil.rmtree(d)
    for d in (LORA_DIR, EMB_DIR, VAE_DIR, REF):
        d.mkdir(parents=True)

    images = {}
    base_pipe = load_pipe()
    base = save_png(run(base_pipe), "base.png")
    images["base"] = base

    # ---- LoRA ----------------------------------------------------------------------------
    log("LoRA")
    targets = lora_targets(base_pipe)
    deltas = make_lora(targets)
    kohya_path, peft_path, mis_path = (LORA_DIR / "tiny_kohya.safetensors", LORA_DIR / "tiny_peft.safetensors",
                                       LORA_DIR / "tiny_mismatch.safetensors")
    save_file(kohya_state_dict(deltas), str(kohya_path))
    save_file(peft_state_dict(deltas), str(peft_path), metadata={"format": "pt"})  # as save_lora_weights
    mis_sd, mis_valid, mis_invalid = mismatch_state_dict(deltas)
    save_file(mis_sd, str(mis_path))
    n_unet = sum(1 for c, _ in deltas if c == "unet")
    log(f"  {len(deltas)} modules ({n_unet} UNet incl. {len(LOCON_MODULES)} 3x3 LoCon, {len(deltas) - n_unet} text encoder)")

    pipe_k = load_lora_fused(kohya_path)
    check_fused(pipe_k, base_pipe, deltas, "kohya")
    lora_kohya = save_png(run(pipe_k), "lora_kohya.png")
    save_file({f"{fused_key(m)}.weight": module_weight(pipe_k, m).contiguous() for m in FUSED_MODULES},
              str(REF / "lora_fused.safetensors"))
    # The first UNet output and the text encoder with the fused LoRA differ from the base ones.
    ids = base_pipe.tokenizer(BASE_CASE["prompt"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        te_rel = float((pipe_k.text_encoder(ids)[0] - base_pipe.text_encoder(ids)[0]).norm()
                       / base_pipe.text_encoder(ids)[0].norm())
    log(f"  text encoder output moved by {100 * te_rel:.1f} % (relative L2) with the LoRA")
    assert te_rel > 0.05, "text-encoder LoRA not applied"
    # tiny_peft.safetensors has exactly the keys, shapes, dtypes and metadata that save_lora_weights writes
    # for the kohya adapter diffusers loaded; lora_A is the same, lora_B is alpha/rank times lora_up.
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=get_peft_model_state_dict(pipe_k.unet, adapter_name="default_0"),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe_k.text_encoder, adapter_name="default_0"))
        saved_path = Path(tmp) / "pytorch_lora_weights.safetensors"
        saved = load_file(str(saved_path))
        with safe_open(str(saved_path), "pt") as f:
            saved_meta = f.metadata()
    mine = load_file(str(peft_path))
    with safe_open(str(peft_path), "pt") as f:
        assert f.metadata() == saved_meta, (f.metadata(), saved_meta)
    assert sorted(saved) == sorted(mine), set(saved) ^ set(mine)
    for k, v in saved.items():
        want = v * (ALPHA / RANK) if ".lora_B." in k else v
        assert v.dtype == mine[k].dtype and torch.equal(want, mine[k]), k
    log(f"  tiny_peft.safetensors = save_lora_weights' keys ({len(mine)}), dtypes and metadata {saved_meta}")
    del pipe_k

    pipe_p = load_lora_fused(peft_path)
    check_fused(pipe_p, base_pipe, deltas, "peft")
    lora_peft = save_png(run(pipe_p), "lora_peft.png")
    pipe_p_te = {k: v.clone() for k, v in pipe_p.text_encoder.state_dict().items()}
    del pipe_p
    # The older text-encoder spelling (transformers 4: text_encoder.text_model.encoder...) loads the same.
    pipe_o = load_lora_fused({k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder."): v
                              for k, v in load_file(str(peft_path)).items()})
    for k, v in pipe_o.text_encoder.state_dict().items():
        assert torch.equal(v, pipe_p_te[k]), k
    log("  text_encoder.text_model.encoder.* keys fuse to the same text encoder")
    del pipe_o, pipe_p_te
    kp = diff(lora_kohya, lora_peft)
    log(f"  kohya vs peft image: max {kp[0]}, mean {kp[1]:.3f} levels")
    assert kp[0] <= 1, "the two LoRA formats disagree"

    # Mismatched file: diffusers applies the valid half and warns about the rest.
    handler = CaptureWarnings()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    saved_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as py_warnings:
        warnings.simplefilter("always")
        pipe_m = load_lora_fused(mis_path)
    for lg, lvl in zip(loggers, saved_levels):
        lg.removeHandler(handler)
        lg.setLevel(lvl)
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    mis_messages = [sorted_table(ansi.sub("", m))[:300] for m in handler.records + [str(w.message) for w in py_warnings]]
    for m in mis_messages:
        log(f"  mismatch warning: {m}")
    valid_keys = {kohya_name(c, n) for c, n in deltas} & set(mis_valid)
    assert valid_keys == set(mis_valid)
    valid_modules = {(c, n) for c, n in deltas if kohya_name(c, n) in valid_keys}
    check_fused(pipe_m, base_pipe, deltas, "mismatch (valid half)", only=valid_modules)
    for c, n in deltas:  # the other half stays untouched
        if (c, n) not in valid_modules:
            assert torch.equal(module_weight(pipe_m, f"{c}.{n}"), module_weight(base_pipe, f"{c}.{n}")), (c, n)
    lora_mismatch = save_png(run(pipe_m), "lora_mismatch.png")
    del pipe_m
    images.update(lora_kohya=lora_kohya, lora_peft=lora_peft, lora_mismatch=lora_mismatch)

    # ---- Textual inversion -----------------------------------------------------------------
    log("textual inversion")
    tinyemb = fp16_randn("ti.tinyemb", (2, 64), TI_STD)
    onevec = fp16_randn("ti.onevec", (1, 64), TI_STD)
    save_file({"emb_params": tinyemb.half()}, str(EMB_DIR / "tinyemb.safetensors"))  # A1111 safetensors format
    save_file({"onevec": onevec.clone()}, str(EMB_DIR / "onevec.safetensors"))  # diffusers format, float32
    pipe_t = load_pipe()
    pipe_t.load_textual_inversion(str(EMB_DIR / "tinyemb.safetensors"), token="tinyemb")
    pipe_t.load_textual_inversion(str(EMB_DIR / "onevec.safetensors"))
    tok = pipe_t.tokenizer
    added = {t: tok.convert_tokens_to_ids(t) for t in ("tinyemb", "tinyemb_1", "onevec")}
    v = mf.TINY_VOCAB  # the added tokens get the next ids
    assert added == {"tinyemb": v, "tinyemb_1": v + 1, "onevec": v + 2}, added
    expanded = pipe_t.maybe_convert_prompt(TI_PROMPT, tok)
    assert expanded == "a photo of tinyemb tinyemb_1 and onevec, best quality", expanded
    ti_ids = tok(expanded, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    plain = base_pipe.tokenizer("a photo of", add_special_tokens=False).input_ids
    rest = base_pipe.tokenizer("and", add_special_tokens=False).input_ids
    tail = base_pipe.tokenizer(", best quality", add_special_tokens=False).input_ids
    want_ids = [mf.BOS_ID] + plain + [v, v + 1] + rest + [v + 2] + tail + [mf.EOS_ID]
    assert ti_ids[0, : len(want_ids)].tolist() == want_ids, (ti_ids[0, :24].tolist(), want_ids)
    assert torch.all(ti_ids[0, len(want_ids):] == mf.EOS_ID)
    emb = pipe_t.text_encoder.get_input_embeddings().weight
    assert torch.equal(emb[v], tinyemb[0]) and torch.equal(emb[v + 1], tinyemb[1])
    assert torch.equal(emb[v + 2], onevec[0])
    with torch.no_grad():
        ti_cond = pipe_t.text_encoder(ti_ids)[0]
        pe, _ = pipe_t.encode_prompt(TI_PROMPT, "cpu", 1, False)
    assert torch.equal(pe, ti_cond), "encode_prompt differs from text_encoder(expanded ids)"
    save_file({"input_ids": ti_ids.contiguous(), "cond": ti_cond.contiguous()}, str(REF / "ti_cond.safetensors"))
    ti = save_png(run(pipe_t, TI_PROMPT), "ti.png")
    del pipe_t
    ti_plain = run(base_pipe, TI_PROMPT)  # the same prompt without embeddings (sensitivity only; not saved)
    images["ti"] = ti

    # ---- VAE override ----------------------------------------------------------------------
    log("VAE override")
    vae = build_override_vae()
    mf.check_weights("vae_override", vae.state_dict())
    for k, v in vae.state_dict().items():
        assert not torch.equal(v, base_pipe.vae.state_dict()[k]), f"override VAE {k} equals tiny-sd1's"
    ldm_path, dif_path = VAE_DIR / "tiny_vae_ldm.safetensors", VAE_DIR / "tiny_vae_diffusers.safetensors"
    save_file(vae_ldm_state_dict(vae), str(ldm_path))
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, str(dif_path))
    vae_single = AutoencoderKL.from_single_file(str(ldm_path), config=str(mf.MODEL_DIR), subfolder="vae",
                                                local_files_only=True, torch_dtype=torch.float32).eval()
    n_vae = mf.state_dicts_equal(vae_single, vae, "VAE from_single_file(tiny_vae_ldm) vs built")
    vae_dif = AutoencoderKL(**mf.VAE_CONFIG)
    vae_dif.load_state_dict({k: v.float() for k, v in load_file(str(dif_path)).items()})
    mf.state_dicts_equal(vae_dif.eval(), vae, "tiny_vae_diffusers vs built")
    log(f"  from_single_file(tiny_vae_ldm.safetensors): {n_vae} tensors equal the built VAE")
    pipe_v = load_pipe()
    pipe_v.vae = vae_single
    vae_img = save_png(run(pipe_v), "vae.png")
    del pipe_v
    images["vae"] = vae_img

    # ---- checks ------------------------------------------------------------------------------
    log("image statistics")
    mf.check_image_statistics(images)
    diffs = {
        "lora_kohya vs base": diff(lora_kohya, base),
        "lora_peft vs base": diff(lora_peft, base),
        "lora_mismatch vs base": diff(lora_mismatch, base),
        "lora_mismatch vs lora_kohya": diff(lora_mismatch, lora_kohya),
        "ti vs same prompt without embeddings": diff(ti, ti_plain),
        "vae vs base": diff(vae_img, base),
    }
    for k, (mx, mean) in diffs.items():
        log(f"  {k:38s} max {mx:4d}  mean {mean:6.2f}")
    for k in ("lora_kohya vs base", "lora_mismatch vs base", "lora_mismatch vs lora_kohya"):
        assert diffs[k][0] > MIN_LORA_MAX_DIFF and diffs[k][1] < MAX_LORA_MEAN_DIFF, k
    assert diffs["vae vs base"][0] > MIN_LORA_MAX_DIFF and diffs["vae vs base"][1] >= MIN_TI_MEAN_DIFF
    assert diffs["ti vs same prompt without embeddings"][1] >= MIN_TI_MEAN_DIFF

    # ---- cases.json --------------------------------------------------------------------------
    def rel(p):
        return str(Path(p).relative_to(mf.ROOT))

    files = {rel(p): {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in sorted(ADAPTERS.rglob("*.safetensors"))}

    def case(name, png, prompt=BASE_CASE["prompt"], **extra):
        c = dict(name=name, **dict(BASE_CASE, prompt=prompt), loras=[], embeddings=[], vae=None)
        c.update(extra)
        c["png"] = png
        return c

    lora_entry = lambda p: [{"file": rel(p), "weight": LORA_WEIGHT}]  # noqa: E731
    doc = {
        "model": "tests/fixtures/tiny-sd1",
        "produced_by": "tests/reference/make_adapters.py",
        **versions,
        "dtype": "float32",
        "device": "cpu",
        "pixel_conversion": "round(clip(x, 0, 1) * 255) of diffusers' output_type='np'",
        "pipeline": "StableDiffusionPipeline (load_folder_pipeline in make_fixtures.py); scheduler "
                    "EulerDiscreteScheduler.from_config(SD 1.5's scheduler config); generator "
                    "torch.Generator('cpu').manual_seed(seed); negative_prompt '' (an empty string, not None)",
        "lora": {
            "rank": RANK,
            "alpha": ALPHA,
            "weight": LORA_WEIGHT,
            "diffusers_calls": ["pipe.load_lora_weights(file)",
                                "pipe.fuse_lora(components=['unet', 'text_encoder'], lora_scale=0.8)"],
            "formula": "W' = W + weight * alpha / rank * (up @ down) = W + 0.8 * 0.5 * (up @ down) = W + 0.4 * (up @ down)",
            "conv": "down [r, C, kh, kw] (kh = kw = 1 for proj_in/proj_out, 3 for the LoCon conv1s), up [C', r, 1, 1]: "
                    "delta[o, c, y, x] = sum_r up[o, r] * down[r, c, y, x]",
            "kohya_file": "lora_<unet|te>_<diffusers module path, '.' -> '_'>.{lora_down.weight, lora_up.weight, alpha}; "
                          "float16; alpha is a float16 scalar 2.0; diffusers converts it to network_alphas and uses "
                          "lora_alpha = alpha, scaling = alpha / rank",
            "peft_file": "<unet|text_encoder>.<module path>.{lora_A.weight, lora_B.weight}, exactly the keys, "
                         "dtypes and header metadata ({'format': 'pt'}) that save_lora_weights writes with these "
                         "versions (checked): text-encoder modules are text_encoder.encoder.layers.N.* because "
                         "transformers 5's CLIPTextModel has no text_model wrapper (older files say "
                         "text_encoder.text_model.encoder.layers.N.*; diffusers fuses both to the same weights, "
                         "checked); float32; no alpha and no lora_adapter_metadata, so "
                         "diffusers uses lora_alpha = rank (scaling 1): lora_B = 0.5 * kohya lora_up (exact), "
                         "lora_A = kohya lora_down; the effective delta equals the kohya file's",
            "modules": [f"{c}.{n}" for c, n in deltas],
            "modules_note": "kohya spelling of the module paths (text_model.encoder...); the peft file and "
                            "lora_fused.safetensors drop the text_model. of text-encoder modules",
            "locon_modules": [f"unet.{n}" for n in LOCON_MODULES],
            "fused_check": "every module's fused weight equals the float64 formula within 1e-6 relative, for both files",
            "lora_fused_safetensors": "float32 fused weights (kohya file, weight 0.8) of " + ", ".join(
                fused_key(m) for m in FUSED_MODULES) + " (key = module + '.weight', tiny-sd1's own tensor names)",
            "kohya_vs_peft_image": {"max": kp[0], "mean": round(kp[1], 4)},
            "mismatch": {
                "file": rel(mis_path),
                "valid_modules": sorted(mis_valid),
                "invalid_modules": sorted(mis_invalid),
                "construction": "modules in deltas order; even positions keep their name (the same tensors as "
                                "tiny_kohya), odd positions get a block index 7 (UNet down/up), mid-block "
                                "attentions_3/resnets_5, or text-encoder layer 5, none of which exist",
                "diffusers_behaviour": "load_lora_weights + fuse_lora apply the valid half and leave the other "
                                       "modules unchanged (checked); messages: " + json.dumps(mis_messages),
            },
        },
        "textual_inversion": {
            "files": {
                rel(EMB_DIR / "tinyemb.safetensors"): "A1111 safetensors format: one key 'emb_params', float16 [2, 64]",
                rel(EMB_DIR / "onevec.safetensors"): "diffusers format (as textual_inversion.py saves it): one key "
                                                     "'onevec' = the token, float32 [1, 64]",
            },
            "diffusers_calls": ["pipe.load_textual_inversion('tests/fixtures/adapters/embeddings/tinyemb.safetensors', token='tinyemb')",
                                "pipe.load_textual_inversion('tests/fixtures/adapters/embeddings/onevec.safetensors')"],
            "added_tokens": added,
            "expanded_prompt": expanded,
            "note": "diffusers adds tokens tinyemb, tinyemb_1 (one per vector) and onevec and rewrites the prompt "
                    "(maybe_convert_prompt); A1111 matches the embedding file's stem as a word and splices its "
                    "vectors in at that position. Both give the same token-embedding sequence for this prompt.",
            "ti_cond_safetensors": f"input_ids int64 [1, 77] (expanded prompt, padded with {mf.EOS_ID}); cond float32 "
                                   "[1, 77, 64] = text_encoder(input_ids).last_hidden_state",
        },
        "vae": {
            "files": {
                rel(ldm_path): "LDM names without the first_stage_model. prefix (encoder.*, decoder.*, quant_conv.*, "
                               "post_quant_conv.*; mid.attn_1.{q,k,v,proj_out}.weight as [C, C, 1, 1]); float16",
                rel(dif_path): "diffusers AutoencoderKL names (mid_block.attentions.0.to_q.weight as [C, C]); float16",
            },
            "config": "tiny-sd1/vae/config.json (scaling_factor 0.18215)",
            "weights": f"make_fixtures.py's VAE recipe with seed prefix {VAE_PREFIX!r} instead of 'vae.'",
            "diffusers_calls": ["AutoencoderKL.from_single_file('tests/fixtures/adapters/VAE/tiny_vae_ldm.safetensors', "
                                "config='tests/fixtures/tiny-sd1', subfolder='vae', local_files_only=True, "
                                "torch_dtype=torch.float32)", "pipe.vae = that"],
        },
        "files": files,
        "image_differences": {k: {"max": mx, "mean": round(mean, 3)} for k, (mx, mean) in diffs.items()},
        "cases": [
            case("base", "base.png"),
            case("lora_kohya", "lora_kohya.png", loras=lora_entry(kohya_path)),
            case("lora_peft", "lora_peft.png", loras=lora_entry(peft_path)),
            case("lora_mismatch", "lora_mismatch.png", loras=lora_entry(mis_path)),
            case("ti", "ti.png", prompt=TI_PROMPT, embeddings=[
                {"file": rel(EMB_DIR / "tinyemb.safetensors"), "token": "tinyemb", "vectors": 2},
                {"file": rel(EMB_DIR / "onevec.safetensors"), "token": "onevec", "vectors": 1}]),
            case("vae", "vae.png", vae=rel(ldm_path), vae_alt=rel(dif_path)),
        ],
    }
    (REF / "cases.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")

    for d in (ADAPTERS, REF):
        mf.chmod_tree(d)
    mf.check_file_sizes()
    mf.print_sizes([ADAPTERS, REF])
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
