#!/usr/bin/env python3
"""Analytic FLOP count (2 per multiply-add) of one denoiser pass (UNet, or SD 3's
MMDiT: reported as "unet_gflop" all the same) and one VAE decode of a diffusers
folder at a given image size, from the models' config.json. Counts convolutions,
linear layers and attention products; norms, activations and element-wise work
are left out (well under 1 %).

Usage: flops.py MODEL_DIR SIZE_PX [HEIGHT_PX]   → one JSON line (GFLOP per image)
"""
import json
import sys
from pathlib import Path


class Count:
    def __init__(self):
        self.conv = self.linear = self.attention = 0

    def conv2d(self, cin, cout, k, h, w):
        self.conv += 2 * h * w * cin * cout * k * k

    def dense(self, tokens, cin, cout):
        self.linear += 2 * tokens * cin * cout

    def attend(self, lq, lk, c):
        # q·kᵀ and probs·v, all heads together.
        self.attention += 2 * 2 * lq * lk * c

    def resnet(self, cin, cout, h, w):
        self.conv2d(cin, cout, 3, h, w)
        self.conv2d(cout, cout, 3, h, w)
        if cin != cout:
            self.conv2d(cin, cout, 1, h, w)

    def transformer(self, c, h, w, context_dim, context_len, linear_proj, depth=1):
        n = h * w
        proj = self.dense if linear_proj else (lambda t, a, b: self.conv2d(a, b, 1, h, w))
        proj(n, c, c)
        for _ in range(depth):
            self.dense(n, c, 3 * c)  # self-attention q, k, v
            self.attend(n, n, c)
            self.dense(n, c, c)
            self.dense(n, c, c)  # cross-attention q; k, v from the text
            self.dense(context_len, context_dim, 2 * c)
            self.attend(n, context_len, c)
            self.dense(n, c, c)
            self.dense(n, c, 8 * c)  # GEGLU: 4c value + 4c gate
            self.dense(n, 4 * c, c)
        proj(n, c, c)

    def total(self):
        return self.conv + self.linear + self.attention

    def as_gflop(self):
        return {k: round(v / 1e9, 1) for k, v in
                dict(conv=self.conv, linear=self.linear, attention=self.attention, total=self.total()).items()}


def unet(cfg, h, w, context_len=77):
    c = Count()
    ch = cfg["block_out_channels"]
    layers = cfg["layers_per_block"]
    ctx = cfg["cross_attention_dim"]
    lin = cfg.get("use_linear_projection", False)
    attn_down = ["CrossAttn" in t for t in cfg["down_block_types"]]
    attn_up = ["CrossAttn" in t for t in cfg["up_block_types"]]
    c.conv2d(cfg["in_channels"], ch[0], 3, h, w)
    skips = [ch[0]]
    cin = ch[0]
    for i, cout in enumerate(ch):
        for _ in range(layers):
            c.resnet(cin, cout, h, w)
            if attn_down[i]:
                c.transformer(cout, h, w, ctx, context_len, lin)
            cin = cout
            skips.append(cout)
        if i < len(ch) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            c.conv2d(cout, cout, 3, h, w)
            skips.append(cout)
    c.resnet(cin, cin, h, w)
    c.transformer(cin, h, w, ctx, context_len, lin)
    c.resnet(cin, cin, h, w)
    def up_block(i, cin, cout, h, w):
        c.resnet(cin + skips.pop(), cout, h, w)
        if attn_up[i]:
            c.transformer(cout, h, w, ctx, context_len, lin)

    cin, h, w = up_path(c, list(reversed(ch)), layers + 1, cin, h, w, up_block)
    c.conv2d(cin, cfg["out_channels"], 3, h, w)
    return c


def up_path(c, channels, per_level, cin, h, w, block):
    """Levels of `per_level` blocks, each level but the last followed by a 2× upsampling conv."""
    for i, cout in enumerate(channels):
        for _ in range(per_level):
            block(i, cin, cout, h, w)
            cin = cout
        if i < len(channels) - 1:
            h, w = h * 2, w * 2
            c.conv2d(cout, cout, 3, h, w)
    return cin, h, w


def mmdit(cfg, h, w, context_len=77 + 256):
    """SD 3's MMDiT on an h x w latent: CLIP's 77 and T5's 256 text tokens (zeros without T5, still attended)."""
    c = Count()
    p, d = cfg["patch_size"], cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n, lc = (h // p) * (w // p), context_len
    c.conv2d(cfg["in_channels"], d, p, h // p, w // p)
    c.dense(lc, cfg["joint_attention_dim"], d)
    dual = set(cfg.get("dual_attention_layers", ()))
    for i in range(cfg["num_layers"]):
        last = i == cfg["num_layers"] - 1
        c.dense(1, d, (9 if i in dual else 6) * d)  # adaLN modulation (one timestep per batch row)
        c.dense(1, d, (2 if last else 6) * d)
        c.dense(n, d, 3 * d)  # joint attention over image and text tokens
        c.dense(lc, d, 3 * d)
        c.attend(n + lc, n + lc, d)
        c.dense(n, d, d)
        if i in dual:  # MMDiT-X: image-only self-attention beside it
            c.dense(n, d, 3 * d)
            c.attend(n, n, d)
            c.dense(n, d, d)
        c.dense(n, d, 4 * d)
        c.dense(n, 4 * d, d)
        if not last:  # the last block keeps no text stream after the attention
            c.dense(lc, d, d)
            c.dense(lc, d, 4 * d)
            c.dense(lc, 4 * d, d)
    c.dense(n, d, p * p * cfg["out_channels"])
    return c


def vae_decoder(cfg, h, w):
    c = Count()
    ch = list(reversed(cfg["block_out_channels"]))
    lat = cfg["latent_channels"]
    if cfg.get("use_post_quant_conv", True):
        c.conv2d(lat, lat, 1, h, w)
    c.conv2d(lat, ch[0], 3, h, w)
    c.resnet(ch[0], ch[0], h, w)
    c.dense(h * w, ch[0], 4 * ch[0])  # mid attention: q, k, v, out
    c.attend(h * w, h * w, ch[0])
    c.resnet(ch[0], ch[0], h, w)
    cin, h, w = up_path(c, ch, cfg["layers_per_block"] + 1, ch[0], h, w, lambda i, a, b, h, w: c.resnet(a, b, h, w))
    c.conv2d(cin, cfg["out_channels"], 3, h, w)
    return c


def count(model_dir, width, height):
    model = Path(model_dir)
    v = json.loads((model / "vae" / "config.json").read_text())
    scale = 2 ** (len(v["block_out_channels"]) - 1)
    lh, lw = height // scale, width // scale
    if (model / "transformer").is_dir():
        backbone = mmdit(json.loads((model / "transformer" / "config.json").read_text()), lh, lw)
    else:
        backbone = unet(json.loads((model / "unet" / "config.json").read_text()), lh, lw)
    return {"size": [width, height], "unet_gflop": backbone.as_gflop(),
            "vae_decode_gflop": vae_decoder(v, lh, lw).as_gflop()}


if __name__ == "__main__":
    w = int(sys.argv[2])
    print(json.dumps(count(sys.argv[1], w, int(sys.argv[3]) if len(sys.argv) > 3 else w)))
