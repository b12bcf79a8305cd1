#!/usr/bin/env python3
"""Tiny SDXL / SDXL-inpaint / SD 2.x-inpaint models and their diffusers reference outputs.

Usage (from anywhere; paths come from this file's location):

    /root/venv-ref/bin/python tests/reference/make_families.py

(torch 2.15.0, diffusers 0.42.1, transformers 5.23.0, safetensors; CPU, float32, deterministic.)
It deletes and rewrites only:

    tests/fixtures/tiny-sdxl/                  StableDiffusionXLPipeline folder (text encoders -> tiny-sdxl-text,
                                               VAE weights and vocabulary -> tiny-sd1; new UNet, scheduler file)
    tests/fixtures/tiny-sdxl.safetensors       the same model as one SDXL ("sgm") checkpoint
    tests/fixtures/tiny-sdxl-inpaint/          StableDiffusionXLInpaintPipeline folder (9-channel UNet + symlinks)
    tests/fixtures/tiny-sd2-inpaint/           StableDiffusionInpaintPipeline folder, SD 2.x style (symlinks only:
                                               tiny-sd1-inpaint's 9-channel UNet, tiny-sd2's text encoder and VAE)
    tests/fixtures/reference/families/         txt2img.json, edit.json and their PNGs
    tests/fixtures/reference/sdxl/unet.safetensors   one call of tiny-sdxl's UNet (make_sdxl_unet.write_reference)

It needs the existing tiny-sdxl-text/, tiny-sd1/, tiny-sd2/, tiny-sd1-inpaint/ and images/ fixtures and writes
nothing else.
See tests/reference/README.md ("make_families.py").
"""

import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402  (sets torch threads to 2, imports diffusers/transformers quietly)
import make_sdxl_unet  # noqa: E402  (its randomize(): the SDXL UNet recipe)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import diffusers  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

torch.set_num_threads(2)
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

ROOT = mf.ROOT
FIXTURES = mf.FIXTURES
XL_DIR = FIXTURES / "tiny-sdxl"
XL_SINGLE = FIXTURES / "tiny-sdxl.safetensors"
XL_INPAINT_DIR = FIXTURES / "tiny-sdxl-inpaint"
SD2_INPAINT_DIR = FIXTURES / "tiny-sd2-inpaint"
REF = FIXTURES / "reference" / "families"
XL_UNET_REF = FIXTURES / "reference" / "sdxl" / make_sdxl_unet.REF_FILE_NAME
OUTPUTS = (XL_DIR, XL_SINGLE, XL_INPAINT_DIR, SD2_INPAINT_DIR, REF, XL_UNET_REF)
TEXT_DIR = FIXTURES / "tiny-sdxl-text"

# ---- tokenizer ------------------------------------------------------------------------------------------------
# make_fixtures.tiny_vocab_and_merges: CLIP's first 998 tokens + the two specials = the text encoders' vocab_size
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# ---- scheduler / pipeline configs -------------------------------------------------------------------------------
# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json, verbatim (key order included).
XL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# stabilityai/stable-diffusion-2-inpainting's scheduler/scheduler_config.json (PNDM, epsilon, no timestep_spacing
# key: each class keeps its own default, as with SD 1.5's and SD 2.1's files).
SD2_INPAINT_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
XL_VAE_SCALING = 0.13025

# ---- UNets ---------------------------------------------------------------------------------------------------------
POOLED_DIM, TIME_DIM = make_sdxl_unet.POOLED_DIM, make_sdxl_unet.TIME_DIM
# SDXL's structure at two levels (make_sdxl_unet.CONFIG): 16 and 32 channels, 16 groups, no attention at level 0,
# one head per block, linear proj_in/proj_out, 2 transformer layers at the deeper level and in the mid block, "text_time".
XL_UNET_CONFIG = make_sdxl_unet.CONFIG
# A folder-only model: 24 channels at both levels (17 carry the identity paths), 12 groups (two channels each), one
# transformer layer everywhere.
XL_INPAINT_UNET_CONFIG = dict(XL_UNET_CONFIG, in_channels=9, block_out_channels=[24, 24], norm_num_groups=12,
                              transformer_layers_per_block=[1, 1])
XL_UNET_SEED, XL_INPAINT_UNET_SEED = 3201, 3202
# The denoiser-like identity paths of make_fixtures.build_unet / build_unet_inpaint (see tests/reference/README.md),
# on top of make_sdxl_unet.randomize's random weights: they keep sampling contractive, so float noise is not
# amplified and samplers/seeds/prompts stay clearly apart.
XL_ID_OUT = 1.2
XL_F_OUT = 0.3
XL_ATTN2_GAIN = 1.0  # extra factor on attn2.to_out (randomize() already gives it full gain)

# tiny-sd2-inpaint's UNet is tiny-sd1-inpaint's (a symlink): the SD 2.x parts are the text encoder (GELU, "!"
# padding) and the scheduler file.
SD2_INPAINT_SHARED = {"text_encoder": "../tiny-sd2/text_encoder", "tokenizer": "../tiny-sd2/tokenizer",
                      "vae": "../tiny-sd2/vae", "unet": "../tiny-sd1-inpaint/unet"}

# ---- cases -----------------------------------------------------------------------------------------------------------
FOX, CAT = "a red fox in the snow", "a photo of a cat"


def _t2i(name, sampler, schedule, seed, prompt=FOX, neg=None, steps=6, cfg=5.0, model="tiny-sdxl", png=None,
         original_size=None, crops=None, target_size=None):
    return dict(name=name, model=model, prompt=prompt, negative_prompt=neg, seed=seed, steps=steps, cfg_scale=cfg,
                width=64, height=64, sampler=sampler, schedule=schedule, original_size=original_size,
                crops_coords_top_left=crops, target_size=target_size, png=png or f"{name}.png")


T2I_CASES = [
    _t2i("euler_normal", "euler", "normal", 42),
    _t2i("euler_a_normal", "euler_a", "normal", 7),
    _t2i("dpmpp_2m_karras", "dpmpp_2m", "karras", 1234, prompt=CAT),
    _t2i("ddim_normal", "ddim", "normal", 99),
    _t2i("euler_neg", "euler", "normal", 42, neg="blurry, low quality"),
    _t2i("euler_cfg1", "euler", "normal", 42, cfg=1.0),
    _t2i("euler_size_cond", "euler", "normal", 42, original_size=[128, 96], crops=[8, 4], target_size=[64, 48]),
    _t2i("euler_a_trailing_1step_cfg0", "euler_a", "trailing", 5, steps=1, cfg=0.0),
    # the same as euler_normal, through the single file: same PNG, must be bit-identical
    _t2i("single_file_euler", "euler", "normal", 42, model="tiny-sdxl.safetensors", png="euler_normal.png"),
]
SINGLE_FILE_CASE, SINGLE_FILE_TWIN = "single_file_euler", "euler_normal"
MIN_PAIR_MAX = 30  # levels: every two distinct txt2img cases differ by at least this much somewhere (max abs)
MIN_PAIR_MEAN = 2.0  # ... and by this much on average

APPLE, ORANGES = mf.APPLE, mf.ORANGES
INIT, RECT_M, CIRC_M = mf.INIT, mf.RECT_M, mf.CIRC_M
EDIT_CASES = [
    mf._edit_case("xl_inpaint9_rect_euler", "inpaint", "tiny-sdxl-inpaint", APPLE, "", 42, "euler", 1.0, INIT, RECT_M),
    mf._edit_case("xl_inpaint9_circle_euler_a_s075", "inpaint", "tiny-sdxl-inpaint", ORANGES, "", 1234, "euler_a", 0.75,
                  INIT, CIRC_M),
    mf._edit_case("sd2_inpaint9_rect_euler", "inpaint", "tiny-sd2-inpaint", APPLE, "", 42, "euler", 1.0, INIT, RECT_M),
    mf._edit_case("sd2_inpaint9_circle_ddim_s08", "inpaint", "tiny-sd2-inpaint", ORANGES, "blurry", 7, "ddim", 0.8, INIT,
                  CIRC_M),
]
EDIT_SCHEDULER_CONFIG = {"tiny-sdxl-inpaint": XL_SCHEDULER_CONFIG, "tiny-sd2-inpaint": SD2_INPAINT_SCHEDULER_CONFIG}
MIN_EDIT_DIFF = 6.0  # levels: mean abs change of the repainted region under another seed / prompt
F64_TOL = 0.05  # levels before rounding: float64 with the same noise


def log(*a):
    print(*a, flush=True)


# =====================================================================================================================
# Helpers
# =====================================================================================================================


def remove(path: Path):
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def write_json(path: Path, obj, sort_keys=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


def symlink(target: str, link: Path):
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    assert link.exists(), f"dangling symlink {link} -> {target}"


def tensor_digests(module):
    return {hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for v in module.state_dict().values()}


def check_distinct_from(name, module, others):
    digests = set().union(*(tensor_digests(o) for o in others))
    for k, v in module.state_dict().items():
        assert hashlib.sha256(v.float().numpy().tobytes()).hexdigest() not in digests, f"{name}.{k} copies a tensor"


def assert_f16(path: Path):
    with safe_open(str(path), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys()), path


def sha256_tree(paths):
    """sha256 of every written file (symlinks: their target), for the byte-identical check."""
    out = {}
    for root in paths:
        items = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in items:
            rel = str(p.relative_to(FIXTURES))
            if p.name.endswith(".sdgen.json"):  # sdgen's hash cache, written beside model files by the tests
                continue
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# =====================================================================================================================
# Tokenizers
# =====================================================================================================================


def check_tokenizer(path: Path, pad_id):
    tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    assert len(tok) == 1000 and tok.model_max_length == 77 and tok.pad_token_id == pad_id, (len(tok), tok.pad_token_id)
    ids = tok(FOX, padding="max_length", max_length=77, truncation=True).input_ids
    n = ids.index(999) + 1
    assert ids[0] == 998 and all(i < 1000 for i in ids) and ids[n:] == [pad_id] * (77 - n), ids
    assert tok(CAT).input_ids == [998] + tok(CAT).input_ids[1:-1] + [999]
    return tok, ids[:n]


# =====================================================================================================================
# UNets
# =====================================================================================================================


@torch.no_grad()
def add_denoiser_paths(unet, nine, id_out, f_out, attn2_gain):
    """make_fixtures' identity paths: conv_in carries +/- latent (and for 9 channels +/- masked-image latent and the
    mask), the last up resnet's 1x1 shortcut passes them on, conv_out reads them back."""
    for name, mod in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            mod.weight.mul_(attn2_gain)
    w = unet.conv_in.weight
    n = 17 if nine else 8
    if nine:
        w[:, 4].mul_(mf.UNET9_MASK_GAIN)
    w[:n].mul_(0.1)
    for c in range(4):
        w[c, c, 1, 1] += mf.UNET_ID_IN
        w[4 + c, c, 1, 1] -= mf.UNET_ID_IN
        if nine:
            w[8 + c, 5 + c, 1, 1] += mf.UNET_ID_IN
            w[12 + c, 5 + c, 1, 1] -= mf.UNET_ID_IN
    if nine:
        w[16, 4, 1, 1] += mf.UNET_ID_IN
    mf.pass_skip_channels(unet, n)
    wo = unet.conv_out.weight
    wo.mul_(f_out)
    mf.add_latent_identity(wo, id_out)
    if nine:
        for c in range(4):
            wo[c, 8 + c, 1, 1] -= mf.UNET9_ID_MASKED
            wo[c, 12 + c, 1, 1] += mf.UNET9_ID_MASKED
            wo[c, 16, 1, 1] += (-1) ** c * mf.UNET9_ID_MASK


@torch.no_grad()
def build_xl_unet(config, seed):
    torch.manual_seed(0)  # (the default init is overwritten)
    unet = UNet2DConditionModel(**config)
    make_sdxl_unet.randomize(unet, seed)
    nine = config["in_channels"] == 9
    add_denoiser_paths(unet, nine, mf.UNET9_ID_OUT if nine else XL_ID_OUT, XL_F_OUT,
                       mf.UNET9_ATTN2_GAIN if nine else XL_ATTN2_GAIN)
    mf.round_to_fp16(unet)
    return unet.eval()


# =====================================================================================================================
# Single file (SDXL "sgm" layout)
# =====================================================================================================================


def unet_key_to_sgm(key, cfg):
    m = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
    for a, b in m.items():
        if key.startswith(a):
            return b + key[len(a):]
    return mf.unet_key_to_ldm(key, cfg)


def build_xl_single_file(pipe):
    """Everything F16, as in the folder (every value is fp16-exact)."""
    sd = {}

    def put(k, v):
        assert k not in sd, f"duplicate key {k}"
        sd[k] = v.detach().contiguous()

    mf.put_unet_and_vae(put, pipe, unet_key_to_sgm)
    for k, v in pipe.text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        put("conditioner.embedders.0.transformer." + k, v.half())
    put("conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        torch.arange(77, dtype=torch.int64)[None])
    te2 = pipe.text_encoder_2.state_dict()
    for k, v in mf.openclip_text_keys(te2, "conditioner.embedders.1.model.").items():
        put(k, v)
    return sd


def inverse_text_encoder_2(sd, prefix="conditioner.embedders.1.model."):
    """An independent reading of the single file's open_clip tower back into transformers names."""
    out = {
        "text_model.embeddings.token_embedding.weight": sd[prefix + "token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd[prefix + "positional_embedding"],
        "text_model.final_layer_norm.weight": sd[prefix + "ln_final.weight"],
        "text_model.final_layer_norm.bias": sd[prefix + "ln_final.bias"],
        "text_projection.weight": sd[prefix + "text_projection"].T.contiguous(),
    }
    i = 0
    while f"{prefix}transformer.resblocks.{i}.ln_1.weight" in sd:
        r, t = f"{prefix}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for s in ("weight", "bias"):
            q, k, v = sd[f"{r}attn.in_proj_{s}"].chunk(3)
            out[f"{t}self_attn.q_proj.{s}"], out[f"{t}self_attn.k_proj.{s}"], out[f"{t}self_attn.v_proj.{s}"] = q, k, v
            for a, b in (("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{t}{b}.{s}"] = sd[f"{r}{a}.{s}"]
        i += 1
    return out


# =====================================================================================================================
# Running cases
# =====================================================================================================================


def make_scheduler(sampler, schedule, config):
    cls, opts = mf.SAMPLER_TABLE[sampler]
    return cls.from_config(config, **opts, **mf.SCHEDULE_TABLE[schedule])


@torch.no_grad()
def run_t2i(pipe, case, **overrides):
    case = dict(case, **overrides)
    pipe.scheduler = make_scheduler(case["sampler"], case["schedule"], XL_SCHEDULER_CONFIG)
    kw = {}
    for k in ("original_size", "crops_coords_top_left", "target_size"):
        if case[k] is not None:
            kw[k] = tuple(case[k])
    out = pipe(
        prompt=case["prompt"],
        negative_prompt=case["negative_prompt"],
        num_inference_steps=case["steps"],
        guidance_scale=case["cfg_scale"],
        width=case["width"],
        height=case["height"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        output_type="np",
        **kw,
    )
    img = out.images[0]
    assert img.shape == (case["height"], case["width"], 3), img.shape
    return img


def diffusers_negative(case):
    """SDXL: our "" (no negative prompt) -> None, so diffusers uses zero embeddings (force_zeros_for_empty_prompt);
    SD 2.x: the string as given ("" is encoded), as make_fixtures does for SD 1.x."""
    if case["model"] == "tiny-sdxl-inpaint" and case["negative_prompt"] == "":
        return None
    return case["negative_prompt"]


@torch.no_grad()
def run_edit(pipe, case, canvas, mask, scheduler_config, prompt=None, seed=None, dtype=torch.float32):
    """make_fixtures.run_edit for inpainting, with the scheduler config of the model and (for SDXL) explicit
    width/height and negative_prompt None for "". Returns (uint8 image after the overlay, raw float output)."""
    cls = mf.SAMPLERS[case["sampler"]]
    pipe.scheduler = cls.from_config(scheduler_config)
    sf = pipe.vae.config.scaling_factor
    x = mf.pixels_to_tensor(canvas).to(dtype)
    image_latents = mf.vae_mean(pipe.vae, x) * sf
    keep = torch.from_numpy(~mf.binarize(mask))[None, None].to(dtype)  # 1 where the pixel is kept
    masked_latents = mf.vae_mean(pipe.vae, x * keep) * sf
    h, w = mask.shape
    out = pipe(
        prompt=prompt or case["prompt"],
        negative_prompt=diffusers_negative(case),
        num_inference_steps=case["steps"],
        guidance_scale=case["cfg_scale"],
        strength=case["strength"],
        generator=torch.Generator("cpu").manual_seed(case["seed"] if seed is None else seed),
        output_type="np",
        image=image_latents,
        mask_image=Image.fromarray(mask, "L"),
        masked_image_latents=masked_latents,
        height=h,
        width=w,
    )
    raw = out.images[0]
    assert raw.shape == canvas.shape, (raw.shape, canvas.shape)
    u8 = np.where(mf.binarize(mask)[..., None], mf.to_uint8(raw), canvas)  # overlay: kept pixels from the input
    return u8, raw


class F32Noise:
    """While a pipeline runs in float64: its noise draws stay float32 (then cast), as make_fixtures.f32_noise."""

    MODULES = (
        "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
        "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint",
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
        "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    )

    def __enter__(self):
        import importlib
        from diffusers.utils import torch_utils

        orig = torch_utils.randn_tensor

        def randn_f32(shape, generator=None, device=None, dtype=None, layout=None):
            return orig(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

        self.saved = []
        for name in self.MODULES:
            mod = importlib.import_module(name)
            self.saved.append((mod, mod.randn_tensor))
            mod.randn_tensor = randn_f32
        return self

    def __exit__(self, *exc):
        for mod, fn in self.saved:
            mod.randn_tensor = fn


def image_diff(a, b):
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return d.mean(), d.max()


# =====================================================================================================================
# 1. tiny-sdxl folder
# =====================================================================================================================


def make_xl_folder():
    log("tiny-sdxl: tokenizers, text encoder links, VAE, scheduler, UNet")
    vocab, merges = mf.tiny_vocab_and_merges()  # the same files as tiny-sd1's tokenizer: symlinks to them
    mf.write_tokenizer_files(XL_DIR / "tokenizer", vocab, merges, pad_token=EOS,
                             share_vocab_with="../../tiny-sd1/tokenizer")
    mf.write_tokenizer_files(XL_DIR / "tokenizer_2", vocab, merges, pad_token="!", share_vocab_with="../../tiny-sd1/tokenizer")
    tok1, ids1 = check_tokenizer(XL_DIR / "tokenizer", 999)
    tok2, ids2 = check_tokenizer(XL_DIR / "tokenizer_2", 0)
    assert ids1 == ids2
    log(f"  '{FOX}' -> {ids1}; pads 999 / 0")

    for sub in ("text_encoder", "text_encoder_2"):
        for fn in ("config.json", "model.safetensors"):
            symlink(f"../../tiny-sdxl-text/{sub}/{fn}", XL_DIR / sub / fn)
    vae_cfg = json.loads((FIXTURES / "tiny-sd1" / "vae" / "config.json").read_text())
    vae_cfg["scaling_factor"] = XL_VAE_SCALING
    assert vae_cfg["force_upcast"] is True
    write_json(XL_DIR / "vae" / "config.json", vae_cfg, sort_keys=True)
    symlink("../../tiny-sd1/vae/diffusion_pytorch_model.safetensors",
            XL_DIR / "vae" / "diffusion_pytorch_model.safetensors")
    write_json(XL_DIR / "scheduler" / "scheduler_config.json", XL_SCHEDULER_CONFIG)

    unet = build_xl_unet(XL_UNET_CONFIG, XL_UNET_SEED)
    mf.check_weights("tiny-sdxl unet", unet.state_dict())
    unet.half().save_pretrained(str(XL_DIR / "unet"), safe_serialization=True)
    unet.float()
    assert_f16(XL_DIR / "unet" / "diffusion_pytorch_model.safetensors")

    # model_index.json as diffusers writes it (save_config of the pipeline built in memory)
    f32 = dict(local_files_only=True, dtype=torch.float32)
    te1 = CLIPTextModel.from_pretrained(str(TEXT_DIR / "text_encoder"), **f32).eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(str(TEXT_DIR / "text_encoder_2"), **f32).eval()
    vae = AutoencoderKL.from_pretrained(str(XL_DIR / "vae"), **f32).eval()
    sched = EulerDiscreteScheduler.from_config(XL_SCHEDULER_CONFIG)
    mem = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                    unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True,
                                    add_watermarker=False)
    with tempfile.TemporaryDirectory() as tmp:
        mem.save_config(tmp)
        index = json.loads((Path(tmp) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    write_json(XL_DIR / "model_index.json", index, sort_keys=True)
    mf.chmod_plain(XL_DIR)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(XL_DIR), dtype=torch.float32, local_files_only=True,
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.vae.config.scaling_factor == XL_VAE_SCALING
    assert pipe.tokenizer.pad_token_id == 999 and pipe.tokenizer_2.pad_token_id == 0
    mf.state_dicts_equal(pipe.unet, unet, "tiny-sdxl unet")
    mf.state_dicts_equal(pipe.text_encoder, te1, "tiny-sdxl text_encoder")
    mf.state_dicts_equal(pipe.text_encoder_2, te2, "tiny-sdxl text_encoder_2")
    sd1_vae = AutoencoderKL.from_pretrained(str(FIXTURES / "tiny-sd1" / "vae"), local_files_only=True)
    mf.state_dicts_equal(pipe.vae, sd1_vae, "tiny-sdxl vae")
    check_distinct_from("tiny-sdxl unet", unet, [sd1_vae])
    n = sum(p.numel() for p in unet.parameters())
    log(f"  UNet: {len(unet.state_dict())} F16 tensors, {n} parameters; folder loads and equals the models built")
    return pipe


# =====================================================================================================================
# 2. tiny-sdxl.safetensors
# =====================================================================================================================


def make_xl_single_file(pipe):
    log("tiny-sdxl.safetensors: writing + validating")
    sd = build_xl_single_file(pipe)
    save_file(sd, str(XL_SINGLE), metadata={"format": "pt"})
    mf.chmod_tree(XL_SINGLE)
    back = load_file(str(XL_SINGLE))
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    n_by_prefix = {p: sum(k.startswith(p) for k in sd) for p in
                   ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.", "conditioner.embedders.1.")}
    assert sum(n_by_prefix.values()) == len(sd)

    # (a) independent inverse mapping: every tensor of the file maps back onto the folder's, one to one
    inv = {}
    ucfg, vcfg = dict(pipe.unet.config), dict(pipe.vae.config)
    for k in pipe.unet.state_dict():
        inv["model.diffusion_model." + unet_key_to_sgm(k, ucfg)] = ("unet", k)
    for k in pipe.vae.state_dict():
        inv["first_stage_model." + mf.vae_key_to_ldm(k, vcfg)] = ("vae", k)
    for k in pipe.text_encoder.state_dict():
        inv["conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = (
            "text_encoder", k)
    te2_back = inverse_text_encoder_2(back)
    folder = {n: getattr(pipe, n).state_dict() for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    for k, (comp, dk) in inv.items():
        a, b = back[k].float(), folder[comp][dk]
        assert torch.equal(a.reshape(b.shape), b), k
    assert sorted(te2_back) == sorted(folder["text_encoder_2"])
    assert all(torch.equal(te2_back[k].float(), folder["text_encoder_2"][k]) for k in te2_back)
    extra = set(back) - set(inv) - {k for k in back if k.startswith("conditioner.embedders.1.")}
    assert extra == {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids"}, extra
    assert back["model.diffusion_model.label_emb.0.0.weight"].shape == (XL_UNET_CONFIG["block_out_channels"][0] * 4,
                                                                       POOLED_DIM + 6 * TIME_DIM)

    # (b) diffusers' own loader
    sf_kw = dict(config=str(XL_DIR), local_files_only=True, dtype=torch.float32, add_watermarker=False)
    plain = StableDiffusionXLPipeline.from_single_file(str(XL_SINGLE), **sf_kw)
    report, n_equal = [], 0
    for name in ("unet", "vae", "text_encoder"):
        n_equal += mf.state_dicts_equal(getattr(plain, name), getattr(pipe, name), f"single-file {name}")
        report.append(f"{name}: {len(getattr(pipe, name).state_dict())} tensors equal")
    # text_encoder_2: diffusers 0.42.1 (create_diffusers_clip_model_from_ldm) takes the first branch whose test
    # passes, is_clip_sdxl_model(checkpoint) and the position-embedding width equal to the model's. Real SDXL's
    # encoders are 768 and 1280 wide; here both are 64, so text_encoder_2 gets embedders.0's tensors and its
    # text_projection.weight stays on the meta device. Recorded here, then encoder 2 is converted with diffusers'
    # own open_clip converter (the one that branch would call for a 1280-wide tower).
    te2_plain = plain.text_encoder_2.state_dict()
    te1_sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in pipe.text_encoder.state_dict().items()}
    meta = sorted(k for k, v in te2_plain.items() if v.is_meta)
    from_enc1 = sum(1 for k, v in te2_plain.items() if not v.is_meta and k in te1_sd and torch.equal(v, te1_sd[k]))
    plain_te2 = (f"plain from_single_file fills text_encoder_2 with text_encoder's tensors ({from_enc1} of "
                 f"{len(te2_plain)}) and leaves {meta} on the meta device: diffusers picks the SDXL encoder by width "
                 f"(768 vs 1280), and both tiny encoders are 64 wide")
    log("  " + plain_te2)
    del plain
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    te2 = CLIPTextModelWithProjection(pipe.text_encoder_2.config).eval()
    conv = convert_open_clip_checkpoint(te2, back, prefix="conditioner.embedders.1.model.")
    te2.load_state_dict(conv, strict=True)
    sf_pipe = StableDiffusionXLPipeline.from_single_file(str(XL_SINGLE), text_encoder_2=te2, **sf_kw)
    sf_pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        n = mf.state_dicts_equal(getattr(sf_pipe, name), getattr(pipe, name), f"single-file {name}")
    n_equal += n
    report.append(f"text_encoder_2 (diffusers' convert_open_clip_checkpoint on conditioner.embedders.1.model.*, "
                  f"strict load): {n} tensors equal")
    log("  from_single_file: " + "; ".join(report))
    return sd, sf_pipe, report, n_equal, n_by_prefix, plain_te2


# =====================================================================================================================
# 3./4. inpainting folders
# =====================================================================================================================


def make_xl_inpaint_folder(xl_pipe):
    log("tiny-sdxl-inpaint: 9-channel UNet + symlinks to tiny-sdxl")
    unet9 = build_xl_unet(XL_INPAINT_UNET_CONFIG, XL_INPAINT_UNET_SEED)
    mf.check_weights("tiny-sdxl-inpaint unet", unet9.state_dict())
    check_distinct_from("tiny-sdxl-inpaint unet", unet9, [xl_pipe.unet])
    unet9.half().save_pretrained(str(XL_INPAINT_DIR / "unet"), safe_serialization=True)
    unet9.float()
    assert_f16(XL_INPAINT_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    for name in ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        symlink(f"../tiny-sdxl/{name}", XL_INPAINT_DIR / name)
    mem = StableDiffusionXLInpaintPipeline(**{k: v for k, v in xl_pipe.components.items()
                                              if k not in ("unet", "image_encoder", "feature_extractor")},
                                           unet=unet9, requires_aesthetics_score=False,
                                           force_zeros_for_empty_prompt=True, add_watermarker=False)
    with tempfile.TemporaryDirectory() as tmp:
        mem.save_config(tmp)
        index = json.loads((Path(tmp) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline" and index["requires_aesthetics_score"] is False
    write_json(XL_INPAINT_DIR / "model_index.json", index, sort_keys=True)
    mf.chmod_plain(XL_INPAINT_DIR)
    pipe9 = StableDiffusionXLInpaintPipeline.from_pretrained(str(XL_INPAINT_DIR), dtype=torch.float32,
                                                             local_files_only=True, add_watermarker=False)
    pipe9.set_progress_bar_config(disable=True)
    mf.state_dicts_equal(pipe9.unet, unet9, "tiny-sdxl-inpaint unet")
    for name in ("vae", "text_encoder", "text_encoder_2"):
        mf.state_dicts_equal(getattr(pipe9, name), getattr(xl_pipe, name), f"tiny-sdxl-inpaint {name}")
    assert pipe9.tokenizer_2.pad_token_id == 0 and pipe9.config.force_zeros_for_empty_prompt
    log(f"  UNet: {sum(p.numel() for p in unet9.parameters())} parameters; folder loads and equals the models built")
    return pipe9


def make_sd2_inpaint_folder():
    log("tiny-sd2-inpaint: symlinks to tiny-sd1-inpaint's 9-channel UNet and tiny-sd2's text encoder, tokenizer, VAE")
    for name, target in SD2_INPAINT_SHARED.items():
        symlink(target, SD2_INPAINT_DIR / name)
    write_json(SD2_INPAINT_DIR / "scheduler" / "scheduler_config.json", SD2_INPAINT_SCHEDULER_CONFIG)
    index = dict(mf.MODEL_INDEX, _class_name="StableDiffusionInpaintPipeline", scheduler=["diffusers", "PNDMScheduler"])
    write_json(SD2_INPAINT_DIR / "model_index.json", index)
    mf.chmod_plain(SD2_INPAINT_DIR)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(SD2_INPAINT_DIR), safety_checker=None,
                                                          dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is PNDMScheduler and pipe.tokenizer.pad_token_id == 0
    assert pipe.text_encoder.config.hidden_act == "gelu" and pipe.unet.config.in_channels == 9
    sd1_unet9 = UNet2DConditionModel.from_pretrained(str(FIXTURES / "tiny-sd1-inpaint" / "unet"), local_files_only=True)
    mf.state_dicts_equal(pipe.unet, sd1_unet9, "tiny-sd2-inpaint unet")
    sd2_te = CLIPTextModel.from_pretrained(str(FIXTURES / "tiny-sd2" / "text_encoder"), local_files_only=True,
                                           dtype=torch.float32)
    mf.state_dicts_equal(pipe.text_encoder, sd2_te, "tiny-sd2-inpaint text_encoder")
    log(f"  loads; UNet = tiny-sd1-inpaint's ({sum(p.numel() for p in pipe.unet.parameters())} parameters), "
        "text encoder = tiny-sd2's")
    return pipe


# =====================================================================================================================
# 5. references
# =====================================================================================================================


@torch.no_grad()
def check_conditioning(pipe):
    """What the SDXL pipeline hands its UNet, on the first call: time ids order, zero negatives, pooled index."""
    def first_call(case):
        seen = []

        def grab(module, args, kwargs):
            if not seen:
                seen.append((kwargs["encoder_hidden_states"].clone(),
                             {k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()}))

        h = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            run_t2i(pipe, dict(case, steps=1))
        finally:
            h.remove()
        return seen[0]

    by_name = {c["name"]: c for c in T2I_CASES}

    def encode(text):
        ids1 = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids2 = pipe.tokenizer_2(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        o1 = pipe.text_encoder(ids1, output_hidden_states=True)
        o2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
        pos = int(ids2[0].tolist().index(999))
        assert pos == int(ids2.argmax(-1)) and ids2[0, pos + 1] == 0
        fln = pipe.text_encoder_2.text_model.final_layer_norm
        pooled = fln(o2.hidden_states[-1])[:, pos] @ pipe.text_encoder_2.text_projection.weight.T
        assert torch.allclose(pooled, o2.text_embeds, atol=1e-6)
        return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1), o2.text_embeds

    ctx, added = first_call(by_name["euler_size_cond"])
    assert added["time_ids"].tolist() == [[128, 96, 8, 4, 64, 48]] * 2, added["time_ids"]
    ctx, added = first_call(by_name["euler_normal"])
    assert added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    c_pos, p_pos = encode(by_name["euler_normal"]["prompt"])
    assert ctx.shape == (2, 77, 128) and torch.all(ctx[0] == 0) and torch.all(added["text_embeds"][0] == 0)
    assert torch.equal(ctx[1:], c_pos) and torch.equal(added["text_embeds"][1:], p_pos)
    ctx, added = first_call(by_name["euler_neg"])
    c_neg, p_neg = encode(by_name["euler_neg"]["negative_prompt"])
    assert torch.equal(ctx[:1], c_neg) and torch.equal(added["text_embeds"][:1], p_neg)
    for name in ("euler_cfg1", "euler_a_trailing_1step_cfg0"):
        ctx, added = first_call(by_name[name])
        assert by_name[name]["prompt"] == FOX and ctx.shape[0] == 1 and torch.equal(ctx, c_pos), name
    log("  UNet inputs: time_ids [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (both halves); "
        "negative None -> zero context and zero text_embeds; text_embeds = text_encoder_2's projection of "
        "final_layer_norm(last hidden state) at the first EOS (= argmax of the ids); cfg <= 1 -> batch 1")


def make_t2i_references(pipe, sf_pipe):
    log("txt2img references (tiny-sdxl)")
    check_conditioning(pipe)
    images, raw, sched_info = {}, {}, {}
    for case in T2I_CASES:
        t0 = time.time()
        p = sf_pipe if case["model"] == "tiny-sdxl.safetensors" else pipe
        img = run_t2i(p, case)
        u8 = mf.to_uint8(img)
        s = p.scheduler
        sched_info[case["name"]] = {
            "class": type(s).__name__,
            "from_config_options": {**mf.SAMPLER_TABLE[case["sampler"]][1], **mf.SCHEDULE_TABLE[case["schedule"]]},
            "timesteps": [int(t) if float(t).is_integer() else float(t) for t in s.timesteps],
            "init_noise_sigma": float(s.init_noise_sigma),
        }
        if case["name"] == SINGLE_FILE_CASE:
            assert np.array_equal(img, raw[SINGLE_FILE_TWIN]), "single-file image differs from the folder's"
        else:
            Image.fromarray(u8, "RGB").save(REF / case["png"])
        images[case["name"]], raw[case["name"]] = u8, img
        log(f"  {case['name']:30s} {time.time() - t0:5.1f}s  timesteps {sched_info[case['name']]['timesteps']}")
    for case in T2I_CASES:
        assert np.array_equal(np.asarray(Image.open(REF / case["png"])), images[case["name"]]), case["name"]
    stats = {k: v for k, v in images.items() if k != SINGLE_FILE_CASE}
    mf.check_image_statistics(stats)
    log("  pairwise differences (levels; mean / max), every pair of distinct cases:")
    worst_max, worst_mean = 1e9, 1e9
    for a, b in itertools.combinations(stats, 2):
        mean, mx = image_diff(stats[a], stats[b])
        worst_max, worst_mean = min(worst_max, mx), min(worst_mean, mean)
        assert mx >= MIN_PAIR_MAX and mean >= MIN_PAIR_MEAN, f"{a} vs {b}: mean {mean:.2f}, max {mx:.0f}"
    for b in stats:
        if b != "euler_normal":
            mean, mx = image_diff(stats["euler_normal"], stats[b])
            log(f"    euler_normal vs {b:28s} {mean:6.1f} {mx:5.0f}")
    log(f"  smallest over all {len(stats) * (len(stats) - 1) // 2} pairs: mean {worst_mean:.1f}, max {worst_max:.0f}")
    return images, raw, sched_info, (worst_mean, worst_max)


def make_edit_references(pipes):
    log("edit references (tiny-sdxl-inpaint, tiny-sd2-inpaint)")
    # the same procedure as make_fixtures' inpaint9_* cases: reproduce one of them bit for bit first
    sd1_9 = StableDiffusionInpaintPipeline.from_pretrained(str(FIXTURES / "tiny-sd1-inpaint"), safety_checker=None,
                                                           dtype=torch.float32, local_files_only=True)
    sd1_9.set_progress_bar_config(disable=True)
    probe = next(c for c in mf.EDIT_CASES if c["name"] == "inpaint9_rect_euler")
    canvas, mask = mf.edit_inputs(probe)
    u8, _ = run_edit(sd1_9, probe, canvas, mask, mf.SCHEDULER_CONFIG)
    committed = np.asarray(Image.open(mf.EDIT_DIR / "inpaint9_rect_euler.png"))
    assert np.array_equal(u8, committed), "run_edit does not reproduce make_fixtures' inpaint9_rect_euler"
    log("  run_edit reproduces reference/edit/inpaint9_rect_euler.png bit for bit (tiny-sd1-inpaint)")
    del sd1_9

    for p in pipes.values():  # the pixel/mask conventions agree with each pipeline's own processors
        init = np.asarray(Image.open(FIXTURES / INIT).convert("RGB"))
        assert torch.equal(mf.pixels_to_tensor(init), p.image_processor.preprocess(Image.fromarray(init, "RGB")))
        for mpath in (RECT_M, CIRC_M):
            m = np.asarray(Image.open(FIXTURES / mpath))
            mc = p.mask_processor.preprocess(Image.fromarray(m, "L"), height=64, width=64)
            assert torch.equal(mc[0, 0] >= 0.5, torch.from_numpy(mf.binarize(m)))
            lat = torch.nn.functional.interpolate(mc, size=(8, 8))
            assert torch.equal(lat[0, 0] >= 0.5, torch.from_numpy(mf.binarize(m)[::8, ::8]))

    cases_json, results, inputs = [], {}, {}
    for case in EDIT_CASES:
        t0 = time.time()
        canvas, mask = mf.edit_inputs(case)
        inputs[case["name"]] = (canvas, mask)
        u8, raw = run_edit(pipes[case["model"]], case, canvas, mask, EDIT_SCHEDULER_CONFIG[case["model"]])
        Image.fromarray(u8, "RGB").save(REF / f"{case['name']}.png")
        results[case["name"]] = (u8, raw)
        entry = dict(case)
        entry.update(width=canvas.shape[1], height=canvas.shape[0], png=f"{case['name']}.png", canvas=None,
                     canvas_mask=None)
        cases_json.append(entry)
        log(f"  {case['name']:32s} {time.time() - t0:5.1f}s")
    ref_keys = list(json.loads((mf.EDIT_DIR / "cases.json").read_text())["cases"][0])
    assert all(list(e) == ref_keys for e in cases_json), (ref_keys, list(cases_json[0]))

    stats = {}
    log("  sensitivity of the repainted region (levels, mean abs): alt prompt / seed+1")
    for case in EDIT_CASES:
        name = case["name"]
        canvas, mask = inputs[name]
        region = mf.binarize(mask)
        back = np.asarray(Image.open(REF / f"{name}.png"))
        assert np.array_equal(back, results[name][0]) and np.array_equal(back[~region], canvas[~region]), name
        f = back.astype(np.float64)
        assert f[region].std() >= mf.MIN_STD, name
        stats[name] = back
        diffs = []
        for kw in (dict(prompt=mf.EDIT_ALT_PROMPT), dict(seed=case["seed"] + 1)):
            other = run_edit(pipes[case["model"]], case, canvas, mask, EDIT_SCHEDULER_CONFIG[case["model"]], **kw)[0]
            d = np.abs(other.astype(np.float64) - f)[region].mean()
            diffs.append(d)
            assert d >= MIN_EDIT_DIFF, f"{name}: {kw} changes the region by only {d:.2f}"
        log(f"    {name:32s} {diffs[0]:6.1f} {diffs[1]:6.1f}   region std {f[region].std():.1f}")
    mf.check_image_statistics(stats)
    for a, b in itertools.combinations(stats, 2):
        assert image_diff(stats[a], stats[b])[1] > 3 * 10, (a, b)
    return cases_json, results, inputs


def float64_check(xl_pipe, t2i_raw, edit_pipes, edit_raw, edit_inputs_):
    log("float64 vs float32 (same noise), levels before rounding:")
    worst = 0.0
    with F32Noise():
        try:
            xl_pipe.to(torch.float64)
            for case in T2I_CASES:
                if case["model"] != "tiny-sdxl":
                    continue
                d = np.abs(run_t2i(xl_pipe, case) - t2i_raw[case["name"]]).max() * 255
                worst = max(worst, d)
                log(f"  {case['name']:32s} {d:.5f}")
            for p in edit_pipes.values():
                p.to(torch.float64)
            for case in EDIT_CASES:
                canvas, mask = edit_inputs_[case["name"]]
                raw64 = run_edit(edit_pipes[case["model"]], case, canvas, mask, EDIT_SCHEDULER_CONFIG[case["model"]],
                                 dtype=torch.float64)[1]
                d = np.abs(raw64 - edit_raw[case["name"]][1]).max() * 255
                worst = max(worst, d)
                log(f"  {case['name']:32s} {d:.5f}")
        finally:
            xl_pipe.to(torch.float32)
            for p in edit_pipes.values():
                p.to(torch.float32)
    assert worst < F64_TOL, f"references are numerically fragile ({worst:.4f} levels)"
    return worst


# =====================================================================================================================
# Main
# =====================================================================================================================


def main():
    t_start = time.time()
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    for p in OUTPUTS:
        remove(p)
    for p in (XL_DIR, XL_INPAINT_DIR, SD2_INPAINT_DIR, REF):
        p.mkdir(parents=True)

    xl_pipe = make_xl_folder()
    make_sdxl_unet.write_reference(xl_pipe.unet)
    sd, sf_pipe, sf_report, n_equal, n_by_prefix, plain_te2 = make_xl_single_file(xl_pipe)
    xl9 = make_xl_inpaint_folder(xl_pipe)
    sd2_9 = make_sd2_inpaint_folder()

    images, t2i_raw, sched_info, worst_pair = make_t2i_references(xl_pipe, sf_pipe)
    sf_result = (f"StableDiffusionXLPipeline.from_single_file(tiny-sdxl.safetensors, config=tests/fixtures/tiny-sdxl, "
                 f"local_files_only=True, dtype=float32): {'; '.join(sf_report)}; {n_equal} tensors in all; "
                 f"case {SINGLE_FILE_CASE} bit-identical to {SINGLE_FILE_TWIN}. Also checked: an independent "
                 f"inverse mapping of every tensor of the file onto the folder's")
    del sf_pipe

    edit_pipes = {"tiny-sdxl-inpaint": xl9, "tiny-sd2-inpaint": sd2_9}
    edit_cases, edit_results, edit_in = make_edit_references(edit_pipes)
    worst64 = float64_check(xl_pipe, t2i_raw, edit_pipes, edit_results, edit_in)

    common = {
        "produced_by": "tests/reference/make_families.py",
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "device": "cpu",
        "generator": "torch.Generator('cpu').manual_seed(seed)",
    }
    t2i_meta = dict(
        common,
        models={"tiny-sdxl": "tests/fixtures/tiny-sdxl",
                "tiny-sdxl.safetensors": "tests/fixtures/tiny-sdxl.safetensors (diffusers loads it with "
                                         "config=tests/fixtures/tiny-sdxl)"},
        pipeline="StableDiffusionXLPipeline (add_watermarker=False), output_type='np'",
        pixel_conversion="round(clip(x, 0, 1) * 255) of diffusers' output_type='np'",
        scheduler_config=XL_SCHEDULER_CONFIG,
        scheduler=("SAMPLER_TABLE[sampler] class .from_config(scheduler_config, **its options, "
                   "**SCHEDULE_TABLE[schedule]) as in make_fixtures.py ('normal' = no override); see 'schedulers'"),
        negative_prompt=("null = not given: diffusers gets negative_prompt=None and, as force_zeros_for_empty_prompt "
                         "is true, uses all-zero negative embeddings (context and pooled); a string is encoded by "
                         "both encoders (negative_prompt_2 = the same). cfg_scale <= 1: no negative pass at all"),
        conditioning=("add_time_ids = original_size + crops_coords_top_left + target_size = [orig_h, orig_w, "
                      "crop_top, crop_left, target_h, target_w]; null = diffusers' default: original_size = "
                      "target_size = [height, width], crops [0, 0]; the negative half uses the same time ids. "
                      "text_embeds = text_encoder_2's projected pooled output at input_ids.argmax(-1) (the first "
                      "EOS, id 999); context = cat(penultimate hidden states of both encoders) (128 wide)"),
        single_file_validation=sf_result,
        single_file_plain_text_encoder_2=plain_te2,
        single_file_tensors=n_by_prefix,
        schedulers=sched_info,
        cases=T2I_CASES,
    )
    write_json(REF / "txt2img.json", t2i_meta)
    edit_meta = dict(
        common,
        models={"tiny-sdxl-inpaint": "tests/fixtures/tiny-sdxl-inpaint (StableDiffusionXLInpaintPipeline)",
                "tiny-sd2-inpaint": "tests/fixtures/tiny-sd2-inpaint (StableDiffusionInpaintPipeline)"},
        paths="image and mask are relative to tests/fixtures; png, canvas and canvas_mask to this folder",
        procedure=("make_fixtures.py's inpaint9_* procedure (run_edit): image and masked image go in as VAE "
                   "posterior-mean latents, the mask as a PIL 'L' image; width/height passed explicitly; strength "
                   "always passed (the SDXL inpaint pipeline's default is 0.9999); the scheduler is "
                   "SAMPLERS[sampler].from_config(scheduler_configs[model]); the same code reproduces "
                   "reference/edit/inpaint9_rect_euler.png bit for bit"),
        scheduler_configs=EDIT_SCHEDULER_CONFIG,
        negative_prompt={
            "tiny-sdxl-inpaint": ("\"\" (what sdgen gets: no negative prompt) was passed to diffusers as "
                                  "negative_prompt=None -> all-zero negative embeddings (force_zeros_for_empty_prompt); "
                                  "any other string is passed as it is"),
            "tiny-sd2-inpaint": "passed to diffusers as it is: \"\" is encoded as the empty prompt (as make_fixtures "
                                "does for SD 1.x)",
        },
        sdxl_time_ids=("requires_aesthetics_score false: [64, 64, 0, 0, 64, 64] for both halves (original_size = "
                       "target_size = [height, width])"),
        pixel_input="x/255*2-1 in float32 (VaeImageProcessor), no resizing",
        vae_encoding="posterior mean * scaling_factor (0.13025 tiny-sdxl-inpaint, 0.18215 tiny-sd2-inpaint); "
                     "no sampling: the generator only draws the noise",
        mask="grayscale, repaint where value >= 128; masked image = 0 there; latent mask = mask[8i, 8j]",
        overlay="after decoding, pixels with mask 0 are copied from the input (canvas) unchanged",
        pixel_conversion="round(clip(x, 0, 1) * 255) of diffusers' output_type='np', then the overlay",
        cases=edit_cases,
    )
    write_json(REF / "edit.json", edit_meta)
    mf.chmod_plain(REF)

    mf.check_file_sizes()
    log(f"\n{sf_result}\nfloat64 worst {worst64:.4f} levels; txt2img pairs: smallest mean {worst_pair[0]:.1f}, "
        f"max {worst_pair[1]:.0f}")
    log("\nwritten (bytes; symlinks as '->'):")
    total = 0
    for rel, h in sha256_tree(OUTPUTS).items():
        p = FIXTURES / rel
        size = 0 if p.is_symlink() else p.stat().st_size
        total += size
        log(f"  {size:9d}  {rel}" + (f"  {h}" if h.startswith("->") else ""))
    log(f"  {total:9d}  total")
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
