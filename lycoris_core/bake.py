"""Bake adapters into a single-file checkpoint, streaming tensor by tensor.

The checkpoint is never loaded whole: its header gives every key and shape, the
adapters are mapped onto them (``patch.build_plan``), and each tensor is then read
alone (``safetensors.safe_open``), patched by ``plan.patched`` (float32 sum, one
rounding into the tensor's dtype) and appended to the output, whose header was
written first.  safe_open memory-maps the file, and mapped pages that were read count
toward the process's resident memory, so the reader is reopened every
``REOPEN_BYTES``: the peak stays near the adapters plus a few layers.

With ``dtype`` ("fp16", "bf16", "fp32") floating tensors are converted; a patched
tensor is then rounded once, from float32 straight to the target dtype.  The output
metadata keeps the checkpoint's own and adds ``lycoris_core_bake``: the recipe as JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from .errors import LycorisError
from .merge import MergeError, MergeInput, Progress, ProgressFn, _version
from .reader import DTYPES

REOPEN_BYTES = 64 << 20
OUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_NAME_OF = {v[0]: k for k, v in DTYPES.items()}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class BakeReport:
    rows: list[dict] = field(default_factory=list)  # one per patched key
    total_error: float = 0.0  # baking is exact up to the one rounding: always 0
    path: str | None = None
    size_bytes: int = 0
    dry_run: bool = False
    match_lines: list[str] = field(default_factory=list)
    tensors: int = 0
    patched: int = 0
    seconds: float = 0.0
    dtype: str = "keep"

    def to_text(self) -> str:
        lines = [f"bake: {self.patched} of {self.tensors} tensors patched, dtype {self.dtype}"]
        lines += self.match_lines
        for r in self.rows:
            if r["skipped"]:
                lines.append(f"{r['module']}: skipped: {r['skipped']}")
            else:
                lines.append(f"{r['module']}: {r['contributions']} contribution(s)")
        if self.path:
            lines.append(f"wrote {self.path} ({self.size_bytes} bytes) in {self.seconds:.1f}s")
        elif self.dry_run:
            lines.append("dry run: nothing written")
        return "\n".join(lines)


class StreamReader:
    """One tensor at a time from a safetensors file, dropping the memory map every so often."""

    def __init__(self, path: str, reopen_bytes: int = REOPEN_BYTES):
        self.path, self.reopen_bytes = path, reopen_bytes
        self._handle = None
        self._since = 0

    def get(self, key: str, nbytes: int) -> torch.Tensor:
        from safetensors import safe_open

        if self._handle is None or self._since >= self.reopen_bytes:
            self._handle = None  # unmap before mapping again
            self._handle = safe_open(self.path, framework="pt", device="cpu")
            self._since = 0
        self._since += nbytes
        return self._handle.get_tensor(key).clone()  # own the memory, not the map

    def close(self) -> None:
        self._handle = None


class StreamWriter:
    """A safetensors file written header first, then tensors appended in header order."""

    def __init__(self, path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self.expected = []
        for key, dtype, shape in entries:
            nbytes = math.prod(shape) * DTYPES[dtype][1]
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((key, dtype, tuple(shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.fh = open(path, "wb")
        self.fh.write(len(raw).to_bytes(8, "little"))
        self.fh.write(raw)
        self.index = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, dtype, shape, nbytes = self.expected[self.index]
        if key != want_key or _NAME_OF[tensor.dtype] != dtype or tuple(tensor.shape) != shape:
            raise MergeError(f"stream writer: got {key} {tensor.dtype} {tuple(tensor.shape)}, "
                             f"expected {want_key} {dtype} {shape}")
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise MergeError(f"stream writer: {key} has {data.nbytes} bytes, expected {nbytes}")
        self.fh.write(memoryview(data))
        self.index += 1

    def close(self) -> None:
        if self.index != len(self.expected):
            self.fh.close()
            raise MergeError(f"stream writer closed after {self.index} of {len(self.expected)} tensors")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def bake_checkpoint(checkpoint: str, inputs: list[MergeInput], out_path: str | None, *,
                    dtype: str | None = None, dry_run: bool = False, overwrite: bool = False,
                    progress: ProgressFn | None = None, allow_partial: bool = False) -> BakeReport:
    """Write ``checkpoint`` with ``inputs`` baked in to ``out_path`` (see the module docstring)."""
    from .adapter import load_adapter
    from .patch import AdapterSpec, build_plan
    from .reader import read_safetensors_header
    from .rounding import to_dtype
    from .writer import WriteError, atomic_path, check_output, verify_written

    started = time.perf_counter()
    if dtype in (None, "", "keep"):
        dtype = None
    elif dtype not in OUT_DTYPES:
        raise MergeError(f"dtype must be one of keep, {', '.join(OUT_DTYPES)}, not {dtype!r}")
    if not os.path.isfile(checkpoint):
        raise MergeError(f"checkpoint {checkpoint} does not exist")
    if not dry_run:
        if out_path is None:
            raise MergeError("an output path is needed unless dry_run is set")
        if os.path.abspath(out_path) == os.path.abspath(checkpoint):
            raise MergeError("the output must not be the input checkpoint")
        check_output(out_path, overwrite)

    entries, metadata, _start = read_safetensors_header(checkpoint)
    shapes = {k: tuple(v["shape"]) for k, v in entries.items()}
    adapters = [load_adapter(i.path) for i in inputs]
    specs = [AdapterSpec(a, i.strength_unet, i.strength_clip, i.blocks) for a, i in zip(adapters, inputs)]
    plan = build_plan(specs, shapes, allow_partial=allow_partial)

    report = BakeReport(dry_run=dry_run, dtype=dtype or "keep", tensors=len(entries))
    report.match_lines = [f"{os.path.basename(i.path)}: {r.summary()}" for i, r in zip(inputs, plan.reports)]
    for adapter, r in zip(adapters, plan.reports):
        for name in r.unmatched:
            report.rows.append({"module": name, "skipped": "no matching layer", "contributions": 0})
        for name, key, ms, ws in r.mismatched:
            report.rows.append({"module": name, "skipped": f"shape {ms} does not fit {key} {ws}", "contributions": 0})
        for name in r.not_applicable:
            report.rows.append({"module": name, "skipped": "its model part is absent", "contributions": 0})
        for key, reason in adapter.unknown_reasons.items():
            report.rows.append({"module": key, "skipped": f"unknown key: {reason}", "contributions": 0})
    touched = set(plan.keys())
    for key in plan.keys():
        report.rows.append({"module": key, "skipped": "", "contributions": len(plan.contributions[key])})
    report.patched = len(touched)

    if dry_run:
        for a in adapters:
            a.close()
        report.seconds = time.perf_counter() - started
        return report

    # output layout: the checkpoint's order (by offset), dtypes converted where asked
    order = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
    target = OUT_DTYPES.get(dtype) if dtype else None
    out_entries = []
    for key in order:
        src = entries[key]["dtype"]
        src_dtype = DTYPES[src][0]
        out = _NAME_OF[target] if target is not None and src_dtype in _FLOATS else src
        out_entries.append((key, out, shapes[key]))
    recipe = {
        "tool": f"lycoris_core {_version()}",
        "checkpoint": {"name": os.path.basename(checkpoint), "size": os.path.getsize(checkpoint)},
        "adapters": [i.recipe() for i in inputs],
        "dtype": dtype or "keep",
        "rounding": "float32 sum of strength-scaled deltas, one rounding per tensor",
    }
    out_meta = dict(metadata)
    out_meta["lycoris_core_bake"] = json.dumps(recipe)

    total_bytes = sum(math.prod(s) * DTYPES[d][1] for _k, d, s in out_entries)
    bar = Progress(total_bytes, "bake", progress, unit="B")
    reader = StreamReader(checkpoint)
    try:
        with atomic_path(out_path, overwrite) as tmp:
            writer = StreamWriter(tmp, out_entries, out_meta)
            try:
                for key, out_name, shape in out_entries:
                    begin, end = entries[key]["data_offsets"]
                    tensor = reader.get(key, end - begin)
                    out_dtype = DTYPES[out_name][0]
                    if key in touched:
                        if out_dtype == tensor.dtype:
                            tensor = plan.patched(key, tensor)
                        else:  # one rounding, float32 -> output dtype
                            tensor = to_dtype(plan.patched(key, tensor.to(torch.float32)), out_dtype, key)
                    elif out_dtype != tensor.dtype:
                        tensor = tensor.to(out_dtype)
                    writer.write(key, tensor)
                    bar.update(tensor.numel() * tensor.element_size())
                    del tensor
            finally:
                writer.fh.close() if writer.index != len(out_entries) else writer.close()
            verify_written(tmp, {k: s for k, _d, s in out_entries})
    except OSError as exc:
        if isinstance(exc, LycorisError):
            raise
        raise WriteError(f"could not write {out_path}: {exc.strerror or exc}") from exc
    finally:
        bar.close()
        reader.close()
        for a in adapters:
            a.close()
    report.path = str(out_path)
    report.size_bytes = os.path.getsize(out_path)
    report.seconds = time.perf_counter() - started
    return report
