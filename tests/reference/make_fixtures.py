#!/usr/bin/env python3
"""Generate the tiny Stable Diffusion 1.x/2.x fixtures and the diffusers reference outputs.

Run from the repository root (the paths are derived from this file's location, so any
working directory works):

    python tests/reference/make_fixtures.py               # everything
    python tests/reference/make_fixtures.py --edit-only   # only images/, tiny-sd1-inpaint/, reference/edit/,
                                                          # from the existing tiny-sd1 folder
    python tests/reference/make_fixtures.py --samplers-only  # only tiny-lcm/ and reference/samplers/
    python tests/reference/make_fixtures.py --sd2-only    # only the tiny-sd2 entries below

Everything is deterministic (fixed seeds, CPU, float32).  The script deletes and rewrites:

    tests/fixtures/tiny-sd1/                     diffusers folder (tiny random SD1 model)
    tests/fixtures/tiny-sd1.safetensors          the same model as one CompVis/LDM checkpoint (fp16)
    tests/fixtures/reference/sd1/cases.json      pipeline cases + PNGs (diffusers outputs)
    tests/fixtures/reference/sd1/*.png
    tests/fixtures/reference/sd1/modules.safetensors   per-module / scheduler / RNG tensors
    tests/fixtures/images/                       editing inputs: init.png, small.png, mask_{rect,circle}.png
    tests/fixtures/tiny-sd1-inpaint/             9-channel inpainting model (unet/ + symlinks into tiny-sd1/)
    tests/fixtures/reference/edit/               img2img / inpaint / outpaint cases + PNGs + modules.safetensors
    tests/fixtures/tiny-lcm/, reference/samplers/   LCM-shaped UNet; every sampler x schedule
    tests/fixtures/tiny-sd2/                     tiny random SD 2.x model (v-prediction; vae/, vocab -> tiny-sd1)
    tests/fixtures/tiny-sd2.safetensors          the same model as one LDM + OpenCLIP checkpoint (fp16)
    tests/fixtures/reference/sd2/                cases + PNGs + modules.safetensors; cases.json's "eps_patch" says
                                                 how to make tiny-sd2-eps.safetensors (not committed) from the file

See tests/reference/README.md and tests/fixtures/README.md.
"""

import contextlib
import functools
import gzip
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

torch.set_num_threads(2)

import open_clip  # noqa: E402  (bpe_simple_vocab_16e6.txt.gz; its TextTransformer checks SD2's tower)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import clip_tokenizer  # noqa: E402  (the vocabulary's derivation, shared with scripts/bench)
import diffusers  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save as save_bytes, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
    UNet2DConditionModel,
)

diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MODEL_DIR = FIXTURES / "tiny-sd1"
SINGLE_FILE = FIXTURES / "tiny-sd1.safetensors"
REF_DIR = FIXTURES / "reference" / "sd1"

SEED = 20240611  # base seed of all random weights

# SD 1.5's scheduler/scheduler_config.json, verbatim (key order included).
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": diffusers.__version__,
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# SD 1.x's layout (attention at every level but the last, 8 heads, 1x1-conv projections, wider deeper down) at
# 16/32/32 channels, one layer per level. 16 norm groups (single files: sdgen takes the narrowest width below 32): one
# channel per group at level 0, where conv_norm_out must standardise each channel (see build_unet), two at 32
# channels. A GroupNorm of one channel per group removes the per-channel constant the time embedding adds in every
# resnet; at 32 groups of 32 channels the UNet's output would not depend on the timestep at all.
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,  # SD1 convention: this is the number of heads (8)
    norm_num_groups=16,
    use_linear_projection=False,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 16, 16),  # 4 levels: latent = image / 8
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,  # one group per channel (single files: sdgen takes the narrowest width below 32)
    sample_size=64,
    scaling_factor=0.18215,
)
CLIP_CONFIG = dict(
    vocab_size=1000,  # TINY_VOCAB: CLIP's first 998 tokens + BOS 998 + EOS 999 (see tiny_vocab_and_merges)
    bos_token_id=998,
    eos_token_id=999,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
)

# Weight-shaping knobs (see README): std-normal weights scaled by gain/sqrt(fan_in),
# residual-branch outputs by RES_GAIN, norms 1 + 0.1*N / 0.05*N, biases 0.05*N.
GAIN = 1.0
RES_GAIN = 0.5
BIAS_STD = 0.05
NORM_W_STD = 0.1
NORM_B_STD = 0.05
TOKEN_EMB_STD = 0.5
POS_EMB_STD = 0.3
UNET_ID_IN = 1.0  # conv_in: channels 0..3 = +latent, 4..7 = -latent
# the last up resnet's 1x1 shortcut passes those 8 skip channels on; 0.85 and UNET_ID_OUT 1.6 are tuned for these
# narrow UNets (16 channels at level 0): at the earlier 2.0 and 1.2, euler and euler_a images (at cfg 1) came out only
# ~4 levels apart, and euler vs ddim img2img barely moved
UNET_ID_SHORTCUT = 0.85
UNET_ID_OUT = 1.6  # conv_out: eps_c += UNET_ID_OUT * (ch_c - ch_{c+4})  (silu(z)-silu(-z) = z)
UNET_F_OUT = 0.3  # scale of the remaining (random, prompt/time dependent) conv_out weights
UNET_ATTN2_GAIN = 1.0  # cross-attention outputs (attn2.to_out) at this gain instead of RES_GAIN
VAE_OUT_GAIN = 0.4  # decoder.conv_out scale: keeps images unsaturated

SAMPLERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
}

LONG_PROMPT = (
    "a highly detailed oil painting of an old lighthouse on a rocky cliff at sunset, "
    "waves crashing against the rocks, seagulls flying over the water, warm orange and "
    "purple sky with dramatic clouds, a small fishing boat returning to the harbor, "
    "reflections on the wet stones, tall grass moving in the wind, a winding path leading "
    "up to the lighthouse door, lanterns glowing in the windows of a cottage nearby, "
    "stars beginning to appear in the darkening sky, trending on artstation, masterpiece"
)

CASES = [
    # name, prompt, negative_prompt, seed, steps, cfg, width, height, sampler
    ("cat_euler_a", "a photo of a cat", None, 42, 10, 7.5, 64, 64, "euler_a"),
    ("cat_euler", "a photo of a cat", None, 42, 10, 7.5, 64, 64, "euler"),
    ("cat_ddim", "a photo of a cat", None, 42, 10, 7.5, 64, 64, "ddim"),
    ("cat_euler_seed7", "a photo of a cat", None, 7, 10, 7.5, 64, 64, "euler"),
    ("fox_euler", "a red fox in the snow", None, 42, 10, 7.5, 64, 64, "euler"),
    ("cat_euler_neg", "a photo of a cat", "blurry, low quality", 42, 10, 7.5, 64, 64, "euler"),
    ("cat_euler_cfg1", "a photo of a cat", None, 42, 10, 1.0, 64, 64, "euler"),
    ("cat_euler_a_cfg1", "a photo of a cat", None, 42, 10, 1.0, 64, 64, "euler_a"),
    ("wide_72x48_euler", "a photo of a cat", None, 42, 10, 7.5, 72, 48, "euler"),
    ("tall_48x72_euler_a", "a red fox in the snow", None, 1234, 10, 7.5, 48, 72, "euler_a"),
    ("cat_euler_a_20", "a photo of a cat", None, 42, 20, 7.5, 64, 64, "euler_a"),
    ("long_prompt_euler", LONG_PROMPT, None, 42, 10, 7.5, 64, 64, "euler"),
    ("fox_ddim_20_bigseed", "a red fox in the snow", "cartoon", 3000000000, 20, 5.0, 64, 64, "ddim"),
]

# Pairs that differ in exactly one of sampler / seed / prompt / negative / cfg / steps.
DIFF_PAIRS = [
    ("cat_euler_a", "cat_euler"),
    ("cat_euler_a", "cat_ddim"),
    ("cat_euler", "cat_ddim"),
    ("cat_euler", "cat_euler_seed7"),
    ("cat_euler", "fox_euler"),
    ("cat_euler", "long_prompt_euler"),
    ("cat_euler", "cat_euler_neg"),
    ("cat_euler", "cat_euler_cfg1"),
    ("cat_euler_a", "cat_euler_a_cfg1"),
    ("cat_euler_cfg1", "cat_euler_a_cfg1"),
    ("cat_euler_a", "cat_euler_a_20"),
]
MIN_PAIR_DIFF = 5.0  # mean abs pixel difference, levels of 255
MIN_STD = 10.0
MAX_SATURATED = 0.02  # fraction of channel values equal to 0 or 255


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


N_MERGES = 486  # 256 bytes + 256 bytes</w> + 486 merges + 2 specials = TINY_VOCAB, every tiny text encoder's vocab_size
TINY_VOCAB = 512 + N_MERGES + 2
BOS_ID, EOS_ID = TINY_VOCAB - 2, TINY_VOCAB - 1  # <|startoftext|> 998, <|endoftext|> 999
VOCAB_GZ = ROOT / "assets" / "bpe_simple_vocab_16e6.txt.gz"  # what sdgen embeds (the same file as open_clip's)
# "a photo of a cat" in the tiny vocabulary: 'photo' and 'cat' are not among its words, so they split:
# <|startoftext|> a</w> pho to</w> of</w> a</w> c at</w> <|endoftext|>
CAT_IDS = [998, 320, 816, 531, 539, 320, 66, 536, 999]


def clip_vocab_and_merges():
    """CLIP's 49408-token vocabulary built from open_clip's bpe_simple_vocab_16e6.txt.gz."""
    tokens, merges = clip_tokenizer.vocab_and_merges(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(out_dir: Path, vocab, merges, pad_token, share_vocab_with=None):
    """A CLIP tokenizer folder as SD 1.5 ships it (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json); share_vocab_with: a relative folder whose vocab.json and merges.txt (the
    same bytes, checked) the first two become symlinks to."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def write_vocab_files(d: Path):
        with open(d / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(d / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for a, b in merges:
                f.write(f"{a} {b}\n")

    with tempfile.TemporaryDirectory() as tmp:
        src, saved = Path(tmp) / "src", Path(tmp) / "saved"
        src.mkdir()
        write_vocab_files(src)
        tok = CLIPTokenizer.from_pretrained(
            str(src), model_max_length=77, pad_token=pad_token, local_files_only=True
        )
        # transformers 5.x saves tokenizer.json + tokenizer_config.json only; we ship SD1.5's file set
        # (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json).
        tok.save_pretrained(str(saved))
        cfg = json.loads((saved / "tokenizer_config.json").read_text())
        for k in ("is_local", "local_files_only", "name_or_path"):
            cfg.pop(k, None)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if share_vocab_with is None:
            write_vocab_files(out_dir)
        else:
            for fn in ("vocab.json", "merges.txt"):
                os.symlink(f"{share_vocab_with}/{fn}", out_dir / fn)
                assert (out_dir / fn).read_bytes() == (src / fn).read_bytes(), fn
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def tiny_vocab_and_merges():
    """CLIP's vocabulary built exactly as CLIP builds it (simple_tokenizer.py), truncated to its first N_MERGES
    merges: 256 byte characters, the same + "</w>", the merged strings in order, then the two specials (ids 998,
    999). BPE only ever produces merges it knows, so the first 998 tokens of CLIP's vocabulary are a complete
    vocabulary on their own, with CLIP's ids: what sdgen's single-file rule (ClipTokenizer::embedded_for) builds
    for a 1000-row token table."""
    lines = gzip.open(VOCAB_GZ).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]  # line 0 is a header
    assert all(len(m) == 2 for m in merges)
    byte_chars = list(clip_tokenizer.bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == TINY_VOCAB and vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    # the same prefix as CLIP's full vocabulary (built from open_clip's copy of the file)
    full_vocab, full_merges = clip_vocab_and_merges()
    inv = {i: t for t, i in full_vocab.items()}
    assert all(inv[i] == t for i, t in enumerate(tokens[: TINY_VOCAB - 2])) and full_merges[:N_MERGES] == merges
    return vocab, merges


def write_tokenizer(out_dir: Path, pad_token="<|endoftext|>", share_vocab_with=None):
    """The tiny-vocabulary tokenizer in SD 1.5's file set; SD 2.x's differs only in pad_token ("!", id 0) and
    shares the vocabulary files (share_vocab_with, a relative folder)."""
    vocab, merges = tiny_vocab_and_merges()
    write_tokenizer_files(out_dir, vocab, merges, pad_token, share_vocab_with)

    tok = CLIPTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    ids = tok("a photo of a cat").input_ids
    assert ids == CAT_IDS, ids
    assert tok.model_max_length == 77 and tok.pad_token_id == vocab[pad_token], (tok.model_max_length, tok.pad_token_id)
    assert len(tok) == TINY_VOCAB
    return tok


# --------------------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------------------


def randn(name, shape):
    g = torch.Generator().manual_seed(SEED ^ zlib.crc32(name.encode()))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64)


RESIDUAL_OUTPUTS = ("conv2", "to_out.0", "ff.net.2", "proj_out", "out_proj", "fc2")


@torch.no_grad()
def init_random(model: nn.Module, prefix: str):
    """Give every parameter a random, distinct value (no ones/zeros anywhere)."""
    for mname, mod in model.named_modules():
        full = prefix + mname
        if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
            mod.weight.copy_(1 + NORM_W_STD * randn(full + ".weight", mod.weight.shape))
            mod.bias.copy_(NORM_B_STD * randn(full + ".bias", mod.bias.shape))
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            gain = RES_GAIN if mname.endswith(RESIDUAL_OUTPUTS) else GAIN
            mod.weight.copy_(gain / math.sqrt(fan_in) * randn(full + ".weight", mod.weight.shape))
            if mod.bias is not None:
                mod.bias.copy_(BIAS_STD * randn(full + ".bias", mod.bias.shape))
        elif isinstance(mod, nn.Embedding):
            std = TOKEN_EMB_STD if "token" in mname else POS_EMB_STD
            mod.weight.copy_(std * randn(full + ".weight", mod.weight.shape))


@torch.no_grad()
def round_to_fp16(model: nn.Module):
    for p in model.parameters():
        p.copy_(p.half().float())


@torch.no_grad()
def build_unet(config=UNET_CONFIG, prefix="unet.", id_out=UNET_ID_OUT, f_out=UNET_F_OUT):
    """tiny-sd1's UNet (the defaults); tiny-lcm's with its own config, seed prefix and identity gain."""
    unet = UNet2DConditionModel(**config)
    init_random(unet, prefix)
    # Cross-attention output at full gain (UNET_ATTN2_GAIN), so prompts matter.
    scale_cross_attention_out(unet, UNET_ATTN2_GAIN)
    # A denoiser-like path: eps ~= UNET_ID_OUT * (standardized input latent) + f(x, t, text).
    w = unet.conv_in.weight  # [C0, 4, 3, 3] (C0 = block_out_channels[0])
    w[:8].mul_(0.1)
    for c in range(4):
        w[c, c, 1, 1] += UNET_ID_IN
        w[4 + c, c, 1, 1] -= UNET_ID_IN
    pass_skip_channels(unet, 8)
    wo = unet.conv_out.weight  # [4, C0, 3, 3]
    wo.mul_(f_out)
    add_latent_identity(wo, id_out)
    round_to_fp16(unet)
    return unet.eval()


def scale_cross_attention_out(unet, gain):
    """Cross-attention outputs at `gain` (undoing init_random's residual-branch RES_GAIN)."""
    for name, mod in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            mod.weight.mul_(gain / RES_GAIN)


def pass_skip_channels(unet, n):
    """The last up ResNet's 1x1 shortcut carries conv_in's first `n` channels (its skip input) through."""
    last = unet.up_blocks[-1].resnets[-1]
    h_ch = last.conv_shortcut.weight.shape[1] - unet.config.block_out_channels[0]
    cs = last.conv_shortcut.weight  # [C, 2C, 1, 1]; input = cat(h, skip = conv_in output)
    cs[:n].mul_(0.1)
    for c in range(n):
        cs[c, h_ch + c, 0, 0] += UNET_ID_SHORTCUT


def add_latent_identity(wo, gain):
    """conv_out: eps_c += gain * (ch_c - ch_{c+4}), the +/- latent pair conv_in placed there."""
    for c in range(4):
        wo[c, c, 1, 1] += gain
        wo[c, 4 + c, 1, 1] -= gain


@torch.no_grad()
def build_vae():
    vae = AutoencoderKL(**VAE_CONFIG)
    init_random(vae, "vae.")
    vae.decoder.conv_out.weight.mul_(VAE_OUT_GAIN)
    round_to_fp16(vae)
    return vae.eval()


@torch.no_grad()
def build_text_encoder():
    te = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
    init_random(te, "text_encoder.")
    round_to_fp16(te)
    return te.eval()


def check_weights(name, sd):
    seen = {}
    for k, v in sd.items():
        v = v.float()
        assert v.numel() > 1 and float(v.std()) > 0, f"{name}.{k} is constant"
        assert not torch.all(v == 0) and not torch.all(v == 1), f"{name}.{k} is zeros/ones"
        assert torch.equal(v, v.half().float()), f"{name}.{k} is not fp16-representable"
        digest = hashlib.sha256(v.numpy().tobytes()).hexdigest()
        assert digest not in seen, f"{name}.{k} duplicates {seen[digest]}"
        seen[digest] = k


# --------------------------------------------------------------------------------------
# diffusers -> CompVis/LDM key mapping (inverse of diffusers' single-file converter)
# --------------------------------------------------------------------------------------

UNET_RESNET_RENAMES = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def _unet_resnet(rest):
    for a, b in UNET_RESNET_RENAMES:
        if rest.startswith(a):
            return b + rest[len(a) :]
    raise KeyError(rest)


def unet_key_to_ldm(key, cfg):
    L = cfg["layers_per_block"]
    up_has_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    fixed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for a, b in fixed.items():
        if key.startswith(a):
            return b + key[len(a) :]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * (L + 1) + l
        return f"input_blocks.{idx}.0.{_unet_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"input_blocks.{1 + int(m[1]) * (L + 1) + L}.0.op.{m[2]}"
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"middle_block.{2 * int(m[1])}.{_unet_resnet(m[2])}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * (L + 1) + l
        return f"output_blocks.{idx}.0.{_unet_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        b = int(m[1])
        return f"output_blocks.{b * (L + 1) + L}.{2 if up_has_attn[b] else 1}.conv.{m[2]}"
    raise KeyError(key)


VAE_ATTN_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_ldm(key, cfg):
    n_up = len(cfg["up_block_types"])
    for a, b in {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}.items():
        if key.startswith(a):
            return b + key[len(a) :]
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(.+)", key)
    if m:
        return f"{m[1]}.{'norm_out' if m[2] == 'conv_norm_out' else m[2]}.{m[3]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if m:
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.attn_1.{VAE_ATTN_RENAMES[m[2]]}.{m[3]}"
    raise KeyError(key)


def ldm_schedule_buffers():
    """The DDPM buffers CompVis' LatentDiffusion.register_schedule stores (computed in f64, kept f32)."""
    n = 1000
    betas = np.linspace(0.00085**0.5, 0.012**0.5, n, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    bufs = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in bufs.items()}


def put_unet_and_vae(put, pipe, unet_key=None):
    """pipe's UNet (model.diffusion_model.*, names by unet_key, default unet_key_to_ldm) and VAE
    (first_stage_model.*) in the original checkpoints' names, as F16."""
    unet_key = unet_key or unet_key_to_ldm
    ucfg, vcfg = dict(pipe.unet.config), dict(pipe.vae.config)
    for k, v in pipe.unet.state_dict().items():
        put("model.diffusion_model." + unet_key(k, ucfg), v.half())
    for k, v in pipe.vae.state_dict().items():
        lk = vae_key_to_ldm(k, vcfg)
        v = v.half()
        if ".mid.attn_1." in lk and lk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM stores the VAE attention projections as 1x1 convs
        put("first_stage_model." + lk, v)


def build_single_file(pipe, text_encoder_keys=None):
    """SD1 layout; text_encoder_keys (already prefixed) replace the transformers CLIP, for SD 2.x's OpenCLIP."""
    sd = {}

    def put(k, v):
        assert k not in sd, f"duplicate key {k}"
        sd[k] = v.detach().contiguous()

    put_unet_and_vae(put, pipe)
    if text_encoder_keys is None:
        te_sd = pipe.text_encoder.state_dict()
        for k, v in te_sd.items():
            k = k if k.startswith("text_model.") else "text_model." + k
            put("cond_stage_model.transformer." + k, v.half())
        put("cond_stage_model.transformer.text_model.embeddings.position_ids", torch.arange(77, dtype=torch.int64)[None])
    else:
        for k, v in text_encoder_keys.items():
            put(k, v)
    for k, v in ldm_schedule_buffers().items():
        put(k, v)
    # EMA bookkeeping as in the original checkpoints (flattened names, only a couple of tensors here:
    # fewer than 100 model_ema keys, so diffusers ignores them; loaders must not use them).
    put("model_ema.decay", torch.tensor(0.9999, dtype=torch.float32))
    put("model_ema.num_updates", torch.tensor(470000, dtype=torch.int32))
    for k in ("out.2.weight", "out.2.bias", "input_blocks.0.0.bias"):
        v = sd["model.diffusion_model." + k].float()
        ema = v + 0.01 * randn("ema." + k, v.shape).float()
        put("model_ema.diffusion_model" + k.replace(".", ""), ema.half())
    return sd


# --------------------------------------------------------------------------------------
# Pipeline helpers
# --------------------------------------------------------------------------------------


def set_sampler(pipe, sampler, scheduler_config=SCHEDULER_CONFIG):
    pipe.scheduler = SAMPLERS[sampler].from_config(scheduler_config)


def run_case(pipe, case, output_type="np", callback=None, scheduler_config=SCHEDULER_CONFIG):
    name, prompt, neg, seed, steps, cfg, w, h, sampler = case
    set_sampler(pipe, sampler, scheduler_config)
    gen = torch.Generator("cpu").manual_seed(seed)
    kwargs = {}
    if callback is not None:
        kwargs = dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    with torch.no_grad():
        out = pipe(
            prompt=prompt,
            negative_prompt=neg,
            num_inference_steps=steps,
            guidance_scale=cfg,
            width=w,
            height=h,
            generator=gen,
            output_type=output_type,
            **kwargs,
        )
    return out.images if output_type == "latent" else out.images[0]


def check_image_statistics(images):
    """Logs each reference image's mean, spread and saturation, and refuses flat or clipped ones."""
    log(f"  {'case':24s} {'mean':>6s} {'std':>6s} {'sat%':>6s}")
    for name, u8 in images.items():
        f = u8.astype(np.float64)
        sat = float(np.mean((u8 == 0) | (u8 == 255)))
        log(f"  {name:24s} {f.mean():6.1f} {f.std():6.1f} {100 * sat:6.2f}")
        assert f.std() >= MIN_STD, f"{name}: image too flat"
        assert sat <= MAX_SATURATED, f"{name}: too many saturated pixels"


def to_uint8(img):
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def state_dicts_equal(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb), f"{what}: key sets differ: {set(sa) ^ set(sb)}"
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{what}: {k} differs"
    return len(sa)


def chmod_tree(path: Path):
    for p in [path] + list(path.rglob("*")) if path.is_dir() else [path]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def file_sizes(path: Path):
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else [path]
    return [(str(p.relative_to(FIXTURES)), p.stat().st_size) for p in files]


# --------------------------------------------------------------------------------------
# Image editing: img2img, inpaint, outpaint (tests/fixtures/reference/edit/)
# --------------------------------------------------------------------------------------

IMAGES_DIR = FIXTURES / "images"
INPAINT_DIR = FIXTURES / "tiny-sd1-inpaint"
EDIT_DIR = FIXTURES / "reference" / "edit"
# tiny-sd1-inpaint shares these with tiny-sd1 through relative symlinks (no copies)
INPAINT_SHARED = ("scheduler", "text_encoder", "tokenizer", "vae")
INPAINT_MODEL_INDEX = dict(MODEL_INDEX, _class_name="StableDiffusionInpaintPipeline")

# A folder-only model: 24 channels at both levels (17 carry the identity paths below), 12 norm groups (two channels
# each, so the timestep reaches the output).
UNET9_CONFIG = dict(
    sample_size=8,
    in_channels=9,  # 4 noisy latents + 1 mask + 4 masked-image latents
    out_channels=4,
    block_out_channels=(24, 24),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=12,
    use_linear_projection=False,
)
UNET9_ID_OUT = 1.7  # as UNET_ID_OUT, for the 9-channel UNet
UNET9_F_OUT = 0.3  # as UNET_F_OUT
UNET9_ID_MASKED = 0.8  # conv_out: eps_c -= UNET9_ID_MASKED * (standardized masked-image latent c)
UNET9_MASK_GAIN = 3.0  # conv_in's random weights on the mask channel, scaled up
UNET9_ID_MASK = 0.5  # conv_out: eps_c += (-1)^c * UNET9_ID_MASK * silu(standardized mask)
UNET9_ATTN2_GAIN = 2.0  # extra factor on the cross-attention outputs (on top of 1/RES_GAIN)

RECT = (13, 45, 9, 37)  # mask_rect.png: x in [13, 45), y in [9, 37)
CIRCLE = (38.0, 27.0, 17.0)  # mask_circle.png: centre x, centre y, radius (pixel (x, y) sits at x+0.5, y+0.5)
SMALL_CROP = (10, 4)  # small.png = init.png[4:52, 10:58]
OUTPAINT_PADS = {"left": 16, "right": 8, "top": 0, "bottom": 16}  # small.png (48x48) -> canvas 72x64


def _edit_case(name, mode, model, prompt, neg, seed, sampler, strength, image, mask=None, pads=None):
    return dict(
        name=name, mode=mode, model=model, prompt=prompt, negative_prompt=neg, seed=seed, steps=10,
        cfg_scale=7.5, sampler=sampler, strength=strength, image=image, mask=mask, pads=pads,
    )


APPLE, ORANGES, CASTLE, LAND = (
    "a red apple on a wooden table",
    "a bowl of oranges",
    "a stone castle on a hill",
    "a wide mountain landscape",
)
INIT, RECT_M, CIRC_M, SMALL = "images/init.png", "images/mask_rect.png", "images/mask_circle.png", "images/small.png"
EDIT_CASES = [
    _edit_case("img2img_s05_euler_a", "img2img", "tiny-sd1", CASTLE, "", 42, "euler_a", 0.5, INIT),
    _edit_case("img2img_s08_euler_a", "img2img", "tiny-sd1", CASTLE, "", 42, "euler_a", 0.8, INIT),
    _edit_case("img2img_s05_ddim", "img2img", "tiny-sd1", CASTLE, "blurry, low quality", 7, "ddim", 0.5, INIT),
    _edit_case("img2img_s08_ddim", "img2img", "tiny-sd1", CASTLE, "blurry, low quality", 7, "ddim", 0.8, INIT),
    _edit_case("inpaint_rect_euler", "inpaint", "tiny-sd1", APPLE, "", 42, "euler", 1.0, INIT, RECT_M),
    _edit_case("inpaint_circle_euler_a", "inpaint", "tiny-sd1", ORANGES, "", 1234, "euler_a", 1.0, INIT, CIRC_M),
    _edit_case("inpaint_rect_ddim_s075", "inpaint", "tiny-sd1", APPLE, "cartoon", 42, "ddim", 0.75, INIT, RECT_M),
    _edit_case("inpaint9_rect_euler", "inpaint", "tiny-sd1-inpaint", APPLE, "", 42, "euler", 1.0, INIT, RECT_M),
    _edit_case("inpaint9_circle_ddim", "inpaint", "tiny-sd1-inpaint", ORANGES, "", 1234, "ddim", 1.0, INIT, CIRC_M),
    _edit_case("inpaint9_rect_euler_a_s06", "inpaint", "tiny-sd1-inpaint", APPLE, "blurry", 5, "euler_a", 0.6, INIT, RECT_M),
    _edit_case("outpaint_euler", "outpaint", "tiny-sd1", LAND, "", 42, "euler", 1.0, SMALL, pads=OUTPAINT_PADS),
    _edit_case("outpaint9_euler_a", "outpaint", "tiny-sd1-inpaint", LAND, "", 42, "euler_a", 1.0, SMALL, pads=OUTPAINT_PADS),
]
UNET9_CAPTURE_CASE = "inpaint9_rect_euler"  # its first UNet call goes to modules.safetensors
EDIT_ALT_PROMPT = "a photo of a cat"
MIN_EDIT_DIFF = 6.0  # levels: mean abs change of the repainted pixels under another prompt/seed/sampler
MIN_IMAGE_DIFF = {"img2img": 1.0, "inpaint": 6.0, "outpaint": 6.0}  # ... when the input picture is mirrored
EDIT_F64_CASES = ("img2img_s08_ddim", "inpaint_circle_euler_a", "inpaint_rect_ddim_s075", "inpaint9_rect_euler_a_s06",
                  "outpaint_euler", "outpaint9_euler_a")


def make_init_image():
    """64x64 RGB: gradients, a disk, a box, a triangle, hash texture + ripple; values in [20, 235]."""
    yi, xi = np.mgrid[0:64, 0:64]
    x, y = xi.astype(np.float64), yi.astype(np.float64)
    img = np.stack([60 + 120 * x / 63, 70 + 100 * y / 63, 160 - 70 * (x + y) / 126], axis=-1)
    disk = (x + 0.5 - 20) ** 2 + (y + 0.5 - 21) ** 2 <= 10.5**2
    img[disk] = 0.3 * img[disk] + 0.7 * np.array([205.0, 90.0, 70.0])
    img[(x >= 38) & (x < 58) & (y >= 36) & (y < 57)] = [55.0, 115.0, 185.0]
    tri = (x >= 4) & (y <= 60) & (y >= 40 + (x - 4) * 20 / 26)
    img[tri] = 0.5 * img[tri] + 0.5 * np.array([230.0, 215.0, 90.0])
    for c in range(3):
        h = ((xi * 73856093) ^ (yi * 19349663) ^ ((c + 1) * 83492791)) % 23 - 11  # hash texture, +-11
        img[..., c] += h + 8 * np.sin(0.8 * x + 2 * c) * np.cos(0.6 * y)
    return np.round(np.clip(img, 20, 235)).astype(np.uint8)


def make_masks():
    yi, xi = np.mgrid[0:64, 0:64]
    x0, x1, y0, y1 = RECT
    rect = ((xi >= x0) & (xi < x1) & (yi >= y0) & (yi < y1)).astype(np.uint8) * 255
    cx, cy, r = CIRCLE
    circle = (((xi + 0.5 - cx) ** 2 + (yi + 0.5 - cy) ** 2) <= r * r).astype(np.uint8) * 255
    return rect, circle


def binarize(mask_u8):
    """What diffusers' mask processor gives (x/255 >= 0.5): True = repaint."""
    return mask_u8 >= 128


def pixels_to_tensor(u8):
    """uint8 HxWx3 -> [1,3,H,W] float32 in [-1,1] as VaeImageProcessor: (x/255)*2-1 in float32."""
    x = 2.0 * (u8.astype(np.float32) / 255.0) - 1.0
    assert x.dtype == np.float32
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def vae_mean(vae, x):
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean


def edit_inputs(case):
    """(canvas uint8 HxWx3, mask uint8 HxW with 0/255 or None) as sdgen builds them."""
    img = np.asarray(Image.open(FIXTURES / case["image"]).convert("RGB"))
    if case["mode"] == "img2img":
        return img, None
    if case["mode"] == "inpaint":
        mask = np.asarray(Image.open(FIXTURES / case["mask"]))
        assert mask.shape == img.shape[:2]
        return img, mask
    p = case["pads"]
    canvas = np.pad(img, ((p["top"], p["bottom"]), (p["left"], p["right"]), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[p["top"] : p["top"] + img.shape[0], p["left"] : p["left"] + img.shape[1]] = 0
    return canvas, mask


@torch.no_grad()
def build_unet_inpaint():
    """Random 9-channel UNet; same denoiser path as build_unet, plus a direct masked-image-latent path."""
    torch.manual_seed(0)  # (the default init is overwritten anyway)
    unet = UNet2DConditionModel(**UNET9_CONFIG)
    init_random(unet, "unet_inpaint.")
    scale_cross_attention_out(unet, UNET9_ATTN2_GAIN)
    w = unet.conv_in.weight  # [24, 9, 3, 3]; input = cat(latents, mask, masked-image latents)
    w[:, 4].mul_(UNET9_MASK_GAIN)
    w[:17].mul_(0.1)
    w[16, 4, 1, 1] += UNET_ID_IN  # mask
    for c in range(4):
        w[c, c, 1, 1] += UNET_ID_IN  # +latent
        w[4 + c, c, 1, 1] -= UNET_ID_IN  # -latent
        w[8 + c, 5 + c, 1, 1] += UNET_ID_IN  # +masked-image latent
        w[12 + c, 5 + c, 1, 1] -= UNET_ID_IN  # -masked-image latent
    pass_skip_channels(unet, 17)
    wo = unet.conv_out.weight  # [4, 24, 3, 3]
    wo.mul_(UNET9_F_OUT)
    add_latent_identity(wo, UNET9_ID_OUT)
    for c in range(4):
        wo[c, 8 + c, 1, 1] -= UNET9_ID_MASKED
        wo[c, 12 + c, 1, 1] += UNET9_ID_MASKED
        wo[c, 16, 1, 1] += (-1) ** c * UNET9_ID_MASK
    round_to_fp16(unet)
    return unet.eval()


def run_edit(pipes, case, canvas, mask, prompt=None, seed=None, sampler=None, masked_source=None,
             unet_mask_override=None, dtype=torch.float32):
    """One case through diffusers; returns (uint8 image after the overlay, raw float output).

    The image (and masked image) go in as VAE posterior-mean latents, so diffusers' VAE encode
    draws nothing from the generator. For the sensitivity checks only: masked_source, another
    picture to take the masked image from; unet_mask_override, a constant for the 9-channel
    UNet's mask input channel."""
    kind = "img2img" if case["mode"] == "img2img" else "inpaint"
    pipe = pipes[(kind, case["model"])]
    set_sampler(pipe, sampler or case["sampler"])
    sf = pipe.vae.config.scaling_factor
    x = pixels_to_tensor(canvas).to(dtype)
    image_latents = vae_mean(pipe.vae, x) * sf
    kw = dict(
        prompt=prompt or case["prompt"],
        negative_prompt=case["negative_prompt"],
        num_inference_steps=case["steps"],
        guidance_scale=case["cfg_scale"],
        strength=case["strength"],
        generator=torch.Generator("cpu").manual_seed(case["seed"] if seed is None else seed),
        output_type="np",
    )
    with torch.no_grad():
        if kind == "img2img":
            out = pipe(image=image_latents, **kw)
        else:
            keep = torch.from_numpy(~binarize(mask))[None, None].to(dtype)  # 1 where the pixel is kept
            src = x if masked_source is None else pixels_to_tensor(masked_source).to(dtype)
            masked_latents = vae_mean(pipe.vae, src * keep) * sf
            h, w = mask.shape
            hook = None
            if unet_mask_override is not None:

                def set_mask(module, args):
                    args[0][:, 4] = unet_mask_override

                hook = pipe.unet.register_forward_pre_hook(set_mask)
            try:
                out = pipe(
                    image=image_latents,
                    mask_image=Image.fromarray(mask, "L"),
                    masked_image_latents=masked_latents,
                    height=h,
                    width=w,
                    **kw,
                )
            finally:
                if hook is not None:
                    hook.remove()
    raw = out.images[0]
    assert raw.shape == canvas.shape, (raw.shape, canvas.shape)
    u8 = to_uint8(raw)
    if mask is not None:
        u8 = np.where(binarize(mask)[..., None], u8, canvas)  # overlay: kept pixels exactly from the input
    return u8, raw


@torch.no_grad()
def manual_edit(pipe, case, canvas, mask):
    """The same case written out without diffusers' pipelines (only its schedulers' scale_model_input
    and step): the semantics sdgen implements. Returns the raw decoded image in [0, 1], HxWx3."""
    sched = SAMPLERS[case["sampler"]].from_config(SCHEDULER_CONFIG)
    k = case["steps"]
    sched.set_timesteps(k)
    t_start = k - min(int(k * case["strength"]), k)  # the last int(K*strength) steps run
    ts = sched.timesteps[t_start:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start)

    def noised(latents, noise, i):  # add_noise at the schedule's i-th timestep
        if case["sampler"] == "ddim":
            ac = sched.alphas_cumprod[int(sched.timesteps[i])]
            return ac**0.5 * latents + (1 - ac) ** 0.5 * noise
        return latents + noise * sched.sigmas[i]

    def embed(text):
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    ctx = torch.cat([embed(case["negative_prompt"]), embed(case["prompt"])])
    sf = pipe.vae.config.scaling_factor
    x = pixels_to_tensor(canvas)
    image_latents = vae_mean(pipe.vae, x) * sf
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    noise = torch.randn(image_latents.shape, generator=gen, dtype=torch.float32)
    if case["mode"] == "img2img" or case["strength"] < 1.0:
        latents = noised(image_latents, noise, t_start)
    else:  # inpaint/outpaint at strength 1: pure noise, even for the 4-channel model
        latents = noise * sched.init_noise_sigma
    nine = pipe.unet.config.in_channels == 9
    if mask is not None:
        repaint = torch.from_numpy(binarize(mask)).float()[None, None]
        m_lat = repaint[:, :, ::8, ::8]  # nearest: latent (i, j) <- pixel (8i, 8j)
        masked_latents = vae_mean(pipe.vae, x * (1 - repaint)) * sf
    for i, t in enumerate(ts):
        inp = sched.scale_model_input(torch.cat([latents] * 2), t)
        if nine:  # the mask and the masked-image latents are not scaled
            inp = torch.cat([inp, torch.cat([m_lat] * 2), torch.cat([masked_latents] * 2)], dim=1)
        uncond, cond = pipe.unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
        eps = uncond + case["cfg_scale"] * (cond - uncond)
        latents = sched.step(eps, t, latents, generator=gen).prev_sample
        if mask is not None and not nine:  # blend: same noise, next timestep; clean latents after the last step
            known = noised(image_latents, noise, t_start + i + 1) if i < len(ts) - 1 else image_latents
            latents = (1 - m_lat) * known + m_lat * latents
    img = pipe.vae.decode(latents / sf).sample
    return (img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()


def chmod_plain(path: Path):
    """chmod_tree that leaves symlinks (and what they point to) alone."""
    for p in [path] + list(path.rglob("*")):
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


def make_edit_fixtures(pipe):
    """Input images, masks, the 9-channel model and the img2img/inpaint/outpaint references."""
    t0 = time.time()
    for p in (IMAGES_DIR, INPAINT_DIR, EDIT_DIR):
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)
    for p in (IMAGES_DIR, INPAINT_DIR, EDIT_DIR):
        p.mkdir(parents=True)

    # ---- input images and masks ------------------------------------------------------
    log("\nediting fixtures: images, masks")
    init = make_init_image()
    sx, sy = SMALL_CROP
    small = init[sy : sy + 48, sx : sx + 48]
    rect, circle = make_masks()
    Image.fromarray(init, "RGB").save(IMAGES_DIR / "init.png")
    Image.fromarray(np.ascontiguousarray(small), "RGB").save(IMAGES_DIR / "small.png")
    Image.fromarray(rect, "L").save(IMAGES_DIR / "mask_rect.png")
    Image.fromarray(circle, "L").save(IMAGES_DIR / "mask_circle.png")
    for name, arr, mode in (("init", init, "RGB"), ("small", small, "RGB"), ("mask_rect", rect, "L"),
                            ("mask_circle", circle, "L")):
        im = Image.open(IMAGES_DIR / f"{name}.png")
        assert im.mode == mode and np.array_equal(np.asarray(im), arr), name
    assert 20 <= init.min() and init.max() <= 235 and init.std() > 30, (init.min(), init.max(), init.std())
    assert set(np.unique(rect)) == {0, 255} and set(np.unique(circle)) == {0, 255}
    # nearest latent downsampling of the unaligned rectangle differs from the pixel mask's coverage
    rect_lat = binarize(rect)[::8, ::8]
    assert rect_lat.sum() * 64 != binarize(rect).sum()
    log(f"  init.png mean {init.mean():.1f} std {init.std():.1f} range {init.min()}..{init.max()}; "
        f"rect {binarize(rect).sum()} px (latent {int(rect_lat.sum())} cells), circle {binarize(circle).sum()} px "
        f"(latent {int(binarize(circle)[::8, ::8].sum())} cells)")

    # ---- tiny-sd1-inpaint ----------------------------------------------------------------
    log("building tiny-sd1-inpaint (9-channel UNet)")
    unet9 = build_unet_inpaint()
    check_weights("unet9", unet9.state_dict())
    sd1_digests = {hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for v in pipe.unet.state_dict().values()}
    for k, v in unet9.state_dict().items():
        assert hashlib.sha256(v.float().numpy().tobytes()).hexdigest() not in sd1_digests, f"unet9.{k} copies tiny-sd1"
    unet9.half().save_pretrained(str(INPAINT_DIR / "unet"), safe_serialization=True)
    unet9.float()
    for name in INPAINT_SHARED:
        os.symlink(f"../tiny-sd1/{name}", INPAINT_DIR / name, target_is_directory=True)
    (INPAINT_DIR / "model_index.json").write_text(json.dumps(INPAINT_MODEL_INDEX, indent=2) + "\n")
    chmod_plain(INPAINT_DIR)
    unet_file = INPAINT_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(unet_file), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
        n_unet9 = len(list(f.keys()))
    pipe9 = StableDiffusionInpaintPipeline.from_pretrained(
        str(INPAINT_DIR), safety_checker=None, dtype=torch.float32, local_files_only=True
    )
    pipe9.set_progress_bar_config(disable=True)
    assert type(pipe9.scheduler).__name__ == "PNDMScheduler" and pipe9.unet.dtype == torch.float32
    state_dicts_equal(pipe9.unet, unet9, "tiny-sd1-inpaint unet")
    state_dicts_equal(pipe9.vae, pipe.vae, "tiny-sd1-inpaint vae")
    state_dicts_equal(pipe9.text_encoder, pipe.text_encoder, "tiny-sd1-inpaint text_encoder")
    assert pipe9.tokenizer("a photo of a cat").input_ids == CAT_IDS
    n_params = sum(p.numel() for p in unet9.parameters())
    load_result = (f"StableDiffusionInpaintPipeline.from_pretrained(tiny-sd1-inpaint): UNet {n_unet9} F16 tensors "
                   f"({n_params} parameters) identical to the built one; vae/text_encoder/tokenizer via symlinks "
                   f"identical to tiny-sd1's")
    log("  " + load_result)

    components = dict(pipe.components)
    pipes = {
        ("img2img", "tiny-sd1"): StableDiffusionImg2ImgPipeline(**components),
        ("inpaint", "tiny-sd1"): StableDiffusionInpaintPipeline(**components),
        ("inpaint", "tiny-sd1-inpaint"): pipe9,
    }
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)

    # the conventions sdgen uses agree with diffusers' own processors
    x_init = pixels_to_tensor(init)
    assert torch.equal(x_init, pipe9.image_processor.preprocess(Image.fromarray(init, "RGB")))
    for m in (rect, circle):
        mc = pipe9.mask_processor.preprocess(Image.fromarray(m, "L"), height=64, width=64)
        assert torch.equal(mc[0, 0] >= 0.5, torch.from_numpy(binarize(m))) and set(mc.unique().tolist()) == {0.0, 1.0}
        lat = torch.nn.functional.interpolate(mc, size=(8, 8))
        assert torch.equal(lat[0, 0] >= 0.5, torch.from_numpy(binarize(m)[::8, ::8]))

    # ---- cases ---------------------------------------------------------------------------
    log("running editing cases")
    mod = {"vae_encode.image": x_init, "vae_encode.mean": vae_mean(pipe.vae, x_init)}
    assert torch.equal(mod["vae_encode.mean"], vae_mean(pipe9.vae, x_init))
    cases_json, results, inputs = [], {}, {}
    for case in EDIT_CASES:
        t1 = time.time()
        canvas, mask = edit_inputs(case)
        inputs[case["name"]] = (canvas, mask)
        captured = []
        hook = None
        if case["name"] == UNET9_CAPTURE_CASE:

            def grab(module, args, kwargs, output):
                if not captured:
                    captured.append((args[0].clone(), args[1], kwargs["encoder_hidden_states"].clone(), output[0].clone()))

            hook = pipe9.unet.register_forward_hook(grab, with_kwargs=True)
        try:
            u8, raw = run_edit(pipes, case, canvas, mask)
        finally:
            if hook is not None:
                hook.remove()
        if captured:
            sample, t, ctx, out = captured[0]
            mod["unet9.sample"] = sample
            mod["unet9.timestep"] = torch.as_tensor(t, dtype=torch.float32).reshape(1)
            mod["unet9.context"] = ctx
            with torch.no_grad():
                again = pipe9.unet(sample, mod["unet9.timestep"], encoder_hidden_states=ctx).sample
            assert torch.equal(again, out), "unet9 capture does not replay"
            mod["unet9.out"] = out
        name = case["name"]
        Image.fromarray(u8, "RGB").save(EDIT_DIR / f"{name}.png")
        results[name] = (u8, raw)
        entry = dict(case)
        entry.update(width=canvas.shape[1], height=canvas.shape[0], png=f"{name}.png", canvas=None, canvas_mask=None)
        if case["mode"] == "outpaint":
            Image.fromarray(canvas, "RGB").save(EDIT_DIR / f"{name}_canvas.png")
            Image.fromarray(mask, "L").save(EDIT_DIR / f"{name}_mask.png")
            entry.update(canvas=f"{name}_canvas.png", canvas_mask=f"{name}_mask.png")
        cases_json.append(entry)
        log(f"  {name}: {time.time() - t1:.1f}s")
    assert len(mod) == 6, sorted(mod)

    # read back: PNGs exact, and every kept pixel equals the input exactly
    for case in EDIT_CASES:
        name = case["name"]
        canvas, mask = inputs[name]
        back = np.asarray(Image.open(EDIT_DIR / f"{name}.png"))
        assert back.dtype == np.uint8 and np.array_equal(back, results[name][0]), name
        if mask is not None:
            keep = ~binarize(mask)
            assert np.array_equal(back[keep], canvas[keep]), f"{name}: kept pixels differ from the input"
            assert not np.array_equal(back[~keep], canvas[~keep])
        if case["mode"] == "outpaint":
            p = case["pads"]
            sm = np.asarray(Image.open(FIXTURES / case["image"]).convert("RGB"))
            assert np.array_equal(back[p["top"] : p["top"] + sm.shape[0], p["left"] : p["left"] + sm.shape[1]], sm)
            assert np.array_equal(np.asarray(Image.open(EDIT_DIR / f"{name}_canvas.png")), canvas)
            assert np.array_equal(np.asarray(Image.open(EDIT_DIR / f"{name}_mask.png")), mask)

    # the semantics written out by hand (README) give the same images
    log("re-implementation without diffusers' pipelines vs diffusers (levels, before rounding):")
    worst = 0.0
    for case in EDIT_CASES:
        canvas, mask = inputs[case["name"]]
        kind = "img2img" if case["mode"] == "img2img" else "inpaint"
        mine = manual_edit(pipes[(kind, case["model"])], case, canvas, mask)
        d = np.abs(mine - results[case["name"]][1]).max() * 255
        worst = max(worst, d)
        log(f"  {case['name']:26s} max {d:.5f}")
    assert worst < 0.01, "the hand-written semantics differ from diffusers"

    meta = {
        "models": {"tiny-sd1": "tests/fixtures/tiny-sd1", "tiny-sd1-inpaint": "tests/fixtures/tiny-sd1-inpaint"},
        "paths": "image and mask are relative to tests/fixtures; png, canvas and canvas_mask to this folder",
        "produced_by": "tests/reference/make_fixtures.py",
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "device": "cpu",
        "pixel_input": "x/255*2-1 in float32 (VaeImageProcessor), no resizing",
        "vae_encoding": "posterior mean * 0.18215 (no sampling; the generator only draws the noise)",
        "mask": "grayscale, repaint where value >= 128; masked image = 0 there; latent mask = mask[8i, 8j]",
        "overlay": "after decoding, pixels with mask 0 are copied from the input (canvas) unchanged",
        "pixel_conversion": "round(clip(x, 0, 1) * 255) of diffusers' output_type='np', then the overlay",
        "cases": cases_json,
    }
    (EDIT_DIR / "cases.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    mod = {k: v.detach().float().contiguous() for k, v in mod.items()}
    save_file(mod, str(EDIT_DIR / "modules.safetensors"), metadata={"format": "pt"})

    # ---- statistics and sensitivity ----------------------------------------------------------
    log("\nediting statistics (levels of 255; 'region' = the repainted pixels, whole image for img2img):")
    log(f"  {'case':26s} {'mean':>6s} {'std':>6s} {'sat%':>6s} {'reg.std':>7s} {'vs in':>6s} {'vs rt':>6s} {'overlay':>7s}")
    vs_rt = {}
    for case in EDIT_CASES:
        name = case["name"]
        canvas, mask = inputs[name]
        u8, raw = results[name]
        f = u8.astype(np.float64)
        region = np.ones(canvas.shape[:2], bool) if mask is None else binarize(mask)
        sat = float(np.mean((u8 == 0) | (u8 == 255)))
        with torch.no_grad():  # the VAE round trip of the input (what img2img gives as strength -> 0)
            rt = pipe.vae.decode(vae_mean(pipe.vae, pixels_to_tensor(canvas))).sample
        rt = to_uint8(rt[0].permute(1, 2, 0).numpy() / 2 + 0.5).astype(np.float64)
        d_in = np.abs(f - canvas)[region].mean()
        vs_rt[name] = np.abs(f - rt)[region].mean()
        overlay = "-" if mask is None else f"{np.abs(to_uint8(raw).astype(np.float64) - canvas)[~region].mean():7.1f}"
        log(f"  {name:26s} {f.mean():6.1f} {f.std():6.1f} {100 * sat:6.2f} {f[region].std():7.1f} {d_in:6.1f} "
            f"{vs_rt[name]:6.1f} {overlay:>7s}")
        assert sat <= MAX_SATURATED and f[region].std() >= MIN_STD, name
    log("  ('vs in' / 'vs rt': mean |output - input| / |output - VAE round trip of the input| over the region;")
    log("   'overlay': mean |diffusers' output - input| over the kept pixels, which the overlay restores;")
    log("   the random VAE is no autoencoder, so decode(encode(x)) is far from x)")
    for smp in ("euler_a", "ddim"):
        assert vs_rt[f"img2img_s05_{smp}"] < vs_rt[f"img2img_s08_{smp}"], smp

    log("\nsensitivity: mean abs change of the region when one setting changes (levels)")
    log(f"  {'case':26s} {'prompt':>7s} {'seed+1':>7s} {'euler':>6s} {'euler_a':>7s} {'ddim':>6s} {'mirror':>7s}")
    sens_min = 1e9
    for case in EDIT_CASES:
        name = case["name"]
        canvas, mask = inputs[name]
        region = np.ones(canvas.shape[:2], bool) if mask is None else binarize(mask)
        base = results[name][0].astype(np.float64)
        variants = [dict(prompt=EDIT_ALT_PROMPT), dict(seed=case["seed"] + 1)]
        variants += [dict(sampler=s_) if s_ != case["sampler"] else None for s_ in SAMPLERS]
        # the input picture mirrored (for inpaint/outpaint the mask stays): image (and masked image) latents change
        variants.append(dict(canvas=np.ascontiguousarray(canvas[:, ::-1])))
        cols = []
        for kw in variants:
            if kw is None:
                cols.append("     -")
                continue
            kw = dict(kw)
            cv = kw.pop("canvas", canvas)
            other = run_edit(pipes, case, cv, mask, **kw)[0]
            other = np.where(region[..., None], other, canvas)  # compare the region only
            d = np.abs(other.astype(np.float64) - base)[region].mean()
            if kw:
                sens_min = min(sens_min, d)
            cols.append(f"{d:6.1f}")
            floor = MIN_EDIT_DIFF if kw else MIN_IMAGE_DIFF[case["mode"]]
            assert d >= floor, f"{name}: {kw or 'mirrored input'} changes the region by only {d:.2f} levels"
        log(f"  {name:26s} {cols[0]:>7s} {cols[1]:>7s} {cols[2]:>6s} {cols[3]:>7s} {cols[4]:>6s} {cols[5]:>7s}")
    log(f"  smallest prompt/seed/sampler change: {sens_min:.1f}")
    for a, b in (("img2img_s05_euler_a", "img2img_s08_euler_a"), ("img2img_s05_ddim", "img2img_s08_ddim")):
        d = np.abs(results[a][0].astype(np.float64) - results[b][0]).mean()
        log(f"  strength 0.5 vs 0.8: {a} / {b}: {d:.1f}")
        assert d >= MIN_EDIT_DIFF

    # the 9-channel model uses its mask and masked-image inputs
    log("\n9-channel UNet: effect of its extra inputs")
    s9, t9, c9 = mod["unet9.sample"], mod["unet9.timestep"], mod["unet9.context"]
    with torch.no_grad():
        scale = mod["unet9.out"].abs().mean()
        for what, sl in (("mask", slice(4, 5)), ("masked-image latent", slice(5, 9))):
            s2 = s9.clone()
            s2[:, sl] = 0
            o2 = pipe9.unet(s2, t9, encoder_hidden_states=c9).sample
            rel = float((o2 - mod["unet9.out"]).abs().mean() / scale)
            log(f"  first step of {UNET9_CAPTURE_CASE}: zeroing the {what} channel(s) changes eps by {100 * rel:.0f}%"
                " (mean abs, relative)")
            assert rel > 0.1, what
    for name in ("inpaint9_rect_euler", "outpaint9_euler_a"):
        case = next(c for c in EDIT_CASES if c["name"] == name)
        canvas, mask = inputs[name]
        region = binarize(mask)
        for label, kw in (("masked image from the mirrored picture", dict(masked_source=np.ascontiguousarray(canvas[:, ::-1]))),
                          ("mask channel all ones", dict(unet_mask_override=1.0))):
            other = run_edit(pipes, case, canvas, mask, **kw)[0]
            d = np.abs(other.astype(np.float64) - results[name][0])[region].mean()
            log(f"  {name}: {label}: region changes by {d:.1f} levels")
            assert d >= MIN_EDIT_DIFF, (name, label)

    # numerical robustness: float64 with the same noise
    log("\nediting, float64 vs float32 (same noise), |diff| of the [0,255]-scaled output before rounding:")
    from diffusers.utils import torch_utils
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as pimg
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as pinp
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as sea

    orig = torch_utils.randn_tensor

    def randn_f32(shape, generator=None, device=None, dtype=None, layout=None):
        return orig(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    pimg.randn_tensor, pinp.randn_tensor, sea.randn_tensor = randn_f32, randn_f32, randn_f32
    try:
        pipe.to(torch.float64)
        pipe9.to(torch.float64)
        worst = 0.0
        for case in EDIT_CASES:
            if case["name"] not in EDIT_F64_CASES:
                continue
            canvas, mask = inputs[case["name"]]
            raw64 = run_edit(pipes, case, canvas, mask, dtype=torch.float64)[1]
            d = np.abs(raw64 - results[case["name"]][1]) * 255
            worst = max(worst, d.max())
            log(f"  {case['name']:26s} max {d.max():.5f} mean {d.mean():.6f}")
        assert worst < 0.05, "editing references are numerically fragile"
    finally:
        pimg.randn_tensor, pinp.randn_tensor, sea.randn_tensor = orig, orig, orig
        pipe.to(torch.float32)
        pipe9.to(torch.float32)

    chmod_plain(IMAGES_DIR)
    chmod_plain(EDIT_DIR)
    log(f"\n{load_result}\nediting fixtures done in {time.time() - t0:.0f}s")
    return load_result


# --------------------------------------------------------------------------------------
# Samplers and schedules (tests/fixtures/reference/samplers/, tests/fixtures/tiny-lcm/)
# --------------------------------------------------------------------------------------

LCM_DIR = FIXTURES / "tiny-lcm"
SAMPLERS_DIR = FIXTURES / "reference" / "samplers"
# tiny-lcm shares everything but its UNet with tiny-sd1 (relative symlinks), scheduler config included
LCM_SHARED = ("scheduler", "text_encoder", "tokenizer", "vae")
# smaller than tiny-sd1's (two levels of 16 channels, one layer each, 8 norm groups: a folder-only model) to keep the
# fixture small; time_cond_proj_dim adds time_embedding.cond_proj: Linear(32 -> 16, no bias)
LCM_UNET_CONFIG = dict(
    UNET_CONFIG,
    block_out_channels=(16, 16),
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    time_cond_proj_dim=32,
)
LCM_F_OUT = 1.0  # as UNET_F_OUT: there is no CFG to amplify the prompt, so the random path is stronger
LCM_ATTN2_GAIN = 4.5  # extra factor on the cross-attention outputs (on top of 1/RES_GAIN); 3 left the prompt < 6 levels
LCM_COND_PROJ_GAIN = 8.0  # extra factor on cond_proj (the guidance-scale embedding's way in)

# sdgen sampler name -> (diffusers scheduler class, options for from_config). dpmpp_2s_a is not a
# diffusers scheduler: k-diffusion's sample_dpmpp_2s_ancestral runs on EulerDiscreteScheduler's sigmas.
SAMPLER_TABLE = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_2s_a": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "ddpm": (DDPMScheduler, {}),
    "lcm": (LCMScheduler, {}),
}
SCHEDULE_TABLE = {  # sdgen --schedule -> from_config options
    "normal": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "trailing": {"timestep_spacing": "trailing"},
    "leading": {"timestep_spacing": "leading"},
    "linspace": {"timestep_spacing": "linspace"},
}
SCHEDULE_STEPS = (1, 4, 6, 20)
TRACED = ("dpmpp_2m", "dpmpp_2m_sde", "unipc", "deis", "pndm", "ddpm", "lms", "heun", "dpm_2", "dpm_2_a",
          "dpmpp_2s_a", "lcm")
K_DIFFUSION_VERSION = "0.1.1.post1"
SAMPLER_PROMPT = "a photo of a cat"
# (the per-step noise of these diffusers schedulers comes from their module's randn_tensor)
NOISE_MODULES = ("euler_ancestral_discrete", "k_dpm_2_ancestral_discrete", "dpmsolver_multistep", "ddpm", "lcm",
                 "ddim", "euler_discrete")
MIN_SAMPLER_DIFF = 6.0  # levels: every sampler is at least this far (mean abs) from some other sampler
MIN_VS_EULER = 2.0  # levels: ... and this far from euler
MIN_LCM_CFG_DIFF = 2.0  # levels: lcm at cfg 8 vs cfg 2 (the guidance embedding; see README)
# cases allowed to look like the same sampler's normal 6-step image, and why
NEAR_NORMAL = {
    "dpmpp_2m_trailing": "DPMSolver's linspace timesteps are round(linspace(0, 999, N+1))[::-1][:-1], trailing's "
                         "round(arange(1000, 0, -1000/N)) - 1: each differs by at most 1 (6 steps: 500/499, 333/332)",
}


def import_k_diffusion():
    """k_diffusion.sampling and k_diffusion.external from the PyPI package, without running the package
    __init__: that imports the training/evaluation modules (clean-fid, clip, kornia, wandb, ...), which
    requirements.txt does not install. sampling.py itself needs scipy, torchdiffeq, torchsde and tqdm."""
    import importlib.metadata
    import importlib.util
    import types

    version = importlib.metadata.version("k-diffusion")
    assert version == K_DIFFUSION_VERSION, f"k-diffusion {version}, expected {K_DIFFUSION_VERSION}"
    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        sys.modules["k_diffusion"] = pkg
    import k_diffusion.external as kd_external
    import k_diffusion.sampling as kd_sampling

    return kd_sampling, kd_external


def tiny_scheduler_config():
    return json.loads((MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())


def schedule_dropped(sampler, schedule):
    """The schedule options the sampler's class does not take. from_config drops them without a word."""
    cls = SAMPLER_TABLE[sampler][0]
    params = inspect.signature(cls.__init__).parameters
    return [k for k in SCHEDULE_TABLE[schedule] if k not in params]


def make_scheduler(sampler, schedule):
    cls, opts = SAMPLER_TABLE[sampler]
    return cls.from_config(tiny_scheduler_config(), **opts, **SCHEDULE_TABLE[schedule])


def cfg_eps_denoiser(unet, alphas_cumprod, context, cfg_scale):
    """k-diffusion's DiscreteEpsDDPMDenoiser (c_in = 1/sqrt(sigma^2+1), c_out = -sigma, timestep from sigma by
    log-sigma interpolation over the training sigmas, not quantized) around the diffusers UNet, with
    classifier-free guidance as diffusers does it: one batch-2 call [uncond, cond], uncond + cfg*(cond - uncond).
    Every denoised output is appended to .outputs."""
    _, kd_external = import_k_diffusion()

    class CFGEpsDenoiser(kd_external.DiscreteEpsDDPMDenoiser):
        def get_eps(self, x, t):
            out = self.inner_model(torch.cat([x, x]), t, encoder_hidden_states=context).sample
            uncond, cond = out.chunk(2)
            return uncond + cfg_scale * (cond - uncond)

        def forward(self, x, sigma):
            denoised = super().forward(x, sigma)
            self.outputs.append(denoised.detach().clone())
            return denoised

    model = CFGEpsDenoiser(unet, alphas_cumprod, quantize=False)
    model.outputs = []
    return model


class Recorder:
    """Around one sampling run: records every UNet call (its sample, after scale_model_input, and timestep),
    every scheduler step (its input sample, model output and result) and the noise the schedulers draw.
    It changes no computation. With noise_f32 (float64 re-runs) all noise is drawn in float32 and then cast,
    so a float64 run sees the same numbers."""

    def __init__(self, unet, scheduler=None, noise_f32=False):
        self.unet, self.scheduler, self.noise_f32 = unet, scheduler, noise_f32

    def _randn(self, orig, record):
        def randn(shape, generator=None, device=None, dtype=None, layout=None):
            if self.noise_f32:
                x = orig(shape, generator=generator, device=device, dtype=torch.float32, layout=layout).to(dtype)
            else:
                x = orig(shape, generator=generator, device=device, dtype=dtype, layout=layout)
            if record:
                self.noise.append(x.detach().clone())
            return x

        return randn

    def __enter__(self):
        import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as psd
        import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as pimg
        import importlib

        self.unet_in, self.unet_t, self.unet_batch = [], [], []
        self.step_in, self.eps, self.latents, self.noise, self.denoised = [], [], [], [], []

        def pre(module, args, kwargs):
            sample = args[0]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            if sample.shape[0] == 2:  # CFG batch [uncond, cond]: the same latents twice
                assert torch.equal(sample[0], sample[1])
            self.unet_batch.append(sample.shape[0])
            self.unet_in.append(sample[:1].detach().clone())
            t = torch.as_tensor(t).reshape(-1)
            assert t.numel() == 1
            self.unet_t.append(t[0].item())

        self.hook = self.unet.register_forward_pre_hook(pre, with_kwargs=True)
        self.patched = []
        for mod, record in [(psd, False), (pimg, False)] + [
            (importlib.import_module(f"diffusers.schedulers.scheduling_{m}"), True) for m in NOISE_MODULES
        ]:
            self.patched.append((mod, mod.randn_tensor))
            mod.randn_tensor = self._randn(mod.randn_tensor, record)
        if self.scheduler is not None:
            orig_step = self.scheduler.step

            @functools.wraps(orig_step)  # keeps the signature: pipelines pass `generator` only if step takes it
            def step(model_output, timestep, sample, *args, **kwargs):
                self.step_in.append(sample.detach().clone())
                self.eps.append(model_output.detach().clone())
                out = orig_step(model_output, timestep, sample, *args, **kwargs)
                self.latents.append((out[0] if isinstance(out, tuple) else out.prev_sample).detach().clone())
                return out

            self.scheduler.step = step
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        for mod, orig in self.patched:
            mod.randn_tensor = orig
        if self.scheduler is not None:
            del self.scheduler.step
        return False


@torch.no_grad()
def run_dpmpp_2s_a(pipe, case, gen, dtype):
    """k-diffusion's sample_dpmpp_2s_ancestral (eta 1, s_noise 1) on EulerDiscreteScheduler's sigmas."""
    kd_sampling, _ = import_k_diffusion()
    euler = make_scheduler("dpmpp_2s_a", case["schedule"])
    euler.set_timesteps(case["steps"])
    sigmas = euler.sigmas.to(dtype)
    cond, uncond = pipe.encode_prompt(case["prompt"], torch.device("cpu"), 1, True, case["negative_prompt"])
    model = cfg_eps_denoiser(pipe.unet, euler.alphas_cumprod, torch.cat([uncond, cond]), case["cfg_scale"])
    shape = (1, pipe.unet.config.in_channels, case["height"] // 8, case["width"] // 8)
    with Recorder(pipe.unet, noise_f32=dtype != torch.float32) as rec:
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype) * sigmas[0]
        rec.step_in.append(x.clone())

        def noise_sampler(sigma, sigma_next):
            n = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
            rec.noise.append(n.clone())
            return n

        def callback(d):
            if d["i"] > 0:
                rec.latents.append(d["x"].clone())

        x = kd_sampling.sample_dpmpp_2s_ancestral(model, x, sigmas, callback=callback, disable=True,
                                                   noise_sampler=noise_sampler)
        rec.latents.append(x.clone())
        rec.denoised = model.outputs
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True])[0], rec


@torch.no_grad()
def run_sampler_case(pipes, case, dtype=torch.float32, **overrides):
    """One case through diffusers (k-diffusion for dpmpp_2s_a); returns (raw HxWx3 in [0,1], Recorder)."""
    case = dict(case, **overrides)
    pipe = pipes[(case["mode"], case["model"])]
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    if case["sampler"] == "dpmpp_2s_a":
        return run_dpmpp_2s_a(pipe, case, gen, dtype)
    pipe.scheduler = make_scheduler(case["sampler"], case["schedule"])
    kw = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"], num_inference_steps=case["steps"],
              guidance_scale=case["cfg_scale"], generator=gen, output_type="np")
    if case["mode"] == "img2img":
        x = pixels_to_tensor(np.asarray(Image.open(FIXTURES / case["image"]).convert("RGB"))).to(dtype)
        kw.update(image=vae_mean(pipe.vae, x) * pipe.vae.config.scaling_factor, strength=case["strength"])
    else:
        kw.update(width=case["width"], height=case["height"])
    with Recorder(pipe.unet, pipe.scheduler, noise_f32=dtype != torch.float32) as rec:
        out = pipe(**kw)
    return out.images[0], rec


def _sampler_case(name, sampler, schedule, steps=6, cfg=7.5, mode="txt2img", strength=None, model="tiny-sd1"):
    return dict(name=name, mode=mode, model=model, sampler=sampler, schedule=schedule, prompt=SAMPLER_PROMPT,
                negative_prompt="", seed=42, steps=steps, cfg_scale=cfg, width=64, height=64, strength=strength,
                image=INIT if mode == "img2img" else None)


def sampler_cases():
    plain = [s for s in SAMPLER_TABLE if s != "lcm"]
    cases = [_sampler_case(f"{s}_normal", s, "normal") for s in plain]
    cases += [_sampler_case(f"{s}_karras", s, "karras") for s in plain if not schedule_dropped(s, "karras")]
    cases += [
        _sampler_case("euler_exponential", "euler", "exponential"),
        _sampler_case("euler_beta", "euler", "beta"),
        _sampler_case("dpmpp_2m_trailing", "dpmpp_2m", "trailing"),
        _sampler_case("euler_a_trailing_1step", "euler_a", "trailing", steps=1),
        _sampler_case("ddim_trailing", "ddim", "trailing"),
        _sampler_case("dpmpp_2m_exponential", "dpmpp_2m", "exponential"),
        _sampler_case("euler_normal_1step", "euler", "normal", steps=1),
        _sampler_case("dpmpp_2m_normal_1step", "dpmpp_2m", "normal", steps=1),
    ]
    cases += [_sampler_case(f"img2img_{s}_s06", s, "normal", mode="img2img", strength=0.6)
              for s in ("heun", "dpmpp_2m", "lms")]
    cases += [
        _sampler_case("lcm_normal", "lcm", "normal", steps=4, cfg=8.0, model="tiny-lcm"),
        _sampler_case("lcm_normal_1step", "lcm", "normal", steps=1, cfg=8.0, model="tiny-lcm"),
    ]
    return cases


def scheduler_description(sampler, schedule):
    cls, opts = SAMPLER_TABLE[sampler]
    d = {"class": cls.__name__, "options": {**opts, **SCHEDULE_TABLE[schedule]}}
    if sampler == "dpmpp_2s_a":
        d = {"class": f"k_diffusion.sampling.sample_dpmpp_2s_ancestral (k-diffusion {K_DIFFUSION_VERSION})",
             "sigmas": {"class": cls.__name__, "options": dict(SCHEDULE_TABLE[schedule])},
             "denoiser": "k_diffusion.external.DiscreteEpsDDPMDenoiser(unet, alphas_cumprod, quantize=False) with CFG"}
    dropped = schedule_dropped(sampler, schedule)
    if dropped:
        d["dropped_options"] = dropped
    return d


# ---- schedule tables ---------------------------------------------------------------------


def _as_tensor(v):
    """A scheduler value as it is held: tensors keep their dtype, Python floats become float64."""
    if torch.is_tensor(v):
        return v.detach().clone().reshape(-1) if v.ndim == 0 else v.detach().clone()
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v.copy())
    return torch.tensor([float(v)], dtype=torch.float64)


def scheduler_arrays(sampler, s, steps):
    """What a sigma-space reimplementation wants to compare against, for one set_timesteps(steps)."""
    a = {"timesteps": _as_tensor(s.timesteps)}
    if sampler == "dpmpp_2s_a":
        kd_sampling, kd_external = import_k_diffusion()
        kd = kd_external.DiscreteEpsDDPMDenoiser(None, s.alphas_cumprod, quantize=False)
        sig = s.sigmas
        a["sigmas"] = sig.clone()
        a["timesteps"] = kd.sigma_to_t(sig[:-1]).clone()  # what the UNet gets at each step's first call
        a["init_noise_sigma"] = sig[:1].clone()
        ups, downs, mids = [], [], []
        for i in range(len(sig) - 1):
            down, up = kd_sampling.get_ancestral_step(sig[i], sig[i + 1])
            downs.append(torch.as_tensor(down, dtype=sig.dtype))
            ups.append(torch.as_tensor(up, dtype=sig.dtype))
            if down > 0:  # as sample_dpmpp_2s_ancestral: t = -log(sigma), midpoint s = t + h/2
                t, t_next = sig[i].log().neg(), torch.as_tensor(down).log().neg()
                mids.append((t + 0.5 * (t_next - t)).neg().exp())
        a["sigmas_down"], a["sigmas_up"] = torch.stack(downs), torch.stack(ups)
        if mids:
            a["sigmas_mid"] = torch.stack(mids)
            a["timesteps_mid"] = kd.sigma_to_t(a["sigmas_mid"]).clone()
        return a
    if torch.is_tensor(getattr(s, "sigmas", None)):
        a["sigmas"] = s.sigmas.clone()
    a["init_noise_sigma"] = _as_tensor(s.init_noise_sigma)
    if isinstance(s, (DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler)):
        alpha_t, sigma_t = s._sigma_to_alpha_sigma_t(s.sigmas)
        a["alpha_t"], a["sigma_t"] = alpha_t.clone(), sigma_t.clone()
        a["lambda_t"] = torch.log(alpha_t) - torch.log(sigma_t)
    elif isinstance(s, (KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler)):
        a["sigmas_interpol"] = s.sigmas_interpol.clone()
        if isinstance(s, KDPM2AncestralDiscreteScheduler):
            a["sigmas_up"], a["sigmas_down"] = s.sigmas_up.clone(), s.sigmas_down.clone()
    elif isinstance(s, LMSDiscreteScheduler):
        coeffs = torch.zeros((len(s.timesteps), 4), dtype=torch.float64)
        for i in range(len(s.timesteps)):
            order = min(i + 1, 4)  # step() with the default order 4, from the first step on
            for k in range(order):
                coeffs[i, k] = s.get_lms_coefficient(order, i, k)
        a["lms_coeffs"] = coeffs
    elif isinstance(s, DDIMScheduler):
        ts = s.timesteps
        prev = ts - s.config.num_train_timesteps // steps
        a["prev_timesteps"] = prev.clone()
        a["alphas_cumprod"] = s.alphas_cumprod[ts].clone()
        a["alphas_cumprod_prev"] = torch.stack(
            [s.alphas_cumprod[int(p)] if p >= 0 else s.final_alpha_cumprod for p in prev])
    elif isinstance(s, PNDMScheduler):  # per UNet call, the (t, t_prev) pair _get_prev_sample uses
        ratio = s.config.num_train_timesteps // steps
        ts, prevs = [], []
        for c, t in enumerate(s.timesteps.tolist()):
            t_use, prev = (t + ratio, t) if c == 1 else (t, t - ratio)
            ts.append(t_use)
            prevs.append(prev)
        a["step_t"], a["step_prev_t"] = torch.tensor(ts), torch.tensor(prevs)
        a["alphas_cumprod"] = s.alphas_cumprod[a["step_t"]].clone()
        a["alphas_cumprod_prev"] = torch.stack(
            [s.alphas_cumprod[p] if p >= 0 else s.final_alpha_cumprod for p in prevs])
    elif isinstance(s, DDPMScheduler):
        prev = torch.stack([torch.as_tensor(s.previous_timestep(t)) for t in s.timesteps])
        a["prev_timesteps"] = prev
        a["alphas_cumprod"] = s.alphas_cumprod[s.timesteps].clone()
        a["alphas_cumprod_prev"] = torch.stack([s.alphas_cumprod[p] if p >= 0 else s.one for p in prev])
        a["variance"] = torch.stack([s._get_variance(t) for t in s.timesteps])
    elif isinstance(s, LCMScheduler):
        ts = s.timesteps
        prev = torch.cat([ts[1:], ts[-1:]])  # the last step returns `denoised`, prev is unused
        a["alphas_cumprod"] = s.alphas_cumprod[ts].clone()
        a["alphas_cumprod_prev"] = s.alphas_cumprod[prev].clone()
        c = [s.get_scalings_for_boundary_condition_discrete(t) for t in ts]
        a["c_skip"] = torch.stack([torch.as_tensor(x[0]) for x in c])
        a["c_out"] = torch.stack([torch.as_tensor(x[1]) for x in c])
    return a


def same_array(a, b):
    """Bit-for-bit equal, NaN == NaN (KDPM2's unused sigmas_interpol[0] and KDPM2A's last sigmas_up are NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return bool(torch.all((a == b) | (torch.isnan(a) & torch.isnan(b))))
    return torch.equal(a, b)


def make_schedule_tables():
    """schedules.safetensors + schedules.json: every sampler x schedule x steps diffusers accepts."""
    tensors, entries = {}, []
    for sampler in SAMPLER_TABLE:
        for schedule in SCHEDULE_TABLE:
            for steps in SCHEDULE_STEPS:
                prefix = f"{sampler}.{schedule}.{steps}"
                cls, opts = SAMPLER_TABLE[sampler]
                entry = dict(key_prefix=prefix, sampler=sampler, schedule=schedule, steps=steps, **{"class": cls.__name__},
                             options={**opts, **SCHEDULE_TABLE[schedule]})
                dropped = schedule_dropped(sampler, schedule)
                try:
                    s = make_scheduler(sampler, schedule)
                    s.set_timesteps(steps)
                    arrays = scheduler_arrays(sampler, s, steps)
                except Exception as e:  # noqa: BLE001  (recorded, not hidden)
                    entry.update(status="raised", error=f"{type(e).__name__}: {e}")
                    entries.append(entry)
                    continue
                normal = make_scheduler(sampler, "normal")
                normal.set_timesteps(steps)
                ref = scheduler_arrays(sampler, normal, steps)
                same = sorted(ref) == sorted(arrays) and all(same_array(ref[k], arrays[k]) for k in ref)
                entry["equals_normal"] = bool(same)
                if dropped:
                    assert same, f"{prefix}: a dropped option changed the schedule"
                    entry.update(status="ignored", dropped_options=dropped)
                    entries.append(entry)
                    continue
                entry.update(status="ok", arrays={})
                for k, v in arrays.items():
                    tensors[f"{prefix}.{k}"] = v.contiguous()
                    entry["arrays"][k] = f"{str(v.dtype).replace('torch.', '')} {list(v.shape)}"
                entries.append(entry)
    base = DDIMScheduler.from_config(tiny_scheduler_config())
    ac = base.alphas_cumprod.clone()
    tensors["train.alphas_cumprod"] = ac
    tensors["train.sigmas"] = ((1 - ac) / ac) ** 0.5
    _, kd_external = import_k_diffusion()
    assert torch.equal(kd_external.DiscreteEpsDDPMDenoiser(None, ac, quantize=False).sigmas, tensors["train.sigmas"])
    for sampler in SAMPLER_TABLE:  # every class builds the same table
        assert torch.equal(make_scheduler(sampler, "normal").alphas_cumprod, ac), sampler
    return tensors, entries


def cls_name(sampler):
    return SAMPLER_TABLE[sampler][0].__name__


# ---- tiny-lcm --------------------------------------------------------------------------


@torch.no_grad()
def build_unet_lcm():
    """tiny-sd1's UNet recipe on LCM_UNET_CONFIG (two levels, time_cond_proj_dim 32), its own seeds (prefix
    unet_lcm.) and gains."""
    torch.manual_seed(0)  # (the default init is overwritten anyway)
    unet = build_unet(LCM_UNET_CONFIG, "unet_lcm.", UNET_ID_OUT, LCM_F_OUT)
    for name, mod in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            mod.weight.mul_(LCM_ATTN2_GAIN)
    unet.time_embedding.cond_proj.weight.mul_(LCM_COND_PROJ_GAIN)
    round_to_fp16(unet)
    return unet.eval()


def make_lcm_model(pipe):
    for p in (LCM_DIR,):
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)
    LCM_DIR.mkdir(parents=True)
    unet = build_unet_lcm()
    check_weights("unet_lcm", unet.state_dict())
    cp = unet.time_embedding.cond_proj
    assert cp.in_features == 32 and cp.out_features == LCM_UNET_CONFIG["block_out_channels"][0] and cp.bias is None
    sd1_digests = {hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for v in pipe.unet.state_dict().values()}
    for k, v in unet.state_dict().items():
        assert hashlib.sha256(v.float().numpy().tobytes()).hexdigest() not in sd1_digests, f"unet_lcm.{k} copies tiny-sd1"
    assert set(unet.state_dict()) - set(pipe.unet.state_dict()) == {"time_embedding.cond_proj.weight"}
    unet.half().save_pretrained(str(LCM_DIR / "unet"), safe_serialization=True)
    unet.float()
    for name in LCM_SHARED:
        os.symlink(f"../tiny-sd1/{name}", LCM_DIR / name, target_is_directory=True)
    (LCM_DIR / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    chmod_plain(LCM_DIR)
    with safe_open(str(LCM_DIR / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
        n_tensors = len(list(f.keys()))
    lcm = StableDiffusionPipeline.from_pretrained(str(LCM_DIR), safety_checker=None, dtype=torch.float32,
                                                  local_files_only=True)
    lcm.set_progress_bar_config(disable=True)
    assert lcm.unet.config.time_cond_proj_dim == 32 and type(lcm.scheduler).__name__ == "PNDMScheduler"
    state_dicts_equal(lcm.unet, unet, "tiny-lcm unet")
    state_dicts_equal(lcm.vae, pipe.vae, "tiny-lcm vae")
    state_dicts_equal(lcm.text_encoder, pipe.text_encoder, "tiny-lcm text_encoder")
    n_params = sum(p.numel() for p in unet.parameters())
    msg = (f"StableDiffusionPipeline.from_pretrained(tiny-lcm): UNet {n_tensors} F16 tensors ({n_params} parameters, "
           f"time_cond_proj_dim 32) identical to the built one; vae/text_encoder/tokenizer/scheduler via symlinks")
    log("  " + msg)
    return lcm, msg


# ---- the fixtures ------------------------------------------------------------------------


def make_sampler_fixtures(pipe):
    """tiny-lcm/ and reference/samplers/: images, schedule tables, per-step traces."""
    t0 = time.time()
    kd_sampling, _ = import_k_diffusion()
    if SAMPLERS_DIR.exists():
        shutil.rmtree(SAMPLERS_DIR)
    SAMPLERS_DIR.mkdir(parents=True)
    log("\nsampler fixtures: tiny-lcm")
    lcm_pipe, lcm_msg = make_lcm_model(pipe)
    pipes = {
        ("txt2img", "tiny-sd1"): pipe,
        ("img2img", "tiny-sd1"): StableDiffusionImg2ImgPipeline(**pipe.components),
        ("txt2img", "tiny-lcm"): lcm_pipe,
    }
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)

    # ---- schedule tables -------------------------------------------------------------------
    log("schedule tables")
    sched_tensors, sched_entries = make_schedule_tables()
    save_file(sched_tensors, str(SAMPLERS_DIR / "schedules.safetensors"), metadata={"format": "pt"})
    support = {}
    for e in sched_entries:
        support.setdefault(e["sampler"], {}).setdefault(e["schedule"], []).append(e)
    for sampler, row in support.items():
        for schedule, es in row.items():
            statuses = {e["status"] for e in es}
            if statuses == {"ok"} and schedule != "normal" and all(e["equals_normal"] for e in es):
                statuses = {"= normal"}
            row[schedule] = "/".join(sorted(statuses))
    raised = [e for e in sched_entries if e["status"] == "raised"]
    log(f"  {len(sched_tensors)} tensors; {sum(e['status'] == 'ok' for e in sched_entries)} ok, "
        f"{sum(e['status'] == 'ignored' for e in sched_entries)} ignored, {len(raised)} raised")
    for e in raised:
        log(f"  raised: {e['key_prefix']}: {e['error']}")
    log(f"  {'sampler':13s} " + " ".join(f"{s:>12s}" for s in SCHEDULE_TABLE))
    for sampler, row in support.items():
        log(f"  {sampler:13s} " + " ".join(f"{row[s]:>12s}" for s in SCHEDULE_TABLE))

    # ---- cases -------------------------------------------------------------------------------
    log("running sampler cases")
    cases = sampler_cases()
    results, recs, cases_json = {}, {}, []
    for case in cases:
        t1 = time.time()
        raw, rec = run_sampler_case(pipes, case)
        assert raw.shape == (case["height"], case["width"], 3)
        u8 = to_uint8(raw)
        Image.fromarray(u8, "RGB").save(SAMPLERS_DIR / f"{case['name']}.png")
        results[case["name"]], recs[case["name"]] = (u8, raw), rec
        entry = dict(case, png=f"{case['name']}.png", scheduler=scheduler_description(case["sampler"], case["schedule"]),
                     unet_calls=len(rec.unet_t), unet_batch=rec.unet_batch[0], noise_draws=len(rec.noise))
        cases_json.append(entry)
        log(f"  {case['name']:26s} {len(rec.unet_t):2d} UNet calls (batch {rec.unet_batch[0]}), "
            f"{len(rec.noise)} noise draws: {time.time() - t1:.1f}s")
    for case in cases:
        back = np.asarray(Image.open(SAMPLERS_DIR / f"{case['name']}.png"))
        assert back.dtype == np.uint8 and np.array_equal(back, results[case["name"]][0]), case["name"]

    # the pipeline behaviours the README describes
    lcm_rec = recs["lcm_normal"]
    assert lcm_rec.unet_batch == [1] * 4 and len(lcm_rec.unet_t) == 4, "LCM: one conditional UNet pass per step"
    assert all(b == 2 for n, r in recs.items() if not n.startswith("lcm") for b in r.unet_batch), "CFG batch"
    for name in ("img2img_heun_s06", "img2img_dpmpp_2m_s06", "img2img_lms_s06"):
        full = make_scheduler(next(c for c in cases if c["name"] == name)["sampler"], "normal")
        full.set_timesteps(6)
        k = min(int(6 * 0.6), 6)
        assert k == 3 and recs[name].unet_t == full.timesteps[(6 - k) * full.order:].tolist(), name

    # ---- traces --------------------------------------------------------------------------------
    traces = {}
    for sampler in TRACED:
        name = "lcm_normal" if sampler == "lcm" else f"{sampler}_normal"
        rec = recs[name]
        p = f"trace.{sampler}."
        traces[p + "latents"] = torch.cat(rec.latents)[:, None].float()
        traces[p + "unet_t"] = torch.tensor(rec.unet_t, dtype=torch.float64)
        traces[p + "unet_in"] = torch.cat(rec.unet_in)[:, None].float()
        traces[p + "init_latents"] = rec.step_in[0].float()
        if sampler == "dpmpp_2s_a":
            traces[p + "denoised"] = torch.cat(rec.denoised)[:, None].float()
        else:
            traces[p + "eps"] = torch.cat(rec.eps)[:, None].float()
        if rec.noise:
            traces[p + "noise"] = torch.cat(rec.noise)[:, None].float()
        # the last latents are what the VAE decodes
        with torch.no_grad():
            pp = pipes[("txt2img", "tiny-lcm" if sampler == "lcm" else "tiny-sd1")]
            img = pp.vae.decode(traces[p + "latents"][-1] / pp.vae.config.scaling_factor).sample
        assert np.array_equal(to_uint8(img[0].permute(1, 2, 0).numpy() / 2 + 0.5), results[name][0]), sampler
    traces = {k: v.contiguous() for k, v in traces.items()}
    save_file(traces, str(SAMPLERS_DIR / "traces.safetensors"), metadata={"format": "pt"})

    # ---- LCM module tensors ----------------------------------------------------------------------
    mod = {}
    with torch.no_grad():
        w = torch.tensor(8.0 - 1).repeat(1)
        mod["lcm.w_embedding"] = lcm_pipe.get_guidance_scale_embedding(w, embedding_dim=32)
        mod["lcm.sample"] = lcm_rec.unet_in[0]
        mod["lcm.timestep"] = torch.tensor([lcm_rec.unet_t[0]], dtype=torch.float32)
        cond, _ = lcm_pipe.encode_prompt(SAMPLER_PROMPT, torch.device("cpu"), 1, False)
        mod["lcm.context"] = cond
        mod["lcm.out"] = lcm_pipe.unet(mod["lcm.sample"], mod["lcm.timestep"], encoder_hidden_states=cond,
                                       timestep_cond=mod["lcm.w_embedding"]).sample
        assert torch.equal(mod["lcm.out"], lcm_rec.eps[0]), "the LCM pipeline's first UNet call differs"
        no_cond = lcm_pipe.unet(mod["lcm.sample"], mod["lcm.timestep"], encoder_hidden_states=cond).sample
        cond_effect = float((no_cond - mod["lcm.out"]).abs().mean() / mod["lcm.out"].abs().mean())
    mod = {k: v.detach().float().contiguous() for k, v in mod.items()}
    save_file(mod, str(SAMPLERS_DIR / "modules.safetensors"), metadata={"format": "pt"})
    log(f"  lcm: dropping timestep_cond changes the first UNet output by {100 * cond_effect:.0f}% (mean abs, relative)")

    # ---- statistics and sensitivity ------------------------------------------------------------
    log("\nsampler image statistics (levels of 255):")
    for case in cases:
        u8 = results[case["name"]][0]
        f = u8.astype(np.float64)
        sat = float(np.mean((u8 == 0) | (u8 == 255)))
        log(f"  {case['name']:26s} mean {f.mean():6.1f} std {f.std():5.1f} sat {100 * sat:5.2f}%")
        assert f.std() >= MIN_STD, f"{case['name']}: image too flat"
        assert sat <= MAX_SATURATED, f"{case['name']}: too many saturated pixels"

    def diff(a, b):
        return float(np.abs(results[a][0].astype(np.float64) - results[b][0]).mean())

    plain = [s for s in SAMPLER_TABLE if s != "lcm"]
    matrix = {a: {b: round(diff(f"{a}_normal", f"{b}_normal"), 2) for b in plain} for a in plain}
    log("\nmean abs difference between samplers, normal schedule, 6 steps (levels):")
    log("  " + " " * 13 + "".join(f"{b[:7]:>8s}" for b in plain))
    for a in plain:
        log(f"  {a:13s}" + "".join(f"{matrix[a][b]:8.1f}" for b in plain))
    for a in plain:
        far = max(matrix[a][b] for b in plain if b != a)
        assert far >= MIN_SAMPLER_DIFF, f"{a}: within {far:.2f} levels of every other sampler"
        assert a == "euler" or matrix[a]["euler"] > MIN_VS_EULER, f"{a} vs euler: only {matrix[a]['euler']:.2f}"
    nearest = min((matrix[a][b], a, b) for a, b in itertools.combinations(plain, 2))
    log(f"  closest pair: {nearest[1]} / {nearest[2]}: {nearest[0]:.2f}")
    other = {}
    log("\nschedules, steps and img2img against the same sampler's normal 6-step image (levels):")
    for case in cases:
        if case["schedule"] == "normal" and case["steps"] == 6 and case["mode"] == "txt2img":
            continue
        if case["sampler"] == "lcm":
            continue
        d = diff(case["name"], f"{case['sampler']}_normal")
        other[case["name"]] = round(d, 2)
        why = NEAR_NORMAL.get(case["name"])
        log(f"  {case['name']:26s} {d:6.1f}" + (f"  (expected: {why})" if why else ""))
        assert d > MIN_VS_EULER or why, f"{case['name']}: the schedule/steps/mode has no visible effect"
    lcm_sens = {}
    for label, kw in (("cfg 8 -> 2", dict(cfg_scale=2.0)), ("4 steps -> 1", dict(steps=1)),
                      ("prompt", dict(prompt="a red fox in the snow")), ("seed+1", dict(seed=43))):
        u8 = to_uint8(run_sampler_case(pipes, next(c for c in cases if c["name"] == "lcm_normal"), **kw)[0])
        lcm_sens[label] = round(float(np.abs(u8.astype(np.float64) - results["lcm_normal"][0]).mean()), 2)
    log(f"  lcm_normal: {lcm_sens}")
    assert lcm_sens["cfg 8 -> 2"] >= MIN_LCM_CFG_DIFF and min(lcm_sens.values()) >= MIN_LCM_CFG_DIFF
    assert min(v for k, v in lcm_sens.items() if k != "cfg 8 -> 2") >= MIN_SAMPLER_DIFF, lcm_sens

    # numerical robustness: float64 with the same noise
    log("\nsamplers, float64 vs float32 (same noise), |diff| of the [0,255]-scaled output before rounding:")
    worst = 0.0
    f64_max = {}
    try:
        for p in pipes.values():
            p.to(torch.float64)
        for case in cases:
            raw64 = run_sampler_case(pipes, case, dtype=torch.float64)[0]
            d = float(np.abs(raw64 - results[case["name"]][1]).max() * 255)
            f64_max[case["name"]] = round(d, 5)
            worst = max(worst, d)
        log("  " + ", ".join(f"{k} {v:.4f}" for k, v in f64_max.items()))
        log(f"  worst {worst:.5f}")
        assert worst < 0.05, "sampler references are numerically fragile"
    finally:
        for p in pipes.values():
            p.to(torch.float32)

    # ---- cases.json ----------------------------------------------------------------------------------
    karras = {s: (scheduler_description(s, "karras").get("dropped_options") and
                  f"{cls_name(s)} has no use_karras_sigmas: from_config drops it silently, the schedule stays normal")
              or "supported" for s in SAMPLER_TABLE}
    meta = {
        "models": {"tiny-sd1": "tests/fixtures/tiny-sd1", "tiny-lcm": "tests/fixtures/tiny-lcm"},
        "paths": "image is relative to tests/fixtures; png to this folder",
        "produced_by": "tests/reference/make_fixtures.py",
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "k_diffusion": K_DIFFUSION_VERSION,
        "dtype": "float32",
        "device": "cpu",
        "scheduler_config": "tests/fixtures/tiny-sd1/scheduler/scheduler_config.json (every case, tiny-lcm too)",
        "schedules": SCHEDULE_TABLE,
        "samplers": {s: {"class": c.__name__, "options": o} for s, (c, o) in SAMPLER_TABLE.items()},
        "dpmpp_2s_a": ("k_diffusion.sampling.sample_dpmpp_2s_ancestral(model, x, sigmas, eta=1, s_noise=1, "
                       "noise_sampler=lambda s, sn: torch.randn(shape, generator=gen)); sigmas = "
                       "EulerDiscreteScheduler.from_config(config, **schedule).set_timesteps(steps).sigmas; "
                       "x = randn(generator) * sigmas[0]; model = DiscreteEpsDDPMDenoiser(unet, alphas_cumprod, "
                       "quantize=False) with CFG (one batch-2 call, uncond + cfg*(cond-uncond))"),
        "lcm": ("StableDiffusionPipeline(tiny-lcm) with LCMScheduler.from_config(config): unet.config.time_cond_proj_dim "
                "is set, so the pipeline runs one conditional UNet pass per step (no CFG batch, the negative prompt is "
                "unused) with timestep_cond = get_guidance_scale_embedding(cfg - 1, embedding_dim=32)"),
        "img2img": ("StableDiffusionImg2ImgPipeline, image = VAE posterior mean * 0.18215 (nothing sampled); "
                    "n = min(int(steps*strength), steps) steps run: timesteps[(steps-n)*order:], "
                    "set_begin_index((steps-n)*order)"),
        "karras_support": karras,
        "unet_calls": "UNet evaluations of the case (each a CFG batch of 2 unless unet_batch is 1)",
        "noise_draws": "randn draws of the latent shape by the sampler after the initial latents, in order",
        "sampler_differences": matrix,
        "differences_vs_normal": other,
        "lcm_sensitivity": lcm_sens,
        "float64_max_levels": f64_max,
        "pixel_conversion": "round(clip(x, 0, 1) * 255) of diffusers' output_type='np'",
        "cases": cases_json,
    }
    (SAMPLERS_DIR / "cases.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    steps_json = {
        "produced_by": "tests/reference/make_fixtures.py",
        "diffusers": diffusers.__version__,
        "k_diffusion": K_DIFFUSION_VERSION,
        "scheduler_config": "tests/fixtures/tiny-sd1/scheduler/scheduler_config.json",
        "created_with": "<class>.from_config(scheduler_config, **options); set_timesteps(steps)",
        "steps": list(SCHEDULE_STEPS),
        "schedules": SCHEDULE_TABLE,
        "samplers": {s: scheduler_description(s, "normal") for s in SAMPLER_TABLE},
        "status": {"ok": "arrays stored as <key_prefix>.<array> (dtype and shape listed); equals_normal: every array "
                   "equals the normal schedule's",
                   "ignored": "the class's __init__ has no such option (dropped_options): from_config drops it without "
                   "an error or a log message, even at debug level, and the schedule equals the normal one; nothing "
                   "stored",
                   "raised": "from_config or set_timesteps raised `error`; nothing stored"},
        "train": {"train.alphas_cumprod": "float32 [1000], diffusers' table (betas = linspace(sqrt(0.00085), "
                  "sqrt(0.012), 1000, float32)**2, cumprod of 1-betas)",
                  "train.sigmas": "float32 [1000], ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 in float32"},
        "entries": sched_entries,
    }
    head = json.dumps(steps_json, indent=2, ensure_ascii=False)
    head = head[: head.index('  "entries": [')]  # one line per entry below
    body = ",\n".join("    " + json.dumps(e, ensure_ascii=False) for e in sched_entries)
    (SAMPLERS_DIR / "schedules.json").write_text(head + '  "entries": [\n' + body + "\n  ]\n}\n")
    json.loads((SAMPLERS_DIR / "schedules.json").read_text())
    chmod_plain(SAMPLERS_DIR)
    log(f"\n{lcm_msg}\nsampler fixtures done in {time.time() - t0:.0f}s")
    return lcm_msg


# --------------------------------------------------------------------------------------
# SD 2.x (tests/fixtures/tiny-sd2/, tiny-sd2.safetensors, reference/sd2/)
# --------------------------------------------------------------------------------------

SD2_DIR = FIXTURES / "tiny-sd2"
SD2_SINGLE_FILE = FIXTURES / "tiny-sd2.safetensors"
# The ε variant is not committed: cases.json's "eps_patch" says how to make it from tiny-sd2.safetensors
# (the Rust test writes it itself). This script builds it in a temporary folder.
SD2_EPS_NAME = "tiny-sd2-eps.safetensors"
SD2_EPS_TENSOR = "model.diffusion_model.out.2.bias"
SD2_LEGACY = (FIXTURES / SD2_EPS_NAME,)  # committed by earlier versions of this script: deleted
SD2_REF_DIR = FIXTURES / "reference" / "sd2"
SD2_OUTPUTS = (SD2_DIR, SD2_SINGLE_FILE, SD2_REF_DIR)
# stabilityai/stable-diffusion-2-1's scheduler/scheduler_config.json, verbatim (345 bytes with this
# indent and newline). It has no timestep_spacing key: each class keeps its own default.
SD2_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD2_MODEL_INDEX = dict(MODEL_INDEX, scheduler=["diffusers", "DDIMScheduler"])
# SD 2.1's UNet options on two levels (16 and 32 channels, 16 norm groups as tiny-sd1). A list attention_head_dim is
# diffusers' (misnamed) heads per block: 1 head per block, the block's whole width (SD 2.x's heads are 64 wide;
# sdgen infers heads = channels / 64, at least 1).
SD2_UNET_CONFIG = dict(UNET_CONFIG, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(1, 1),
                       use_linear_projection=True, upcast_attention=True)
# OpenCLIP ViT-H's activation is exact GELU; heads = width/64 as in ViT-H (16 x 64), so 1 here.
SD2_CLIP_CONFIG = dict(CLIP_CONFIG, hidden_act="gelu", pad_token_id=0)
SD2_TOWER_LAYERS = CLIP_CONFIG["num_hidden_layers"] + 1  # SD2 drops the last OpenCLIP block (penultimate layer)
SD2_SHARED = ("vae",)  # relative symlinks to ../tiny-sd1/*
# out.2.bias shifts, so A1111's/sd.cpp's v-prediction probe (value < -1 means v) lands clearly on each
# side (margin >= 0.5). Unshifted the probe gives -0.51. The folder carries the v shift. Both are exact
# in f32 (and JSON), so the Rust side adds the very same number.
SD2_V_BIAS_SHIFT = -1.125
SD2_EPS_BIAS_DELTA = 1.25  # tiny-sd2-eps.safetensors' out.2.bias = f16(f32(tiny-sd2's) + this)
SD2_PROBE_MARGIN = 0.5
# conv_out's identity gain (tiny-sd1: UNET_ID_OUT = 1.2). At 1.2 this all-64-channel UNet gives euler and ddim
# images only 4.6 levels apart; 1.6 gives 6.9 (the check wants >= MIN_PAIR_DIFF).
SD2_ID_OUT = 1.6


def _sd2_case(name, model, prediction, sampler, prompt="a photo of a cat", neg=None, seed=42):
    return dict(name=name, model=model, prediction=prediction, prompt=prompt, negative_prompt=neg, seed=seed,
                steps=10, cfg_scale=7.5, width=64, height=64, sampler=sampler)


SD2_CASES = [
    _sd2_case("cat_euler", "tiny-sd2", "v", "euler"),
    _sd2_case("cat_euler_a", "tiny-sd2", "v", "euler_a"),
    _sd2_case("cat_ddim", "tiny-sd2", "v", "ddim"),
    _sd2_case("fox_euler_neg_seed7", "tiny-sd2", "v", "euler", "a red fox in the snow", "blurry", 7),
    _sd2_case("eps_file_cat_euler", SD2_EPS_NAME, "eps", "euler"),
    _sd2_case("cat_euler_force_eps", "tiny-sd2", "eps", "euler"),  # what `--prediction eps` gives
]
SD2_DIFF_PAIRS = [  # (a, b): must differ by >= MIN_PAIR_DIFF levels (mean abs)
    ("cat_euler", "cat_euler_a"),
    ("cat_euler", "cat_ddim"),
    ("cat_euler", "fox_euler_neg_seed7"),
    ("cat_euler", "cat_euler_force_eps"),
    ("eps_file_cat_euler", "cat_euler_force_eps"),
]
SD2_MIN_V_VS_EPS_MAX = 3  # levels: the v image and the forced-eps one must differ by far more than this (max)


@torch.no_grad()
def build_unet_sd2():
    """tiny-sd1's UNet recipe on SD2_UNET_CONFIG, its own seeds (prefix unet_sd2.), out.2.bias shifted for the probe."""
    torch.manual_seed(0)  # (the default init is overwritten anyway)
    unet = build_unet(SD2_UNET_CONFIG, "unet_sd2.", id_out=SD2_ID_OUT)
    unet.conv_out.bias.add_(SD2_V_BIAS_SHIFT)
    round_to_fp16(unet)
    return unet.eval()


@torch.no_grad()
def build_text_encoder_sd2(num_layers):
    """Seeded by name, so layers 0..1 are the same in the folder's 2 layers and the single file's 3-block tower."""
    te = CLIPTextModel(CLIPTextConfig(**dict(SD2_CLIP_CONFIG, num_hidden_layers=num_layers)))
    init_random(te, "text_encoder_sd2.")
    round_to_fp16(te)
    return te.eval()


def openclip_text_keys(te_sd, prefix="cond_stage_model.model."):
    """transformers CLIPTextModel(WithProjection) tensors -> OpenCLIP TextTransformer names, as SD 2.x checkpoints
    and SDXL's second encoder store them (fp16); text_projection becomes the transpose of text_projection.weight
    (open_clip computes x @ text_projection)."""
    sd = {k.removeprefix("text_model."): v.half() for k, v in te_sd.items()
          if not k.endswith("position_ids")}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),  # a bare [77, C] parameter
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    renames = (("layer_norm1", "ln_1"), ("self_attn.out_proj", "attn.out_proj"), ("layer_norm2", "ln_2"),
               ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
    for i in range(n_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for s in ("weight", "bias"):
            # nn.MultiheadAttention's packed projection: rows q, then k, then v
            out[f"{dst}attn.in_proj_{s}"] = torch.cat([sd.pop(f"{src}self_attn.{q}_proj.{s}") for q in "qkv"])
            for a, b in renames:
                out[f"{dst}{b}.{s}"] = sd.pop(f"{src}{a}.{s}")
    assert not sd, f"unconverted text encoder tensors: {sorted(sd)}"
    return {prefix + k: v.contiguous() for k, v in out.items()}


def sd2_text_encoder_keys(tower):
    """The single file's cond_stage_model.model.*: the whole tower plus the CLIP head SD2 never uses."""
    keys = openclip_text_keys(tower.state_dict())
    c = SD2_CLIP_CONFIG["hidden_size"]
    proj = randn("text_encoder_sd2.text_projection", (c, c)) / math.sqrt(c)
    keys["cond_stage_model.model.text_projection"] = proj.half()
    keys["cond_stage_model.model.logit_scale"] = torch.tensor(math.log(1 / 0.07)).half()  # OpenCLIP's init, a scalar
    return keys


@torch.no_grad()
def vpred_probe(unet):
    """A1111's / sd.cpp's v-prediction test: mean(unet(x=0.5, t=999, context=0.5) - x) < -1 means v."""
    x = torch.full((1, 4, 8, 8), 0.5)
    ctx = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
    out = unet(x, torch.tensor([999]), encoder_hidden_states=ctx).sample
    return float((out - x).mean()), out


@torch.no_grad()
def openclip_penultimate(keys, ids):
    """SD2's FrozenOpenCLIPEmbedder(layer="penultimate") on open_clip's own TextTransformer: all blocks but the
    last, then ln_final. An independent reading of the single file's text encoder."""
    from open_clip.transformer import TextTransformer

    c = SD2_CLIP_CONFIG["hidden_size"]
    tt = TextTransformer(context_length=77, vocab_size=TINY_VOCAB, width=c, heads=SD2_CLIP_CONFIG["num_attention_heads"],
                         layers=SD2_TOWER_LAYERS, mlp_ratio=SD2_CLIP_CONFIG["intermediate_size"] / c, output_dim=c,
                         act_layer=nn.GELU)
    prefix = "cond_stage_model.model."
    sd = {k[len(prefix):]: v.float() for k, v in keys.items() if k.startswith(prefix) and not k.endswith("logit_scale")}
    tt.load_state_dict(sd, strict=True)
    tt.eval()
    x, mask = tt._embeds(ids)
    for blk in tt.transformer.resblocks[:-1]:
        x = blk(x, attn_mask=mask)
    return tt.ln_final(x)


@contextlib.contextmanager
def f32_noise():
    """Keeps the pipeline's and Euler a's noise draws float32 while the pipeline runs in float64."""
    from diffusers.utils import torch_utils
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as psd
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as sea

    orig = torch_utils.randn_tensor

    def randn_f32(shape, generator=None, device=None, dtype=None, layout=None):
        return orig(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    psd.randn_tensor, sea.randn_tensor = randn_f32, randn_f32
    try:
        yield
    finally:
        psd.randn_tensor, sea.randn_tensor = orig, orig


def patch_f16_tensor(data: bytes, key: str, add: float) -> bytes:
    """A safetensors file's bytes with one F16 tensor replaced by f16(f32(value) + add) (round to nearest even),
    in place: header and every other byte unchanged. What the Rust test does to make the ε file."""
    n = int.from_bytes(data[:8], "little")
    info = json.loads(data[8 : 8 + n])[key]
    assert info["dtype"] == "F16", info
    start, end = (8 + n + o for o in info["data_offsets"])
    old = np.frombuffer(data[start:end], dtype="<f2")
    new = (old.astype(np.float32) + np.float32(add)).astype("<f2")
    assert new.dtype == np.dtype("<f2") and np.float32(add) == add
    return data[:start] + new.tobytes() + data[end:]


def sd2_scheduler_config(prediction):
    return dict(SD2_SCHEDULER_CONFIG, prediction_type={"v": "v_prediction", "eps": "epsilon"}[prediction])


def run_sd2_case(pipes, case):
    fields = ("name", "prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height", "sampler")
    return run_case(pipes[case["model"]], tuple(case[k] for k in fields),
                    scheduler_config=sd2_scheduler_config(case["prediction"]))


def make_sd2_fixtures():
    """tiny-sd2/, tiny-sd2.safetensors and reference/sd2/ (needs tiny-sd1's vae/tokenizer)."""
    t0 = time.time()
    for p in (SD2_DIR, SD2_REF_DIR):
        if p.exists():
            shutil.rmtree(p)
    for f in (SD2_SINGLE_FILE, *SD2_LEGACY):
        f.unlink(missing_ok=True)
    SD2_DIR.mkdir(parents=True)
    SD2_REF_DIR.mkdir(parents=True)

    # ---- diffusers folder -------------------------------------------------------------
    log("\nSD 2.x fixtures: tiny-sd2")
    # vocab.json and merges.txt: relative symlinks to ../../tiny-sd1/tokenizer/*
    tok = write_tokenizer(SD2_DIR / "tokenizer", pad_token="!", share_vocab_with="../../tiny-sd1/tokenizer")
    pad_ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert pad_ids == CAT_IDS + [0] * (77 - len(CAT_IDS)), pad_ids

    unet = build_unet_sd2()
    te = build_text_encoder_sd2(CLIP_CONFIG["num_hidden_layers"])  # the folder's
    tower = build_text_encoder_sd2(SD2_TOWER_LAYERS)  # the single file's: one more block
    for name, m in (("unet_sd2", unet), ("text_encoder_sd2", te), ("tower_sd2", tower)):
        check_weights(name, m.state_dict())
    tower_sd = tower.state_dict()
    for k, v in te.state_dict().items():
        assert torch.equal(v, tower_sd[k]), f"tower {k} differs from the folder's"
    assert {k for k in tower_sd if k not in te.state_dict()} == {k for k in tower_sd if ".layers.2." in k}
    sd1 = load_folder_pipeline()
    for new, old, what in ((unet, sd1.unet, "unet_sd2"), (tower, sd1.text_encoder, "tower_sd2")):
        old_digests = {hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for v in old.state_dict().values()}
        for k, v in new.state_dict().items():
            digest = hashlib.sha256(v.float().numpy().tobytes()).hexdigest()
            assert digest not in old_digests, f"{what}.{k} copies tiny-sd1"
    unet.half().save_pretrained(str(SD2_DIR / "unet"), safe_serialization=True)
    te.half().save_pretrained(str(SD2_DIR / "text_encoder"), safe_serialization=True)
    for m in (unet, te):
        m.float()
    for name in SD2_SHARED:
        os.symlink(f"../tiny-sd1/{name}", SD2_DIR / name, target_is_directory=True)
    (SD2_DIR / "scheduler").mkdir()
    (SD2_DIR / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2_SCHEDULER_CONFIG, indent=2) + "\n")
    assert (SD2_DIR / "scheduler" / "scheduler_config.json").stat().st_size == 345
    (SD2_DIR / "model_index.json").write_text(json.dumps(SD2_MODEL_INDEX, indent=2) + "\n")
    chmod_plain(SD2_DIR)
    for sub, fname in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        with safe_open(str(SD2_DIR / sub / fname), "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys()), sub

    folder_kw = dict(safety_checker=None, dtype=torch.float32, local_files_only=True)
    pipe = StableDiffusionPipeline.from_pretrained(str(SD2_DIR), **folder_kw)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    assert pipe.text_encoder.config.hidden_act == "gelu" and pipe.unet.config.upcast_attention
    state_dicts_equal(pipe.unet, unet, "tiny-sd2 unet")
    state_dicts_equal(pipe.text_encoder, te, "tiny-sd2 text_encoder")
    state_dicts_equal(pipe.vae, sd1.vae, "tiny-sd2 vae")
    del sd1

    # ---- single files ------------------------------------------------------------------
    log(f"writing + validating tiny-sd2.safetensors, {SD2_EPS_NAME} (patched, temporary)")
    te_keys = sd2_text_encoder_keys(tower)
    sd = build_single_file(pipe, te_keys)
    c0 = SD2_UNET_CONFIG["block_out_channels"][0]
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (c0, c0)  # linear, not 1x1 conv
    save_file(sd, str(SD2_SINGLE_FILE), metadata={"format": "pt"})
    chmod_tree(SD2_SINGLE_FILE)
    sf_bytes = SD2_SINGLE_FILE.read_bytes()
    eps_bytes = patch_f16_tensor(sf_bytes, SD2_EPS_TENSOR, SD2_EPS_BIAS_DELTA)
    bias_key = SD2_EPS_TENSOR
    sd_eps = dict(sd)
    sd_eps[bias_key] = (sd[bias_key].float() + SD2_EPS_BIAS_DELTA).half()  # torch's f32 add + f16 rounding
    assert save_bytes(sd_eps, metadata={"format": "pt"}) == eps_bytes, "byte patch differs from save_file's"
    n_hdr = int.from_bytes(sf_bytes[:8], "little")
    lo, hi = (8 + n_hdr + o for o in json.loads(sf_bytes[8 : 8 + n_hdr])[bias_key]["data_offsets"])
    assert len(sf_bytes) == len(eps_bytes) and sf_bytes[:lo] == eps_bytes[:lo] and sf_bytes[hi:] == eps_bytes[hi:]
    assert np.all(np.frombuffer(sf_bytes[lo:hi], "<f2") != np.frombuffer(eps_bytes[lo:hi], "<f2"))  # every channel
    eps_patch = {
        "from": SD2_SINGLE_FILE.name,
        "tensor": SD2_EPS_TENSOR,
        "add": SD2_EPS_BIAS_DELTA,
        "from_sha256": hashlib.sha256(sf_bytes).hexdigest(),
        "patched_sha256": hashlib.sha256(eps_bytes).hexdigest(),
    }
    sf_kw = dict(config=str(SD2_DIR), local_files_only=True, dtype=torch.float32, safety_checker=None)
    sf_pipe = StableDiffusionPipeline.from_single_file(str(SD2_SINGLE_FILE), **sf_kw)
    with tempfile.TemporaryDirectory(prefix="sdgen-sd2-eps-") as eps_tmp:
        eps_file = Path(eps_tmp) / SD2_EPS_NAME
        eps_file.write_bytes(eps_bytes)
        eps_pipe = StableDiffusionPipeline.from_single_file(str(eps_file), **sf_kw)
    n_checked = 0
    for name in ("unet", "vae", "text_encoder"):
        n_checked += state_dicts_equal(getattr(sf_pipe, name), getattr(pipe, name), f"tiny-sd2.safetensors {name}")
    for name in ("vae", "text_encoder"):
        state_dicts_equal(getattr(eps_pipe, name), getattr(pipe, name), f"{SD2_EPS_NAME} {name}")
    eps_unet, v_unet = eps_pipe.unet.state_dict(), pipe.unet.state_dict()
    assert sorted(eps_unet) == sorted(v_unet)
    assert [k for k in v_unet if not torch.equal(v_unet[k], eps_unet[k])] == ["conv_out.bias"]
    assert torch.equal(eps_unet["conv_out.bias"], sd_eps[bias_key].float())
    n_te = sum(k.startswith("cond_stage_model.") for k in sd)
    n_extra = sum(".resblocks.2." in k for k in sd)
    # diffusers maps resblocks.2 to encoder.layers.2, which the 2-layer model lacks: load_model_dict_into_meta skips it
    sf_result = (f"from_single_file(tiny-sd2.safetensors, config=tiny-sd2): {n_checked} tensors identical to the "
                 f"folder pipeline ({n_te} cond_stage_model tensors in the file, the {n_extra} of resblocks.2 "
                 f"ignored); {SD2_EPS_NAME} (patch) differs only in conv_out.bias")
    log("  " + sf_result)

    probe = {"tiny-sd2.safetensors": vpred_probe(sf_pipe.unet), "tiny-sd2-eps.safetensors": vpred_probe(eps_pipe.unet)}
    assert probe["tiny-sd2.safetensors"][0] == vpred_probe(pipe.unet)[0]
    log(f"  v-prediction probe: tiny-sd2 {probe['tiny-sd2.safetensors'][0]:.4f}, "
        f"tiny-sd2-eps {probe['tiny-sd2-eps.safetensors'][0]:.4f} (v when < -1)")
    assert probe["tiny-sd2.safetensors"][0] <= -1 - SD2_PROBE_MARGIN, probe
    assert probe["tiny-sd2-eps.safetensors"][0] >= -1 + SD2_PROBE_MARGIN, probe

    # the single file's OpenCLIP tower, run by open_clip itself (penultimate block + ln_final), equals the folder's CLIP
    ids = pipe.tokenizer(["", "a red fox in the snow"], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hf = pipe.text_encoder(ids)[0]
    oc = openclip_penultimate(te_keys, ids)
    oc_diff = float((oc - hf).abs().max())
    log(f"  open_clip TextTransformer (penultimate) vs folder CLIPTextModel: max abs diff {oc_diff:.2e}")
    assert oc_diff < 1e-4, oc_diff

    # ---- cases ------------------------------------------------------------------------------
    log("running SD 2.x cases")
    pipes = {"tiny-sd2": pipe, "tiny-sd2-eps.safetensors": eps_pipe}
    for p in (pipe, sf_pipe, eps_pipe):
        p.set_progress_bar_config(disable=True)
    cases_json, images, raw = [], {}, {}
    for case in SD2_CASES:
        t1 = time.time()
        img = run_sd2_case(pipes, case)
        u8 = to_uint8(img)
        Image.fromarray(u8, "RGB").save(SD2_REF_DIR / f"{case['name']}.png")
        images[case["name"]], raw[case["name"]] = u8, img
        sched = pipes[case["model"]].scheduler
        cases_json.append(dict(case, png=f"{case['name']}.png", scheduler=type(sched).__name__,
                               timestep_spacing=sched.config.timestep_spacing,
                               timesteps=[int(t) if float(t).is_integer() else float(t) for t in sched.timesteps]))
        log(f"  {case['name']}: {time.time() - t1:.1f}s")
    for name, u8 in images.items():
        assert np.array_equal(np.asarray(Image.open(SD2_REF_DIR / f"{name}.png")), u8)
    sf_img = run_sd2_case({"tiny-sd2": sf_pipe}, SD2_CASES[0])
    assert np.array_equal(sf_img, raw[SD2_CASES[0]["name"]]), "tiny-sd2.safetensors image differs from the folder's"
    del sf_pipe

    # ---- per-module tensors ------------------------------------------------------------------
    mod = {"clip.input_ids": ids.to(torch.int64), "clip.last_hidden_state": hf}
    g = torch.Generator().manual_seed(2001)
    mod["unet.sample"] = torch.randn((2, 4, 8, 8), generator=g)
    mod["unet.timestep"] = torch.tensor([712.5], dtype=torch.float32)
    mod["unet.context"] = hf.clone()  # [uncond "", "a red fox in the snow"]
    with torch.no_grad():
        mod["unet.out"] = pipe.unet(mod["unet.sample"], mod["unet.timestep"], encoder_hidden_states=hf).sample
    mod["probe.v.out"] = probe["tiny-sd2.safetensors"][1]
    mod["probe.eps.out"] = probe["tiny-sd2-eps.safetensors"][1]
    save_file({k: v.detach().contiguous() for k, v in mod.items()}, str(SD2_REF_DIR / "modules.safetensors"),
              metadata={"format": "pt"})

    meta = {
        "produced_by": "tests/reference/make_fixtures.py",
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "dtype": "float32",
        "device": "cpu",
        "pixel_conversion": "round(clip(x, 0, 1) * 255) of diffusers' output_type='np'",
        "scheduler_config": SD2_SCHEDULER_CONFIG,
        "probe": {k: v[0] for k, v in probe.items()},
        "eps_patch": eps_patch,
        "cases": cases_json,
    }
    (SD2_REF_DIR / "cases.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    chmod_tree(SD2_REF_DIR)

    # ---- statistics -----------------------------------------------------------------------------
    log("\nSD 2.x image statistics (levels of 255):")
    check_image_statistics(images)
    for a, b in SD2_DIFF_PAIRS:
        d = np.abs(images[a].astype(np.float64) - images[b])
        log(f"  {a:20s} vs {b:20s} mean {d.mean():6.1f} max {d.max():5.0f}")
        assert d.mean() >= MIN_PAIR_DIFF, f"{a} vs {b}: only {d.mean():.2f} levels apart"
    v_vs_eps = int(np.abs(images["cat_euler"].astype(int) - images["cat_euler_force_eps"]).max())
    assert v_vs_eps > 10 * SD2_MIN_V_VS_EPS_MAX, v_vs_eps
    log(f"  v vs forced eps (cat_euler vs cat_euler_force_eps): max {v_vs_eps} levels (tests tell them apart at 3)")

    # numerical robustness: float64 with the same noise
    worst = 0.0
    with f32_noise():
        for p in (pipe, eps_pipe):
            p.to(torch.float64)
        try:
            for case in SD2_CASES:
                d = np.abs(run_sd2_case(pipes, case) - raw[case["name"]]) * 255
                worst = max(worst, d.max())
        finally:
            for p in (pipe, eps_pipe):
                p.to(torch.float32)
    log(f"  float64 vs float32 (same noise): worst {worst:.4f} levels before rounding")
    assert worst < 0.05, "SD 2.x reference outputs are numerically fragile"
    log(f"SD 2.x fixtures done in {time.time() - t0:.0f}s")
    values = {k: v[0] for k, v in probe.items()}
    return (sf_result + f"; probe v {values['tiny-sd2.safetensors']:.4f}, eps {values['tiny-sd2-eps.safetensors']:.4f}"
            f"; eps_patch add {SD2_EPS_BIAS_DELTA}, patched sha256 {eps_patch['patched_sha256']}")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def load_folder_pipeline():
    folder_kw = dict(dtype=torch.float32, local_files_only=True)
    pipe = StableDiffusionPipeline.from_pretrained(
        str(MODEL_DIR),
        unet=UNet2DConditionModel.from_pretrained(str(MODEL_DIR), subfolder="unet", variant="fp16", **folder_kw),
        vae=AutoencoderKL.from_pretrained(str(MODEL_DIR), subfolder="vae", **folder_kw),
        text_encoder=CLIPTextModel.from_pretrained(str(MODEL_DIR), subfolder="text_encoder", **folder_kw),
        safety_checker=None,
        **folder_kw,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def print_sizes(paths):
    log("\nsizes (bytes):")
    total = 0
    for path in paths:
        for rel, size in file_sizes(path):
            total += size
            log(f"  {size:10d}  {rel}")
    log(f"  {total:10d}  total")


MAX_FILE_BYTES = 5 * 2**20  # no fixture file may be larger (they are committed whole)


def check_file_sizes(root=FIXTURES):
    """Every regular file under tests/fixtures is at most MAX_FILE_BYTES. And no .safetensors file starts like a
    pickle (0x80, then a protocol number <= 5: a header length of 128, 384, 640, ... bytes), which sdgen's pickle
    sniffing (src/loading/pickle/mod.rs, looks_pickled) would take for one without its `{` check."""
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert p.stat().st_size <= MAX_FILE_BYTES, f"{p.relative_to(FIXTURES)}: {p.stat().st_size} bytes"
            if p.suffix == ".safetensors":
                head = p.read_bytes()[:2]
                assert not (head[0] == 0x80 and head[1] <= 5), f"{p.relative_to(FIXTURES)} starts like a pickle"


def main():
    t_start = time.time()
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    if sys.argv[1:] == ["--edit-only"]:
        # Regenerate only images/, tiny-sd1-inpaint/ and reference/edit/ from the existing tiny-sd1.
        make_edit_fixtures(load_folder_pipeline())
        print_sizes((IMAGES_DIR, INPAINT_DIR, EDIT_DIR))
        log(f"done in {time.time() - t_start:.0f}s")
        return
    if sys.argv[1:] == ["--samplers-only"]:
        # Regenerate only tiny-lcm/ and reference/samplers/ from the existing tiny-sd1 and images/init.png.
        make_sampler_fixtures(load_folder_pipeline())
        print_sizes((LCM_DIR / "unet", LCM_DIR / "model_index.json", SAMPLERS_DIR))
        log(f"done in {time.time() - t_start:.0f}s")
        return
    if sys.argv[1:] == ["--sd2-only"]:
        # Regenerate only tiny-sd2/, tiny-sd2.safetensors and reference/sd2/ (symlinks into the existing tiny-sd1).
        make_sd2_fixtures()
        print_sizes(SD2_OUTPUTS)
        log(f"done in {time.time() - t_start:.0f}s")
        return
    assert not sys.argv[1:], f"unknown arguments {sys.argv[1:]} (only --edit-only, --samplers-only or --sd2-only)"
    for p in (MODEL_DIR, REF_DIR):
        if p.exists():
            shutil.rmtree(p)
    SINGLE_FILE.unlink(missing_ok=True)
    MODEL_DIR.mkdir(parents=True)
    REF_DIR.mkdir(parents=True)

    # ---- 1. diffusers folder -------------------------------------------------------
    log("building tokenizer + models")
    write_tokenizer(MODEL_DIR / "tokenizer")
    unet, vae, te = build_unet(), build_vae(), build_text_encoder()
    for name, m in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        check_weights(name, m.state_dict())
    # Every component stored in fp16 (its values are fp16-exact), each in another of
    # the file layouts diffusers folders come in, so the loader meets all three:
    # the `.fp16` variant name (UNet), the plain name (VAE), and shards with an
    # index (text encoder; the two embedding tables are the first shard, the layers the second).
    unet.half().save_pretrained(str(MODEL_DIR / "unet"), safe_serialization=True, variant="fp16")
    vae.half().save_pretrained(str(MODEL_DIR / "vae"), safe_serialization=True)
    te.half().save_pretrained(str(MODEL_DIR / "text_encoder"), safe_serialization=True, max_shard_size="140KB")
    for m in (unet, vae, te):
        m.float()
    (MODEL_DIR / "scheduler").mkdir()
    (MODEL_DIR / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    (MODEL_DIR / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    chmod_tree(MODEL_DIR)

    pipe = load_folder_pipeline()
    for name, built in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        state_dicts_equal(getattr(pipe, name), built, f"folder {name}")
    te_index = json.loads((MODEL_DIR / "text_encoder" / "model.safetensors.index.json").read_text())
    te_shards = sorted(set(te_index["weight_map"].values()))
    assert len(te_shards) > 1, "the text encoder should be sharded"
    te_keys = []
    for shard in te_shards:
        with safe_open(str(MODEL_DIR / "text_encoder" / shard), "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
            te_keys += list(f.keys())
    log(f"text_encoder: {len(te_keys)} fp16 tensors in {len(te_shards)} shards, e.g. {sorted(te_keys)[0]}")

    # ---- 2. single-file checkpoint -----------------------------------------------------
    log("writing + validating single-file checkpoint")
    sd = build_single_file(pipe)
    save_file(sd, str(SINGLE_FILE), metadata={"format": "pt"})
    chmod_tree(SINGLE_FILE)
    sf_pipe = StableDiffusionPipeline.from_single_file(
        str(SINGLE_FILE), config=str(MODEL_DIR), local_files_only=True, dtype=torch.float32, safety_checker=None
    )
    sf_pipe.set_progress_bar_config(disable=True)
    n_checked = 0
    for name in ("unet", "vae", "text_encoder"):
        n_checked += state_dicts_equal(getattr(sf_pipe, name), getattr(pipe, name), f"single-file {name}")
    sf_case = CASES[0]
    img_folder = run_case(pipe, sf_case)
    img_single = run_case(sf_pipe, sf_case)
    assert np.array_equal(img_folder, img_single), "single-file image differs from folder image"
    sf_result = (
        f"from_single_file: {n_checked} tensors identical to the folder pipeline; "
        f"case {sf_case[0]} image bit-identical (max abs diff {np.abs(img_folder - img_single).max()})"
    )
    log(sf_result)
    del sf_pipe

    # ---- 3. pipeline cases ------------------------------------------------------------
    n_long = len(pipe.tokenizer(LONG_PROMPT).input_ids)
    assert n_long > 77, n_long
    log(f"long prompt: {n_long} tokens incl. BOS/EOS (diffusers keeps the first 77)")
    log("running pipeline cases")
    cases_json, images, raw = [], {}, {}
    for case in CASES:
        name, prompt, neg, seed, steps, cfg, w, h, sampler = case
        t0 = time.time()
        img = run_case(pipe, case)
        assert img.shape == (h, w, 3), img.shape
        u8 = to_uint8(img)
        Image.fromarray(u8, "RGB").save(REF_DIR / f"{name}.png")
        images[name], raw[name] = u8, img
        cases_json.append(
            dict(
                name=name,
                prompt=prompt,
                negative_prompt=neg,
                seed=seed,
                steps=steps,
                cfg_scale=cfg,
                width=w,
                height=h,
                sampler=sampler,
                png=f"{name}.png",
            )
        )
        log(f"  {name}: {time.time() - t0:.1f}s")
    # PNG round trip
    for name, u8 in images.items():
        back = np.asarray(Image.open(REF_DIR / f"{name}.png"))
        assert back.dtype == np.uint8 and back.shape == u8.shape and np.array_equal(back, u8)
    meta = {
        "model": "tests/fixtures/tiny-sd1",
        "single_file": "tests/fixtures/tiny-sd1.safetensors",
        "produced_by": "tests/reference/make_fixtures.py",
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "device": "cpu",
        "pixel_conversion": "round(clip(x, 0, 1) * 255) of diffusers' output_type='np'",
        "cases": cases_json,
    }
    (REF_DIR / "cases.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    # ---- 4. per-module tensors -------------------------------------------------------------
    log("per-module tensors")
    mod = {}
    tok = pipe.tokenizer

    def ids_of(prompts):
        return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    with torch.no_grad():
        ids = ids_of(["a red fox in the snow"])
        mod["clip.input_ids"] = ids.to(torch.int64)
        mod["clip.last_hidden_state"] = pipe.text_encoder(ids)[0]

        g = torch.Generator().manual_seed(1001)
        mod["unet.sample"] = torch.randn((2, 4, 8, 8), generator=g)
        mod["unet.timestep"] = torch.tensor([712.5], dtype=torch.float32)
        mod["unet.context"] = pipe.text_encoder(ids_of(["", "a red fox in the snow"]))[0]
        mod["unet.out"] = pipe.unet(mod["unet.sample"], mod["unet.timestep"], encoder_hidden_states=mod["unet.context"]).sample

        g = torch.Generator().manual_seed(1002)
        mod["unet_odd.sample"] = torch.randn((1, 4, 9, 6), generator=g)
        mod["unet_odd.timestep"] = torch.tensor([301.25], dtype=torch.float32)
        mod["unet_odd.context"] = pipe.text_encoder(ids_of(["a photo of a cat"]))[0]
        mod["unet_odd.out"] = pipe.unet(
            mod["unet_odd.sample"], mod["unet_odd.timestep"], encoder_hidden_states=mod["unet_odd.context"]
        ).sample

        latents = run_case(pipe, CASES[1], output_type="latent")  # cat_euler final latents
        mod["vae.latent"] = latents / pipe.vae.config.scaling_factor
        mod["vae.image"] = pipe.vae.decode(mod["vae.latent"]).sample
        # the decoded latent is exactly the cat_euler PNG
        vae_png = to_uint8((mod["vae.image"][0].permute(1, 2, 0).numpy() / 2 + 0.5))
        assert np.array_equal(vae_png, images[CASES[1][0]])

    for sampler in ("euler", "euler_a", "ddim"):
        for steps in (10, 20):
            s = SAMPLERS[sampler].from_config(SCHEDULER_CONFIG)
            s.set_timesteps(steps)
            p = f"sched.{sampler}.{steps}"
            mod[p + ".timesteps"] = s.timesteps.clone()
            ins = s.init_noise_sigma
            mod[p + ".init_noise_sigma"] = (ins.reshape(1) if torch.is_tensor(ins) else torch.tensor([ins])).float()
            if sampler == "ddim":
                ts = s.timesteps
                prev = ts - s.config.num_train_timesteps // steps
                mod[p + ".alphas_cumprod"] = s.alphas_cumprod[ts].clone()
                mod[p + ".alphas_cumprod_prev"] = torch.stack(
                    [s.alphas_cumprod[int(t)] if t >= 0 else s.final_alpha_cumprod for t in prev]
                ).float()
                mod[p + ".final_alpha_cumprod"] = s.final_alpha_cumprod.reshape(1).float()
            else:
                mod[p + ".sigmas"] = s.sigmas.clone()
    mod["sched.alphas_cumprod"] = DDIMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod.clone()

    # torch CPU RNG draws (what torch.Generator('cpu').manual_seed(seed) + torch.randn give)
    for seed, shape in ((42, (1, 4, 8, 8)), (42, (1, 4, 6, 9)), (7, (1, 4, 8, 8)), (3000000000, (1, 4, 8, 8)),
                        (2**32 + 42, (1, 4, 8, 8)), (42, (1, 3)), (42, (17,))):
        g = torch.Generator().manual_seed(seed)
        key = f"rng.{seed}." + "x".join(map(str, shape))
        mod[key] = torch.randn(shape, generator=g)
        if shape == (1, 4, 8, 8) and seed == 42:
            mod[key + ".second"] = torch.randn(shape, generator=g)  # next draw from the same stream

    # per-step latents (after each scheduler step) for three samplers
    for case in CASES[:3]:
        steps_lat = []

        def cb(p_, i, t, kw):
            steps_lat.append(kw["latents"].clone())
            return {}

        img = run_case(pipe, case, callback=cb)
        assert np.array_equal(to_uint8(img), images[case[0]])
        mod[f"trace.{case[0]}.step_latents"] = torch.stack(steps_lat)

    mod = {k: v.detach().contiguous() for k, v in mod.items()}
    for k, v in mod.items():
        assert v.dtype in (torch.float32, torch.float64, torch.int64), (k, v.dtype)
    save_file(mod, str(REF_DIR / "modules.safetensors"), metadata={"format": "pt"})
    chmod_tree(REF_DIR)

    # ---- 5. statistics ---------------------------------------------------------------
    log("\nimage statistics (levels of 255):")
    check_image_statistics(images)
    log("\npairs differing in one setting: mean abs pixel diff (levels)")
    for a, b in DIFF_PAIRS:
        d = np.abs(images[a].astype(np.float64) - images[b]).mean()
        log(f"  {a:20s} vs {b:20s} {d:6.1f}")
        assert d >= MIN_PAIR_DIFF, f"{a} vs {b}: only {d:.2f} levels apart"
    same = [n for n, im in images.items() if im.shape == (64, 64, 3)]
    dmin = min(
        (np.abs(images[a].astype(np.float64) - images[b]).mean(), a, b) for a, b in itertools.combinations(same, 2)
    )
    log(f"  smallest difference over all 64x64 pairs: {dmin[0]:.1f} ({dmin[1]} vs {dmin[2]})")

    # numerical robustness: the same cases in float64 with identical noise
    log("\nfloat64 vs float32 (same noise), |diff| of the [0,255]-scaled output before rounding:")
    from diffusers.utils import torch_utils
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as psd
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as sea

    orig = torch_utils.randn_tensor

    def randn_f32(shape, generator=None, device=None, dtype=None, layout=None):
        return orig(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    psd.randn_tensor, sea.randn_tensor = randn_f32, randn_f32
    try:
        pipe.to(torch.float64)
        worst = 0.0
        for case in CASES:
            if case[0] not in ("cat_euler_a_20", "cat_ddim", "wide_72x48_euler", "tall_48x72_euler_a", "fox_ddim_20_bigseed"):
                continue
            img64 = run_case(pipe, case)
            d = np.abs(img64 - raw[case[0]]) * 255
            worst = max(worst, d.max())
            log(f"  {case[0]:24s} max {d.max():.5f} mean {d.mean():.6f}")
        assert worst < 0.05, "reference outputs are numerically fragile"
    finally:
        psd.randn_tensor, sea.randn_tensor = orig, orig
        pipe.to(torch.float32)

    # ---- 6. image editing (img2img / inpaint / outpaint) --------------------------------------
    edit_result = make_edit_fixtures(pipe)

    # ---- 7. samplers and schedules (tiny-lcm, reference/samplers) -------------------------------
    sampler_result = make_sampler_fixtures(pipe)

    # ---- 8. SD 2.x (tiny-sd2, its single file, reference/sd2) -------------------------------------
    sd2_result = make_sd2_fixtures()

    print_sizes((MODEL_DIR, SINGLE_FILE, REF_DIR, IMAGES_DIR, INPAINT_DIR, EDIT_DIR, LCM_DIR / "unet",
                 LCM_DIR / "model_index.json", SAMPLERS_DIR, *SD2_OUTPUTS))
    log("\n" + sf_result)
    log(edit_result)
    log(sampler_result)
    log(sd2_result)
    check_file_sizes()
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
