#!/usr/bin/env python3
"""The tiny SDXL UNet's recipe (CONFIG, randomize) and its module reference.

make_families.py builds tests/fixtures/tiny-sdxl/unet/ from CONFIG and randomize() (plus make_fixtures' identity
paths, rounded to fp16) and calls write_reference() on it, which writes
  tests/fixtures/reference/sdxl/unet.safetensors   inputs + outputs of one UNet call, with and without the
                                                   added conditioning (F32)
Run on its own, this script rewrites that file from the committed tiny-sdxl/unet (the same bytes).

The UNet has SDXL's structure (no attention at the top level, linear proj_in/proj_out, more transformer layers
deeper down, the "text_time" added conditioning) scaled down to 2 levels of 16 and 32 channels.
Everything runs in float32 on CPU and is deterministic (fixed seeds, no hub access).

Usage: python tests/reference/make_sdxl_unet.py   (torch 2.15.0, diffusers 0.42.1, safetensors)
"""

import math
import os

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, "tests", "fixtures", "tiny-sdxl", "unet")
REF_DIR = os.path.join(ROOT, "tests", "fixtures", "reference", "sdxl")

POOLED_DIM = 32  # width of the pooled text embedding ("text_embeds")
TIME_DIM = 8  # addition_time_embed_dim: sinusoid width per time_id

# SDXL's rules at two levels of 16 and 32 channels: 16 norm groups (single files: sdgen takes the narrowest width
# below 32; two channels a group at 32, so the time and size embedding reaches the output), no attention at level 0,
# one head of the block's whole width (SDXL's are 64 wide; sdgen infers heads = channels / 64, at least 1), linear
# projections, 2 transformer layers at the deeper level and in the mid block, cross-attention 128 = 64
# (text_encoder) + 64 (text_encoder_2), "text_time" (time ids 6 x 8 + pooled 32).
CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=[16, 32],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=[1, 2],
    attention_head_dim=[1, 1],  # diffusers' (misnamed) number of heads per block
    use_linear_projection=True,
    cross_attention_dim=128,
    norm_num_groups=16,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_DIM,  # 80
    flip_sin_to_cos=True,
    freq_shift=0,
    upcast_attention=False,
)
REF_FILE_NAME = "unet.safetensors"


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


def write_reference(unet):
    """reference/sdxl/unet.safetensors: one call of `unet` (batch 2; the two rows use different size/crop
    conditioning), with and without the added conditioning."""
    unet = unet.float().eval()
    g = torch.Generator().manual_seed(3002)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
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
    path = os.path.join(REF_DIR, REF_FILE_NAME)
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)
    for k, v in tensors.items():
        print(f"  {k:13s} {tuple(v.shape)}  std {v.std().item() if v.numel() > 1 else 0:.4f}")

    # Keys an SD1-style UNet does not have (the added-conditioning embedding).
    sd = unet.state_dict()
    print(f"{len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters; SDXL-only keys:")
    for k, v in sd.items():
        if k.startswith("add_"):
            print(f"  {k} {list(v.shape)}")


def main():
    torch.set_num_threads(2)
    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR, local_files_only=True, torch_dtype=torch.float32)
    assert {k: unet.config[k] for k in CONFIG} == {k: (list(v) if isinstance(v, tuple) else v) for k, v in CONFIG.items()}
    write_reference(unet)


if __name__ == "__main__":
    main()
