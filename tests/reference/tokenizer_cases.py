#!/usr/bin/env python3
"""Record reference token ids for sdgen's CLIP tokenizer (tests/tokenizer.rs).

Builds transformers' CLIPTokenizer (transformers 5.x, tokenizers-backed) from a vocab.json /
merges.txt derived from assets/bpe_simple_vocab_16e6.txt.gz exactly as CLIP derives its
vocabulary (no hub download), cross-checks it against open_clip's SimpleTokenizer where the two
agree by design, and writes tests/fixtures/tokenizer/cases.json:

    [{"prompt": str, "ids": [77 ids], "tokens": [BPE ids, no BOS/EOS, untruncated],
      "dropped": str | null}, ...]

"ids" is `tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids`;
"dropped" is the text diffusers reports as truncated: the decode of the untruncated ids
[76:-1] (null when nothing was cut).

Usage: python tests/reference/tokenizer_cases.py   (needs transformers==5.23.0, tokenizers;
open_clip_torch is optional and only used for the cross-check).
"""

import json
import os
import random
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GZ = os.path.join(ROOT, "assets", "bpe_simple_vocab_16e6.txt.gz")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "cases.json")
MAX_LEN = 77


sys.path.insert(0, os.path.join(ROOT, "scripts"))
from clip_tokenizer import bytes_to_unicode, vocab_and_merges  # noqa: E402,F401  (make_prompts imports both from here)


def write_vocab(directory):
    """vocab.json + merges.txt as CLIP derives them from the gz (49408 entries)."""
    tokens, merges = vocab_and_merges(GZ)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(" ".join(m) for m in merges) + "\n")


LONG_1 = (
    "masterpiece, best quality, ultra detailed, 8k, photorealistic portrait of an old "
    "fisherman with a weathered face and a thick grey beard, wearing a yellow raincoat, "
    "standing on a wooden pier at dawn, dramatic lighting, volumetric fog, seagulls in the "
    "background, shallow depth of field, bokeh, shot on a Canon EOS R5 with an 85mm lens, "
    "f/1.4, highly detailed skin texture, cinematic color grading, trending on artstation"
)
LONG_2 = ", ".join(["(beautiful:1.2) landscape"] * 40)
LONG_3 = "a " * 100 + "cat"
LONG_4 = "word " * 74 + "last"  # 75 tokens: fits exactly
LONG_5 = "word " * 75 + "extra"  # 76 tokens: one dropped
LONG_6 = "word " * 73 + "end"  # 74 tokens
LONG_7 = "日本の美しい風景、山と川と桜、" * 12
LONG_8 = "🐱" * 60 + " cat"
LONG_9 = "a painting of a fox " * 15 + "<|endoftext|> in the snow"

PROMPTS = [
    # basics
    "a photo of a cat",
    "",
    " ",
    "   \t\n  ",
    "a",
    "A",
    "cat",
    "Cat",
    "CAT",
    "cAt DoG",
    "A Photo Of A Cat",
    "A PHOTO OF A CAT",
    "an astronaut riding a horse on mars",
    "a beautiful landscape painting, trending on artstation",
    "portrait of a woman, oil on canvas, by rembrandt",
    "cyberpunk city at night, neon lights, rain, reflections",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "antidisestablishmentarianism floccinaucinihilipilification",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "xyzzy qwfp zxcvbnm",
    # punctuation
    "hello, world!",
    "hello,world!",
    "what?!?! no...",
    "!!!!!!!!!!!!!!!!",
    "a cat; a dog: a bird - a fish",
    "a/b\\c|d",
    "@user #hashtag $100 %50 ^caret &and *star",
    "email@example.com",
    "https://www.example.com/path?query=1&b=2",
    "~tilde `backtick` _under_score_",
    "\"double quotes\" and 'single quotes'",
    "a_b_c-d-e.f.g",
    "...",
    "--",
    "<>",
    "<|>",
    "<|notatoken|>",
    # contractions
    "it's a cat's toy",
    "don't won't can't shouldn't",
    "I'm you're we've they'll he'd",
    "IT'S I'LL WE'RE",
    "'s 't 're 've 'm 'll 'd",
    "'sun 'dog' rock'n'roll",
    "''' '' 's''",
    # numbers
    "0",
    "12345",
    "3.14159",
    "1,000,000",
    "2024-01-01 12:30:45",
    "8k uhd 4k 1080p",
    "f/1.8 85mm iso100",
    "0x1F 1e10 -42 +7",
    "x² y³ ½ ¼",
    "Ⅻ ① ⑳ ٣ ४",
    "１２３ fullwidth digits",
    # accents and Latin
    "café crème brûlée",
    "naïve façade résumé",
    "Ångström Øresund Æsir",
    "straße STRASSE Straße",
    "ﬁ ﬂ ligatures",
    "Ｈｅｌｌｏ Ｗｏｒｌｄ",
    "cafe\u0301",
    "e\u0301 a\u0300 o\u0308",
    "A\u030a vs \u00c5 vs \u212b",
    "İstanbul ıi",
    "ΟΔΟΣ Σ σς",
    "Ελληνικά γράμματα",
    "ДОБРО пожаловать",
    "Ǆ ǅ ǆ",
    "ŉ ǰ",
    # CJK and other scripts
    "日本語のテキスト",
    "一只猫坐在桌子上",
    "中文 and English mixed",
    "東京タワー、夜景、高画質",
    "한국어 텍스트 안녕하세요",
    "\u1100\u1161\u11a8",
    "カタカナ ひらがな 漢字",
    "ｶﾀｶﾅ halfwidth",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "ሰላም",
    "𝕳𝖊𝖑𝖑𝖔 𝓌𝑜𝓇𝓁𝒹",
    # NFC with tokenizers' Unicode 9.0 tables: later compositions and combining classes unused
    "\U000113c2\U000113c2 \U000113c5 tulu-tigalari",
    "\U00011935\U00011930 \U00011938 dives akuru",
    "\U0001611e\U0001611e\U0001611f gurung khema",
    "q\u0345\u1df6 a\u0301\u1dfa\u0316",
    "\u08d3\u0651\u064b arabic marks",
    # emoji
    "😀",
    "a cat 🐱 and a dog 🐶",
    "👍🏽",
    "👨‍👩‍👧‍👦 family",
    "🇯🇵 🇺🇸 flags",
    "❤️ ✨ ☀",
    "🔥🔥🔥 fire",
    "emoji😀inside",
    # whitespace
    "a  photo   of    a cat",
    "\ta photo of a cat\t",
    "a\nphoto\nof\na\ncat",
    "a\r\nphoto",
    "  leading and trailing  ",
    "a\u00a0photo\u00a0of",
    "a\u3000photo",
    "a\u2003b\u2009c\u202fd",
    "a\u2028b\u2029c",
    "a\u0085b",
    "a\u000bb\u000cc",
    "a\u200bb",
    "a\ufeffb",
    "a\u1680b",
    # control characters
    "a\x00b",
    "a\x07b\x1bc",
    "a\x7fb",
    "a\x1cb\x1dc\x1ed\x1ff",
    "\x01\x02\x03",
    "a\u200db\u200cc",
    "a\u00adb",
    "\ufffd replacement",
    # html entities and typography
    "fish &amp; chips",
    "&lt;tag&gt; &quot;x&quot; &#39;y&#39;",
    "“curly” ‘quotes’ it’s",
    "em—dash en–dash ellipsis…",
    "«guillemets» ¿qué? ¡sí!",
    "© ® ™ ° ± × ÷",
    "→ ← ↑ ↓ ∞ ≈ ≠",
    "∑∫√∂",
    # A1111-style weighting
    "(masterpiece:1.2), (best quality), [worst quality]",
    "((very detailed)), (((intricate)))",
    "[[low quality]] {{{high}}}",
    "(red hair:1.3) (blue eyes:0.8)",
    "\\(escaped parentheses\\)",
    "a [cat|dog] hybrid",
    "[from:to:0.5] scene",
    "BREAK a cat BREAK a dog",
    "<lora:add_detail:0.7> portrait",
    "(embedding:some-name:1.0)",
    # special tokens
    "<|startoftext|>",
    "<|endoftext|>",
    "a<|endoftext|>b",
    "a <|endoftext|> b",
    "<|startoftext|>a photo<|endoftext|>",
    "<|ENDOFTEXT|>",
    "a<|EndOfText|>>",
    "x<|startoftext|",
    "<|startoftext|><|endoftext|><|endoftext|>",
    "<start_of_text> <end_of_text>",
    # long prompts
    LONG_1,
    LONG_2,
    LONG_3,
    LONG_4,
    LONG_5,
    LONG_6,
    LONG_7,
    LONG_8,
    LONG_9,
    "word" * 200,
    "x" * 1000,
]


def random_prompts(n, seed=1234):
    rng = random.Random(seed)
    pool = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n.,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`")
        + list("éèêëÉÈÀàçÇñÑüÜöÖäÄßøØåÅæÆœŒ")
        + list("日本語中文字猫犬山川한국어ひらがなカタカナ")
        + list("😀🐱🐶🔥✨❤️👍🏽‍")
        + ["\u00a0", "\u3000", "\u2003", "\u0301", "\u0308", "\x00", "\x1b", "\u200b", "\ufeff"]
        + ["'s", "'ll", "<|endoftext|>", "<|startoftext|>", "ΣΟΣ", "İ"]
    )
    out = []
    for _ in range(n):
        length = rng.randint(1, 40)
        out.append("".join(rng.choice(pool) for _ in range(length)))
    return out


def openclip_agrees_by_design(prompt):
    """Prompts on which open_clip's (= the old 4.x slow) cleaning cannot differ: printable
    ASCII and ordinary whitespace, no HTML entities, no special-token text (open_clip spells
    its special tokens <start_of_text> / <end_of_text>)."""
    return (
        all(c in "\t\n " or 0x21 <= ord(c) <= 0x7E for c in prompt)
        and "&" not in prompt
        and "<|" not in prompt
        and "_of_text>" not in prompt
    )


def load_openclip():
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except Exception as exc:  # torch or ftfy missing
        print(f"open_clip unavailable ({exc}); skipping the cross-check", file=sys.stderr)
        return None
    return SimpleTokenizer(GZ)


def main():
    from transformers import CLIPTokenizer
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        write_vocab(tmp)
        tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"))
    print(f"transformers {transformers.__version__}, {type(tok).__name__}", file=sys.stderr)
    assert tok.pad_token_id == 49407

    cat = tok("a photo of a cat").input_ids
    assert cat == [49406, 320, 1125, 539, 320, 2368, 49407], cat

    prompts = PROMPTS + random_prompts(40)
    assert len(prompts) == len(set(prompts))

    cases = []
    for prompt in prompts:
        ids = tok(prompt, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
        full = tok(prompt).input_ids
        tokens = tok(prompt, add_special_tokens=False).input_ids
        assert full == [49406] + tokens + [49407]
        assert len(ids) == MAX_LEN
        assert ids[: min(len(full), MAX_LEN) - 1] == full[: min(len(full), MAX_LEN) - 1]
        dropped = tok.decode(full[MAX_LEN - 1 : -1]) if len(full) > MAX_LEN else None
        cases.append({"prompt": prompt, "ids": ids, "tokens": tokens, "dropped": dropped})

    oc = load_openclip()
    if oc is not None:
        checked, differing = 0, []
        for case in cases:
            theirs = oc.encode(case["prompt"])
            if openclip_agrees_by_design(case["prompt"]):
                assert theirs == case["tokens"], (case["prompt"], theirs, case["tokens"])
                checked += 1
            elif theirs != case["tokens"]:
                differing.append(case["prompt"])
        print(f"open_clip: {checked} prompts identical by design", file=sys.stderr)
        print(f"open_clip: {len(differing)} other prompts differ (4.x-style cleaning):", file=sys.stderr)
        for prompt in differing:
            print(f"  {prompt!r}", file=sys.stderr)

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(c, ensure_ascii=True) for c in cases) + "\n]\n")
    print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
