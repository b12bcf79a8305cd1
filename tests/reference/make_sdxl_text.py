#!/usr/bin/env python3
"""Tiny random SDXL-style text encoders (both) and their transformers reference outputs.

Writes
  tests/fixtures/tiny-sdxl-text/text_encoder/{config.json, model.safetensors}     CLIPTextModel (F16)
  tests/fixtures/tiny-sdxl-text/text_encoder_2/{config.json, model.safetensors}   CLIPTextModelWithProjection (F16)
  tests/fixtures/reference/sdxl/text.safetensors   token ids + encoder outputs (F32, ids I64)

SDXL's context is cat[enc1 penultimate hidden state, enc2 penultimate hidden state] (neither
through the final layer norm); its pooled embedding is enc2's text_embeds, taken at
input_ids.argmax(-1) because SDXL's configs carry the legacy eos_token_id 2.
The weights are rounded to fp16 values and stored as F16; everything runs in float32 on CPU and is deterministic
(fixed seeds, no hub access).

Usage: python tests/reference/make_sdxl_text.py   (torch 2.15.0, transformers 5.23.0, safetensors)
"""

import math
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, "tests", "fixtures", "tiny-sdxl-text")
REF_DIR = os.path.join(ROOT, "tests", "fixtures", "reference", "sdxl")

BOS, EOS, PAD0 = 998, 999, 0  # token ids used in the inputs (EOS is the largest id)

COMMON = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=1,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
    bos_token_id=998,
    eos_token_id=2,  # legacy value as in SDXL's configs -> pooling uses input_ids.argmax(-1)
    pad_token_id=1,
)
CONFIG_1 = dict(COMMON, hidden_act="quick_gelu")  # CLIP ViT-L style
CONFIG_2 = dict(COMMON, hidden_act="gelu", projection_dim=32)  # OpenCLIP bigG style


def randomize(model, seed):
    """Random weights that keep activations O(1): Linear W ~ N(0,1)/sqrt(fan_in), biases
    ~ 0.02 N(0,1), LayerNorm weight ~ 1 + 0.1 N(0,1) / bias ~ 0.02 N(0,1), embeddings ~ N(0,1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in sorted(model.named_modules()):  # sorted: order independent of construction
            for pname, p in sorted(mod.named_parameters(recurse=False)):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(mod, torch.nn.LayerNorm):
                    p.copy_(1.0 + 0.1 * noise if pname == "weight" else 0.02 * noise)
                elif isinstance(mod, torch.nn.Embedding):
                    p.copy_(noise)
                elif pname == "weight":
                    p.copy_(noise / math.sqrt(p[0].numel()))
                else:
                    p.copy_(0.02 * noise)


def input_ids():
    ids = torch.zeros(2, 77, dtype=torch.int64)
    # Row 0: BOS, two tokens, EOS, then padding with 0 (SDXL's 2nd tokenizer pads with "!").
    ids[0, :4] = torch.tensor([BOS, 5, 17, EOS])
    ids[0, 4:] = PAD0
    # Row 1: BOS, four tokens, then EOS repeated to the end (the 1st tokenizer pads with EOS).
    ids[1, :5] = torch.tensor([BOS, 40, 41, 42, 43])
    ids[1, 5:] = EOS
    return ids


def final_norm(m):
    # transformers >= 5.6: CLIPTextModel has no text_model wrapper, CLIPTextModelWithProjection has.
    return getattr(m, "text_model", m).final_layer_norm


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def main():
    torch.manual_seed(0)
    enc1 = CLIPTextModel(CLIPTextConfig(**CONFIG_1)).float().eval()
    randomize(enc1, seed=3101)
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**CONFIG_2)).float().eval()
    randomize(enc2, seed=3102)
    with torch.no_grad():
        for m in (enc1, enc2):
            for p in m.parameters():
                p.copy_(p.half().float())  # fp16-exact values, stored as F16

    for name, m in (("text_encoder", enc1), ("text_encoder_2", enc2)):
        d = os.path.join(MODEL_DIR, name)
        os.makedirs(d, exist_ok=True)
        m.half().save_pretrained(d, safe_serialization=True)
        m.float()

    ids = input_ids()
    with torch.no_grad():
        o1 = enc1(ids, output_hidden_states=True)
        o2 = enc2(ids, output_hidden_states=True)
        pos = ids.argmax(-1)
        rows = torch.arange(ids.shape[0])

        # Checks: the pieces are what we think they are.
        n_layers = CONFIG_1["num_hidden_layers"]
        for o, m in ((o1, enc1), (o2, enc2)):
            assert len(o.hidden_states) == n_layers + 1  # embeddings + one per layer
            fln = final_norm(m)
            assert close(o.last_hidden_state, fln(o.hidden_states[-1]))
            assert not close(o.hidden_states[-2], o.hidden_states[-1], 1e-2)
        assert pos.tolist() == [3, 5], pos
        assert close(o1.pooler_output, o1.last_hidden_state[rows, pos])
        manual = final_norm(enc2)(o2.hidden_states[-1])[rows, pos]
        manual = manual @ enc2.text_projection.weight.T
        assert close(o2.text_embeds, manual), (o2.text_embeds - manual).abs().max()
        # Reloading from disk gives the same outputs.
        f32 = dict(dtype=torch.float32)
        r1 = CLIPTextModel.from_pretrained(os.path.join(MODEL_DIR, "text_encoder"), **f32).eval()
        r2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(MODEL_DIR, "text_encoder_2"), **f32).eval()
        assert torch.equal(r1(ids, output_hidden_states=True).hidden_states[-2], o1.hidden_states[-2])
        assert torch.equal(r2(ids).text_embeds, o2.text_embeds)

    tensors = {
        "input_ids": ids,
        "enc1.penultimate": o1.hidden_states[-2],
        "enc2.penultimate": o2.hidden_states[-2],
        "enc2.text_embeds": o2.text_embeds,
        "enc2.pooled_position": pos,
        "enc1.last_hidden_state": o1.last_hidden_state,
        # As diffusers' StableDiffusionXLPipeline.encode_prompt builds prompt_embeds.
        "context": torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1),
    }
    assert tensors["context"].shape == (2, 77, 128)
    os.makedirs(REF_DIR, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(REF_DIR, "text.safetensors"), metadata={"format": "pt"})
    for k, v in tensors.items():
        std = v.float().std().item()
        print(f"  {k:24s} {str(v.dtype):13s} {tuple(v.shape)}  std {std:.4f}")
    for name, m in (("text_encoder", enc1), ("text_encoder_2", enc2)):
        sd = m.state_dict()
        print(f"{name}: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters")


if __name__ == "__main__":
    main()
