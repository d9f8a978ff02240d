"""Bake adapters into a single-file checkpoint, streaming tensor by tensor.

The checkpoint is never loaded whole: its header gives every key and shape, the
adapters are mapped onto them (``patch.build_plan``), and the data is then streamed
in checkpoint order (``io.stream.stream_copy``: a reader thread, this thread patching,
a writer thread).  Tensors the plan touches are patched in their read buffer by the
patch kernel (``patch.patched_value``: float32 sum in row tiles, one rounding, one range
check); low-rank deltas are built tile by tile inside that pass, the other deltas that
need no original weight are computed ahead on a fourth thread (``DeltaPrefetch``).
Untouched tensors are copied as raw bytes; memory stays near the adapters plus a few
buffers.  Run it with one torch thread (the CLI does): the I/O threads need the other core.

With ``dtype`` ("fp16", "bf16", "fp32") floating tensors are converted; a patched
tensor is then rounded once, from float32 straight to the target dtype, and refused
(``WeightRangeError``) when the target cannot hold it.  The output metadata keeps the
checkpoint's own and adds ``lycoris_core_bake``: the recipe as JSON.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..adapter import load_adapter
from ..errors import LycorisError
from ..io.reader import DTYPES, read_safetensors_header
from ..io.stream import NAME_OF, StreamItem, StreamWriter, stream_copy
from ..io.writer import WriteError, atomic_path, verify_written
from ..patch import AdapterSpec, PatchPlan, build_plan, module_delta, patched_value, streams
from .common import (
    MergeError,
    MergeInput,
    Progress,
    ProgressFn,
    check_files,
    check_write,
    footer,
    match_rows,
)

BAKE_THREADS = 1  # torch threads the CLI sets for a bake: the reader and writer threads need the other core
PREFETCH_BYTES = 16 << 20  # float32 deltas computed ahead by the delta thread (one always fits)
OUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
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
        return "\n".join(lines + footer(self))


class DeltaPrefetch:
    """Computes the strength-1 deltas of the keys to patch, in order, on a second thread.

    A ``patch.DeltaSource`` for the kernel: ``peek`` hands over the delta the thread computed
    (the same ``module_delta`` call, so the bits are the same) and frees its budget; it
    keeps nothing (``reserve`` is False).  Only deltas that need no original weight and are
    not built tile by tile in the pass are computed ahead; the kernel builds the others, and
    any the thread could not make (raising there what the thread hit).
    """

    def __init__(self, plan: PatchPlan, keys, budget: int = PREFETCH_BYTES):
        self.budget, self.used = budget, 0
        self.ready: dict = {}
        self.cond = threading.Condition()
        self.stop = False
        self.failed: set = set()
        self.order = [c for k in keys for c in plan.contributions.get(k, ()) if self.ahead(c)]
        self.planned = {self._key(c.module, c.target) for c in self.order}
        self.thread = threading.Thread(target=self._run, name="bake-deltas", daemon=True)
        self.thread.start()

    @staticmethod
    def ahead(c) -> bool:
        # streamed deltas are built tile by tile inside the patch pass: nothing to do ahead
        return (not c.bias and c.strength != 0 and c.module.linear_in_strength and not c.module.uses_weight
                and not streams(c))

    @staticmethod
    def _key(module, target):
        return id(module), target.weight_key, target.rows

    def _run(self):
        for c in self.order:
            k = self._key(c.module, c.target)
            with self.cond:
                while self.used >= self.budget and self.ready and not self.stop:
                    self.cond.wait()
                if self.stop:
                    return
            try:
                delta = module_delta(c.module, c.target, None)
            except BaseException:  # noqa: BLE001 - the kernel builds it again and raises where it is used
                with self.cond:
                    self.failed.add(k)
                    self.cond.notify_all()
                continue
            with self.cond:
                self.ready[k] = delta
                self.used += delta.numel() * delta.element_size()
                self.cond.notify_all()

    def peek(self, module, target, identity=None):
        k = self._key(module, target)
        if k not in self.planned:
            return None
        with self.cond:
            while k not in self.ready and k not in self.failed and self.thread.is_alive():
                self.cond.wait(0.5)
            delta = self.ready.pop(k, None)
            if delta is not None:
                self.used -= delta.numel() * delta.element_size()
                self.cond.notify_all()
            self.planned.discard(k)
        return delta

    def reserve(self, module, target, identity, nbytes, device) -> bool:
        return False

    def put(self, module, target, identity, delta) -> None:
        raise AssertionError("the prefetcher keeps nothing")

    def close(self):
        with self.cond:
            self.stop = True
            self.ready.clear()
            self.cond.notify_all()
        self.thread.join()


def _report(plan: PatchPlan, adapters, inputs, dry_run: bool, dtype: str | None, tensors: int) -> BakeReport:
    report = BakeReport(dry_run=dry_run, dtype=dtype or "keep", tensors=tensors)
    report.match_lines = [f"{os.path.basename(i.path)}: {r.summary()}" for i, r in zip(inputs, plan.reports)]
    for adapter, r in zip(adapters, plan.reports):
        report.rows += [{"module": row["module"], "skipped": row["skipped"], "contributions": 0}
                        for row in match_rows(adapter, r)]
    report.rows += [{"module": key, "skipped": "", "contributions": len(plan.contributions[key])} for key in plan.keys()]
    report.patched = len(plan.contributions)
    return report


def _out_entries(entries: dict, dtype: str | None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(key, output dtype name, shape) in the checkpoint's own order, floats converted where asked."""
    target = OUT_DTYPES.get(dtype) if dtype else None
    out = []
    for key in sorted(entries, key=lambda k: entries[k]["data_offsets"][0]):
        src = entries[key]["dtype"]
        name = NAME_OF[target] if target is not None and DTYPES[src][0] in _FLOATS else src
        out.append((key, name, tuple(entries[key]["shape"])))
    return out


def bake_checkpoint(checkpoint: str, inputs: list[MergeInput], out_path: str | None, *,
                    dtype: str | None = None, dry_run: bool = False, overwrite: bool = False,
                    progress: ProgressFn | None = None, allow_partial: bool = False) -> BakeReport:
    """Write ``checkpoint`` with ``inputs`` baked in to ``out_path`` (see the module docstring)."""
    started = time.perf_counter()
    if dtype in (None, "", "keep"):
        dtype = None
    elif dtype not in OUT_DTYPES:
        raise MergeError(f"dtype must be one of keep, {', '.join(OUT_DTYPES)}, not {dtype!r}")
    check_files(checkpoint)
    check_write(out_path, dry_run, overwrite, [checkpoint, *(i.path for i in inputs)])

    entries, metadata, data_start = read_safetensors_header(checkpoint)
    adapters = [load_adapter(i.path) for i in inputs]
    try:
        specs = [AdapterSpec(a, i.strength_unet, i.strength_clip, i.blocks) for a, i in zip(adapters, inputs)]
        plan = build_plan(specs, {k: tuple(v["shape"]) for k, v in entries.items()}, allow_partial=allow_partial)
        report = _report(plan, adapters, inputs, dry_run, dtype, len(entries))
        if not dry_run:
            recipe = {
                "tool": f"lycoris_core {__version__}",
                "checkpoint": {"name": os.path.basename(checkpoint), "size": os.path.getsize(checkpoint)},
                "adapters": [i.recipe() for i in inputs],
                "dtype": dtype or "keep",
                "rounding": "float32 sum of strength-scaled deltas, one rounding per tensor",
            }
            meta = {**metadata, "lycoris_core_bake": json.dumps(recipe)}
            _write(checkpoint, entries, data_start, plan, _out_entries(entries, dtype), meta, out_path, overwrite,
                   progress)
            report.path = str(out_path)
            report.size_bytes = os.path.getsize(out_path)
    finally:
        for a in adapters:
            a.close()
    report.seconds = time.perf_counter() - started
    return report


def _write(checkpoint: str, entries: dict, data_start: int, plan: PatchPlan, out_entries, meta: dict,
           out_path: str, overwrite: bool, progress: ProgressFn | None) -> None:
    """Stream the checkpoint into ``out_path`` (atomically), patching and converting on the way."""
    touched = set(plan.keys())
    items = []
    for key, out_name, shape in out_entries:
        begin, end = entries[key]["data_offsets"]
        src = entries[key]["dtype"]
        items.append(StreamItem(key, src, shape, data_start + begin, end - begin, key in touched or out_name != src))
    out_dtype_of = {key: DTYPES[name][0] for key, name, _shape in out_entries}
    deltas = None

    def transform(item: StreamItem, tensor: torch.Tensor) -> torch.Tensor:
        out_dtype = out_dtype_of[item.key]
        if item.key in touched:  # one rounding, float32 -> output dtype; in the read buffer when it can
            out = tensor if out_dtype == tensor.dtype else None
            return patched_value(tensor, plan.contributions[item.key], item.key, deltas, out=out, dtype=out_dtype)
        return tensor.to(out_dtype)

    bar = Progress(sum(math.prod(s) * DTYPES[d][1] for _k, d, s in out_entries), "bake", progress, unit="B")

    def advance(item: StreamItem, nbytes: int) -> None:
        # output bytes: a converted tensor comes whole, a raw copy in pieces of the same size
        bar.update(math.prod(item.shape) * DTYPES[out_dtype_name[item.key]][1] if item.as_tensor else nbytes)

    out_dtype_name = {key: name for key, name, _shape in out_entries}
    try:
        with atomic_path(out_path, overwrite) as tmp:
            writer = StreamWriter(tmp, out_entries, meta)
            deltas = DeltaPrefetch(plan, [it.key for it in items if it.key in touched])
            try:
                stream_copy(checkpoint, items, writer, transform, advance)
            finally:
                deltas.close()
                writer.skip_empty()
                writer.fh.close() if writer.index != len(out_entries) else writer.close()
            verify_written(tmp, {k: s for k, _d, s in out_entries})
    except OSError as exc:
        if isinstance(exc, LycorisError):
            raise
        raise WriteError(f"could not write {out_path}: {exc.strerror or exc}") from exc
    finally:
        bar.close()
