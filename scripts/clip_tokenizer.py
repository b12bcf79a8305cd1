#!/usr/bin/env python3
"""Writes the full CLIP tokenizer (that of openai/clip-vit-large-patch14 and of
Stable Diffusion 1.x's tokenizer/ folder) for transformers' CLIPTokenizer,
derived from assets/bpe_simple_vocab_16e6.txt.gz the way CLIP derives it (see
assets/README.md): vocab.json (49408 entries), merges.txt (48894 merges),
tokenizer_config.json and special_tokens_map.json. Standard library only.

Usage: clip_tokenizer.py OUT_DIR [BPE_GZ]   (BPE_GZ defaults to assets/bpe_simple_vocab_16e6.txt.gz)
Check: CLIPTokenizer.from_pretrained(OUT_DIR)("a photo of a cat").input_ids
       == [49406, 320, 1125, 539, 320, 2368, 49407]
"""
import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode():
    # CLIP's (and GPT-2's) map of the 256 bytes onto printable characters.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocab_and_merges(gz):
    """CLIP's 49408 tokens in id order and its 48894 merges (pairs), from bpe_simple_vocab_16e6.txt.gz."""
    lines = gzip.open(gz).read().decode("utf-8").split("\n")
    # Line 0 is a header; CLIP uses the first 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == len(set(tokens)) == 49408 and len(merges) == 48894, (len(tokens), len(merges))
    return tokens, merges


def main():
    out = Path(sys.argv[1])
    gz = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent.parent / "assets/bpe_simple_vocab_16e6.txt.gz"
    vocab, merges = vocab_and_merges(gz)

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",  # SD 1.x pads with <|endoftext|> (49407)
        "unk_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = dict(special, model_max_length=77, do_lower_case=True, errors="replace",
                  add_prefix_space=False, tokenizer_class="CLIPTokenizer")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
