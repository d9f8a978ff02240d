"""Fuzz the adapter reader with mutated real adapter files (issue 8).

Seeds are real files: ``synthetic_adapter`` output for every algorithm (real SD1.5
module names and shapes) saved by the safetensors library, a PEFT-style file whose
alpha lives in the header, and (long run only) files written by ``lycoris-lora``
itself through ``tests/lycoris_factory.py``.  Hypothesis chains up to three
mutations (truncation, bit flips, lying length, huge/negative/overflowing shapes
and offsets, wrong dtypes, duplicate and renamed keys, NaN/Inf/huge values, hostile
metadata, bytes that are not safetensors at all) and every case must end in one of:

- ``AdapterFormatError`` from ``load_adapter``, or
- a loaded adapter whose summary works, whose every module's delta/apply works or
  raises ``AdapterFormatError``, and whose ``WeightPatcher.apply`` on a real-name
  SD1.5 weight set either works (then ``restore`` is bit-exact) or raises a
  ``LycorisError`` with every weight still equal to the original,

within 1 s of CPU time, and with bounded memory: Python allocations (tracemalloc)
while reading stay under a small multiple of the file's size, and the process's
peak resident memory (VmHWM, which sees torch's allocations too) grows by no more
than the file's size plus the patch working set of the weight set.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import time
import traceback
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_util import LONG, Memory, MiB, scaled, tally
from safetensors.torch import save as st_save

from lycoris_core import AdapterFormatError, load_adapter
from lycoris_core.adapter.describe import summary_lines
from lycoris_core.algorithms import SUFFIX_ROLES
from lycoris_core.errors import LycorisError, WeightRangeError
from lycoris_core.keymap import state_shapes
from lycoris_core.patch import AdapterSpec, WeightPatcher, build_plan
from lycoris_core.testing.synthetic import synthetic_adapter

SD1 = state_shapes("sd1", "comfy")
CPU_LIMIT = 1.0  # seconds of CPU per case
HANG_LIMIT = 20.0  # wall seconds before a case is interrupted and counted as a hang
DENSE_LIMIT = 1 << 22  # standalone delta() of unmapped modules only up to this many elements

# the smallest real SD1.5 layers of each kind: self/cross attention, 1x1 and 3x3 convs, a CLIP layer
PICK = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.proj_in",
    "conv_in",
    "text_model.encoder.layers.0.self_attn.q_proj",
)
SEED_ALGOS = ("lora", "dora", "locon_tucker", "loha", "loha_tucker", "lokr", "full", "ia3", "glora",
              "diag-oft", "boft", "norm")
META = {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1",
        "modelspec.architecture": "stable-diffusion-v1/lora"}


def _picked(spec) -> bool:
    return spec.name in PICK


def _seed_files() -> dict[str, bytes]:
    seeds = {}
    for algo in SEED_ALGOS:
        tensors = synthetic_adapter("sd1", algo, select=_picked, rank=4, seed=3)
        if algo == "norm":  # synthetic norm adapters cover every norm layer: keep a handful
            tensors = {k: v for k, v in tensors.items() if "down_blocks_0_" in k}
        seeds[algo] = st_save(tensors, metadata=dict(META, ss_network_args=json.dumps({"algo": algo})))
    for dtype in (torch.float32, torch.bfloat16):
        tensors = synthetic_adapter("sd1", "lora", select=_picked, rank=4, seed=4, dtype=dtype)
        seeds[f"lora-{dtype}"] = st_save(tensors, metadata=META)
    # PEFT/diffusers style: no alpha tensors, lora_alpha in the header's lora_adapter_metadata
    tensors = synthetic_adapter("sd1", "lora", select=_picked, rank=4, seed=5)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    seeds["lora-peft-alpha"] = st_save(tensors, metadata={"lora_adapter_metadata": json.dumps(
        {"r": 4, "lora_alpha": 8, "alpha_pattern": {"to_q": 2}, "use_rslora": False})})
    if LONG:
        seeds.update(_factory_seeds())
    return seeds


def _factory_seeds() -> dict[str, bytes]:
    """Files written by lycoris-lora itself (slow to import: long run only)."""
    try:
        from lycoris_factory import make_adapter
    except Exception:  # lycoris-lora or diffusers missing
        return {}
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in ("lora", "locon-tucker", "loha-tucker", "lokr-tucker", "lora-dora-in", "glora",
                        "boft", "diag-oft-rescaled", "ia3", "full", "norms"):
            path, _layers = make_adapter(variant, torch.float16, folder)
            out[f"lycoris-{variant}"] = Path(path).read_bytes()
    return out


SEEDS = _seed_files()
SEED_NAMES = sorted(SEEDS)


def _weight_set() -> dict[str, torch.Tensor]:
    """fp16 weights (real SD1.5 comfy names and shapes) for every key the seeds touch."""
    keys: set[str] = set()
    for name, data in SEEDS.items():
        if name.startswith("lycoris-"):
            continue
        adapter = load_adapter(torch_load_bytes(data))
        plan = build_plan([AdapterSpec(adapter)], SD1, allow_partial=True)
        keys.update(plan.keys())
    # views into one flat buffer, so "every weight equals its original" is a single comparison
    sizes = {k: math.prod(SD1[k]) for k in sorted(keys)}
    gen = torch.Generator().manual_seed(8)
    flat = (torch.randn(sum(sizes.values()), generator=gen) * 0.05).half()
    out, at = {}, 0
    for k, n in sizes.items():
        out[k] = flat[at : at + n].view(SD1[k])
        at += n
    return out


def torch_load_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


# ---- the safetensors layout, parsed and re-serialised -------------------------------------

def split(data: bytes):
    """(header dict, data bytes) of a well-formed file, or None."""
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return None
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    return header, bytearray(data[8 + n :])


def join(header_text: str | bytes, body: bytes, length: int | None = None) -> bytes:
    raw = header_text.encode() if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(raw) if length is None else length) + raw + bytes(body)


def tensor_keys(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
            "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
HUGE = [2**31, 2**32 + 1, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100, 10**30]


# ---- mutations: each takes (bytes, rng) and returns bytes ----------------------------------

def m_truncate(data, rng):
    n = len(data)
    cuts = [0, 1, 7, 8, 9, min(n, 16), n // 2, n - 1, rng.randrange(n + 1)]
    if len(data) >= 8:
        (h,) = struct.unpack("<Q", data[:8])
        cuts += [min(n, 8 + h + d) for d in (-1, 0, 1, 2)]
    return data[: rng.choice(cuts)]


def m_flip_bits(data, rng, header_only=False):
    if not data:
        return data
    out = bytearray(data)
    limit = len(out)
    if header_only and len(out) >= 8:
        limit = min(len(out), 8 + struct.unpack("<Q", out[:8])[0])
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(limit)
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def m_flip_header(data, rng):
    return m_flip_bits(data, rng, header_only=True)


def m_length(data, rng):
    n = len(data)
    (h,) = struct.unpack("<Q", data[:8]) if n >= 8 else (0,)
    value = rng.choice([0, 1, 2, 7, h - 1, h + 1, n - 8, n - 7, n, 100 * MiB + 1, 2**63, 2**64 - 1,
                        rng.randrange(2**64)])
    return struct.pack("<Q", max(0, min(value, 2**64 - 1))) + data[8:]


def m_splice(data, rng):
    i = rng.randrange(len(data) + 1)
    if rng.random() < 0.5 and data:
        j = min(len(data), i + rng.randint(1, 64))
        return data[:i] + data[j:]
    return data[:i] + rng.randbytes(rng.randint(1, 64)) + data[i:]


def m_append(data, rng):
    return data + rng.choice([b"\x00", b" " * 8, rng.randbytes(rng.randint(1, 4096)), data[: 4096]])


NOT_SAFETENSORS = [
    b"", b"\x00", b"\x00" * 8, b"\xff" * 8, b"{}", b"PK\x03\x04" + b"\x00" * 60, b"\x80\x02}q\x00.",
    b"\x80\x04\x95" + b"\x00" * 20, b"\x1f\x8b\x08\x00" + b"\x00" * 20, b"GGUF\x03\x00\x00\x00" + b"\x00" * 24,
    b"<html><body>404</body></html>", "ünïcödé ✓".encode(), b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
    b"\x02\x00\x00\x00\x00\x00\x00\x00[]", b"\x04\x00\x00\x00\x00\x00\x00\x00null",
    b"\x05\x00\x00\x00\x00\x00\x00\x00\"ab\"",
]


def m_not_safetensors(data, rng):
    choice = rng.randrange(4)
    if choice == 0:
        return rng.choice(NOT_SAFETENSORS)
    if choice == 1:
        return rng.randbytes(rng.randint(0, 4096))
    if choice == 2:  # a plausible length, then noise
        body = rng.randbytes(rng.randint(0, 512))
        return struct.pack("<Q", rng.randint(0, len(body))) + body
    deep = rng.choice(["[" * 100_000, "{\"a\":" * 50_000, "[" * 900 + "]" * 900, "1" * 50_000])
    return join(deep, b"")


def _structured(fn):
    """A mutation on the parsed header; falls back to a header bit flip if the input is not parseable."""

    def mutate(data, rng):
        parsed = split(data)
        if parsed is None:
            return m_flip_header(data, rng)
        header, body = parsed
        keys = tensor_keys(header)
        if not keys:
            return m_flip_header(data, rng)
        try:
            result = fn(header, body, keys, rng)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError):
            return m_flip_header(data, rng)  # an earlier mutation left fields this one cannot read
        if isinstance(result, bytes):
            return result
        return join(json.dumps(header), body)

    mutate.__name__ = fn.__name__
    return mutate


@_structured
def m_shape(header, body, keys, rng):
    entry = header[rng.choice(keys)]
    bad = [[rng.choice(HUGE), rng.choice(HUGE)], [rng.choice(HUGE)], [-1, 4], [4, -rng.randrange(1, 10**9)],
           [1.5, 2], [True, 4], ["4", 4], [None], [], [0], [1] * 9, [1] * 64, "4", None, {"0": 4}, [0, 2**63],
           [2**32, 2**32, 2**32], entry["shape"][::-1] if isinstance(entry.get("shape"), list) else [1]]
    entry["shape"] = rng.choice(bad)


@_structured
def m_huge_consistent(header, body, keys, rng):
    """Shape and offsets agree with each other, declaring far more data than the file holds."""
    entry = header[rng.choice(keys)]
    dims = [rng.choice([2**16, 2**20, 2**31, 2**33]) for _ in range(rng.randint(1, 3))]
    entry["shape"] = dims
    begin = rng.choice([0, len(body)])
    entry["data_offsets"] = [begin, begin + math.prod(dims) * ITEMSIZE.get(entry.get("dtype"), 2)]


@_structured
def m_offsets(header, body, keys, rng):
    key = rng.choice(keys)
    entry = header[key]
    try:
        begin, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        begin, end = 0, 0
    other = header[rng.choice(keys)].get("data_offsets", [0, 0])
    choices = [[-1, end], [begin, -1], [-(2**63), end - begin - 2**63], [end, begin], [begin, 2**64],
               [2**63, 2**63 + end - begin], [2**64 - 1, 2**64 - 1 + end - begin], [begin + 1, end + 1],
               [begin - 1, end - 1], [float(begin), end], [str(begin), end], [begin], [begin, end, end],
               None, other, [0, end - begin], [len(body) - (end - begin), len(body)],
               [len(body), len(body) + end - begin], [begin, begin]]
    entry["data_offsets"] = rng.choice(choices)


@_structured
def m_dtype(header, body, keys, rng):
    entry = header[rng.choice(keys)]
    new = rng.choice(list(ITEMSIZE) + ["f16", "F4", "", None, 3, "U16", "C64", "F16 ", ["F16"]])
    old = entry.get("dtype")
    entry["dtype"] = new
    shape = entry.get("shape")
    if rng.random() < 0.7 and new in ITEMSIZE and old in ITEMSIZE and isinstance(shape, list) and shape:
        # keep the byte count where possible, so the file stays valid with reinterpreted data
        ratio = ITEMSIZE[old] / ITEMSIZE[new]
        last = shape[-1] * ratio
        if isinstance(last, float) and last.is_integer() and last >= 0:
            shape[-1] = int(last)


@_structured
def m_duplicate(header, body, keys, rng):
    key = rng.choice(keys)
    text = json.dumps(header)
    extra = json.dumps({key: header[key]})[1:-1]
    return join(text[:-1] + ", " + extra + "}", body)


@_structured
def m_drop(header, body, keys, rng):
    for key in rng.sample(keys, rng.randint(1, max(1, len(keys) // 3))):
        del header[key]


SUFFIXES = sorted(SUFFIX_ROLES)


@_structured
def m_rename(header, body, keys, rng):
    key = rng.choice(keys)
    entry = header.pop(key)
    module = key.rsplit(".", 1)[0] if rng.random() < 0.7 else rng.choice(keys).split(".")[0]
    options = [module + rng.choice(SUFFIXES), module.replace("down_blocks_0", "down_blocks_9"),
               module.replace("lora_unet", "lora_te") + ".lora_up.weight", "", ".alpha", "\u0000.alpha",
               "x" * 10_000 + ".lora_down.weight", "é" + key, key.upper(), "__metadata__.alpha"]
    header[rng.choice(options)] = entry


@_structured
def m_swap(header, body, keys, rng):
    a, b = rng.choice(keys), rng.choice(keys)
    field = rng.choice(["shape", "dtype", "data_offsets"])
    header[a][field], header[b][field] = header[b].get(field), header[a].get(field)


@_structured
def m_reshape(header, body, keys, rng):
    """Same element count, other dims: the header stays valid, the algorithms must cope."""
    entry = header[rng.choice(keys)]
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        return
    n = math.prod(shape)
    choice = rng.randrange(5)
    if choice == 0:
        rng.shuffle(shape)
    elif choice == 1:
        shape.insert(rng.randrange(len(shape) + 1), 1)
    elif choice == 2 and shape:
        entry["shape"] = [n]
    elif choice == 3 and n:
        d = rng.choice([d for d in range(1, min(n, 4096) + 1) if n % d == 0])
        entry["shape"] = [d, n // d]
    else:  # rank 0 / empty tensor: a zero dim, offsets collapsed
        if shape:
            shape[rng.randrange(len(shape))] = 0
        else:
            entry["shape"] = [0]
        begin = entry["data_offsets"][0] if isinstance(entry.get("data_offsets"), list) else 0
        entry["data_offsets"] = [begin, begin]


@_structured
def m_metadata(header, body, keys, rng):
    hostile = [{"a": 1}, {"a": None}, {"a": {"b": "c"}}, {"a": ["x"]}, [], "text", 5,
               {"lora_adapter_metadata": rng.choice(['{"lora_alpha": "x"}', '{"lora_alpha": NaN}',
                                                     '{"lora_alpha": Infinity}', '{"lora_alpha": [1]}',
                                                     '{"lora_alpha": -8, "use_rslora": true}',
                                                     '{"lora_alpha": 0}', '{"lora_alpha": 1e309}',
                                                     '{"unet": {"lora_alpha": null}}', "[]", "{",
                                                     '{"lora_alpha": 4, "alpha_pattern": [1]}',
                                                     '{"lora_alpha": 4, "alpha_pattern": {"to_q": "z"}}'])},
               {"ss_network_args": "{" * 10_000}, {"x" * 1000: "y" * 100_000}]
    header["__metadata__"] = rng.choice(hostile)


VALUES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -4.0, 1e30, -1e30, 6e4, 1e-40, 3e38]


@_structured
def m_values(header, body, keys, rng):
    """Write NaN / Inf / zero / negative / huge into one tensor's bytes (dtype aware)."""
    alphas = [k for k in keys if k.endswith(".alpha")]
    key = rng.choice(alphas) if alphas and rng.random() < 0.4 else rng.choice(keys)
    entry = header[key]
    try:
        begin, end = entry["data_offsets"]
        code = {"F32": "<f", "F64": "<d", "F16": "<e"}.get(entry["dtype"])
    except (KeyError, TypeError, ValueError):
        return
    if entry["dtype"] == "BF16":
        value = struct.pack("<f", rng.choice(VALUES))[2:]
    elif code is None:
        value = rng.randbytes(ITEMSIZE.get(entry["dtype"], 1))
    else:
        try:
            value = struct.pack(code, rng.choice(VALUES))
        except OverflowError:
            value = struct.pack(code, float("inf"))
    if not (0 <= begin <= end <= len(body)) or end - begin < len(value):
        return
    for _ in range(rng.choice([1, 1, 3, (end - begin) // len(value)])):
        i = begin + rng.randrange((end - begin) // len(value)) * len(value)
        body[i : i + len(value)] = value


@_structured
def m_header_shape(header, body, keys, rng):
    text = json.dumps(header)
    choice = rng.randrange(4)
    if choice == 0:  # padding spaces, as the safetensors writer does, or trailing junk
        return join(text + rng.choice([" " * 7, "\x00", "}", ",", "\n"]), body)
    if choice == 1:
        return join(rng.choice(["[]", '"x"', "1", "null", "true", "[" + text + "]"]), body)
    if choice == 2:
        return join(text, body, length=len(text) + rng.choice([-2, -1, 1, 8]))
    return join(text.replace('"', "'", 2), body)


MUTATIONS = [m_truncate, m_flip_bits, m_flip_header, m_length, m_splice, m_append, m_not_safetensors, m_shape,
             m_huge_consistent, m_offsets, m_dtype, m_duplicate, m_drop, m_rename, m_swap, m_reshape,
             m_metadata, m_values, m_header_shape]


# ---- one case ----------------------------------------------------------------------------

# Bugs found by this suite in files it does not own; each has a strict-xfail test elsewhere that fails
# once the bug is fixed: then delete its entry here, and the fuzz counts it as a crash again.
KNOWN_BUGS: dict = {}  # (file, function) -> what is wrong; empty: every bug found so far is fixed


def known_bug(exc: BaseException) -> str | None:
    for frame in traceback.extract_tb(exc.__traceback__):
        found = KNOWN_BUGS.get((Path(frame.filename).name, frame.name))
        if found and isinstance(exc, (ValueError, TypeError, AttributeError)):
            return found
    return None


class Hang(BaseException):
    """Raised by the watchdog when a case overruns HANG_LIMIT (BaseException: nothing catches it)."""


def _alarm(signum, frame):
    raise Hang()


class Harness:
    """Runs a case, classifies its outcome, and checks time, memory and the weights."""

    def __init__(self, folder: Path):
        self.path = folder / "case.safetensors"
        self.weights = _weight_set()
        self.flat = next(iter(self.weights.values()))._base
        self.original_flat = self.flat.clone()
        self.memory = Memory()
        floats = sum(v.numel() for v in self.weights.values()) * 4
        # patch working set: backups, float32 deltas in the cache, one float32 work copy
        self.working_set = 3 * floats
        self.tally = tally("fuzz")
        for what in ("inputs", "crashes", "hangs"):  # reported even when they stay at 0
            self.tally.add(what, 0)
        self.failures: list[str] = []

    def weights_intact(self) -> bool:
        return torch.equal(self.flat, self.original_flat)

    def run(self, data: bytes, label: str) -> str:
        self.path.write_bytes(data)
        size = len(data)
        self.tally.add("inputs")
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, HANG_LIMIT)
        self.memory.reset_peak()
        rss0 = self.memory.rss()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            outcome = self._exercise(size)
        except Hang:
            self.tally.add("hangs")
            self._fail(label, data, f"hang: over {HANG_LIMIT}s")
            raise
        except AssertionError:  # a broken guarantee found inside the case (memory, weights, restore)
            self.tally.add("broken guarantees")
            raise
        except Exception as exc:  # anything untyped is a crash, unless it is a known, reported bug
            known = known_bug(exc)
            if known is None:
                self.tally.add("crashes")
                self._fail(label, data, f"crash: {type(exc).__name__}: {exc}")
                raise
            self.tally.add(f"known bug hit: {known}")
            outcome = "known bug"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        growth = max(0, self.memory.peak() - rss0)
        self.tally.add(outcome)
        self.tally.peak("cpu s", cpu)
        self.tally.peak("wall s", wall)
        self.tally.peak("rss growth MiB", growth / MiB)
        if cpu > CPU_LIMIT:
            self.tally.add("slow")
            self._fail(label, data, f"took {cpu:.2f}s of CPU")
        if growth > 2 * size + self.working_set + 64 * MiB:
            self._fail(label, data, f"resident memory grew {growth / MiB:.1f} MiB for a {size}-byte file")
        if outcome != "refused on read" and not self.weights_intact():
            self._fail(label, data, "weights differ from the originals after the case")
        return outcome

    def _fail(self, label: str, data: bytes, why: str) -> None:
        self.failures.append(f"{label}: {why} (input {len(data)} bytes, head {data[:48]!r})")
        raise AssertionError(self.failures[-1])

    def _exercise(self, size: int) -> str:
        tracemalloc.start()
        try:
            try:
                adapter = load_adapter(self.path)
            except AdapterFormatError:
                return "refused on read"
            lines = summary_lines(adapter)  # what `inspect` prints for a stranger's file
            assert lines
            _cur, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.tally.peak("read alloc / file size", peak / max(size, 1))
        if peak > 4 * MiB + 16 * size:
            raise AssertionError(f"reading allocated {peak} bytes (Python heap) for a {size}-byte file")
        try:
            return self._patch(adapter)
        finally:
            adapter.close()

    def _patch(self, adapter) -> str:
        patcher = WeightPatcher(self.weights, model_shapes=SD1, cache_bytes=64 * MiB)
        try:
            plan = patcher.apply([AdapterSpec(adapter, 0.8, 0.6)], allow_partial=True)
        except LycorisError:
            if not self.weights_intact():
                raise AssertionError("a failed apply left weights patched") from None
            outcome = "loaded, refused on apply"
            plan = None
        else:
            touched = plan.keys()
            patcher.restore()
            if not self.weights_intact():
                raise AssertionError("restore after a successful apply is not bit-exact")
            outcome = "loaded and applied" if touched else "loaded, nothing to patch"
        # every module on its own: delta/apply works or raises AdapterFormatError
        try:
            report = build_plan([AdapterSpec(adapter)], SD1, allow_partial=True).reports[0]
            targets = report.targets
        except LycorisError:
            targets = {}
        bad = 0
        for name, module in adapter.modules.items():
            target = targets.get(name)
            try:
                if target is not None and target.rows is None and not target.transposed:
                    weight = self.weights.get(target.weight_key)
                    if weight is None:  # a real SD1.5 layer outside the weight set: a stand-in of its shape
                        weight = torch.full(SD1[target.weight_key], 0.01, dtype=torch.float16)
                    module.apply(weight, 0.7, key=target.weight_key)
                elif not module.uses_weight and math.prod(module.shape) <= DENSE_LIMIT:
                    module.delta()
                if module.has_bias:
                    module.bias_delta()
            except (AdapterFormatError, WeightRangeError):  # both typed, both deliberate refusals
                bad += 1
        if bad:
            self.tally.add("modules refused on delta", bad)
        return outcome


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-case CPU time is then one core's; 2 loaded cores are shared
    h = Harness(tmp_path_factory.mktemp("fuzz"))
    for name in SEED_NAMES:  # warm-up: every seed loads and applies as is
        h.run(SEEDS[name], f"seed {name}")
    yield h
    torch.set_num_threads(threads)
    h.tally.stop()


def test_every_seed_is_a_valid_adapter_that_applies(harness):
    for name in SEED_NAMES:
        outcome = harness.run(SEEDS[name], f"seed {name}")
        if name.startswith("lycoris-"):  # lycoris-lora's files are for its tiny SD1.5-like test model
            assert outcome.startswith("loaded"), name
        else:
            assert outcome == "loaded and applied", name


FUZZ_EXAMPLES = scaled(1500, 25_000)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=not LONG,
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(seed=st.sampled_from(SEED_NAMES),
       steps=st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 2**32 - 1)), min_size=1, max_size=3))
def test_fuzz_mutated_adapter_files(harness, seed, steps):
    data = SEEDS[seed]
    for mutate, salt in steps:
        data = mutate(data, random.Random(salt))
    label = f"{seed} <- " + " + ".join(f"{m.__name__}({s})" for m, s in steps)
    harness.run(data, label)


# ---- named hostile inputs: each listed case must end in the typed error ---------------------

def _named_cases():
    lora = SEEDS["lora"]
    header, body = split(lora)
    keys = tensor_keys(header)
    k0 = keys[0]
    text = json.dumps(header)

    def with_entry(**changes):
        h = json.loads(text)
        h[k0].update(changes)
        return join(json.dumps(h), body)

    n = len(lora)
    return {
        "empty file": b"",
        "7 bytes": lora[:7],
        "length only": lora[:8],
        "truncated in header": lora[: 8 + len(text) // 2],
        "truncated in data": lora[: n - 3],
        "length past end": struct.pack("<Q", n) + lora[8:],
        "length 2^64-1": b"\xff" * 8 + lora[8:],
        "huge shape": with_entry(shape=[2**40, 2**40]),
        "shape overflowing int64": with_entry(shape=[2**64, 2]),
        "negative dim": with_entry(shape=[-4, 4]),
        "huge consistent shape": with_entry(shape=[2**20, 2**20], data_offsets=[0, 2**41]),
        "negative offset": with_entry(data_offsets=[-8, 0]),
        "overflowing offset": with_entry(data_offsets=[2**64 - 8, 2**64]),
        "reversed offsets": with_entry(data_offsets=[8, 0]),
        "unknown dtype": with_entry(dtype="F4"),
        "dtype not a string": with_entry(dtype=None),
        "wrong dtype size": with_entry(dtype="F64"),
        "duplicate key": m_duplicate(lora, random.Random(0)),
        "header is a list": join("[]", body),
        "header not utf-8": join(b"\xff\xfe{}", body),
        "deep nesting": join("[" * 100_000, b""),
        "random bytes": random.Random(1).randbytes(4096),
        "zip (torch.save)": b"PK\x03\x04" + bytes(60),
        "pickle": b"\x80\x02}q\x00.",
        "gguf": b"GGUF\x03\x00\x00\x00" + bytes(24),
        "no tensors": join("{}", b""),
        "metadata not strings": join(json.dumps({**header, "__metadata__": {"a": 1}}), body),
    }


NAMED = _named_cases()


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_hostile_input_is_refused_with_the_typed_error(harness, name):
    harness.tally.add("named hostile inputs")
    assert harness.run(NAMED[name], name) == "refused on read"


def test_valid_file_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """Bug found by this suite: a header length of 128 mod 256 made the file 'look like a pickle'."""
    tensors = synthetic_adapter("sd1", "lora", select=_picked, rank=4)
    for pad in range(0, 64):
        data = st_save(tensors, metadata={"pad": "x" * pad})
        if data[0] == 0x80:
            break
    else:
        pytest.skip("no padding gave a 0x80 length byte")
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    assert load_adapter(path).modules


# ---- atheris (optional, long run only) ---------------------------------------------------

ATHERIS_CHILD = r"""
import json, os, sys, tempfile
from pathlib import Path
import atheris
with atheris.instrument_imports(include=["lycoris_core"]):
    import lycoris_core.adapter, lycoris_core.io.reader, lycoris_core.algorithms, lycoris_core.patch
import torch
torch.set_num_threads(1)
import test_reliability_fuzz as F

runs = int(sys.argv[1])
harness = F.Harness(Path(tempfile.mkdtemp()))
done = [0]

def one(data: bytes) -> None:
    harness.run(data, "atheris")
    done[0] += 1
    if done[0] >= runs:
        print("ATHERIS-RESULT " + json.dumps({**harness.tally.counts, **{"max " + k: v for k, v in
              harness.tally.maxima.items()}}), flush=True)
        os._exit(0)

atheris.Setup(sys.argv[:1] + sys.argv[2:], one)
atheris.Fuzz()
"""


@pytest.mark.skipif(not LONG, reason="atheris runs only with LYCORIS_LONG=1")
def test_atheris_coverage_guided(tmp_path):
    """libFuzzer mutates the seed files directly, guided by coverage of lycoris_core (in a child process:
    libFuzzer ends its process when it finishes or finds a crash)."""
    pytest.importorskip("atheris")
    import subprocess
    import sys

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in SEED_NAMES:
        if len(SEEDS[name]) <= 256 * 1024:
            (corpus / f"{name}.safetensors").write_bytes(SEEDS[name])
    runs = scaled(0, 20_000)
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    done = subprocess.run([sys.executable, "-c", ATHERIS_CHILD, str(runs), "-max_len=262144", "-rss_limit_mb=4096",
                           "-timeout=20", str(corpus)], capture_output=True, text=True, env=env, timeout=3600)
    result = [line for line in done.stdout.splitlines() if line.startswith("ATHERIS-RESULT ")]
    assert done.returncode == 0 and result, (done.stdout[-3000:], done.stderr[-5000:])
    counts = json.loads(result[0].split(" ", 1)[1])
    t = tally("fuzz (atheris)")
    for key, value in counts.items():
        if key.startswith("max "):
            t.peak(key[4:], value)
        else:
            t.add(key, value)
    assert not counts.get("crashes") and not counts.get("hangs")
