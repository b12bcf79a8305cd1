#!/usr/bin/env python3
"""A tiny random Stable Diffusion 3.5 Medium-shaped model and its diffusers reference outputs.

Usage (from anywhere; paths come from this file's location):

    /root/venv-ref/bin/python tests/reference/make_sd35.py

(torch 2.15.0, diffusers 0.42.1, transformers 5.23.0, sentencepiece 0.2.3, protobuf 7.36.2, safetensors; CPU,
float32, deterministic.) It deletes and rewrites only:

    tests/fixtures/tiny-sd35/               StableDiffusion3Pipeline folder: MMDiT-X transformer, CLIP-L, CLIP-G, T5,
                                            16-channel VAE, FlowMatchEulerDiscreteScheduler; tokenizer/ and tokenizer_2/
                                            are symlinks to tiny-sdxl's, tokenizer_3/ a trained SentencePiece unigram
    tests/fixtures/tiny-sd35.safetensors    the transformer and the VAE as one official SD 3.5 file
                                            (model.diffusion_model.* in MMDiT names, first_stage_model.* in LDM names)
    tests/fixtures/tiny-sd35-text/          clip_l.safetensors, clip_g.safetensors, t5xxl.safetensors (the text
                                            encoders in the names of the separate official / ComfyUI files)
    tests/fixtures/reference/sd35/          modules.safetensors + modules.json (T5, transformer, VAE tensors),
                                            cases.json + PNGs (StableDiffusion3 txt2img / img2img / inpaint)

It needs the committed tiny-sdxl/tokenizer{,_2} (and through them tiny-sd1's vocabulary) and images/, and writes
nothing else. See tests/reference/README.md ("make_sd35.py").
"""

import hashlib
import io
import itertools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as mf  # noqa: E402  (sets torch threads to 2, imports diffusers/transformers quietly)
import make_families as mfam  # noqa: E402  (helpers: symlink, remove, write_json, sha256_tree, F32Noise, ...)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import diffusers  # noqa: E402
import transformers  # noqa: E402
import sentencepiece as spm  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.models.normalization import RMSNorm  # noqa: E402

torch.set_num_threads(2)
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

FIXTURES = mf.FIXTURES
SD35_DIR = FIXTURES / "tiny-sd35"
SD35_SINGLE = FIXTURES / "tiny-sd35.safetensors"
TEXT_DIR = FIXTURES / "tiny-sd35-text"
REF = FIXTURES / "reference" / "sd35"
OUTPUTS = (SD35_DIR, SD35_SINGLE, TEXT_DIR, REF)

# ---- configs ------------------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-3.5-medium's scheduler/scheduler_config.json (the key set diffusers 0.31 wrote; only
# shift 3.0 and num_train_timesteps 1000 differ from the class defaults).
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.31.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# sdgen sampler name -> scheduler: the FlowMatch classes from SCHEDULER_CONFIG, DPM-Solver++ built with these
# options (everything else its defaults: solver_order 2, dpmsolver++, midpoint, lower_order_final, final sigma 0)
DPM_OPTIONS = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
SAMPLERS = {
    "euler": "FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)",
    "heun": "FlowMatchHeunDiscreteScheduler.from_config(scheduler_config)",
    "dpmpp_2m": "DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type='flow_prediction', flow_shift=3.0)",
}
SAMPLER_SEMANTICS = {
    "euler": "x += (sigma[i+1] - sigma[i]) * v(x, t[i])",
    "heun": ("for sigma[i+1] > 0: x' = x + dt * v(x, t[i]), x += dt * (v(x, t[i]) + v(x', t[i+1])) / 2 with dt = "
             "sigma[i+1] - sigma[i]; the last step (to sigma 0) is a plain Euler step: 2 * steps - 1 calls"),
    "dpmpp_2m": ("DPM-Solver++(2M), midpoint, alpha = 1 - sigma: x0 = x - sigma[i] * v(x, t[i]), lambda = "
                 "log(alpha / sigma), h = lambda[i+1] - lambda[i]; x = (sigma[i+1] / sigma[i]) x - alpha[i+1] "
                 "(exp(-h) - 1) x0; steps 1 .. K-2 add - 0.5 alpha[i+1] (exp(-h) - 1) (x0 - x0_prev) / r0, r0 = "
                 "(lambda[i] - lambda[i-1]) / h; the first and the last step (to sigma 0, where it returns x0) are "
                 "first order"),
}

# CLIP vocabulary: tiny-sdxl's tokenizer files (make_fixtures.tiny_vocab_and_merges: CLIP's first 998 tokens + BOS 998
# + EOS 999). eos_token_id 2 is the legacy value of SD3's own CLIP configs: transformers then pools at
# input_ids.argmax(-1), the first EOS (999 is the largest id).
CLIP_COMMON = dict(vocab_size=1000, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=998,
                   eos_token_id=2, pad_token_id=1)
# CLIP-L (SD3: 768 wide, 12 heads, 12 layers, quick_gelu, projection = identity) and CLIP-G (1280 wide, 20 heads,
# 32 layers, gelu, projection 1280x1280). Heads 64 wide as in every real SD encoder (loaders that infer a CLIP config
# from tensors take heads = hidden / 64). Different widths, so the two can be told apart, and 64 + 128 < 224 (T5's
# width), so the pipeline's zero padding of the CLIP context is exercised. CLIP-G projects 128 -> 64 (a non-square
# projection: pooled = 64 + 64).
CLIP_L_CONFIG = dict(CLIP_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                     hidden_act="quick_gelu", projection_dim=64)
CLIP_G_CONFIG = dict(CLIP_COMMON, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     hidden_act="gelu", projection_dim=64)
# T5 v1.1 (XXL: d_model 4096, d_kv 64, 64 heads, d_ff 10240, 24 layers, gated-gelu, 32 buckets, max distance 128).
# vocab_size is set to the trained tokenizer's length (spm pieces + 100 sentinels).
T5_SP_PIECES = 320
T5_EXTRA_IDS = 100
T5_COMMON = dict(d_model=224, d_kv=16, d_ff=128, num_layers=2, num_heads=2, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                 dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0)
D_CLIP = CLIP_L_CONFIG["hidden_size"] + CLIP_G_CONFIG["hidden_size"]
CLIP_WIDTHS = f"{CLIP_L_CONFIG['hidden_size']} + {CLIP_G_CONFIG['hidden_size']} = {D_CLIP}"
MAX_SEQ = 256  # StableDiffusion3Pipeline's default max_sequence_length (T5 ids per prompt)
CLIP_SEQ = 77
# SD 3.5 Medium: 24 layers, 24 heads x 64, dual attention (MMDiT-X) in layers 0..12, rms qk-norm, patch 2,
# pos_embed_max_size 384, caption_projection_dim 1536 (= inner dim), joint_attention_dim 4096, pooled 2048.
TRANSFORMER_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5_COMMON["d_model"],
    caption_projection_dim=32,
    pooled_projection_dim=CLIP_L_CONFIG["projection_dim"] + CLIP_G_CONFIG["projection_dim"],
    out_channels=16,
    pos_embed_max_size=16,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
# SD3's VAE: [128, 256, 512, 512], 2 resnets per level, 32 groups, 16 latent channels, no quant convs. Tiny: four
# levels (latent = image / 8) of 16 channels, one resnet per level, 16 groups (tiny-sd1's VAE geometry).
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 16, 16),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=16,
    sample_size=64,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)

# ---- weights ------------------------------------------------------------------------------------------------------
# make_fixtures' recipe (randn seeded by SEED ^ crc32(name), N(0,1) * gain / sqrt(fan_in), biases 0.05 N, norm weights
# 1 + 0.1 N, embeddings 0.5 N (tokens) / 0.3 N (positions)), extended to what the SD3 parts have beyond it: LayerNorms
# without affine parameters (nothing to set), RMSNorm / T5LayerNorm weights (1 + 0.1 N), the transformer's learned
# pos_embed buffer (0.3 N), T5's relative attention bias (T5_REL_BIAS_STD N). CLIP and the VAE go through
# make_fixtures.init_random itself; init_random_ext gives the same values on them (checked).
SEED_PREFIX = {"clip_l": "sd35.clip_l.", "clip_g": "sd35.clip_g.", "t5": "sd35.t5.", "transformer": "sd35.transformer.",
               "vae": "sd35.vae."}
TRANSFORMER_RESIDUAL = ("attn.to_out.0", "attn.to_add_out", "attn2.to_out.0", "ff.net.2", "ff_context.net.2")
T5_RESIDUAL = ("SelfAttention.o", "DenseReluDense.wo")
T5_REL_BIAS_STD = 1.0  # relative position bias (added to the unscaled q.k logits), so T5 positions matter
TRANSFORMER_OUT_GAIN = 1.0  # proj_out (the velocity) gain
# The text reaches the image tokens through the joint attention (besides the pooled embedding's adaLN), averaged over
# 77 + 256 text tokens. With plain gains a T5-only prompt change moved the image by 3 levels and euler vs heun by 3.4
# (max 26); with attention outputs (attn / attn2 to_out) at 3x the residual gain and the qk RMSNorm weights x3
# (sharper attention) these are 10 and 8 levels (14.1 and 9.0 with the 64-wide-head CLIPs and the 224-wide T5).
JOINT_ATTN_OUT_GAIN = 1.5
QK_NORM_GAIN = 3.0
VAE_OUT_GAIN = 0.4  # decoder.conv_out scale (make_fixtures.VAE_OUT_GAIN): keeps images unsaturated

# ---- T5 vocabulary: SentencePiece unigram trained on this text ---------------------------------------------------
SPM_TEXT = """\
a red fox in the snow
a photo of a cat
a photo of a dog sleeping on a sofa
blurry, low quality
a stone castle on a hill
a red apple on a wooden table
a bowl of oranges
a wide mountain landscape
a small boat on a quiet lake at sunrise
an old lighthouse on a rocky cliff, waves crashing below
a portrait of a woman with long dark hair, soft light
a city street at night with neon signs and wet asphalt
a forest path covered in autumn leaves
a cup of coffee next to an open book
a watercolor painting of flowers in a glass vase
two children playing in a green field under a blue sky
a snowy village with warm lights in the windows
a close-up photo of a butterfly on a purple flower
an astronaut riding a horse on the moon
a bright yellow taxi in a busy city
the quick brown fox jumps over the lazy dog.
highly detailed, sharp focus, trending on artstation, masterpiece
ugly, deformed, bad anatomy, extra fingers, watermark, text
a futuristic car parked in front of a modern house
a bridge over a river in the evening, golden hour
a plate of pasta with tomato sauce and basil
a black and white photograph of an old man smiling
a herd of elephants walking across the savanna
a cozy room with a fireplace, a sleeping cat and a rug
a sailing ship in a storm, dramatic clouds, lightning
the northern lights over a frozen lake
a castle made of sand on a sunny beach
a robot reading a newspaper in a cafe
a field of sunflowers, hills and a red barn in the distance
a steaming bowl of ramen with an egg and green onions
a white horse running along the shore
a wooden cabin in the mountains covered with snow
digital art of a dragon flying above the clouds
a macro shot of dew drops on a spider web
a quiet library with tall shelves and a reading lamp
a green frog sitting on a lily pad in a pond
an owl perched on a branch under a full moon
a busy market with fruit stalls and colorful umbrellas
a vintage bicycle leaning against a brick wall
a mountain lake reflecting pine trees and snowy peaks
a hot air balloon floating over a valley at dawn
a knight in shiny armor holding a sword and shield
a chocolate cake with strawberries and whipped cream
a lion resting in tall golden grass
an underwater scene with coral, fish and a sea turtle
a train crossing a stone bridge through the fog
a tiny house with a garden full of tulips
a violin on a music stand in an empty concert hall
a desert road with cactus plants and a distant storm
a family of penguins on an iceberg
a pair of red shoes on a wooden floor
a painting in the style of impressionism, bold brush strokes
a glowing lantern hanging from a tree at dusk
a pirate ship with black sails near a tropical island
a fluffy white dog wearing a knitted sweater
three candles burning on a table in a dark room
a waterfall in a jungle surrounded by ferns
a medieval town square with a clock tower
an abstract pattern of circles, squares and triangles
a child flying a kite on a windy beach
a sleepy fox curled up beside a campfire
a vase of roses on a windowsill, morning sunlight
a subway station with tiled walls and commuters
a rainbow over green hills after the rain
a bowl of soup with bread on a checkered tablecloth
a snowman with a carrot nose and a scarf
a koala hugging a eucalyptus tree
an ancient temple hidden in the mountains
a girl reading under an umbrella in the rain
cinematic lighting, volumetric fog, 4k, ultra realistic
low resolution, jpeg artifacts, noisy, overexposed
a neon sign that says open, in a rainy alley
a tabby cat chasing a ball of yarn
fresh bread and cheese on a rustic kitchen counter
a peaceful garden with a stone lantern and koi fish
"""
SPM_OPTIONS = dict(vocab_size=T5_SP_PIECES, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                   num_threads=1, normalization_rule_name="nmt_nfkc", character_coverage=1.0, minloglevel=2)

# ---- cases --------------------------------------------------------------------------------------------------------
FOX, CAT, CASTLE, APPLE = "a red fox in the snow", "a photo of a cat", "a stone castle on a hill", \
    "a red apple on a wooden table"
NEG = "blurry, low quality"
INIT, RECT_M = mf.INIT, mf.RECT_M
STEPS, CFG = 6, 5.0


def _case(name, pipeline="txt2img", prompt=FOX, neg=None, seed=42, steps=STEPS, cfg=CFG, width=64, height=64,
          sampler="euler", strength=None, with_t5=True, image=None, mask=None, png=None):
    return dict(name=name, pipeline=pipeline, model="tiny-sd35", prompt=prompt, negative_prompt=neg, seed=seed,
                steps=steps, cfg_scale=cfg, width=width, height=height, sampler=sampler, strength=strength,
                max_sequence_length=MAX_SEQ, with_t5=with_t5, image=image, mask=mask, png=png or f"{name}.png")


CASES = [
    _case("euler"),
    _case("euler_no_t5", with_t5=False),
    _case("euler_neg", neg=NEG),
    _case("euler_cfg1", cfg=1.0),
    _case("euler_64x48", width=64, height=48, seed=7),
    _case("heun", sampler="heun"),
    _case("dpmpp_2m", sampler="dpmpp_2m"),
    _case("img2img_euler_s06", pipeline="img2img", prompt=CASTLE, strength=0.6, image=INIT),
    _case("inpaint_rect_euler", pipeline="inpaint", prompt=APPLE, strength=1.0, image=INIT, mask=RECT_M),
    # the same as "euler", through tiny-sd35.safetensors (+ the folder's text encoders): must be bit-identical
    _case("single_file_euler", png="euler.png"),
]
SINGLE_FILE_CASE, SINGLE_FILE_TWIN = "single_file_euler", "euler"
# (case, what changes, overrides): each must move the image (the repainted region for inpainting) by >= MIN_EFFECT
SENSITIVITY = [
    ("euler", "prompt", dict(prompt=CAT)),
    ("euler", "seed", dict(seed=43)),
    ("euler", "T5 off", dict(with_t5=False)),
    ("euler", "negative prompt", dict(negative_prompt=NEG)),
    ("euler", "T5 prompt only", dict(prompt_3=CAT)),
    ("img2img_euler_s06", "prompt", dict(prompt=CAT)),
    ("img2img_euler_s06", "seed", dict(seed=43)),
    ("img2img_euler_s06", "input mirrored", dict(mirror_image=True)),
    ("inpaint_rect_euler", "prompt", dict(prompt=CAT)),
    ("inpaint_rect_euler", "seed", dict(seed=43)),
    ("inpaint_rect_euler", "input mirrored", dict(mirror_image=True)),
]
MIN_EFFECT = 4.0  # levels, mean abs
MIN_PAIR_MEAN = 2.0  # every two saved txt2img images differ by at least this much on average ...
MIN_PAIR_MAX = 30  # ... and this much somewhere
F64_CASES = ("euler", "heun", "dpmpp_2m", "img2img_euler_s06", "inpaint_rect_euler")
F64_TOL = 0.05  # levels before rounding: float64 with the same noise
MANUAL_TOL = 0.01  # levels before rounding: manual_case vs diffusers


def log(*a):
    print(*a, flush=True)


# =====================================================================================================================
# Weights
# =====================================================================================================================


@torch.no_grad()
def init_random_ext(model: nn.Module, prefix: str, residual=mf.RESIDUAL_OUTPUTS, out_gains=None, emb_stds=None):
    """make_fixtures.init_random's recipe for every parameter and persistent buffer of `model` (see the constants).
    out_gains / emb_stds: {module name: gain / std} overrides. Returns the names it set (all of them, checked)."""
    out_gains, emb_stds = out_gains or {}, emb_stds or {}
    done = set()
    for mname, mod in model.named_modules():
        full = prefix + mname
        pre = mname + "." if mname else ""
        if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
            if mod.weight is not None:
                mod.weight.copy_(1 + mf.NORM_W_STD * mf.randn(full + ".weight", mod.weight.shape))
                done.add(pre + "weight")
            if mod.bias is not None:
                mod.bias.copy_(mf.NORM_B_STD * mf.randn(full + ".bias", mod.bias.shape))
                done.add(pre + "bias")
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            gain = out_gains.get(mname, mf.RES_GAIN if mname.endswith(residual) else mf.GAIN)
            mod.weight.copy_(gain / math.sqrt(fan_in) * mf.randn(full + ".weight", mod.weight.shape))
            done.add(pre + "weight")
            if mod.bias is not None:
                mod.bias.copy_(mf.BIAS_STD * mf.randn(full + ".bias", mod.bias.shape))
                done.add(pre + "bias")
        elif isinstance(mod, nn.Embedding):
            std = emb_stds.get(mname, mf.TOKEN_EMB_STD if "token" in mname else mf.POS_EMB_STD)
            mod.weight.copy_(std * mf.randn(full + ".weight", mod.weight.shape))
            done.add(pre + "weight")
        elif isinstance(mod, RMSNorm) or type(mod).__name__ == "T5LayerNorm":
            mod.weight.copy_(1 + mf.NORM_W_STD * mf.randn(full + ".weight", mod.weight.shape))
            done.add(pre + "weight")
    if hasattr(model, "pos_embed") and isinstance(getattr(model.pos_embed, "pos_embed", None), torch.Tensor):
        pe = model.pos_embed.pos_embed  # SD3's learned position table (a persistent buffer), [1, max*max, inner]
        pe.copy_(mf.POS_EMB_STD * mf.randn(prefix + "pos_embed.pos_embed", pe.shape))
        done.add("pos_embed.pos_embed")
    missing = set(model.state_dict()) - done
    # T5EncoderModel: encoder.embed_tokens is shared (the same Parameter, listed under both names)
    missing -= {k for k in missing if k == "encoder.embed_tokens.weight"}
    assert not missing, f"{prefix}: parameters without a random value: {sorted(missing)}"
    return done


@torch.no_grad()
def build_clip(config, prefix, identity_projection):
    te = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    mf.init_random(te, prefix)
    other = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    init_random_ext(other, prefix)
    mf.state_dicts_equal(te, other, f"{prefix} init_random vs init_random_ext")
    if identity_projection:  # SD3 uses CLIP-L's pooled output unprojected: its folder's projection is the identity
        te.text_projection.weight.copy_(torch.eye(config["hidden_size"]))
    mf.round_to_fp16(te)
    return te


@torch.no_grad()
def build_t5(vocab_size):
    t5 = T5EncoderModel(T5Config(vocab_size=vocab_size, **T5_COMMON)).eval()
    rel = {n: T5_REL_BIAS_STD for n, m in t5.named_modules() if n.endswith("relative_attention_bias")}
    init_random_ext(t5, SEED_PREFIX["t5"], residual=T5_RESIDUAL, emb_stds={"shared": mf.TOKEN_EMB_STD, **rel})
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    mf.round_to_fp16(t5)
    return t5


@torch.no_grad()
def build_transformer():
    tr = SD3Transformer2DModel(**TRANSFORMER_CONFIG).eval()
    init_random_ext(tr, SEED_PREFIX["transformer"], residual=TRANSFORMER_RESIDUAL,
                    out_gains={"proj_out": TRANSFORMER_OUT_GAIN,
                               **{f"transformer_blocks.{i}.{a}.to_out.0": JOINT_ATTN_OUT_GAIN
                                  for i in range(TRANSFORMER_CONFIG["num_layers"]) for a in ("attn", "attn2")}})
    for name, mod in tr.named_modules():
        if isinstance(mod, RMSNorm):
            mod.weight.mul_(QK_NORM_GAIN)
    mf.round_to_fp16(tr)
    tr.pos_embed.pos_embed.copy_(tr.pos_embed.pos_embed.half().float())
    return tr


@torch.no_grad()
def build_vae():
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    mf.init_random(vae, SEED_PREFIX["vae"])
    other = AutoencoderKL(**VAE_CONFIG).eval()
    init_random_ext(other, SEED_PREFIX["vae"])
    mf.state_dicts_equal(vae, other, "vae init_random vs init_random_ext")
    vae.decoder.conv_out.weight.mul_(VAE_OUT_GAIN)
    mf.round_to_fp16(vae)
    return vae


def check_weights(name, sd, allow_identity=()):
    """make_fixtures.check_weights (random, distinct, fp16-exact) except for the named identity matrices."""
    sd = dict(sd)
    for k in allow_identity:
        v = sd.pop(k)
        assert torch.equal(v.float(), torch.eye(v.shape[0])), k
    mf.check_weights(name, sd)


# =====================================================================================================================
# Tokenizers
# =====================================================================================================================


def train_t5_vocabulary():
    """SentencePiece unigram model (T5's special ids: pad 0, eos 1, unk 2, no bos; NFKC normalisation) as bytes."""
    model = io.BytesIO()
    lines = SPM_TEXT.splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **SPM_OPTIONS)
    return model.getvalue()


def write_t5_tokenizer(out_dir: Path):
    """tokenizer_3/: transformers' T5Tokenizer converted from the trained spiece.model, saved as transformers 5 saves
    it (tokenizer.json + tokenizer_config.json)."""
    data = train_t5_vocabulary()
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert sp.get_piece_size() == T5_SP_PIECES, sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    with tempfile.TemporaryDirectory() as tmp:
        src, saved = Path(tmp) / "src", Path(tmp) / "saved"
        src.mkdir()
        (src / "spiece.model").write_bytes(data)
        tok = T5Tokenizer.from_pretrained(str(src), extra_ids=T5_EXTRA_IDS, model_max_length=512, local_files_only=True)
        tok.save_pretrained(str(saved))
        assert sorted(os.listdir(saved)) == ["tokenizer.json", "tokenizer_config.json"], os.listdir(saved)
        out_dir.mkdir(parents=True)
        (out_dir / "tokenizer.json").write_bytes((saved / "tokenizer.json").read_bytes())
        cfg = json.loads((saved / "tokenizer_config.json").read_text())
        for k in ("is_local", "local_files_only", "name_or_path"):
            cfg.pop(k, None)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok3 = T5Tokenizer.from_pretrained(str(out_dir), local_files_only=True)
    n = len(tok3)
    assert n == T5_SP_PIECES + T5_EXTRA_IDS, n
    assert (tok3.pad_token_id, tok3.eos_token_id, tok3.unk_token_id) == (0, 1, 2)
    assert tok3.convert_tokens_to_ids("<extra_id_0>") == n - 1
    assert tok3.convert_tokens_to_ids("<extra_id_99>") == T5_SP_PIECES
    for text in (FOX, CAT, CASTLE, APPLE, NEG):
        ids = tok3(text).input_ids
        assert ids[-1] == 1 and 2 not in ids and ids == sp.encode(text) + [1], (text, ids, sp.encode(text))
    ids = tok3(FOX, padding="max_length", max_length=MAX_SEQ, truncation=True).input_ids
    k = ids.index(1) + 1
    assert ids[k:] == [0] * (MAX_SEQ - k)
    assert tok3("").input_ids == [1]
    j = json.loads((out_dir / "tokenizer.json").read_text())
    desc = (f"T5Tokenizer (tokenizers Unigram, {T5_SP_PIECES} pieces + {T5_EXTRA_IDS} sentinels <extra_id_99>.."
            f"<extra_id_0> = ids {T5_SP_PIECES}..{n - 1}); normalizer {j['normalizer']['type']}, pre_tokenizer "
            f"{'+'.join(p['type'] for p in j['pre_tokenizer']['pretokenizers'])}, post_processor $A </s>")
    log(f"  tokenizer_3: {desc}; '{FOX}' -> {tok3(FOX).input_ids}")
    return tok3, desc


def check_clip_tokenizers():
    tok1 = CLIPTokenizer.from_pretrained(str(SD35_DIR / "tokenizer"), local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(str(SD35_DIR / "tokenizer_2"), local_files_only=True)
    assert len(tok1) == len(tok2) == 1000 and tok1.pad_token_id == 999 and tok2.pad_token_id == 0
    a = tok1(FOX, padding="max_length", max_length=77).input_ids
    b = tok2(FOX, padding="max_length", max_length=77).input_ids
    n = a.index(999) + 1
    assert a[:n] == b[:n] and a[n:] == [999] * (77 - n) and b[n:] == [0] * (77 - n)
    return tok1, tok2


# =====================================================================================================================
# Single files: inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers / convert_ldm_vae_checkpoint
# =====================================================================================================================


def swap_halves(w):
    """diffusers (scale, shift) <-> official (shift, scale): AdaLayerNormContinuous's order is the reverse of the
    original final layer's / last context block's adaLN_modulation."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_official(sd, cfg):
    """diffusers SD3Transformer2DModel state dict -> the official MMDiT names (model.diffusion_model.* without the
    prefix). q, k, v are concatenated (qkv); the last block's context half has no proj/mlp (context_pre_only)."""
    sd = dict(sd)
    out = {}

    def take(dk, ok, f=None):
        v = sd.pop(dk)
        out[ok] = f(v) if f else v

    take("pos_embed.pos_embed", "pos_embed")
    for s in ("weight", "bias"):
        take(f"pos_embed.proj.{s}", f"x_embedder.proj.{s}")
        take(f"time_text_embed.timestep_embedder.linear_1.{s}", f"t_embedder.mlp.0.{s}")
        take(f"time_text_embed.timestep_embedder.linear_2.{s}", f"t_embedder.mlp.2.{s}")
        take(f"time_text_embed.text_embedder.linear_1.{s}", f"y_embedder.mlp.0.{s}")
        take(f"time_text_embed.text_embedder.linear_2.{s}", f"y_embedder.mlp.2.{s}")
        take(f"context_embedder.{s}", f"context_embedder.{s}")
        take(f"proj_out.{s}", f"final_layer.linear.{s}")
        take(f"norm_out.linear.{s}", f"final_layer.adaLN_modulation.1.{s}", swap_halves)
    n = cfg["num_layers"]
    for i in range(n):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == n - 1
        for s in ("weight", "bias"):
            out[f"{x}attn.qkv.{s}"] = torch.cat([sd.pop(f"{d}attn.to_{p}.{s}") for p in "qkv"])
            out[f"{c}attn.qkv.{s}"] = torch.cat([sd.pop(f"{d}attn.add_{p}_proj.{s}") for p in "qkv"])
            take(f"{d}attn.to_out.0.{s}", f"{x}attn.proj.{s}")
            take(f"{d}norm1.linear.{s}", f"{x}adaLN_modulation.1.{s}")
            take(f"{d}norm1_context.linear.{s}", f"{c}adaLN_modulation.1.{s}", swap_halves if last else None)
            take(f"{d}ff.net.0.proj.{s}", f"{x}mlp.fc1.{s}")
            take(f"{d}ff.net.2.{s}", f"{x}mlp.fc2.{s}")
            if not last:
                take(f"{d}attn.to_add_out.{s}", f"{c}attn.proj.{s}")
                take(f"{d}ff_context.net.0.proj.{s}", f"{c}mlp.fc1.{s}")
                take(f"{d}ff_context.net.2.{s}", f"{c}mlp.fc2.{s}")
            if i in cfg["dual_attention_layers"]:
                out[f"{x}attn2.qkv.{s}"] = torch.cat([sd.pop(f"{d}attn2.to_{p}.{s}") for p in "qkv"])
                take(f"{d}attn2.to_out.0.{s}", f"{x}attn2.proj.{s}")
        take(f"{d}attn.norm_q.weight", f"{x}attn.ln_q.weight")
        take(f"{d}attn.norm_k.weight", f"{x}attn.ln_k.weight")
        take(f"{d}attn.norm_added_q.weight", f"{c}attn.ln_q.weight")
        take(f"{d}attn.norm_added_k.weight", f"{c}attn.ln_k.weight")
        if i in cfg["dual_attention_layers"]:
            take(f"{d}attn2.norm_q.weight", f"{x}attn2.ln_q.weight")
            take(f"{d}attn2.norm_k.weight", f"{x}attn2.ln_k.weight")
    assert not sd, f"unmapped transformer tensors: {sorted(sd)}"
    return out


def build_single_file(pipe):
    sd = {}
    tcfg = dict(pipe.transformer.config)
    for k, v in transformer_to_official(pipe.transformer.state_dict(), tcfg).items():
        sd["model.diffusion_model." + k] = v.half().contiguous()
    vcfg = dict(pipe.vae.config)
    for k, v in pipe.vae.state_dict().items():
        lk = mf.vae_key_to_ldm(k, vcfg)
        v = v.half()
        if ".mid.attn_1." in lk and lk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM stores the VAE attention projections as 1x1 convs
        sd["first_stage_model." + lk] = v.contiguous()
    return sd


def text_encoder_files(pipe):
    """The separate encoder files: clip_l / clip_g in transformers' CLIPTextModelWithProjection names (text_model.*,
    text_projection.weight [out, in]); t5xxl in T5EncoderModel's names with the token table as shared.weight only
    (its tied copy encoder.embed_tokens.weight left out, as some files do, and to save space). All F16."""
    out = {}
    for fn, m in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2), ("t5xxl", pipe.text_encoder_3)):
        out[fn] = {k: v.half().contiguous() for k, v in m.state_dict().items()}
    t5 = out["t5xxl"]
    assert torch.equal(t5["shared.weight"], t5["encoder.embed_tokens.weight"])
    del t5["encoder.embed_tokens.weight"]
    return out


def make_single_files(pipe):
    log("tiny-sd35.safetensors, tiny-sd35-text/: writing + validating")
    sd = build_single_file(pipe)
    save_file(sd, str(SD35_SINGLE), metadata={"format": "pt"})
    back = load_file(str(SD35_SINGLE))
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    mfam.assert_f16(SD35_SINGLE)
    n_mmdit = sum(k.startswith("model.diffusion_model.") for k in back)
    n_vae = sum(k.startswith("first_stage_model.") for k in back)
    assert n_mmdit + n_vae == len(back)
    # The official layout's telltales: fused qkv, dual attention in block 0 only, the last context block without proj
    n = TRANSFORMER_CONFIG["num_layers"]
    p = "model.diffusion_model."
    inner = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
    assert back[p + "joint_blocks.0.x_block.attn.qkv.weight"].shape == (3 * inner, inner)
    assert back[p + "joint_blocks.0.x_block.adaLN_modulation.1.weight"].shape == (9 * inner, inner)
    assert back[p + f"joint_blocks.{n - 1}.x_block.adaLN_modulation.1.weight"].shape == (6 * inner, inner)
    assert back[p + f"joint_blocks.{n - 1}.context_block.adaLN_modulation.1.weight"].shape == (2 * inner, inner)
    assert p + f"joint_blocks.{n - 1}.context_block.attn.proj.weight" not in back
    assert p + "joint_blocks.1.x_block.attn2.qkv.weight" not in back
    assert back[p + "pos_embed"].shape == (1, 16 * 16, inner)
    # shift/scale order: official final layer = (shift, scale), diffusers norm_out = (scale, shift)
    w_off = back[p + "final_layer.adaLN_modulation.1.weight"].float()
    w_dif = pipe.transformer.norm_out.linear.weight
    assert torch.equal(w_off[:inner], w_dif[inner:]) and torch.equal(w_off[inner:], w_dif[:inner])
    w_off = back[p + f"joint_blocks.{n - 1}.context_block.adaLN_modulation.1.bias"].float()
    w_dif = pipe.transformer.transformer_blocks[n - 1].norm1_context.linear.bias
    assert torch.equal(w_off[:inner], w_dif[inner:]) and torch.equal(w_off[inner:], w_dif[:inner])
    w_off = back[p + "joint_blocks.0.context_block.adaLN_modulation.1.weight"].float()  # other blocks: as they are
    assert torch.equal(w_off, pipe.transformer.transformer_blocks[0].norm1_context.linear.weight)

    f32 = dict(local_files_only=True, dtype=torch.float32)
    tr = SD3Transformer2DModel.from_single_file(str(SD35_SINGLE), config=str(SD35_DIR), subfolder="transformer", **f32)
    n_tr = mf.state_dicts_equal(tr, pipe.transformer, "from_single_file transformer")
    vae = AutoencoderKL.from_single_file(str(SD35_SINGLE), config=str(SD35_DIR), subfolder="vae", **f32)
    n_vae_eq = mf.state_dicts_equal(vae, pipe.vae, "from_single_file vae")
    del tr, vae

    TEXT_DIR.mkdir(parents=True)
    files = text_encoder_files(pipe)
    for fn, tensors in files.items():
        save_file(tensors, str(TEXT_DIR / f"{fn}.safetensors"), metadata={"format": "pt"})
        mfam.assert_f16(TEXT_DIR / f"{fn}.safetensors")
    # load them back into fresh transformers models (strict) and compare with the folder's
    report = {}
    for fn, comp, cls in (("clip_l", "text_encoder", CLIPTextModelWithProjection),
                          ("clip_g", "text_encoder_2", CLIPTextModelWithProjection),
                          ("t5xxl", "text_encoder_3", T5EncoderModel)):
        ref = getattr(pipe, comp)
        m = cls(ref.config).eval()
        tensors = load_file(str(TEXT_DIR / f"{fn}.safetensors"))
        missing, unexpected = m.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (fn, missing, unexpected)
        if fn == "t5xxl":
            m.tie_weights()
        mf.state_dicts_equal(m, ref, f"{fn}.safetensors")
        report[fn] = len(tensors)
    assert "text_projection.weight" in load_file(str(TEXT_DIR / "clip_l.safetensors"))
    sf = StableDiffusion3Pipeline.from_single_file(
        str(SD35_SINGLE), config=str(SD35_DIR), text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
        text_encoder_3=pipe.text_encoder_3, **f32)
    sf.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae"):
        mf.state_dicts_equal(getattr(sf, name), getattr(pipe, name), f"pipeline from_single_file {name}")
    desc = (f"SD3Transformer2DModel.from_single_file(tiny-sd35.safetensors, config=tests/fixtures/tiny-sd35, "
            f"subfolder='transformer', local_files_only=True): {n_tr} tensors equal the folder's "
            f"({n_mmdit} model.diffusion_model.* tensors); AutoencoderKL.from_single_file(..., subfolder='vae'): "
            f"{n_vae_eq} tensors equal ({n_vae} first_stage_model.* tensors); "
            f"StableDiffusion3Pipeline.from_single_file with the folder's text encoders passed in gives the same "
            f"transformer and VAE. tiny-sd35-text/*.safetensors load strictly into fresh transformers models and equal "
            f"the folder's encoders ({report})")
    log("  " + desc)
    return sf, desc, {"model.diffusion_model.": n_mmdit, "first_stage_model.": n_vae}, report


# =====================================================================================================================
# Folder
# =====================================================================================================================


def make_folder():
    log("tiny-sd35: tokenizers, text encoders, transformer, VAE, scheduler")
    for sub in ("tokenizer", "tokenizer_2"):
        mfam.symlink(f"../tiny-sdxl/{sub}", SD35_DIR / sub)
    tok1, tok2 = check_clip_tokenizers()
    tok3, tok3_desc = write_t5_tokenizer(SD35_DIR / "tokenizer_3")

    clip_l = build_clip(CLIP_L_CONFIG, SEED_PREFIX["clip_l"], identity_projection=True)
    clip_g = build_clip(CLIP_G_CONFIG, SEED_PREFIX["clip_g"], identity_projection=False)
    t5 = build_t5(len(tok3))
    tr = build_transformer()
    vae = build_vae()
    check_weights("clip_l", clip_l.state_dict(), allow_identity=("text_projection.weight",))
    check_weights("clip_g", clip_g.state_dict())
    check_weights("t5", {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"})
    check_weights("transformer", tr.state_dict())
    check_weights("vae", vae.state_dict())
    mfam.check_distinct_from("clip_g", clip_g, [clip_l])
    for name, m in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5), ("transformer", tr)):
        mfam.check_distinct_from(name, m, [vae] + [o for o in (clip_l, clip_g, t5, tr) if o is not m])

    for sub, m in (("text_encoder", clip_l), ("text_encoder_2", clip_g), ("text_encoder_3", t5)):
        m.half().save_pretrained(str(SD35_DIR / sub), safe_serialization=True)
        m.float()
        mfam.assert_f16(SD35_DIR / sub / "model.safetensors")
    for sub, m in (("transformer", tr), ("vae", vae)):
        m.half().save_pretrained(str(SD35_DIR / sub), safe_serialization=True)
        m.float()
        mfam.assert_f16(SD35_DIR / sub / "diffusion_pytorch_model.safetensors")
    mfam.write_json(SD35_DIR / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)

    sched = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    mem = StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=vae, text_encoder=clip_l, tokenizer=tok1,
                                   text_encoder_2=clip_g, tokenizer_2=tok2, text_encoder_3=t5, tokenizer_3=tok3)
    with tempfile.TemporaryDirectory() as tmp:
        mem.save_config(tmp)
        index = json.loads((Path(tmp) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline", index
    mfam.write_json(SD35_DIR / "model_index.json", index, sort_keys=True)
    mf.chmod_plain(SD35_DIR)

    pipe = load_pipeline()
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.shift == 3.0
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer_max_length == 77
    for name, built in (("text_encoder", clip_l), ("text_encoder_2", clip_g), ("text_encoder_3", t5),
                        ("transformer", tr), ("vae", vae)):
        mf.state_dicts_equal(getattr(pipe, name), built, f"tiny-sd35 {name}")
    # stored values per model (the transformer's pos_embed buffer included; T5's tied embedding once)
    sizes = {name: sum(p.numel() for p in m.parameters()) + (tr.pos_embed.pos_embed.numel() if m is tr else 0)
             for name, m in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5), ("transformer", tr), ("vae", vae))}
    log(f"  parameters: {sizes}; the folder loads (from_pretrained) and equals the models built")
    return pipe, tok3_desc, sizes


def load_pipeline(**kw):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(SD35_DIR), dtype=torch.float32, local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# =====================================================================================================================
# Running cases
# =====================================================================================================================


def make_scheduler(sampler):
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**DPM_OPTIONS)
    cls = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}[sampler]
    return cls.from_config(SCHEDULER_CONFIG)


def jsonable(v):
    """Non-finite floats as strings (JSON has no Infinity)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Trace:
    """Records the timestep of every transformer call (and, optionally, the first call's inputs)."""

    def __init__(self, transformer, keep_first=False):
        self.t, self.first, self.keep = [], None, keep_first
        self.h = transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ts = kwargs["timestep"]
        assert torch.all(ts == ts[0])
        self.t.append(ts[0].item())
        if self.keep and self.first is None:
            self.first = {k: kwargs[k].clone() for k in ("hidden_states", "timestep", "encoder_hidden_states",
                                                         "pooled_projections")}

    def close(self):
        self.h.remove()


def case_pixels(case):
    canvas = np.asarray(Image.open(FIXTURES / case["image"]).convert("RGB"))
    mask = np.asarray(Image.open(FIXTURES / case["mask"])) if case["mask"] else None
    return canvas, mask


def image_latents(vae, canvas, dtype):
    """What the pipelines would get from VAE-encoding the image, with the posterior mean instead of a sample:
    (mean - shift_factor) * scaling_factor."""
    x = mf.pixels_to_tensor(canvas).to(dtype)
    return (mf.vae_mean(vae, x) - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def run_case(pipes, case, dtype=torch.float32, keep_first=False, **overrides):
    """One case through diffusers. Returns (uint8 image, raw float image, Trace, scheduler)."""
    case = dict(case, **{k: v for k, v in overrides.items() if k not in ("prompt_3", "mirror_image")})
    kind = case["pipeline"]
    if kind == "txt2img":
        pipe = pipes["sf" if case["name"] == SINGLE_FILE_CASE else ("t5" if case["with_t5"] else "no_t5")]
    else:
        assert case["with_t5"]
        pipe = pipes[kind]
    pipe.scheduler = make_scheduler(case["sampler"])
    kw = dict(
        prompt=case["prompt"],
        negative_prompt=case["negative_prompt"],
        num_inference_steps=case["steps"],
        guidance_scale=case["cfg_scale"],
        width=case["width"],
        height=case["height"],
        max_sequence_length=case["max_sequence_length"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
    )
    if "prompt_3" in overrides:
        kw["prompt_3"] = overrides["prompt_3"]
    trace = Trace(pipe.transformer, keep_first)
    try:
        if kind == "txt2img":
            raw = pipe(output_type="np", **kw).images[0]
            mask = canvas = None
        else:
            canvas, mask = case_pixels(case)
            if overrides.get("mirror_image"):  # sensitivity check only: the input picture mirrored, same mask
                canvas = np.ascontiguousarray(canvas[:, ::-1])
            lat = image_latents(pipe.vae, canvas, dtype)
            if kind == "img2img":
                raw = pipe(image=lat, strength=case["strength"], output_type="np", **kw).images[0]
            else:
                # masked_image_latents: only a 33-channel transformer reads it; passed so that the pipeline does not
                # multiply the (latent) image by the pixel-sized mask. output_type "latent", then decoded as the
                # other SD3 pipelines decode (diffusers 0.42.1's inpaint pipeline leaves out + shift_factor)
                latents = pipe(image=lat, mask_image=Image.fromarray(mask, "L"), masked_image_latents=lat,
                               strength=case["strength"], output_type="latent", **kw).images
                raw = decode(pipe, latents)
    finally:
        trace.close()
    assert raw.shape == (case["height"], case["width"], 3), raw.shape
    u8 = mf.to_uint8(raw)
    if mask is not None:
        u8 = np.where(mf.binarize(mask)[..., None], u8, canvas)  # overlay: kept pixels exactly from the input
    return u8, raw, trace, pipe.scheduler


@torch.no_grad()
def decode(pipe, latents):
    z = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    img = pipe.vae.decode(z, return_dict=False)[0]
    return pipe.image_processor.postprocess(img, output_type="np")[0]


def floats(t):
    return [float(x) for x in (t.tolist() if isinstance(t, torch.Tensor) else t)]


# =====================================================================================================================
# Module references
# =====================================================================================================================


@torch.no_grad()
def make_module_references(pipe):
    log("module references (reference/sd35/modules.safetensors)")
    t = {}
    tok3 = pipe.tokenizer_3
    prompts = [FOX]
    ids = tok3(prompts, padding="max_length", max_length=MAX_SEQ, truncation=True, add_special_tokens=True,
               return_tensors="pt").input_ids
    t["t5.input_ids"] = ids
    t["t5.last_hidden_state"] = pipe.text_encoder_3(ids)[0]
    assert torch.equal(t["t5.last_hidden_state"][:1], pipe._get_t5_prompt_embeds(FOX, max_sequence_length=MAX_SEQ))
    # encode_prompt for FOX with cfg: what the first transformer call of a guided case gets (negative "" first)
    pe, npe, pp, npp = pipe.encode_prompt(FOX, None, None, do_classifier_free_guidance=True,
                                          max_sequence_length=MAX_SEQ)
    ctx = torch.cat([npe, pe])
    pooled = torch.cat([npp, pp])
    d_clip = CLIP_L_CONFIG["hidden_size"] + CLIP_G_CONFIG["hidden_size"]
    d_pooled = CLIP_L_CONFIG["projection_dim"] + CLIP_G_CONFIG["projection_dim"]
    assert d_clip < T5_COMMON["d_model"] and d_pooled == TRANSFORMER_CONFIG["pooled_projection_dim"]
    assert ctx.shape == (2, CLIP_SEQ + MAX_SEQ, T5_COMMON["d_model"]) and pooled.shape == (2, d_pooled)
    assert torch.all(ctx[:, :CLIP_SEQ, d_clip:] == 0)
    assert torch.equal(ctx[1:, CLIP_SEQ:], t["t5.last_hidden_state"][:1])
    for name, text in (("clip_l", FOX), ("clip_g", FOX)):
        tok = pipe.tokenizer if name == "clip_l" else pipe.tokenizer_2
        t[f"{name}.input_ids"] = tok(text, padding="max_length", max_length=CLIP_SEQ, truncation=True,
                                     return_tensors="pt").input_ids
    # the transformer at a non-square latent (6 x 10 -> a 3 x 5 patch grid cropped from the 16 x 16 table at (6, 5)),
    # two different timesteps in one batch
    lat = mf.randn("sd35.ref.transformer.hidden_states", (2, 16, 6, 10)).float()
    ts = torch.tensor([1000.0, 437.5])
    t["transformer.hidden_states"] = lat
    t["transformer.timestep"] = ts
    t["transformer.encoder_hidden_states"] = ctx
    t["transformer.pooled_projections"] = pooled
    t["transformer.out"] = pipe.transformer(hidden_states=lat, timestep=ts, encoder_hidden_states=ctx,
                                            pooled_projections=pooled, return_dict=False)[0]
    one = pipe.transformer(hidden_states=lat[1:], timestep=ts[1:], encoder_hidden_states=ctx[1:],
                           pooled_projections=pooled[1:], return_dict=False)[0]
    assert torch.allclose(one, t["transformer.out"][1:], atol=1e-5)
    # VAE: decoder at a non-square latent, encoder on images/init.png
    z = mf.randn("sd35.ref.vae.latents", (1, 16, 6, 10)).float()
    t["vae.latents"] = z
    t["vae.decoder_input"] = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    t["vae.decoded"] = pipe.vae.decode(t["vae.decoder_input"], return_dict=False)[0]
    init = np.asarray(Image.open(FIXTURES / INIT).convert("RGB"))
    t["vae.encoder_input"] = mf.pixels_to_tensor(init)
    t["vae.posterior_mean"] = mf.vae_mean(pipe.vae, t["vae.encoder_input"])
    t["vae.image_latents"] = (t["vae.posterior_mean"] - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor

    tensors = {k: (v.contiguous() if v.dtype == torch.int64 else v.float().contiguous()) for k, v in t.items()}
    save_file(tensors, str(REF / "modules.safetensors"), metadata={"format": "pt"})
    back = load_file(str(REF / "modules.safetensors"))
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    desc = {
        "file": "modules.safetensors (F32, ids I64), made by tests/reference/make_sd35.py with tiny-sd35 in float32",
        "prompts": {"t5.input_ids rows": [FOX], "clip_l/clip_g.input_ids": FOX},
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in tensors.items()},
        "t5": ("t5.last_hidden_state = text_encoder_3(t5.input_ids)[0] (T5EncoderModel, no attention mask: the "
               f"pipeline pads to max_sequence_length {MAX_SEQ} with <pad> = 0 after </s> = 1 and attends to "
               "the pads)"),
        "clip": ("clip_l.input_ids pads with <|endoftext|> (999), clip_g.input_ids with '!' (0); both start with 998 "
                 "and hold the first 999 at the same place"),
        "encode_prompt": ("transformer.encoder_hidden_states / pooled_projections = encode_prompt(prompt = "
                          f"'{FOX}', cfg on, negative None -> ''): row 0 the negative, row 1 the prompt. "
                          f"[:, :77] = cat(CLIP-L hidden_states[-2], CLIP-G hidden_states[-2]) ({CLIP_WIDTHS} wide) "
                          f"zero-padded to {T5_COMMON['d_model']}; [:, 77:] = T5 last_hidden_state (256 tokens). pooled = cat(CLIP-L "
                          "text_embeds (identity projection = pooled output), CLIP-G text_embeds), both at "
                          "input_ids.argmax(-1) (the first EOS)"),
        "transformer": ("transformer.out = transformer(hidden_states, timestep, encoder_hidden_states, "
                        "pooled_projections): timestep in [0, 1000] (sigma * 1000), one value per batch row; the "
                        "6 x 10 latent is a 3 x 5 patch grid, its position embedding the rows 6..8, columns 5..9 of "
                        "the 16 x 16 pos_embed table (top = (16 - 3) // 2, left = (16 - 5) // 2)"),
        "vae": ("vae.decoded = vae.decode(vae.decoder_input) with vae.decoder_input = vae.latents / 1.5305 + 0.0609 "
                "(not clamped); vae.posterior_mean = the encoder's mean for vae.encoder_input (images/init.png as "
                "x/255*2-1); vae.image_latents = (mean - 0.0609) * 1.5305 (what img2img / inpaint start from)"),
    }
    mfam.write_json(REF / "modules.json", desc)
    for k, v in tensors.items():
        log(f"  {k:36s} {str(v.dtype):12s} {tuple(v.shape)}" + (f"  std {v.float().std():.4f}" if v.is_floating_point()
                                                               else ""))
    return desc


# =====================================================================================================================
# Pipeline references
# =====================================================================================================================


@torch.no_grad()
def check_conditioning(pipes):
    """What the pipeline hands its transformer on the first call."""
    pipe = pipes["t5"]

    def first(case, **kw):
        _, _, tr, _ = run_case(pipes, dict(case, steps=1), keep_first=True, **kw)
        return tr.first

    by = {c["name"]: c for c in CASES}
    pe, npe, pp, npp = pipe.encode_prompt(FOX, None, None, do_classifier_free_guidance=True, negative_prompt=NEG,
                                          max_sequence_length=MAX_SEQ)
    _, empty, _, empty_pooled = pipe.encode_prompt(FOX, None, None, do_classifier_free_guidance=True,
                                                   max_sequence_length=MAX_SEQ)
    f = first(by["euler"])
    assert f["timestep"].tolist() == [1000.0, 1000.0]
    assert torch.equal(f["encoder_hidden_states"], torch.cat([empty, pe])) and torch.equal(
        f["pooled_projections"], torch.cat([empty_pooled, pp]))
    ids = pipe.tokenizer_3("", padding="max_length", max_length=MAX_SEQ, return_tensors="pt").input_ids
    assert torch.equal(empty[0, CLIP_SEQ:], pipe.text_encoder_3(ids)[0][0])  # "" is encoded, not zeroed
    f = first(by["euler_neg"])
    assert torch.equal(f["encoder_hidden_states"], torch.cat([npe, pe]))
    f = first(by["euler_cfg1"])
    assert f["encoder_hidden_states"].shape[0] == 1 and torch.equal(f["encoder_hidden_states"], pe)
    f = first(by["euler_no_t5"])
    assert torch.all(f["encoder_hidden_states"][:, CLIP_SEQ:] == 0)
    assert torch.equal(f["encoder_hidden_states"][:, :CLIP_SEQ], torch.cat([empty, pe])[:, :CLIP_SEQ])
    f = first(by["euler_64x48"])
    assert f["hidden_states"].shape == (2, 16, 6, 8)
    # pooled: CLIP-L's text_embeds (identity projection) = its pooled output; CLIP-G's is projected
    ids1 = pipe.tokenizer(FOX, padding="max_length", max_length=77, return_tensors="pt").input_ids
    o1 = pipe.text_encoder(ids1, output_hidden_states=True)
    pos = int(ids1.argmax(-1))
    assert ids1[0, pos] == 999 and ids1[0].tolist().index(999) == pos
    assert torch.equal(pp[:, :CLIP_L_CONFIG["hidden_size"]], o1.last_hidden_state[:, pos])
    log("  transformer inputs: negative None -> '' encoded by all three encoders (no zeroing); cfg <= 1 -> batch 1; "
        "no T5 -> 256 zero rows; first timestep 1000.0; pooled = cat(CLIP-L pooled (identity projection), CLIP-G "
        "text_embeds)")


def stats_line(u8):
    f = u8.astype(np.float64)
    return f"mean {f.mean():5.1f} std {f.std():5.1f} sat {100 * np.mean((u8 == 0) | (u8 == 255)):4.2f}%"


def make_pipeline_references(pipes):
    log("pipeline references (reference/sd35/cases.json)")
    check_conditioning(pipes)
    images, raws, info = {}, {}, {}
    for case in CASES:
        t0 = time.time()
        u8, raw, trace, sched = run_case(pipes, case)
        k, s = case["steps"], case["strength"]
        ts, sig = sched.timesteps, sched.sigmas
        if case["sampler"] == "heun":  # the scheduler keeps them interleaved (t0, t1, t1, t2, t2, ...): the K distinct
            ts, sig = torch.cat([ts[:1], ts[1::2]]), torch.cat([sig[:1], sig[1:-1:2], sig[-1:]])
            assert torch.equal(sched.timesteps, torch.cat([ts[:1], ts[1:].repeat_interleave(2)]))
        entry = {
            "scheduler_class": type(sched).__name__,
            "timesteps": floats(ts),
            "sigmas": floats(sig),
            "transformer_timesteps": trace.t,
            "transformer_calls": len(trace.t),
        }
        if s is not None and case["pipeline"] != "txt2img":
            t_start = int(max(k - min(k * s, k), 0))
            entry["steps_run"] = k - t_start
            entry["first_step_index"] = t_start
            assert trace.t == floats(sched.timesteps[t_start:]), (trace.t, sched.timesteps)
        info[case["name"]] = entry
        if case["name"] == SINGLE_FILE_CASE:
            assert np.array_equal(raw, raws[SINGLE_FILE_TWIN]), "single-file image differs from the folder's"
        else:
            Image.fromarray(u8, "RGB").save(REF / case["png"])
            images[case["name"]], raws[case["name"]] = u8, raw
        log(f"  {case['name']:22s} {time.time() - t0:4.1f}s  {stats_line(u8)}  calls {len(trace.t)}  "
            f"t {[round(x, 2) for x in trace.t]}")
    for case in CASES:
        back = np.asarray(Image.open(REF / case["png"]))
        assert np.array_equal(back, images[case["png"][:-4]]), case["name"]
    mf.check_image_statistics(images)

    by = {c["name"]: c for c in CASES}
    t2i = [c["name"] for c in CASES if c["pipeline"] == "txt2img" and c["name"] != SINGLE_FILE_CASE]
    worst = (1e9, 1e9)
    for a, b in itertools.combinations(t2i, 2):
        if images[a].shape != images[b].shape:
            continue
        mean, mx = mfam.image_diff(images[a], images[b])
        worst = (min(worst[0], mean), min(worst[1], mx))
        assert mean >= MIN_PAIR_MEAN and mx >= MIN_PAIR_MAX, f"{a} vs {b}: mean {mean:.2f}, max {mx:.0f}"
    log("  differences from 'euler' (levels, mean / max):")
    pairs = {}
    for b in t2i:
        if b != "euler" and images[b].shape == images["euler"].shape:
            mean, mx = mfam.image_diff(images["euler"], images[b])
            pairs[b] = [round(mean, 2), int(mx)]
            log(f"    {b:22s} {mean:6.1f} {mx:5.0f}")
    log(f"  smallest over the 64x64 txt2img pairs: mean {worst[0]:.1f}, max {worst[1]:.0f}")

    log(f"  sensitivity (levels, mean abs; the repainted region for inpainting; >= {MIN_EFFECT}):")
    sens = []
    for name, what, kw in SENSITIVITY:
        case = by[name]
        other = run_case(pipes, case, **kw)[0]
        ref = images[name].astype(np.float64)
        region = mf.binarize(case_pixels(case)[1]) if case["mask"] else np.ones(ref.shape[:2], bool)
        d = float(np.abs(other.astype(np.float64) - ref)[region].mean())
        sens.append({"case": name, "change": what, "overrides": kw, "mean_abs_levels": round(d, 2)})
        log(f"    {name:22s} {what:18s} {d:6.1f}")
        assert d >= MIN_EFFECT, f"{name}: {what} changes the image by only {d:.2f} levels"
    # inpainting: kept pixels are the input's; img2img keeps the picture's layout more than a fresh image does
    canvas, mask = case_pixels(by["inpaint_rect_euler"])
    keep = ~mf.binarize(mask)
    assert np.array_equal(images["inpaint_rect_euler"][keep], canvas[keep])
    d_init = mfam.image_diff(images["img2img_euler_s06"], canvas)[0]
    log(f"  img2img vs its input: {d_init:.1f} levels (mean abs)")
    return images, raws, info, pairs, worst, sens


def manual_schedule(sampler, k):
    """(timesteps, sigmas) as cases.json's "timesteps" note describes them, without the scheduler classes."""
    s = torch.tensor([1.0], dtype=torch.float32) / 1000
    sigma_min = (3.0 * s / (1 + 2.0 * s)).item()  # the training table's smallest sigma (float32), shifted once
    if sampler in ("euler", "heun"):
        u = np.linspace(1.0 * 1000, sigma_min * 1000, k) / 1000
        sig = torch.from_numpy(3.0 * u / (1 + 2.0 * u)).float()  # shifted again
        return sig * 1000, torch.cat([sig, torch.zeros(1)])
    u = 1.0 - np.linspace(1, 1 / 1000, k + 1)
    sig = np.flip(3.0 * u / (1 + 2.0 * u))[:-1].copy()
    ts = torch.from_numpy(sig * 1000).to(torch.int64)  # truncated
    return ts, torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))


@torch.no_grad()
def manual_case(pipes, case):
    """The case written out without diffusers' pipelines and schedulers (only their models and encode_prompt): the
    semantics cases.json describes. Returns the raw decoded image (H x W x 3 in [0, 1])."""
    kind, k, cfg = case["pipeline"], case["steps"], case["cfg_scale"]
    pipe = pipes["t5" if case["with_t5"] else "no_t5"]
    guided = cfg > 1
    pe, npe, pp, npp = pipe.encode_prompt(case["prompt"], None, None, do_classifier_free_guidance=guided,
                                          negative_prompt=case["negative_prompt"],
                                          max_sequence_length=case["max_sequence_length"])
    ctx, pooled = (torch.cat([npe, pe]), torch.cat([npp, pp])) if guided else (pe, pp)
    ts, sig = manual_schedule(case["sampler"], k)
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    shape = (1, 16, case["height"] // 8, case["width"] // 8)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)

    def velocity(x, t):
        xin = torch.cat([x, x]) if guided else x
        v = pipe.transformer(hidden_states=xin, timestep=t.reshape(1).expand(xin.shape[0]),
                             encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False)[0]
        if guided:
            u, c = v.chunk(2)
            v = u + cfg * (c - u)
        return v

    first, lat, m = 0, None, None
    if kind != "txt2img":
        canvas, mask = case_pixels(case)
        lat = image_latents(pipe.vae, canvas, torch.float32)
        if mask is not None:
            m = torch.from_numpy(mf.binarize(mask)[::8, ::8]).float()[None, None]  # nearest: latent (i, j) <- (8i, 8j)
    if kind == "txt2img" or case["strength"] == 1.0:
        x = noise
    else:
        first = int(max(k - min(k * case["strength"], k), 0))  # the last k - first timesteps run
        x = sig[first] * noise + (1 - sig[first]) * lat
    if case["sampler"] == "euler":
        for i in range(first, k):
            x = x + (sig[i + 1] - sig[i]) * velocity(x, ts[i])
            if m is not None:  # inpainting (16-channel model): re-noised known latents outside the mask
                known = sig[i + 1] * noise + (1 - sig[i + 1]) * lat if i < k - 1 else lat
                x = (1 - m) * known + m * x
    elif case["sampler"] == "heun":
        for i in range(k):
            d = velocity(x, ts[i])
            dt = sig[i + 1] - sig[i]
            if sig[i + 1] == 0:  # the last step is a plain Euler step
                x = x + dt * d
            else:
                x2 = x + dt * d
                x = x + dt * 0.5 * (d + velocity(x2, ts[i + 1]))
    else:  # DPM-Solver++(2M), midpoint, first order on the first and the last step (final sigma 0)
        lam = lambda s: torch.log(1 - s) - torch.log(s)  # noqa: E731  alpha = 1 - sigma, sigma = sigma
        prev = None
        for i in range(k):
            x0 = x - sig[i] * velocity(x, ts[i])
            h = lam(sig[i + 1]) - lam(sig[i])
            base = (sig[i + 1] / sig[i]) * x - (1 - sig[i + 1]) * (torch.exp(-h) - 1.0) * x0
            if prev is None or i == k - 1:
                x = base
            else:
                r0 = (lam(sig[i]) - lam(sig[i - 1])) / h
                x = base - 0.5 * (1 - sig[i + 1]) * (torch.exp(-h) - 1.0) * (x0 - prev) / r0
            prev = x0
    return decode(pipe, x)


def check_manual(pipes, raws, infos):
    log("manual loops (no diffusers pipeline/scheduler) vs diffusers, levels before rounding (max abs):")
    worst = {}
    for case in CASES:
        if case["name"] == SINGLE_FILE_CASE:
            continue
        ts, sig = manual_schedule(case["sampler"], case["steps"])
        info = infos[case["name"]]
        assert floats(ts) == info["timesteps"] and floats(sig) == info["sigmas"], case["name"]
        d = float(np.abs(manual_case(pipes, case) - raws[case["name"]]).max() * 255)
        worst[case["name"]] = round(d, 5)
        log(f"  {case['name']:22s} {d:.5f}")
        assert d < MANUAL_TOL, f"{case['name']}: the manual loop differs by {d:.4f} levels"
    return worst


def float64_check(pipes, raws):
    log("float64 vs float32 (same noise), levels before rounding:")
    modules = ("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
               "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img",
               "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint")

    class Noise(mfam.F32Noise):
        MODULES = modules

    by = {c["name"]: c for c in CASES}
    worst = 0.0
    pipe = pipes["t5"]
    with Noise():
        try:
            pipe.to(torch.float64)
            for name in F64_CASES:
                raw64 = run_case(pipes, by[name], dtype=torch.float64)[1]
                d = float(np.abs(raw64 - raws[name]).max() * 255)
                worst = max(worst, d)
                log(f"  {name:22s} {d:.5f}")
        finally:
            pipe.to(torch.float32)
    assert worst < F64_TOL, f"references are numerically fragile ({worst:.4f} levels)"
    return worst


# =====================================================================================================================
# Main
# =====================================================================================================================


def main():
    t_start = time.time()
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
        f"sentencepiece {spm.__version__}")
    for p in OUTPUTS:
        mfam.remove(p)
    for p in (SD35_DIR, REF):
        p.mkdir(parents=True)

    pipe, tok3_desc, n_params = make_folder()
    sf_pipe, sf_desc, sf_counts, text_counts = make_single_files(pipe)
    modules_desc = make_module_references(pipe)

    comps = {k: v for k, v in pipe.components.items()}
    pipes = {
        "t5": pipe,
        "no_t5": load_pipeline(text_encoder_3=None, tokenizer_3=None),
        "img2img": StableDiffusion3Img2ImgPipeline(**comps),
        "inpaint": StableDiffusion3InpaintPipeline(**comps),
        "sf": sf_pipe,
    }
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    assert pipes["no_t5"].text_encoder_3 is None
    images, raws, info, pairs, worst_pair, sens = make_pipeline_references(pipes)
    manual = check_manual(pipes, raws, info)
    worst64 = float64_check(pipes, raws)

    sched_desc = {}
    for name in SAMPLERS:
        s = make_scheduler(name)
        sched_desc[name] = {"class": type(s).__name__, "built_as": SAMPLERS[name], "step": SAMPLER_SEMANTICS[name],
                            "config": {k: jsonable(v) for k, v in s.config.items() if not k.startswith("_")}}
    meta = {
        "produced_by": "tests/reference/make_sd35.py",
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "device": "cpu",
        "generator": "torch.Generator('cpu').manual_seed(seed)",
        "models": {"tiny-sd35": "tests/fixtures/tiny-sd35 (StableDiffusion3Pipeline.from_pretrained)",
                   "with_t5 false": "StableDiffusion3Pipeline.from_pretrained(tiny-sd35, text_encoder_3=None, "
                                    "tokenizer_3=None)",
                   "img2img / inpaint": "StableDiffusion3Img2ImgPipeline / StableDiffusion3InpaintPipeline built from "
                                        "the folder pipeline's components",
                   "single_file_euler": "StableDiffusion3Pipeline.from_single_file(tiny-sd35.safetensors, "
                                        "config=tests/fixtures/tiny-sd35, text_encoder*, = the folder's)"},
        "paths": "image and mask are relative to tests/fixtures; png to this folder",
        "pixel_conversion": "round(clip(x, 0, 1) * 255) of diffusers' output_type='np'",
        "scheduler_config": SCHEDULER_CONFIG,
        "samplers": sched_desc,
        "negative_prompt": ("null = not given: with cfg_scale > 1 diffusers encodes '' through all three encoders "
                            "(negative_prompt or '' ; no zeroing); a string is encoded by all three. cfg_scale <= 1: "
                            "no negative pass (batch 1)"),
        "conditioning": (f"encoder_hidden_states = cat over tokens of [cat(CLIP-L hidden_states[-2], CLIP-G "
                         f"hidden_states[-2]) (77 x {D_CLIP}, zero-padded to {T5_COMMON['d_model']}), T5 last_hidden_state "
                         f"(max_sequence_length x {T5_COMMON['d_model']}; zeros when with_t5 is false)]; pooled_projections = cat(CLIP-L "
                         f"pooled (text_projection is the identity), CLIP-G text_embeds), both taken at "
                         f"input_ids.argmax(-1). CLIP ids: 77, tokenizer pads with 999, tokenizer_2 with '!' = 0. T5 "
                         f"ids: padded to max_sequence_length with 0, no attention mask"),
        "timesteps": ("the transformer gets timestep = sigma * 1000 (float32; 1000.0 first), not sigma. "
                      "FlowMatchEuler / Heun: s = linspace(1000 * sigma_max, 1000 * sigma_min, steps) / 1000 in "
                      "float64, where sigma_max = 1 and sigma_min = the training table's last sigma, already shifted: "
                      "3 * 0.001 / (1 + 2 * 0.001) = 0.0029940 (float32); then shifted again, sigma = 3 s / (1 + 2 s) "
                      "-> float32, timesteps = sigma * 1000 (float32), sigmas + [0]. So the last timestep is 8.93, "
                      "not 2.99. Heun repeats each timestep after the first (2 * steps - 1 calls). "
                      "DPMSolverMultistep (use_flow_sigmas, flow_shift 3): s = 1 - linspace(1, 1/1000, steps + 1), "
                      "shifted, flipped, the last (0) dropped, so the first sigma is shift(0.999) = 0.99967; its "
                      "timesteps are int64 (sigma * 1000 truncated: 999, 937, ...) while the step uses the float32 "
                      "sigmas. See 'schedulers' for every case's values"),
        "latents": ("txt2img: latents = randn([1, 16, h/8, w/8]) from the generator (init_noise_sigma 1); decode: "
                    "vae.decode(latents / 1.5305 + 0.0609)"),
        "img2img": ("image goes in as (posterior mean - 0.0609) * 1.5305 (no sampling: the generator draws only the "
                    "noise, randn of the latent shape); t_start = int(max(K - min(K * strength, K), 0)), the last "
                    "K - t_start timesteps run (K=6, strength 0.6: 4 steps, not int(6 * 0.6) = 3); latents = "
                    "sigma_start * noise + (1 - sigma_start) * image latents (scale_noise)"),
        "inpaint": ("image as for img2img; mask: grayscale, repaint where >= 128 (mask_processor binarize), latent "
                    "mask = mask[8i, 8j] (nearest); strength 1.0: latents = the noise; after every step latents = "
                    "(1 - m) * scale_noise(image latents, next timestep, the same noise) + m * latents, the clean "
                    "image latents after the last step. The 16-channel transformer never sees the mask. Decoded as "
                    "txt2img (latents / 1.5305 + 0.0609): diffusers 0.42.1's inpaint pipeline decodes latents / "
                    "1.5305 without + shift_factor, so the case runs with output_type='latent' and decodes itself"),
        "overlay": ("inpainting PNGs: after decoding, pixels with mask 0 are copied from the input unchanged (done by "
                    "this script, as make_fixtures does; the SD3 inpaint pipeline overlays only with "
                    "padding_mask_crop)"),
        "single_file_validation": sf_desc,
        "single_file_tensors": sf_counts,
        "text_encoder_files": text_counts,
        "tokenizer_3": tok3_desc,
        "parameters": n_params,
        "checks": {
            "differences_from_euler_levels_mean_max": pairs,
            "smallest_pair_64x64_txt2img_mean_max": [round(worst_pair[0], 2), int(worst_pair[1])],
            "sensitivity": sens,
            "float64_worst_levels": round(worst64, 5),
            "manual_loop_max_diff_levels": manual,
        },
        "schedulers": info,
        "cases": CASES,
    }
    json.dumps(meta, allow_nan=False)  # plain JSON (serde_json reads no Infinity / NaN)
    mfam.write_json(REF / "cases.json", meta)
    mf.chmod_plain(REF)
    mf.chmod_tree(SD35_SINGLE)
    mf.chmod_plain(TEXT_DIR)

    mf.check_file_sizes()
    log("\nwritten (bytes; symlinks as '->'):")
    total = 0
    for rel, h in mfam.sha256_tree(OUTPUTS).items():
        p = FIXTURES / rel
        size = 0 if p.is_symlink() else p.stat().st_size
        total += size
        log(f"  {size:9d}  {rel}" + (f"  {h}" if h.startswith("->") else ""))
    log(f"  {total:9d}  total")
    digest = hashlib.sha256(json.dumps(mfam.sha256_tree(OUTPUTS), sort_keys=True).encode()).hexdigest()
    log(f"sha256 of every written file, combined: {digest}")
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
