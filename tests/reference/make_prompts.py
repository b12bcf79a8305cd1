#!/usr/bin/env python3
"""Reference outputs of AUTOMATIC1111's (stable-diffusion-webui) prompt handling.

Writes tests/fixtures/reference/prompts/
  chunks.json                 parse_prompt_attention + tokenize_line results (CLIP's full vocabulary)
  conditioning.safetensors    A1111 conditioning from the tiny SD1 and tiny SDXL text encoders
  conditioning.json           what each tensor is, its prompt / negative prompt
  clip_skip.json + *.png      diffusers txt2img images with and without clip skip (tiny SD1, tiny SDXL)

The algorithm below is a transcription of A1111's code (read from the AUTOMATIC1111/
stable-diffusion-webui repository, see ALGORITHM_SOURCE) with ONE deliberate difference:

  An opening bracket `(` or `[` that is never closed is a LITERAL character: it stays in the
  text (weight 1.0 times whatever closed brackets enclose it) and weights nothing.
  A1111 instead applies its multiplier (1.1 or 1/1.1) to everything after it.

Implementation of the difference: A1111's own bracket matching is run once to find the opening
brackets still on the stacks at the end; the real parse then treats exactly those as literal
text, like an escaped `\\(`. Removing an opener that is never popped changes no other match
(every `)` after it pops something pushed later), so all other brackets match as in A1111.
`parse_prompt_attention(text, unclosed_is_literal=False)` is A1111 unmodified; the script
checks it against A1111's doctests.

Everything else is A1111 (Emphasis "Original", comma_padding_backtrack 20, chunk_length 75,
no textual-inversion embeddings). Runs on CPU in float32, deterministic.

Usage: /root/venv-ref/bin/python tests/reference/make_prompts.py
       (torch 2.15, transformers 5.23, safetensors; diffusers 0.42.1 for clip_skip.json)
"""

import gzip
import hashlib
import json
import math
import os
import re
import tempfile
import types

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT_DIR = os.path.join(FIX, "reference", "prompts")
SD1_TOKENIZER = os.path.join(FIX, "tiny-sd1", "tokenizer")
SD1_TEXT_ENCODER = os.path.join(FIX, "tiny-sd1", "text_encoder")
SDXL_TEXT = os.path.join(FIX, "tiny-sdxl-text")
SDXL_TOKENIZERS = os.path.join(FIX, "tiny-sdxl")
BPE_GZ = os.path.join(ROOT, "assets", "bpe_simple_vocab_16e6.txt.gz")

PRODUCED_BY = "tests/reference/make_prompts.py"

ALGORITHM_SOURCE = {
    "repository": "AUTOMATIC1111/stable-diffusion-webui",
    "files": {
        "modules/prompt_parser.py": (
            "re_attention (with `:\\s*([+-]?[.\\d]+)\\s*\\)`, i.e. spaces allowed around the "
            "weight), re_break = `\\s*\\bBREAK\\b\\s*` (re.S), parse_prompt_attention (bracket "
            "stacks, multiply_range, unclosed brackets multiplied at the end, BREAK as "
            "['BREAK', -1], [['', 1.0]] when empty, merge of equal neighbouring weights)"
        ),
        "modules/sd_hijack_clip.py": (
            "FrozenCLIPEmbedderWithCustomWordsBase: chunk_length 75, empty_chunk, tokenize_line "
            "with next_chunk (token_count, comma backtrack), process_texts, forward (pads the "
            "batch with empty_chunk, torch.hstack of the chunks, pooled from zs[0]), "
            "process_tokens (id_pad replaces tokens after the first id_end); "
            "FrozenCLIPEmbedderWithCustomWords (comma token ',</w>', id_pad = id_end, tokenize "
            "with truncation=False, add_special_tokens=False; CLIP_stop_at_last_layers > 1 -> "
            "hidden_states[-n] then final_layer_norm); FrozenCLIPEmbedderForSDXLWithCustomWords "
            "(hidden_states[layer_idx], no final norm)"
        ),
        "modules/sd_emphasis.py": (
            "EmphasisOriginal.after_transformers: z *= multipliers; z *= original_mean / new_mean "
            "(means over the whole chunk tensor)"
        ),
        "modules/sd_hijack_open_clip.py": (
            "FrozenOpenCLIPEmbedder2WithCustomWords: id_pad = 0, z = d[layer] ('penultimate'), "
            "z.pooled = d['pooled']"
        ),
        "modules/sd_models_xl.py": "get_learned_conditioning -> GeneralConditioner(sdxl_conds)",
        "modules/sd_samplers_cfg_denoiser.py": (
            "pad_cond_uncond: the shorter of cond/uncond gets copies of the empty-prompt "
            "conditioning (sd_models.get_empty_cond = get_learned_conditioning(['']))"
        ),
        "modules/shared_options.py": (
            "comma_padding_backtrack 20, CLIP_stop_at_last_layers 1, emphasis 'Original', "
            "pad_cond_uncond False by default"
        ),
        "Stability-AI/generative-models sgm/modules/encoders/modules.py": (
            "GeneralConditioner.forward: 3-D outputs ('crossattn') concatenated on dim 2, 2-D "
            "('vector') on dim 1; FrozenOpenCLIPEmbedder2 pools ln_final(last) at "
            "text.argmax(-1) @ text_projection"
        ),
    },
}

DIFFERENCE = (
    "An opening bracket '(' or '[' that is never closed is kept as a literal character (it stays "
    "in the text with the weight of the closed brackets around it, and weights nothing). A1111 "
    "instead multiplies everything after it by 1.1 (or 1/1.1). Everything else follows A1111. "
    "Where a case's result differs from unmodified A1111, the case also has "
    "'a1111_unmodified_parsed'."
)

CHUNK_LENGTH = 75
COMMA_PADDING_BACKTRACK = 20

# ----------------------------------------------------------------------------------------------
# modules/prompt_parser.py (transcribed)

RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)

RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def unclosed_openers(matches):
    """Indices (into `matches`) of the '(' / '[' that A1111's stacks still hold at the end."""
    round_brackets, square_brackets = [], []
    for i, m in enumerate(matches):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            pass
        elif text == "(":
            round_brackets.append(i)
        elif text == "[":
            square_brackets.append(i)
        elif weight is not None and round_brackets:
            round_brackets.pop()
        elif text == ")" and round_brackets:
            round_brackets.pop()
        elif text == "]" and square_brackets:
            square_brackets.pop()
    return set(round_brackets) | set(square_brackets)


def parse_prompt_attention(text, unclosed_is_literal=True):
    matches = list(RE_ATTENTION.finditer(text))
    literal = unclosed_openers(matches) if unclosed_is_literal else set()

    res = []
    round_brackets = []
    square_brackets = []

    round_bracket_multiplier = 1.1
    square_bracket_multiplier = 1 / 1.1

    def multiply_range(start_position, multiplier):
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for i, m in enumerate(matches):
        text = m.group(0)
        weight = m.group(1)

        if i in literal:  # the one difference: an unclosed opener is plain text
            res.append([text, 1.0])
        elif text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), round_bracket_multiplier)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), square_bracket_multiplier)
        else:
            parts = re.split(RE_BREAK, text)
            for j, part in enumerate(parts):
                if j > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    if unclosed_is_literal:
        assert not round_brackets and not square_brackets

    for pos in round_brackets:
        multiply_range(pos, round_bracket_multiplier)

    for pos in square_brackets:
        multiply_range(pos, square_bracket_multiplier)

    if len(res) == 0:
        res = [["", 1.0]]

    # merge runs of identical weights
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1

    return res


def check_a1111_doctests():
    """A1111's own doctests, against the unmodified parser (and what ours gives instead)."""
    a = lambda t: parse_prompt_attention(t, unclosed_is_literal=False)  # noqa: E731
    assert a("normal text") == [["normal text", 1.0]]
    assert a("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert a("(unbalanced") == [["unbalanced", 1.1]]
    assert a("\\(literal\\]") == [["(literal]", 1.0]]
    assert a("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    assert a("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1],
        ["hill", 0.55], [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]
    assert parse_prompt_attention("(unbalanced") == [["(unbalanced", 1.0]]


# ----------------------------------------------------------------------------------------------
# modules/sd_hijack_clip.py: tokenize_line / next_chunk (transcribed; no TI embeddings)

class Tok:
    """What FrozenCLIPEmbedderWithCustomWords takes from its tokenizer."""

    def __init__(self, tokenizer, id_pad=None):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.comma_token = vocab.get(",</w>", None)
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.id_pad = self.id_end if id_pad is None else id_pad

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]


def empty_chunk(tok):
    return ([tok.id_start] + [tok.id_end] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2))


def tokenize_line(tok, line):
    parsed = parse_prompt_attention(line)
    tokenized = tok.tokenize([text for text, _ in parsed])

    chunks = []
    chunk = {"tokens": [], "multipliers": []}
    token_count = 0
    last_comma = -1

    def next_chunk(is_last=False):
        nonlocal token_count, last_comma, chunk
        if is_last:
            token_count += len(chunk["tokens"])
        else:
            token_count += CHUNK_LENGTH

        to_add = CHUNK_LENGTH - len(chunk["tokens"])
        if to_add > 0:
            chunk["tokens"] += [tok.id_end] * to_add
            chunk["multipliers"] += [1.0] * to_add

        chunk["tokens"] = [tok.id_start] + chunk["tokens"] + [tok.id_end]
        chunk["multipliers"] = [1.0] + chunk["multipliers"] + [1.0]

        last_comma = -1
        chunks.append(chunk)
        chunk = {"tokens": [], "multipliers": []}

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue

        position = 0
        while position < len(tokens):
            token = tokens[position]

            if token == tok.comma_token:
                last_comma = len(chunk["tokens"])
            elif (COMMA_PADDING_BACKTRACK != 0 and len(chunk["tokens"]) == CHUNK_LENGTH
                  and last_comma != -1
                  and len(chunk["tokens"]) - last_comma <= COMMA_PADDING_BACKTRACK):
                break_location = last_comma + 1
                reloc_tokens = chunk["tokens"][break_location:]
                reloc_mults = chunk["multipliers"][break_location:]
                chunk["tokens"] = chunk["tokens"][:break_location]
                chunk["multipliers"] = chunk["multipliers"][:break_location]
                next_chunk()
                chunk["tokens"] = reloc_tokens
                chunk["multipliers"] = reloc_mults

            if len(chunk["tokens"]) == CHUNK_LENGTH:
                next_chunk()

            chunk["tokens"].append(token)
            chunk["multipliers"].append(weight)
            position += 1

    if chunk["tokens"] or not chunks:
        next_chunk(is_last=True)

    for c in chunks:
        assert len(c["tokens"]) == len(c["multipliers"]) == CHUNK_LENGTH + 2
    return parsed, chunks, token_count


def fed_ids(tok, tokens):
    """process_tokens: for id_pad != id_end (OpenCLIP), everything after the first id_end."""
    tokens = list(tokens)
    if tok.id_end != tok.id_pad:
        index = tokens.index(tok.id_end)
        tokens[index + 1:] = [tok.id_pad] * (len(tokens) - index - 1)
    return tokens


# ----------------------------------------------------------------------------------------------
# encoders: encode_with_transformers + EmphasisOriginal + forward's hstack

def final_norm(m):
    return getattr(m, "text_model", m).final_layer_norm


def emphasis_original(z, multipliers):
    multipliers = torch.asarray(multipliers)  # python floats -> float32, as A1111
    original_mean = z.mean()
    z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def sd1_encode(model, tok, chunks, clip_skip=1):
    zs = []
    for c in chunks:
        ids = torch.asarray([fed_ids(tok, c["tokens"])])
        out = model(input_ids=ids, output_hidden_states=True)
        if clip_skip > 1:
            z = final_norm(model)(out.hidden_states[-clip_skip])
        else:
            z = out.last_hidden_state
        zs.append(emphasis_original(z, [c["multipliers"]]))
    return torch.hstack(zs)


def sdxl_encode(enc1, tok1, enc2, tok2, line):
    """GeneralConditioner: each embedder runs A1111's forward on its own chunks; crossattn is
    the concatenation on the feature axis, vector (here only the text part) is enc2's pooled."""
    _, chunks1, _ = tokenize_line(tok1, line)
    _, chunks2, _ = tokenize_line(tok2, line)
    z1, z2, ids1, ids2 = [], [], [], []
    pooled = None
    for k, (c1, c2) in enumerate(zip(chunks1, chunks2)):
        i1 = torch.asarray([fed_ids(tok1, c1["tokens"])])
        i2 = torch.asarray([fed_ids(tok2, c2["tokens"])])
        o1 = enc1(input_ids=i1, output_hidden_states=True)
        o2 = enc2(input_ids=i2, output_hidden_states=True)
        z1.append(emphasis_original(o1.hidden_states[-2], [c1["multipliers"]]))
        z2.append(emphasis_original(o2.hidden_states[-2], [c2["multipliers"]]))
        ids1.append(i1[0])
        ids2.append(i2[0])
        if k == 0:
            pooled = o2.text_embeds
            # = open_clip pool: ln_final(last)[argmax(tokens)] @ text_projection (first EOS)
            pos = i2[0].argmax()
            manual = final_norm(enc2)(o2.hidden_states[-1])[0, pos] @ enc2.text_projection.weight.T
            assert torch.allclose(pooled[0], manual, atol=1e-6), (pooled[0] - manual).abs().max()
    assert len(chunks1) == len(chunks2)
    cond = torch.cat([torch.hstack(z1), torch.hstack(z2)], dim=2)
    return chunks1, chunks2, cond, pooled, torch.stack(ids1), torch.stack(ids2)


# ----------------------------------------------------------------------------------------------
# test prompts

# Words that are one token each in CLIP's vocabulary (checked at run time).
WORDS = (
    "cat dog house tree river mountain sky cloud red blue green yellow small large old new "
    "bright dark light soft hard warm cold city forest field garden window door road bridge "
    "boat ship car train bird fish horse flower grass stone wall roof lamp book table chair "
    "glass water fire snow rain wind sun moon star night morning evening winter summer spring "
    "autumn girl boy man woman child king queen hat coat shoe dress ring gold silver wood "
    "paper paint color shadow portrait photo camera lens film music song dance game"
).split()


def words(n, start=0):
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def chunk_cases():
    C = []

    def add(name, prompt, note=None):
        C.append((name, prompt, note))

    add("plain", "a photo of a cat")
    add("round", "a (cat) on a mat")
    add("round_double", "a ((cat)) on a mat")
    add("square", "a [cat] on a mat")
    add("square_double", "a [[cat]] on a mat")
    add("weight", "a (cat:1.3) on a mat")
    add("weight_below_one", "a (cat:0.5) on a mat")
    add("weight_leading_dot", "a (cat:.5) on a (mat:2.)")
    add("weight_nested_in_double", "a ((cat:0.5)) on a mat")
    add("weight_with_spaces", "a ( cat : 1.3 ) on a mat")
    add("weight_negative", "a (cat:-1) on a mat")
    add("colon_not_a_weight", "a (cat:dog) time: 5 pm")
    add("crossed_brackets", "a ([cat)] on a mat")
    add("merge_equal_neighbours", "(unnecessary)(parens) and (cat) (dog)",
        "equal neighbouring weights merge before tokenization: 'unnecessaryparens' is "
        "tokenized as one word; the ' ' (weight 1.0) between (cat) and (dog) keeps those apart")
    add("a1111_docstring", "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        "A1111's doctest prompt; its first '(' is never closed, so it stays literal here")
    add("escapes", "\\(literal\\) \\[x\\] back\\\\slash")
    add("lone_backslash", "a \\ b\\c",
        "a single backslash not followed by ( ) [ ] \\ is dropped (A1111 appends text[1:] = '')")
    add("unbalanced_open_round", "a (cat on a mat")
    add("unbalanced_close_round", "a cat) on a mat")
    add("unbalanced_open_square", "a [cat on a mat")
    add("unbalanced_close_square", "a cat] on a mat")
    add("unbalanced_double_open", "((cat) on a mat")
    add("unbalanced_inside_closed", "[a (cat] on a mat",
        "the unclosed '(' is inside a closed [...], so the literal gets 1/1.1")
    add("unbalanced_open_weight", "a (cat:1.3 on a mat")
    add("break_middle", "a cat BREAK a dog")
    add("break_start", "BREAK a dog", "a leading BREAK gives an empty first chunk")
    add("break_end", "a cat BREAK",
        "a trailing BREAK adds no chunk (the last chunk is empty), but token_count gets 75")
    add("break_double", "a cat BREAK BREAK a dog", "two BREAKs give an empty chunk between")
    add("break_no_spaces", "cat,BREAK,dog")
    add("breakfast", "BREAKFAST at a BREAK_room, break", "not BREAK: no word boundary / lowercase")
    add("break_inside_brackets", "(a cat BREAK a dog)",
        "A1111 quirk: the ['BREAK', -1] marker is multiplied by 1.1 to -1.1, so it is no longer "
        "a break; the word 'BREAK' is tokenized with weight -1.1")
    add("unicode_cafe", "café au lait, crème brûlée")
    add("unicode_cjk", "一只猫 (猫:1.2)")
    add("unicode_emoji", "emoji 🐱🎉 (🐶) ok")
    add("empty", "")
    add("whitespace_only", "   ")
    add("brackets_only", "()[]", "empty brackets weight nothing; the result is empty text")
    add("exact_75", words(75))
    add("exact_76", words(76))
    add("exact_150", words(150))
    add("comma_is_76th", words(75) + ", " + words(5, 75),
        "the comma arrives when the chunk is full: it starts the next chunk (no backtrack)")
    add("backtrack_distance_20", words(55) + ", " + words(30, 55),
        "comma at chunk index 55: 75 - 55 = 20 <= 20, the 19 words after it move on")
    add("backtrack_distance_21", words(54) + ", " + words(30, 54),
        "comma at chunk index 54: 75 - 54 = 21 > 20, hard split at 75")
    add("long_backtrack", words(60) + ", " + words(70, 60) + ", " + words(24, 130),
        "> 150 tokens; both commas within 20 of the boundary move words to the next chunk")
    add("long_no_backtrack", words(30) + ", " + words(19, 30) + ", " + words(101, 49),
        "> 150 tokens; the last comma (index 50) is 25 from the boundary: no backtrack")
    add("weights_span_boundary", words(70) + " (" + words(10, 70) + ":1.2) " + words(10, 80))
    add("weights_moved_by_backtrack", words(60) + ", [" + words(30, 60) + "] end")
    return C


def conditioning_cases():
    # tiny-sd1's vocabulary (CLIP's first 998 tokens) splits most of WORDS into two or three tokens: these word
    # counts give two-chunk prompts
    return [
        dict(name="weighted", prompt="a (red:1.3) cat on a [blue] mat"),
        dict(name="nested", prompt="((a cat)) with [[a hat]] and (((sky:0.8)))"),
        dict(name="long_weighted", prompt=words(20) + " (" + words(15, 20) + ":1.3), [" + words(20, 35) + "]"),
        dict(name="break", prompt="a cat BREAK a (dog:1.2)"),
        dict(name="negative_pads_uncond", prompt=words(25) + ", (" + words(12, 25) + ":1.1)",
             negative_prompt="blurry, (low quality:1.4)"),
        dict(name="negative_pads_cond", prompt="a (cat:1.2)",
             negative_prompt="blurry, " + words(40) + ", [ugly]"),
    ]


SDXL_CASES = [
    dict(name="weighted", prompt="a (red:1.3) cat on a [blue] mat"),
    dict(name="long_weighted", prompt=words(20) + " (" + words(15, 20) + ":1.3), [" + words(20, 35) + "]"),
]


# ----------------------------------------------------------------------------------------------
# output helpers

def compact_json(obj, indent=0):
    """json with lists of scalars on one line (floats as Python repr: shortest round trip)."""
    pad = "  " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad}  {json.dumps(k, ensure_ascii=False)}: {compact_json(v, indent + 1)}'
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) for x in obj):
            return "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in obj) + "]"
        if all(isinstance(x, list) and all(not isinstance(y, (dict, list)) for y in x) for x in obj):
            inner = [pad + "  " + compact_json(x) for x in obj]
            return "[\n" + ",\n".join(inner) + "\n" + pad + "]"
        inner = [pad + "  " + compact_json(x, indent + 1) for x in obj]
        return "[\n" + ",\n".join(inner) + "\n" + pad + "]"
    if isinstance(obj, float):
        assert math.isfinite(obj)
    return json.dumps(obj, ensure_ascii=False)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        f.write(compact_json(obj) + "\n")


def tiny_tokenizers():
    """tests/fixtures/tiny-sdxl/tokenizer{,_2} if present, else the same vocabulary built here:
    CLIP's first 998 tokens (256 bytes, 256 bytes+</w>, 486 merges) + BOS 998 + EOS 999;
    tokenizer_2 pads with '!' (id 0)."""
    d1 = os.path.join(SDXL_TOKENIZERS, "tokenizer")
    d2 = os.path.join(SDXL_TOKENIZERS, "tokenizer_2")
    if os.path.isdir(d1) and os.path.isdir(d2):
        return CLIPTokenizer.from_pretrained(d1), CLIPTokenizer.from_pretrained(d2), "tests/fixtures/tiny-sdxl/tokenizer{,_2}"
    from tokenizer_cases import bytes_to_unicode  # same directory

    lines = gzip.open(BPE_GZ).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + 486]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == len(set(tokens)) == 1000
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    kw = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    t1 = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                       pad_token="<|endoftext|>", **kw)
    t2 = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                       pad_token="!", **kw)
    return t1, t2, "built in memory from assets/bpe_simple_vocab_16e6.txt.gz (first 486 merges)"


# ----------------------------------------------------------------------------------------------
# clip skip: diffusers images (clip_skip.json + PNGs)

CLIP_SKIP_CASES = [
    # name, model, negative prompt, cfg, A1111 clip skip
    # SD1 unguided (cfg 1): diffusers skips layers for the prompt only, A1111 (and sdgen) for
    # the negative prompt too, so only the unguided image means the same in both.
    ("clip_skip1_sd1", "tiny-sd1", "", 1.0, 1),
    ("clip_skip2_sd1", "tiny-sd1", "", 1.0, 2),
    ("clip_skip1_sdxl", "tiny-sdxl", None, 5.0, 1),
    ("clip_skip2_sdxl", "tiny-sdxl", None, 5.0, 2),
]
CLIP_SKIP_SEED = 43  # (with seed 42, tiny-sd1's two images differ by only 21 levels at most)
CLIP_SKIP_PAIR_MIN_MAX = 30  # levels: clip skip 2 vs 1 must differ by this much somewhere
CLIP_SKIP_PAIR_MIN_MEAN = 2.0  # ... and by this much on average


def write_clip_skip_images():
    """tiny-sd1 / tiny-sdxl txt2img through diffusers' own `clip_skip` argument
    (diffusers clip_skip = A1111 "Clip skip" - 1). Written after, and independent of, the files
    above. Returns the case list."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_fixtures as mf  # noqa: E402  (imports diffusers quietly; sets 2 torch threads)
    import make_families as mfam  # noqa: E402
    import diffusers
    import numpy as np
    import transformers
    from PIL import Image
    from diffusers import StableDiffusionXLPipeline
    torch.set_num_threads(1)

    sd1 = mf.load_folder_pipeline()
    # diffusers 0.42.1's clip skip reads text_encoder.text_model.final_layer_norm, a path
    # transformers 5 no longer has (CLIPTextModel holds final_layer_norm itself): point it there.
    assert not hasattr(sd1.text_encoder, "text_model")
    sd1.text_encoder.text_model = types.SimpleNamespace(final_layer_norm=sd1.text_encoder.final_layer_norm)
    # what the pipeline conditions on = this script's A1111 encoding (no weights in the prompt)
    tok = Tok(sd1.tokenizer)
    _, chunks, _ = tokenize_line(tok, "a photo of a cat")
    with torch.no_grad():
        for skip in (1, 2):
            pe, ne = sd1.encode_prompt("a photo of a cat", "cpu", 1, True, negative_prompt="",
                                       clip_skip=(skip - 1) or None)
            assert torch.allclose(pe, sd1_encode(sd1.text_encoder, tok, chunks, clip_skip=skip), atol=1e-5)
            assert torch.equal(ne, sd1.text_encoder(sd1.tokenizer(
                "", padding="max_length", max_length=77, return_tensors="pt").input_ids)[0])
    sdxl = StableDiffusionXLPipeline.from_pretrained(str(mfam.XL_DIR), dtype=torch.float32,
                                                     local_files_only=True, add_watermarker=False)
    sdxl.set_progress_bar_config(disable=True)
    assert sdxl.config.force_zeros_for_empty_prompt is True
    pipes = {"tiny-sd1": (sd1, mf.SCHEDULER_CONFIG), "tiny-sdxl": (sdxl, mfam.XL_SCHEDULER_CONFIG)}

    cases, images = [], {}
    for name, model, neg, cfg, skip in CLIP_SKIP_CASES:
        case = dict(name=name, model=model, prompt="a photo of a cat", negative_prompt=neg, seed=CLIP_SKIP_SEED,
                    steps=6, cfg_scale=cfg, width=64, height=64, sampler="euler", schedule="normal",
                    clip_skip=skip, diffusers_clip_skip=(skip - 1) or None, png=f"{name}.png")
        pipe, sched_config = pipes[model]
        pipe.scheduler = mfam.make_scheduler(case["sampler"], case["schedule"], sched_config)
        with torch.no_grad():
            img = pipe(prompt=case["prompt"], negative_prompt=neg, num_inference_steps=case["steps"],
                       guidance_scale=cfg, width=64, height=64, clip_skip=case["diffusers_clip_skip"],
                       generator=torch.Generator("cpu").manual_seed(case["seed"]),
                       output_type="np").images[0]
        assert img.shape == (64, 64, 3)
        u8 = mf.to_uint8(img)
        Image.fromarray(u8, "RGB").save(os.path.join(OUT_DIR, case["png"]))
        assert np.array_equal(np.asarray(Image.open(os.path.join(OUT_DIR, case["png"]))), u8)
        images[name] = u8
        cases.append(case)
    mf.check_image_statistics(images)

    diffs = {}
    for m in ("sd1", "sdxl"):
        d = np.abs(images[f"clip_skip2_{m}"].astype(np.int16) - images[f"clip_skip1_{m}"].astype(np.int16))
        diffs[m] = {"max": int(d.max()), "mean": round(float(d.mean()), 3)}
        print(f"clip skip 2 vs 1, {m}: max {d.max()} levels, mean {d.mean():.3f}")
        assert d.max() >= CLIP_SKIP_PAIR_MIN_MAX and d.mean() >= CLIP_SKIP_PAIR_MIN_MEAN, (m, diffs[m])

    write_json(os.path.join(OUT_DIR, "clip_skip.json"), {
        "produced_by": PRODUCED_BY,
        "pipelines": {
            "tiny-sd1": "StableDiffusionPipeline from tests/fixtures/tiny-sd1 (make_fixtures."
                        "load_folder_pipeline: UNet variant fp16, float32, CPU, no safety checker); "
                        "scheduler EulerDiscreteScheduler.from_config(make_fixtures.SCHEDULER_CONFIG)",
            "tiny-sdxl": "StableDiffusionXLPipeline from tests/fixtures/tiny-sdxl (float32, CPU, "
                         "add_watermarker=False, force_zeros_for_empty_prompt); scheduler "
                         "EulerDiscreteScheduler.from_config(make_families.XL_SCHEDULER_CONFIG)",
        },
        "method": "pipe(prompt, negative_prompt, num_inference_steps=steps, guidance_scale=cfg_scale, "
                  "width, height, clip_skip=diffusers_clip_skip, generator=torch.Generator('cpu')"
                  ".manual_seed(seed), output_type='np'); PNG = round(clip(image, 0, 1) * 255)",
        "clip_skip": "A1111's 'Clip skip' (1 = the usual layer); diffusers_clip_skip = clip_skip - 1 "
                     "(null = not passed). SD1: final_layer_norm(hidden_states[-(diffusers_clip_skip "
                     "+ 1)]); SDXL: both encoders' hidden_states[-(diffusers_clip_skip + 2)], no norm, "
                     "pooled (text_embeds of encoder 2) unchanged",
        "negative_prompt": "diffusers 0.42.1 applies clip_skip to the PROMPT only: SD1's negative "
                           "prompt ('' here) is always encoded with last_hidden_state (no skip), while "
                           "A1111 skips layers for it too: the SD1 cases run unguided (cfg 1); "
                           "SDXL's null negative prompt is zeros (force_zeros_for_empty_prompt), so "
                           "clip skip cannot reach it",
        "clip_skip_2_vs_1_levels": diffs,
        "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "cases": cases,
    })
    return cases


# ----------------------------------------------------------------------------------------------

def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT_DIR, exist_ok=True)
    check_a1111_doctests()

    # chunks.json: CLIP's full vocabulary (what sdgen embeds), so the words below are one token each
    from tokenizer_cases import write_vocab  # same directory

    with tempfile.TemporaryDirectory() as tmp:
        write_vocab(tmp)
        full_tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"))
    tok = Tok(full_tok)
    assert len(full_tok.get_vocab()) == 49408
    assert (tok.comma_token, tok.id_start, tok.id_end) == (267, 49406, 49407)
    for w in WORDS:
        assert len(tok.tokenize([w])[0]) == 1, w
    assert len(set(WORDS)) == len(WORDS)
    # the conditioning: tiny-sd1's own tokenizer (CLIP's first 998 tokens + BOS 998 + EOS 999)
    sd1_tok = CLIPTokenizer.from_pretrained(SD1_TOKENIZER)
    tok_sd1 = Tok(sd1_tok)
    assert len(sd1_tok.get_vocab()) == 1000
    assert (tok_sd1.comma_token, tok_sd1.id_start, tok_sd1.id_end) == (267, 998, 999)

    # ---- chunks.json
    cases = []
    for name, prompt, note in chunk_cases():
        parsed, chunks, token_count = tokenize_line(tok, prompt)
        case = {"name": name, "prompt": prompt}
        if note:
            case["note"] = note
        case["parsed"] = [[t, float(w)] for t, w in parsed]
        orig = parse_prompt_attention(prompt, unclosed_is_literal=False)
        if orig != parsed:
            case["a1111_unmodified_parsed"] = [[t, float(w)] for t, w in orig]
        case["token_count"] = token_count
        case["chunks"] = [{"ids": c["tokens"], "weights": [float(x) for x in c["multipliers"]]}
                          for c in chunks]
        cases.append(case)

    by = {c["name"]: c for c in cases}
    # Self-checks of the cases' intent.
    n_chunks = lambda n: len(by[n]["chunks"])  # noqa: E731
    assert by["plain"]["chunks"][0]["ids"][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert by["round"]["parsed"] == [["a ", 1.0], ["cat", 1.1], [" on a mat", 1.0]]
    assert by["weight_with_spaces"]["parsed"] == [["a ", 1.0], [" cat ", 1.3], [" on a mat", 1.0]]
    assert by["unbalanced_open_round"]["parsed"] == [["a (cat on a mat", 1.0]]
    assert by["unbalanced_close_round"]["parsed"] == [["a cat) on a mat", 1.0]]
    assert by["unbalanced_double_open"]["parsed"] == [["(", 1.0], ["cat", 1.1], [" on a mat", 1.0]]
    assert (n_chunks("exact_75"), by["exact_75"]["token_count"]) == (1, 75)
    assert (n_chunks("exact_76"), by["exact_76"]["token_count"]) == (2, 76)
    assert (n_chunks("exact_150"), by["exact_150"]["token_count"]) == (2, 150)
    assert (n_chunks("empty"), by["empty"]["token_count"]) == (1, 0)
    assert (n_chunks("break_start"), n_chunks("break_end"), n_chunks("break_double")) == (2, 1, 3)
    assert by["break_end"]["token_count"] == 75
    assert by["break_start"]["chunks"][0]["ids"] == [49406] + [49407] * 76
    assert n_chunks("breakfast") == 1
    assert any(w == -1.1 for w in by["break_inside_brackets"]["chunks"][0]["weights"])
    bt20 = by["backtrack_distance_20"]["chunks"]
    assert bt20[0]["ids"][56] == 267 and bt20[0]["ids"][57:] == [49407] * 20
    bt21 = by["backtrack_distance_21"]["chunks"]
    assert bt21[0]["ids"][55] == 267 and 49407 not in bt21[0]["ids"][1:76]
    assert by["comma_is_76th"]["chunks"][1]["ids"][1] == 267
    lb = by["long_backtrack"]
    assert len(lb["chunks"]) == 3 and sum(49407 in c["ids"][1:76] for c in lb["chunks"][:2]) == 2
    assert lb["token_count"] > 150
    lnb = by["long_no_backtrack"]
    assert len(lnb["chunks"]) == 3 and all(49407 not in c["ids"][1:76] for c in lnb["chunks"][:2])
    assert lnb["token_count"] == 152
    span = by["weights_span_boundary"]["chunks"]
    assert span[0]["weights"][71:76] == [1.2] * 5 and span[1]["weights"][1:6] == [1.2] * 5
    assert len(cases) >= 20

    write_json(os.path.join(OUT_DIR, "chunks.json"), {
        "produced_by": PRODUCED_BY,
        "algorithm_source": ALGORITHM_SOURCE,
        "difference": DIFFERENCE,
        "settings": {
            "tokenizer": "transformers CLIPTokenizer with CLIP's full vocabulary (49408 tokens; vocab.json "
                         "and merges.txt built from assets/bpe_simple_vocab_16e6.txt.gz as CLIP builds them, "
                         "tokenizer_cases.write_vocab: sdgen's embedded tokenizer), each parsed piece "
                         "tokenized separately with truncation=False, add_special_tokens=False",
            "chunk_length": CHUNK_LENGTH, "comma_padding_backtrack": COMMA_PADDING_BACKTRACK,
            "comma_token": tok.comma_token, "id_start": tok.id_start, "id_end": tok.id_end,
            "id_pad": tok.id_pad, "emphasis": "Original", "textual_inversion": "none",
        },
        "schema": {
            "parsed": "parse_prompt_attention's output: [text, weight] pairs; ['BREAK', -1] marks a "
                      "break; weights are the Python floats A1111 computes (e.g. 1.1*1.1 = "
                      "1.2100000000000002)",
            "a1111_unmodified_parsed": "only where unmodified A1111 parses differently",
            "token_count": "A1111's token_count: 75 per chunk closed before the last one "
                           "(break, backtrack or full), plus the real tokens of the last chunk",
            "chunks": "each as fed to the SD1 text encoder: ids = BOS, 75 tokens (padded with "
                      "id_end 49407), EOS; weights = 1.0 at BOS/EOS/padding",
        },
        "cases": cases,
    })

    # ---- conditioning (SD1)
    tensors = {}
    te = CLIPTextModel.from_pretrained(SD1_TEXT_ENCODER, dtype=torch.float32).eval()
    cond_json = []
    with torch.no_grad():
        _, empty_chunks, _ = tokenize_line(tok_sd1, "")
        empty = sd1_encode(te, tok_sd1, empty_chunks)  # sd_models.get_empty_cond
        tensors["empty.cond"] = empty
        for case in conditioning_cases():
            name = case["name"]
            entry = dict(case)
            parsed, chunks, token_count = tokenize_line(tok_sd1, case["prompt"])
            cond = sd1_encode(te, tok_sd1, chunks)
            tensors[f"{name}.ids"] = torch.asarray([c["tokens"] for c in chunks], dtype=torch.int64)
            tensors[f"{name}.weights"] = torch.asarray([c["multipliers"] for c in chunks], dtype=torch.float32)
            entry["parsed"] = [[t, float(w)] for t, w in parsed]
            entry["token_count"] = token_count
            entry["chunks"] = len(chunks)
            if "negative_prompt" in case:
                _, uchunks, _ = tokenize_line(tok_sd1, case["negative_prompt"])
                uncond = sd1_encode(te, tok_sd1, uchunks)
                tensors[f"{name}.uncond.ids"] = torch.asarray([c["tokens"] for c in uchunks], dtype=torch.int64)
                tensors[f"{name}.uncond.weights"] = torch.asarray([c["multipliers"] for c in uchunks], dtype=torch.float32)
                entry["uncond_chunks"] = len(uchunks)
                # sd_samplers_cfg_denoiser.pad_cond_uncond
                num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
                assert num_repeats != 0
                if num_repeats < 0:
                    cond = torch.cat([cond, empty.repeat((cond.shape[0], -num_repeats, 1))], axis=1)
                else:
                    uncond = torch.cat([uncond, empty.repeat((uncond.shape[0], num_repeats, 1))], axis=1)
                entry["padded_with_empty_chunks"] = {"cond": max(0, -num_repeats), "uncond": max(0, num_repeats)}
                tensors[f"{name}.uncond"] = uncond
                assert cond.shape == uncond.shape
            tensors[f"{name}.cond"] = cond
            entry["tensors"] = sorted(k for k in tensors if k.startswith(name + "."))
            cond_json.append(entry)

        chunk_counts = {e["name"]: (e["chunks"], e.get("uncond_chunks")) for e in cond_json}
        assert chunk_counts == {"weighted": (1, None), "nested": (1, None), "long_weighted": (2, None),
                                "break": (2, None), "negative_pads_uncond": (2, 1), "negative_pads_cond": (1, 2)}, chunk_counts

        # clip skip 2 for one prompt
        _, chunks, _ = tokenize_line(tok_sd1, conditioning_cases()[0]["prompt"])
        skip2 = sd1_encode(te, tok_sd1, chunks, clip_skip=2)
        assert not torch.allclose(skip2, tensors["weighted.cond"], atol=1e-3)
        tensors["weighted.clip_skip2.cond"] = skip2
        cond_json[0]["tensors"].append("weighted.clip_skip2.cond")

        # sanity: a weight-1 prompt equals plain transformers output
        _, chunks, _ = tokenize_line(tok_sd1, "a photo of a cat")
        plain = sd1_encode(te, tok_sd1, chunks)
        ref = te(input_ids=torch.asarray([chunks[0]["tokens"]])).last_hidden_state
        assert torch.equal(plain, ref)
        # sanity: the weighted case changed the weighted rows, and kept the overall mean
        w = tensors["weighted.cond"]
        assert abs(w.mean().item() - te(input_ids=tensors["weighted.ids"]).last_hidden_state.mean().item()) < 1e-6

        # ---- SDXL
        t1, t2, tok_src = tiny_tokenizers()
        tok1, tok2 = Tok(t1), Tok(t2, id_pad=0)
        assert (tok1.id_start, tok1.id_end, tok1.comma_token) == (998, 999, 267)
        assert (tok2.id_start, tok2.id_end, tok2.id_pad, t2.pad_token_id) == (998, 999, 0, 0)
        enc1 = CLIPTextModel.from_pretrained(os.path.join(SDXL_TEXT, "text_encoder"), dtype=torch.float32).eval()
        enc2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(SDXL_TEXT, "text_encoder_2"), dtype=torch.float32).eval()
        sdxl_json = []
        for case in SDXL_CASES:
            name = case["name"]
            c1, c2, cond, pooled, ids1, ids2 = sdxl_encode(enc1, tok1, enc2, tok2, case["prompt"])
            assert [c["tokens"] for c in c1] == [c["tokens"] for c in c2]
            tensors[f"{name}.sdxl.cond"] = cond
            tensors[f"{name}.sdxl.pooled"] = pooled
            tensors[f"{name}.sdxl.ids_1"] = ids1.to(torch.int64)
            tensors[f"{name}.sdxl.ids_2"] = ids2.to(torch.int64)
            tensors[f"{name}.sdxl.weights"] = torch.asarray([c["multipliers"] for c in c1], dtype=torch.float32)
            entry = dict(case)
            entry["parsed"] = [[t, float(w)] for t, w in parse_prompt_attention(case["prompt"])]
            entry["chunks"] = len(c1)
            entry["tensors"] = sorted(k for k in tensors if k.startswith(name + ".sdxl."))
            if name == "weighted":
                entry["ids_1"] = ids1.tolist()
                entry["ids_2"] = ids2.tolist()
            sdxl_json.append(entry)
        assert tensors["long_weighted.sdxl.cond"].shape[1] >= 154

    for k, v in tensors.items():
        assert torch.isfinite(v.float()).all(), k
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())},
              os.path.join(OUT_DIR, "conditioning.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(OUT_DIR, "conditioning.safetensors"), 0o644)  # save_file leaves 0600
    write_json(os.path.join(OUT_DIR, "conditioning.json"), {
        "produced_by": PRODUCED_BY,
        "difference": DIFFERENCE,
        "sd1": {
            "text_encoder": "tests/fixtures/tiny-sd1/text_encoder (CLIPTextModel, float32, CPU)",
            "tokenizer": "tests/fixtures/tiny-sd1/tokenizer",
            "method": "per chunk (as in chunks.json): z = last_hidden_state (clip skip 2: "
                      "final_layer_norm(hidden_states[-2])); z *= weight per token; z *= "
                      "mean_before / mean_after (means over the whole (1, 77, 64) chunk); chunks "
                      "concatenated on the sequence axis -> (1, 77*k, 64)",
            "negative_prompt": "cond and uncond are encoded separately; then A1111's "
                               "pad_cond_uncond (option 'Pad prompt/negative prompt', off by "
                               "default: without it A1111 runs cond and uncond in separate UNet "
                               "calls) appends copies of 'empty.cond' (the encoding of \"\": one "
                               "chunk BOS + 76 x EOS, weights 1) to the shorter one",
            "tensors": "<case>.cond (1, 77k, 64) f32, <case>.ids (k, 77) i64, <case>.weights "
                       "(k, 77) f32; with a negative prompt also <case>.uncond (padded, same "
                       "shape as cond), <case>.uncond.ids / .uncond.weights (before padding); "
                       "empty.cond (1, 77, 64)",
            "cases": cond_json,
        },
        "sdxl": {
            "text_encoders": "tests/fixtures/tiny-sdxl-text/text_encoder (CLIPTextModel) and "
                             "text_encoder_2 (CLIPTextModelWithProjection), float32, CPU",
            "tokenizers": tok_src + " (vocabulary 1000: CLIP's first 998 tokens + BOS 998 + "
                          "EOS 999; comma 267)",
            "method": "each encoder separately runs A1111's chunking and emphasis: z = "
                      "hidden_states[-2] (no final norm), z *= weights, z *= mean_before / "
                      "mean_after over that encoder's (1, 77, 64) chunk; encoder 1 pads with EOS "
                      "(id_pad = id_end), encoder 2 gets 0 after the first EOS (id_pad = 0). Per "
                      "chunk the two are concatenated on features (64 + 64 = 128), chunks on the "
                      "sequence. pooled = encoder 2's text_embeds of the FIRST chunk (unweighted; "
                      "position = argmax of its ids = first EOS)",
            "tensors": "<case>.sdxl.cond (1, 77k, 128), <case>.sdxl.pooled (1, 32), "
                       "<case>.sdxl.ids_1 / ids_2 (k, 77) i64 as fed to each encoder, "
                       "<case>.sdxl.weights (k, 77)",
            "cases": sdxl_json,
        },
    })

    write_clip_skip_images()

    for fn in sorted(os.listdir(OUT_DIR)):
        p = os.path.join(OUT_DIR, fn)
        size = os.path.getsize(p)
        assert size < 2_000_000, (fn, size)
        print(f"{fn:28s} {size:9d} bytes  sha256 {hashlib.sha256(open(p, 'rb').read()).hexdigest()[:16]}")
    print(f"{len(cases)} chunk cases, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
