#!/usr/bin/env python3
"""T5 v1.1's token ids of 60 prompts from the Python `tokenizers` library, on the very tokenizer.json sdgen embeds
(assets/t5_tokenizer.json.gz): tests/fixtures/tokenizer/t5_cases.json.

    /root/venv-ref/bin/python tests/reference/t5_tokenizer_cases.py

(tokenizers as pinned in requirements.txt.) Deterministic; needs no model.
"""

import gzip
import json
from pathlib import Path

from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "tokenizer" / "t5_cases.json"

PROMPTS = [
    "", " ", "a", "A", "a red fox in the snow", "a photo of a cat", "A photo of an astronaut riding a horse on mars",
    "masterpiece, best quality, 1girl, solo", "(masterpiece:1.2), [blurry], <lora:fluffy:0.8>", "a\tb\nc  d",
    "  leading and trailing spaces  ", "UPPER lower MiXeD", "numbers 12345 6.789 0x1F 1e-3", "dates 2024-06-11 10:30",
    "e-mail: someone@example.com, url: https://example.com/a?b=c", "emoji 🦊🌨️ and ♥", "Ünïcödé çàfé naïve façade",
    "日本語のテキスト", "中文提示词", "한국어", "Русский текст", "العربية", "ελληνικά", "full-width ＡＢＣ１２３",
    "ligatures ﬁ ﬂ and ½ ²", "quotes “curly” ‘single’ «guillemets»", "dashes – — ‒ and … ellipsis",
    "tabs\tand\ttabs", "new\n\nlines", "repeated !!!!! ????", "a,b;c:d.e", "C:\\path\\to\\file.png",
    "hyphen-ated words and under_scores", "CamelCaseWordsTogether", "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism", "pneumonoultramicroscopicsilicovolcanoconiosis", "x" * 40,
    "the " * 30, "a cozy cabin in the woods at night, snow falling, warm light from the windows",
    "portrait of an old fisherman, dramatic lighting, 85mm, bokeh", "isometric voxel art of a tiny city",
    "low poly, pastel colors, minimalistic", "<extra_id_0> sentinel <extra_id_99>", "</s> end <pad> pad <unk>",
    "▁already▁metaspaced", "mixed\u00a0non\u2009breaking spaces", "zero\u200bwidth", "combining e\u0301 accent",
    "ＴＥＳＴ fullwidth", "$100 €50 £20 ¥1000", "50% off & more #hashtag @user", "a+b=c*d/e^f", "[1, 2, 3]",
    "{json: true}", "<html><body>hi</body></html>", "SELECT * FROM table;", "snake_case_name", "kebab-case-name",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


def main():
    tok = Tokenizer.from_str(gzip.decompress((ROOT / "assets" / "t5_tokenizer.json.gz").read_bytes()).decode())
    assert len(PROMPTS) >= 50
    cases = [{"prompt": p, "ids": tok.encode(p).ids} for p in PROMPTS]
    assert cases[4]["ids"][-1] == 1, "T5 ends with </s> (id 1)"
    OUT.write_text(json.dumps({"source": "tokenizers.Tokenizer.from_str(assets/t5_tokenizer.json).encode(p).ids",
                               "cases": cases}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{len(cases)} prompts -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
