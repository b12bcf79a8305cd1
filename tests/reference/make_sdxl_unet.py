#!/usr/bin/env python3
"""Tiny random SDXL-style UNet and its diffusers reference outputs.

Writes
  tests/fixtures/tiny-sdxl-unet/{config.json, diffusion_pytorch_model.safetensors}   (F32)
  tests/fixtures/reference/sdxl/unet.safetensors   inputs + outputs of one UNet call (F32)

The UNet has SDXL's structure (no attention at the top level, linear proj_in/proj_out, more
transformer layers deeper down, the "text_time" added conditioning) scaled down to 2 levels.
Everything runs in float32 on CPU and is deterministic (fixed seeds, no hub access).

Usage: python tests/reference/make_sdxl_unet.py   (torch 2.15.0, diffusers 0.42.1, safetensors)
"""

import math
import os

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, "tests", "fixtures", "tiny-sdxl-unet")
REF_DIR = os.path.join(ROOT, "tests", "fixtures", "reference", "sdxl")

POOLED_DIM = 32  # width of the pooled text embedding ("text_embeds")
TIME_DIM = 8  # addition_time_embed_dim: sinusoid width per time_id

CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    # Requested [32, 64] with 32 groups is 1.98 M params (7.96 MB in F32); the fixture must stay
    # <= 1.5 MB, so only the widths shrink (and the group count with them, 8 divides every width
    # incl. the up blocks' concatenations 32/40/48). Everything structural is as requested.
    block_out_channels=[16, 24],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=[1, 2],
    attention_head_dim=[1, 2],  # diffusers' (misnamed) number of heads per block
    use_linear_projection=True,
    cross_attention_dim=64,
    norm_num_groups=8,  # 2 channels per group at 16, 3 at 24 (SDXL: 10 at 320)
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_DIM,  # 80
    flip_sin_to_cos=True,
    freq_shift=0,
    upcast_attention=False,
)


def randomize(unet, seed):
    """Random weights that keep activations O(1): W ~ N(0,1)/sqrt(fan_in), biases ~ 0.02 N(0,1),
    norm weights ~ 1 + 0.1 N(0,1). Nothing is zero (conv_out included)."""
    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for _, mod in sorted(unet.named_modules()):  # sorted: order independent of construction
            for pname, p in sorted(mod.named_parameters(recurse=False)):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(mod, norm_types):
                    p.copy_(1.0 + 0.1 * noise if pname == "weight" else 0.02 * noise)
                elif pname == "weight":
                    fan_in = p[0].numel()  # in_features (Linear) or in_ch*kh*kw (Conv)
                    p.copy_(noise / math.sqrt(fan_in))
                else:
                    p.copy_(0.02 * noise)


def main():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIG).float().eval()
    randomize(unet, seed=3001)

    os.makedirs(MODEL_DIR, exist_ok=True)
    unet.save_pretrained(MODEL_DIR, safe_serialization=True)

    # Inputs (batch 2; the two rows use different size/crop conditioning).
    g = torch.Generator().manual_seed(3002)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, 64, generator=g)
    text_embeds = torch.randn(2, POOLED_DIM, generator=g)
    timestep = torch.tensor([601.0])
    # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64], [48, 80, 4, 8, 64, 64]], dtype=torch.float32)

    with torch.no_grad():
        # The same steps UNet2DConditionModel.get_aug_embed takes for "text_time".
        time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(2, -1)  # (2, 6*TIME_DIM)
        aug_emb = unet.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1))
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        out = unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added).sample
        zeros = {"text_embeds": torch.zeros_like(text_embeds), "time_ids": torch.zeros_like(time_ids)}
        out_no_added = unet(sample, timestep, encoder_hidden_states=context,
                            added_cond_kwargs=zeros).sample

    rel = ((out - out_no_added).norm() / out.norm()).item()
    print(f"relative difference out vs out_no_added: {rel:.4f}")
    assert rel > 1e-2, "added conditioning has no visible effect"

    tensors = dict(sample=sample, timestep=timestep, context=context, text_embeds=text_embeds,
                   time_ids=time_ids, time_embeds=time_embeds, aug_emb=aug_emb, out=out,
                   out_no_added=out_no_added)
    os.makedirs(REF_DIR, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in tensors.items()},
              os.path.join(REF_DIR, "unet.safetensors"), metadata={"format": "pt"})
    for k, v in tensors.items():
        print(f"  {k:13s} {tuple(v.shape)}  std {v.std().item() if v.numel() > 1 else 0:.4f}")

    # Keys an SD1-style UNet does not have (the added-conditioning embedding).
    sd = unet.state_dict()
    print(f"{len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters; SDXL-only keys:")
    for k, v in sd.items():
        if k.startswith("add_"):
            print(f"  {k} {list(v.shape)}")


if __name__ == "__main__":
    main()
