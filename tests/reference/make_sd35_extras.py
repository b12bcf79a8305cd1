#!/usr/bin/env python3
"""LoRA references and the bundled single-file check for the tiny SD 3.5 model (make_sd35.py's fixtures).

Usage (from anywhere; paths come from this file's location):

    /root/venv-ref/bin/python tests/reference/make_sd35_extras.py

(the versions make_sd35.py names; CPU, float32, deterministic.) It deletes and rewrites only

    tests/fixtures/reference/sd35-extras/   lora_kohya.safetensors, lora_peft.safetensors, cases.json, *.png

and reads the committed tiny-sd35/, tiny-sd35.safetensors, tiny-sd35-text/ and reference/sd35/euler.png.

LoRA: one set of random low-rank updates, written twice.
  * lora_kohya.safetensors: kohya / ComfyUI names for SD 3 (sd-scripts' lora_sd3): lora_unet_ + the official MMDiT
    module names (joint_blocks_N_{x,context}_block_attn_qkv with q, k and v fused, ..._attn_proj, ..._mlp_fc1/2,
    ..._adaLN_modulation_1, final_layer_*, context_embedder, t_embedder_*, y_embedder_*), lora_te1_ / lora_te2_ for
    CLIP-L / CLIP-G; .lora_down / .lora_up / .alpha. This is how the updates are made.
  * lora_peft.safetensors: the same updates in diffusers' names, as StableDiffusion3Pipeline.save_lora_weights writes
    them (transformer. / text_encoder. / text_encoder_2. + .lora_A / .lora_B, no alpha: alpha / rank is baked into
    lora_B; F16 as the kohya file). A fused qkv update becomes three (to_q, to_k, to_v or add_{q,k,v}_proj) that share lora_A and take
    their third of lora_up's rows; where the official files store (shift, scale) and diffusers (scale, shift) (the
    last block's context adaLN, final_layer), lora_B's halves are swapped. diffusers' own single-file converter
    (convert_sd3_transformer_checkpoint_to_diffusers) checks that mapping: converting base + delta and base gives
    back each module's delta.
  * The reference: StableDiffusion3Pipeline.load_lora_weights(lora_peft) (diffusers loads no kohya SD 3 files),
    fuse_lora(transformer, text_encoder, text_encoder_2; lora_scale = LORA_WEIGHT), then the reference euler case.

Bundled single file: tiny-sd35.safetensors with tiny-sd35-text/*.safetensors added under
text_encoders.{clip_l,clip_g,t5xxl}.transformer. (as sd3_medium_incl_clips_t5xxlfp16.safetensors ships; T5's token
table as both shared.weight and encoder.embed_tokens.weight, since diffusers reads only the latter here) is written
to a temporary folder only; StableDiffusion3Pipeline.from_single_file(it, config=tiny-sd35, local_files_only=True)
must load all five parts equal to the folder's and give reference/sd35/euler.png exactly. The Rust test builds the
same file the same way.
"""

import json
import sys
import tempfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_sd35 as sd35  # noqa: E402  (its imports set torch threads and quiet diffusers)
import make_fixtures as mf  # noqa: E402
import make_families as mfam  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from diffusers import StableDiffusion3Pipeline  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

FIXTURES = sd35.FIXTURES
OUT = FIXTURES / "reference" / "sd35-extras"
RANK = 2
ALPHA = 1.0  # alpha / rank = 0.5, exact in binary
LORA_WEIGHT = 0.8  # --lora NAME:0.8 == fuse_lora(lora_scale=0.8)
UP_GAIN = 0.8  # lora_up ~ UP_GAIN * N / sqrt(rank), lora_down ~ N / sqrt(fan_in)
BUNDLED_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                    "t5xxl": "text_encoders.t5xxl.transformer."}
P = "model.diffusion_model."


def fp16_randn(name, shape, scale):
    g = torch.Generator().manual_seed(zlib.crc32(("sd35-extras." + name).encode()))
    return (scale * torch.randn(shape, generator=g)).half().float()


def official_targets(single):
    """The official MMDiT modules (names without model.diffusion_model.) that get a LoRA: every linear layer."""
    mods = sorted({k[len(P):-len(".weight")] for k, v in single.items()
                   if k.startswith(P) and k.endswith(".weight") and v.ndim == 2
                   and "ln_q" not in k and "ln_k" not in k})
    assert any(m.endswith("attn2.qkv") for m in mods) and "final_layer.adaLN_modulation.1" in mods
    return mods


def diffusers_parts(mod, n_layers):
    """[(diffusers module, row part index or None of 3, swap halves)] for an official module."""
    swap = mod == "final_layer.adaLN_modulation.1" or mod == f"joint_blocks.{n_layers - 1}.context_block.adaLN_modulation.1"
    fixed = {"final_layer.adaLN_modulation.1": "norm_out.linear", "final_layer.linear": "proj_out",
             "context_embedder": "context_embedder",
             "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
             "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
             "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2"}
    if mod in fixed:
        return [(fixed[mod], None, swap)]
    _, i, block, rest = mod.split(".", 3)
    m = f"transformer_blocks.{i}."
    x = block == "x_block"
    table = {
        "attn.qkv": [m + ("attn.to_" + c if x else f"attn.add_{c}_proj") for c in "qkv"],
        "attn2.qkv": [m + "attn2.to_" + c for c in "qkv"],
        "attn.proj": [m + ("attn.to_out.0" if x else "attn.to_add_out")],
        "attn2.proj": [m + "attn2.to_out.0"],
        "mlp.fc1": [m + ("ff" if x else "ff_context") + ".net.0.proj"],
        "mlp.fc2": [m + ("ff" if x else "ff_context") + ".net.2"],
        "adaLN_modulation.1": [m + ("norm1.linear" if x else "norm1_context.linear")],
    }
    names = table[rest]
    return [(n, idx if len(names) == 3 else None, swap) for idx, n in enumerate(names)]


def text_targets(pipe):
    """[(kohya prefix, diffusers component, module name)] for both CLIPs: attention and MLP of every layer."""
    out = []
    for kp, comp in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        for name, mod in getattr(pipe, comp).named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name and name.startswith("text_model."):
                out.append((kp, comp, name))
    assert out
    return out


def make_lora(pipe, single):
    """(kohya state dict, PEFT state dict, {diffusers component.module: delta with alpha/rank, float64})."""
    n_layers = sd35.TRANSFORMER_CONFIG["num_layers"]
    kohya, peft, deltas = {}, {}, {}

    def add(kohya_name, w_shape, pieces):
        down = fp16_randn(kohya_name + ".down", (RANK, w_shape[1]), 1.0 / w_shape[1] ** 0.5)
        up = fp16_randn(kohya_name + ".up", (w_shape[0], RANK), UP_GAIN / RANK ** 0.5)
        kohya[kohya_name + ".lora_down.weight"] = down.half()
        kohya[kohya_name + ".lora_up.weight"] = up.half()
        kohya[kohya_name + ".alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
        for target, part, swap in pieces:
            b = up if part is None else up.chunk(3, 0)[part]
            if swap:
                b = torch.cat(b.chunk(2, 0)[::-1], 0)
            peft[f"{target}.lora_A.weight"] = down.half()
            peft[f"{target}.lora_B.weight"] = (b * (ALPHA / RANK)).half()  # exact: a power of two
            deltas[target] = (b.double() @ down.double()) * (ALPHA / RANK)

    for mod in official_targets(single):
        w = single[f"{P}{mod}.weight"]
        add("lora_unet_" + mod.replace(".", "_"), w.shape,
            [("transformer." + t, part, swap) for t, part, swap in diffusers_parts(mod, n_layers)])
    for kp, comp, name in text_targets(pipe):
        w = dict(getattr(pipe, comp).named_modules())[name].weight
        add(kp + name.replace(".", "_"), w.shape, [(f"{comp}.{name}", None, False)])
    return kohya, peft, deltas


def check_mapping(single, deltas):
    """diffusers' converter on base + delta (official names) minus on base = each diffusers module's delta."""
    base = {k[len(P):]: v.double() for k, v in single.items() if k.startswith(P)}
    n_layers = sd35.TRANSFORMER_CONFIG["num_layers"]
    moved = dict(base)
    for mod in official_targets(single):
        d = torch.zeros_like(base[mod + ".weight"])
        for target, part, swap in diffusers_parts(mod, n_layers):
            t = deltas["transformer." + target]
            if swap:
                t = torch.cat(t.chunk(2, 0)[::-1], 0)
            if part is None:
                d = t
            else:
                rows = d.shape[0] // 3
                d[part * rows:(part + 1) * rows] = t
        moved[mod + ".weight"] = base[mod + ".weight"] + d
    a = convert_sd3_transformer_checkpoint_to_diffusers(dict(moved))
    b = convert_sd3_transformer_checkpoint_to_diffusers(dict(base))
    n = 0
    for k in a:
        diff = a[k] - b[k]
        name = "transformer." + k[:-len(".weight")]
        if name in deltas and k.endswith(".weight"):
            assert torch.allclose(diff, deltas[name], atol=1e-12), k
            n += 1
        else:
            assert torch.equal(diff, torch.zeros_like(diff)), k
    assert n == sum(k.startswith("transformer.") for k in deltas)
    return n


@torch.no_grad()
def lora_reference(peft_path, deltas):
    pipe = sd35.load_pipeline()
    base = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()}
            for c in ("transformer", "text_encoder", "text_encoder_2")}
    pipe.load_lora_weights(str(peft_path), adapter_name="x")
    pipe.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"], lora_scale=LORA_WEIGHT)
    pipe.unload_lora_weights()
    changed = 0
    for comp, sd in base.items():
        for k, v in getattr(pipe, comp).state_dict().items():
            full = f"{comp}.{k[:-len('.weight')]}"
            if full in deltas and k.endswith(".weight"):
                want = sd[k].double() + LORA_WEIGHT * deltas[full]
                assert torch.allclose(v.double(), want, atol=1e-5), k
                changed += 1
            else:
                assert torch.equal(v, sd[k]), k
    assert changed == len(deltas), (changed, len(deltas))
    case = dict(next(c for c in sd35.CASES if c["name"] == "euler"), name="lora", png="lora.png")
    u8, _, _, _ = sd35.run_case({"t5": pipe}, case)
    return case, u8, changed


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def bundled_file(path):
    sd = load_file(str(FIXTURES / "tiny-sd35.safetensors"))
    for stem, prefix in BUNDLED_PREFIXES.items():
        for k, v in load_file(str(FIXTURES / "tiny-sd35-text" / f"{stem}.safetensors")).items():
            sd[prefix + k] = v
    # diffusers' single-file T5 loader leaves encoder.embed_tokens empty (meta) when only shared.weight is there
    sd[BUNDLED_PREFIXES["t5xxl"] + "encoder.embed_tokens.weight"] = sd[BUNDLED_PREFIXES["t5xxl"] + "shared.weight"].clone()
    save_file(sd, str(path), metadata={"format": "pt"})
    return len(sd)


@torch.no_grad()
def check_bundled():
    folder = sd35.load_pipeline()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-sd35-bundled.safetensors"
        n = bundled_file(path)
        pipe = StableDiffusion3Pipeline.from_single_file(str(path), config=str(sd35.SD35_DIR), local_files_only=True,
                                                         dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        mf.state_dicts_equal(getattr(pipe, name), getattr(folder, name), f"bundled {name}")
    case = next(c for c in sd35.CASES if c["name"] == "euler")
    u8, _, _, _ = sd35.run_case({"t5": pipe}, case)
    assert np.array_equal(u8, read_png(sd35.REF / "euler.png")), "bundled file: not euler.png"
    return (f"tiny-sd35.safetensors + tiny-sd35-text/{{clip_l,clip_g,t5xxl}}.safetensors under {BUNDLED_PREFIXES} "
            f"({n} tensors): StableDiffusion3Pipeline.from_single_file(config=tiny-sd35, local_files_only=True) loads "
            f"all five parts equal to the folder's (T5 from the file) and gives reference/sd35/euler.png exactly")


def main():
    mfam.remove(OUT)
    OUT.mkdir(parents=True)
    pipe = sd35.load_pipeline()
    single = load_file(str(FIXTURES / "tiny-sd35.safetensors"))
    kohya, peft, deltas = make_lora(pipe, single)
    n_mapped = check_mapping(single, deltas)
    save_file(kohya, str(OUT / "lora_kohya.safetensors"), metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in peft.items()}, str(OUT / "lora_peft.safetensors"),
              metadata={"format": "pt"})
    case, u8, changed = lora_reference(OUT / "lora_peft.safetensors", deltas)
    Image.fromarray(u8).save(OUT / "lora.png")
    assert np.array_equal(read_png(OUT / "lora.png"), u8)
    euler = read_png(sd35.REF / "euler.png")
    effect = float(np.abs(u8.astype(float) - euler).mean())
    assert effect >= sd35.MIN_EFFECT, f"the LoRA moves the image by only {effect:.2f} levels"
    bundled = check_bundled()
    meta = {
        "produced_by": "tests/reference/make_sd35_extras.py",
        "lora": {
            "files": {"lora_kohya.safetensors": f"{len(kohya) // 3} modules, rank {RANK}, alpha {ALPHA}",
                      "lora_peft.safetensors": f"{len(peft) // 2} modules (fused qkv split in three)"},
            "weight": LORA_WEIGHT,
            "reference": ("StableDiffusion3Pipeline(tiny-sd35).load_lora_weights(lora_peft.safetensors); "
                          f"fuse_lora(components=[transformer, text_encoder, text_encoder_2], lora_scale={LORA_WEIGHT})"
                          f": {changed} weights = base + {LORA_WEIGHT} * alpha/rank * up @ down, nothing else changed"),
            "mapping_check": (f"convert_sd3_transformer_checkpoint_to_diffusers(base + delta) - (base) equals the PEFT "
                              f"delta of all {n_mapped} transformer modules"),
            "effect_levels_mean_vs_euler": round(effect, 2),
        },
        "bundled": {"prefixes": BUNDLED_PREFIXES, "validation": bundled},
        "cases": [case],
    }
    mfam.write_json(OUT / "cases.json", meta)
    mf.chmod_plain(OUT)
    mf.check_file_sizes()
    for p in sorted(OUT.iterdir()):
        print(f"  {p.stat().st_size:9d}  {p.relative_to(FIXTURES)}")
    print(json.dumps(meta["lora"], indent=1))


if __name__ == "__main__":
    main()
