#!/usr/bin/env python3
"""Pickled PyTorch files for sdgen's code-free pickle reader, written by real torch.save, and a hostile corpus.

    /root/venv-ref/bin/python tests/reference/make_pickles.py

(torch 2.15.0, numpy, safetensors; CPU; deterministic: a second run gives byte-identical files.) Reads
tests/fixtures/tiny-sd2.safetensors and tiny-sd1/text_encoder/, and deletes and rewrites only

    tests/fixtures/pickles/good/      files sdgen must read: torch.save zip and legacy formats
    tests/fixtures/pickles/hostile/   files sdgen must refuse, each with one line, running nothing
    tests/fixtures/pickles/cases.json what each file is, and for the good ones the tensors
                                      torch.load(weights_only=True) gives under the naming rules (dtype, shape,
                                      SHA-256 of the row-major bytes), as stored and cast with --dtype f16 / bf16 / f32

Naming rules (as sdgen flattens): a top-level `state_dict` dict is unwrapped (else `params_ema`, else `params`);
nested dicts and lists join with "."; an A1111 embedding's `string_to_param` becomes `emb_params`. The hostile files'
payloads would create /tmp/sdgen-pickle-pwned-<name> if anything ran them.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import sys
import tarfile
import types
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "pickles"
GOOD, HOSTILE = OUT / "good", OUT / "hostile"
MARKER = "/tmp/sdgen-pickle-pwned-"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def gen(name):
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def rand(name, shape, dtype=torch.float32):
    g = gen(name)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, generator=g, dtype=torch.int64).to(dtype)


# ---- naming rules (what sdgen must produce) ----------------------------------------------------------------------

def flatten(obj, prefix=""):
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, torch.nn.ParameterDict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def named_tensors(loaded):
    if isinstance(loaded, dict) and "string_to_param" in loaded:
        (t,) = flatten(loaded["string_to_param"]).values()
        return {"emb_params": t}
    for key in ("state_dict", "params_ema", "params"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            return flatten(loaded[key])
    return flatten(loaded)


def digest(t):
    t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1).to(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def expected(path, trusted=False, casts=True):
    # The Lightning file and the embedding name classes torch's weights_only loader does not know (ModelCheckpoint,
    # ParameterDict): they are our own files.
    loaded = torch.load(path, weights_only=not trusted)
    tensors = named_tensors(loaded)
    out = {}
    for cast in (None, torch.float16, torch.bfloat16, torch.float32) if casts else (None,):
        rows = {}
        for name in sorted(tensors):
            t = tensors[name]
            if cast is not None and t.dtype.is_floating_point:
                t = t.to(cast)
            rows[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": digest(t)}
        out["stored" if cast is None else str(cast).removeprefix("torch.")] = rows
    return out


# ---- good files --------------------------------------------------------------------------------------------------

def nested_state():
    base = rand("shared", (4, 6))
    sd = OrderedDict()
    for d in DTYPES:
        sd[f"dtypes.{str(d).removeprefix('torch.')}"] = rand(f"dtype.{d}", (3, 5), d)
    sd["views.base"] = base
    sd["views.row"] = base[1]  # shares base's storage, offset 6
    sd["views.transposed"] = base.t()  # non-contiguous
    sd["views.strided"] = base[:, ::2]
    sd["views.empty"] = base[:0]
    sd["scalar"] = torch.tensor(2.5)
    sd._metadata = OrderedDict({"": {"version": 1}})  # as nn.Module.state_dict() sets it (a BUILD in the pickle)
    return {"state_dict": sd, "nested": {"inner": {"w": rand("inner", (2, 2))}}, "epoch": 3, "name": "nested"}


def lightning():
    # A CompVis / Lightning checkpoint: callbacks keyed by class, a set, numpy scalars, optimizer state.
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[mod.__name__] = mod
    sd = OrderedDict([("model.diffusion_model.w", rand("lw", (3, 3))), ("model.diffusion_model.b", rand("lb", (3,)))])
    return {
        "epoch": 6, "global_step": 1200, "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.125), "monitor": "val/loss"}},
        "optimizer_states": [{"state": {0: {"exp_avg": rand("adam", (3, 3))}}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [], "tags": {1, 2, 3}, "hparams": {"lr": np.float32(1e-4)},
    }


def embedding():
    width = json.loads((FIXTURES / "tiny-sd1" / "text_encoder" / "config.json").read_text())["hidden_size"]
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(rand("emb", (2, width)), requires_grad=True)})
    return {"string_to_token": {"*": 265}, "string_to_param": params, "name": "pklemb", "step": 100,
            "sd_checkpoint": "a9263745", "sd_checkpoint_name": "tiny"}


def esrgan():
    def body(tag):
        sd = OrderedDict()
        sd["conv_first.weight"] = rand(f"{tag}.cf", (8, 3, 3, 3))
        sd["conv_first.bias"] = rand(f"{tag}.cfb", (8,))
        for i in range(2):
            for c in range(1, 3):
                sd[f"body.{i}.rdb1.conv{c}.weight"] = rand(f"{tag}.b{i}{c}", (4, 8, 3, 3))
        sd["conv_last.weight"] = rand(f"{tag}.cl", (3, 8, 3, 3))
        return sd
    return {"params_ema": body("ema"), "params": body("raw")}


def good_files():
    files = {}
    for name, obj, legacy in (("nested_zip.pt", nested_state(), False), ("nested_legacy.pt", nested_state(), True),
                              ("lightning.ckpt", lightning(), False), ("embedding.pt", embedding(), False),
                              ("esrgan.pth", esrgan(), False)):
        path = GOOD / name
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        files[name] = {"format": "legacy" if legacy else "zip"}
    # The smallest tiny model as a CompVis-style checkpoint, and tiny-sd1's text encoder as an older diffusers
    # folder holds it (pytorch_model.bin).
    sd = load_file(str(FIXTURES / "tiny-sd2.safetensors"))
    torch.save({"state_dict": OrderedDict(sorted(sd.items())), "global_step": 0}, GOOD / "tiny-sd2.ckpt")
    files["tiny-sd2.ckpt"] = {"format": "zip", "twin": "tiny-sd2.safetensors"}
    te = {}
    for shard in sorted((FIXTURES / "tiny-sd1" / "text_encoder").glob("*.safetensors")):
        te.update(load_file(str(shard)))
    torch.save(OrderedDict(sorted(te.items())), GOOD / "pytorch_model.bin")
    files["pytorch_model.bin"] = {"format": "zip", "twin": "tiny-sd1/text_encoder"}
    for name, info in files.items():
        # The two models' casts are left out (the small files cover them): they would double this folder.
        info["expected"] = expected(GOOD / name, trusted=name in ("lightning.ckpt", "embedding.pt"),
                                    casts="twin" not in info)
    return files


# ---- hostile files -----------------------------------------------------------------------------------------------

def marker(name):
    return MARKER + name


class Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def module_func(module, name):
    # The callable itself, so that pickle writes GLOBAL module name.
    mod = __import__(module, fromlist=[name])
    return getattr(mod, name)


def dumps(obj, protocol):
    return pickle.dumps(obj, protocol=protocol)


def with_data_pkl(data_pkl, extra=None):
    """A torch zip archive holding `data_pkl` and a real storage beside it."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else src.read(info.filename)
            z.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data)
        for name, data in (extra or {}).items():
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def legacy_with(main_pickle):
    """A legacy-format file whose main pickle is `main_pickle` (magic, version and sys info as torch writes)."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    at = 0
    for _ in range(3):  # magic number, protocol version, system info
        at = pickle_end(data, at)
    end = pickle_end(data, at)
    return data[:at] + main_pickle + data[end:]


def pickle_end(data, at):
    import pickletools
    for op, arg, pos in pickletools.genops(io.BytesIO(data[at:])):
        if op.name == "STOP":
            return at + pos + 1
    raise ValueError


class FakeStorage:
    """Pickled as a storage persistent id, for hand-made tensor views."""

    def __init__(self, numel):
        self.numel = numel


class ViewPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def tensor_view(numel, offset, size, stride):
    rebuild = Payload(torch._utils._rebuild_tensor_v2, FakeStorage(numel), offset, size, stride, False, OrderedDict())
    buf = io.BytesIO()
    ViewPickler(buf, protocol=2).dump({"w": rebuild})
    return buf.getvalue()


def zip_with_members(members):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def deflated_bomb():
    """A torch archive whose storage is deflated and declares 10 GiB uncompressed (ZIP64 sizes, patched)."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            if info.filename.endswith("/data/0"):
                zi.compress_type = zipfile.ZIP_DEFLATED
                with z.open(zi, "w", force_zip64=True) as f:
                    f.write(bytes(1 << 20))
            else:
                z.writestr(zi, src.read(info.filename))
    data = bytearray(out.getvalue())
    # Every ZIP64 extra field (id 1) of that member: uncompressed size := 10 GiB.
    name = next(n for n in src.namelist() if n.endswith("/data/0")).encode()
    at = 0
    while (at := data.find(name, at)) != -1:
        extra = at + len(name)
        if data[extra:extra + 2] == b"\x01\x00":
            struct.pack_into("<Q", data, extra + 4, 10 << 30)
        at += 1
    return bytes(data)


def hostile_files():
    cases = {}

    def add(name, data, why, expect):
        (HOSTILE / name).write_bytes(data)
        cases[name] = {"what": why, "error": expect}

    cmd = lambda n: f"touch {marker(n)}"  # noqa: E731
    add("os_system.pkl", dumps(Payload(os.system, cmd("os_system")), 2), "GLOBAL os.system, REDUCE",
        "global `posix.system` is not allowed")
    posix = pickle.PROTO + b"\x04" + b"\x8c\x05posix\x8c\x06system\x93" + b"\x8c" + bytes([len(cmd("posix_stack_global"))]) \
        + cmd("posix_stack_global").encode() + b"\x85R."
    add("posix_stack_global.pkl", posix, "STACK_GLOBAL posix.system (protocol 4), REDUCE",
        "global `posix.system` is not allowed")
    add("eval.pkl", dumps(Payload(eval, f"__import__('os').system({cmd('eval')!r})"), 2), "GLOBAL builtins.eval",
        "global `__builtin__.eval` is not allowed")
    add("exec.pkl", dumps(Payload(exec, f"import os; os.system({cmd('exec')!r})"), 4), "STACK_GLOBAL builtins.exec",
        "global `builtins.exec` is not allowed")
    import subprocess
    add("popen.pkl", dumps(Payload(subprocess.Popen, ["touch", marker("popen")]), 4), "STACK_GLOBAL subprocess.Popen",
        "global `subprocess.Popen` is not allowed")
    import importlib
    add("import_module.pkl", dumps(Payload(importlib.import_module, "os"), 3), "importlib.import_module",
        "global `importlib.import_module` is not allowed")
    add("inst.pkl", b"(S'" + cmd("inst").encode() + b"'\nios\nsystem\n.", "INST os system", "opcode INST")
    add("obj.pkl", b"\x80\x02(cos\nsystem\nX" + struct.pack("<I", len(cmd("obj"))) + cmd("obj").encode() + b"o.",
        "OBJ on a global (the global itself is refused first)", "global `os.system` is not allowed")
    add("obj_allowed.pkl", b"\x80\x02(ccollections\nOrderedDict\no.", "OBJ on an allowed class", "opcode OBJ")
    add("build_on_class.pkl", b"\x80\x02ccollections\nOrderedDict\n}X\x04\x00\x00\x00keysNsb.",
        "BUILD aimed at the allowed class OrderedDict itself", "BUILD on the global")
    add("zip_payload.pt", with_data_pkl(dumps(Payload(os.system, cmd("zip_payload")), 2)),
        "a torch zip archive with real storages whose data.pkl calls os.system", "global `posix.system` is not allowed")
    add("legacy_payload.pt", legacy_with(dumps(Payload(os.system, cmd("legacy_payload")), 2)),
        "a legacy torch file whose main pickle calls os.system", "global `posix.system` is not allowed")
    add("deep_marks.pkl", b"\x80\x02" + b"(" * 10_000 + b"t.", "10,000 nested MARKs", "MARKs nested deeper than")
    deep = b"\x80\x02}" + b"X\x01\x00\x00\x00a}" * 200 + b"s" * 200 + b"."
    add("deep_dicts.pt", with_data_pkl(deep), "dicts nested 200 deep in a torch archive", "nested deeper than")
    add("huge_length.pkl", b"\x80\x02X\xff\xff\xff\x7f" + b"abc", "BINUNICODE declaring 2 GiB with 3 bytes left",
        "declared with only 3 left")
    good = dumps({"a": [1, 2, 3], "b": "text"}, 2)
    add("truncated.pkl", good[: len(good) // 2], "a pickle cut in half", "ends before its STOP")
    add("memo_out_of_range.pkl", b"\x80\x02h\xc8.", "BINGET 200 with an empty memo", "memo entry 200")
    add("zip_dotdot.pt", with_data_pkl(zipfile_member_data(), {"../x": b"owned"}),
        "a torch archive with a member named ../x", "a path outside the archive")
    add("zip_absolute.pt", with_data_pkl(zipfile_member_data(), {"/x": b"owned"}),
        "a torch archive with a member named /x", "a path outside the archive")
    add("deflated_bomb.pt", deflated_bomb(), "a deflated storage (1 MiB of zeros) declaring 10 GiB in its ZIP64 header",
        "is compressed")
    add("storage_size.pt", zip_with_members(
        [("archive/data.pkl", zipfile_member_data()), ("archive/data/0", b"\0" * 12), ("archive/version", b"3\n")]),
        "a storage of 4 floats declared with 12 bytes stored", "4 elements of F32 declared, 12 bytes stored")
    add("view_past_storage.pt", zip_with_members(
        [("archive/data.pkl", tensor_view(4, 2, (3,), (1,))), ("archive/data/0", b"\0" * 16),
         ("archive/version", b"3\n")]), "a tensor view (offset 2, size 3) past its 4-element storage",
        "reaches past its storage")
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 1, 0
            t.addfile(info, io.BytesIO(b"\0"))
    add("tar_format.pt", tar.getvalue(), "the tar format of torch.save before PyTorch 0.4", "tar format")
    buf = io.BytesIO()
    torch.save({"a": 1, "b": "no tensors"}, buf)
    add("no_tensors.pt", buf.getvalue(), "a torch file holding no tensor", "no tensors in it")
    return cases


def zipfile_member_data():
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    GOOD.mkdir(parents=True)
    HOSTILE.mkdir(parents=True)
    good = good_files()
    hostile = hostile_files()
    for name, case in hostile.items():
        try:
            torch.load(HOSTILE / name, weights_only=True)
            case["torch_weights_only"] = "accepted"
        except Exception as e:  # noqa: BLE001 (any refusal)
            case["torch_weights_only"] = f"refused ({type(e).__name__})"
    assert not any(Path(MARKER + Path(n).stem).exists() for n in hostile), "a payload ran"
    meta = {"produced_by": "tests/reference/make_pickles.py", "torch": torch.__version__, "good": good,
            "hostile": hostile, "marker": MARKER + "<name without extension>"}
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{len(good)} good, {len(hostile)} hostile files, {total} bytes")
    assert total <= 2_000_000, total


if __name__ == "__main__":
    main()
