"""Bake adapters into a single-file checkpoint, streaming tensor by tensor.

The checkpoint is never loaded whole: its header gives every key and shape, the
adapters are mapped onto them (``patch.build_plan``), and the data is then streamed
in checkpoint order through three threads (``stream_copy``):

* a reader thread ``pread``s ahead into a few reused buffers (no memory map, no
  per-tensor allocation: fresh large allocations cost page faults);
* the main thread patches the tensors the plan touches, in place in their read
  buffer (``patch.patched_value``: float32 sum in a reused workspace, one rounding);
  LoRA and LoHa deltas are built tile by tile inside that pass (``tiles``), the
  others computed ahead on a fourth thread (``DeltaPrefetch``);
* a writer thread appends the bytes to the output, whose header was written first.

Untouched tensors are copied as raw bytes in chunks, never becoming torch tensors.
torch and the read/write syscalls release the GIL, so reading, patching and writing
overlap; memory stays near the adapters plus a few buffers.

With ``dtype`` ("fp16", "bf16", "fp32") floating tensors are converted; a patched
tensor is then rounded once, from float32 straight to the target dtype.  The output
metadata keeps the checkpoint's own and adds ``lycoris_core_bake``: the recipe as JSON.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .errors import LycorisError
from .merge import MergeError, MergeInput, Progress, ProgressFn, _version
from .patch import AdapterSpec, build_plan, module_delta, patched_value, streams
from .reader import DTYPES

CHUNK_BYTES = 4 << 20  # raw copies go through buffers of this size
RAW_BUFFERS = 4  # how far the reader may run ahead on raw copies
TENSOR_BUFFERS = 2  # whole-tensor buffers for patched or converted tensors (each sized for the largest)
BAKE_THREADS = 1  # torch threads while baking: the reader and writer threads need the other core
PREFETCH_BYTES = 16 << 20  # float32 deltas computed ahead by the delta thread (one always fits)
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
        self.write_bytes(key, memoryview(data))

    _partial = 0  # bytes of the current entry written so far

    def write_bytes(self, key: str, data) -> None:
        """Append raw bytes (a buffer) of the current entry; an entry may come in several pieces."""
        if self.index >= len(self.expected):
            raise MergeError(f"stream writer: {key} is past the last tensor")
        want_key, _dtype, _shape, nbytes = self.expected[self.index]
        view = memoryview(data).cast("B")
        if key != want_key or self._partial + view.nbytes > nbytes:
            raise MergeError(f"stream writer: got {view.nbytes} bytes of {key}, expected {want_key} "
                             f"({nbytes - self._partial} bytes left)")
        _write_all(self.fh, view)
        self._partial += view.nbytes
        if self._partial == nbytes:
            self.index += 1
            self._partial = 0

    def skip_empty(self) -> None:
        """Advance past zero-byte entries (nothing to write for them)."""
        while self.index < len(self.expected) and self.expected[self.index][3] == 0 and self._partial == 0:
            self.index += 1

    def close(self) -> None:
        self.skip_empty()
        if self.index != len(self.expected):
            self.fh.close()
            raise MergeError(f"stream writer closed after {self.index} of {len(self.expected)} tensors")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def _write_all(fh, view: memoryview) -> None:
    while view.nbytes:
        n = fh.write(view)
        if n is None or n <= 0:
            raise OSError("short write")
        view = view[n:]


def _read_into(fd: int, buf: torch.Tensor, nbytes: int, offset: int) -> None:
    view = memoryview(buf.numpy())[:nbytes]
    while view.nbytes:
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset}")
        view, offset = view[n:], offset + n


class _Pool:
    """A fixed number of reused byte buffers; ``take`` blocks until one is free."""

    def __init__(self, count: int, size: int = 0):
        self.free: queue.Queue = queue.Queue()
        for _ in range(count):
            self.free.put(torch.empty(size, dtype=torch.uint8))

    def take(self, nbytes: int) -> torch.Tensor:
        buf = self.free.get()
        if buf.numel() < nbytes:
            del buf  # release before growing: one large buffer at a time
            buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    def give(self, buf: torch.Tensor) -> None:
        self.free.put(buf)


@dataclass
class StreamItem:
    """One entry of ``stream_copy``: where its bytes are, and whether they pass through torch."""

    key: str
    dtype: str  # source dtype name
    shape: tuple[int, ...]
    offset: int  # absolute offset in the source file
    nbytes: int
    as_tensor: bool  # False: copied as raw bytes


def stream_copy(src_path: str, items: list[StreamItem], writer: StreamWriter, transform=None,
                on_written=None) -> None:
    """Copy ``items`` from ``src_path`` to ``writer`` in order, reading, transforming and writing
    in parallel (see the module docstring).

    ``transform(item, tensor)`` gets each ``as_tensor`` item as a tensor over its read buffer
    and returns what to write: the same tensor (changed in place) or a new one.  Raw items are
    copied in chunks of ``CHUNK_BYTES``.  ``on_written(item, nbytes)`` is called from this
    (the calling) thread as each piece is handed to the writer.
    """
    # sized once for the largest tensor: regrowing a buffer costs fresh pages each time
    largest = max((item.nbytes for item in items if item.as_tensor), default=0)
    raw_pool, tensor_pool = _Pool(RAW_BUFFERS, CHUNK_BYTES), _Pool(TENSOR_BUFFERS, largest)
    ready: queue.Queue = queue.Queue()
    to_write: queue.Queue = queue.Queue()
    stop = threading.Event()
    failures: list[BaseException] = []

    def read_loop(fd):
        try:
            for item in items:
                if item.as_tensor:
                    if stop.is_set():
                        return
                    if item.nbytes == 0:
                        continue  # nothing to write: the writer skips empty entries
                    buf = tensor_pool.take(item.nbytes)
                    _read_into(fd, buf, item.nbytes, item.offset)
                    ready.put((item, buf, item.nbytes, tensor_pool))
                    continue
                for start in range(0, item.nbytes, CHUNK_BYTES):
                    if stop.is_set():
                        return
                    n = min(CHUNK_BYTES, item.nbytes - start)
                    buf = raw_pool.take(n)
                    _read_into(fd, buf, n, item.offset + start)
                    ready.put((item, buf, n, raw_pool))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failures.append(exc)
        finally:
            ready.put(None)

    def write_loop():
        while True:
            job = to_write.get()
            if job is None:
                return
            key, data, nbytes, pool, buf = job
            try:
                if not failures:
                    writer.skip_empty()
                    writer.write_bytes(key, memoryview(data.numpy())[:nbytes])
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                failures.append(exc)
                stop.set()
            finally:
                if pool is not None:
                    pool.give(buf)

    fd = os.open(src_path, os.O_RDONLY)
    reader = threading.Thread(target=read_loop, args=(fd,), name="bake-reader", daemon=True)
    writing = threading.Thread(target=write_loop, name="bake-writer", daemon=True)
    reader.start()
    writing.start()
    try:
        while True:
            job = ready.get()
            if job is None:
                break
            if failures:
                job[3].give(job[1])
                continue
            item, buf, nbytes, pool = job
            if not item.as_tensor:
                to_write.put((item.key, buf, nbytes, pool, buf))
            else:
                tensor = buf[:nbytes].view(DTYPES[item.dtype][0]).reshape(item.shape)
                result = tensor if transform is None else transform(item, tensor)
                if result is tensor or result.data_ptr() == tensor.data_ptr():
                    to_write.put((item.key, buf, nbytes, pool, buf))
                else:
                    pool.give(buf)
                    flat = result.contiguous().reshape(-1).view(torch.uint8)
                    to_write.put((item.key, flat, flat.numel(), None, None))
            if on_written is not None:
                on_written(item, nbytes)
    except BaseException:
        stop.set()
        raise
    finally:
        stop.set()
        to_write.put(None)
        writing.join()
        # the writer gave every buffer back: a reader blocked in take() can finish
        while reader.is_alive():
            try:
                job = ready.get(timeout=0.1)
            except queue.Empty:
                continue
            if job is not None:
                job[3].give(job[1])
        reader.join()
        os.close(fd)
    if failures:
        raise failures[0]


class DeltaPrefetch:
    """Computes the strength-1 deltas of the keys to patch, in order, on a second thread.

    It stands in for ``patch.DeltaCache`` in ``patched_value``: ``get`` hands over the delta the
    thread computed (the same ``module_delta`` call, so the bits are the same) and frees
    its budget.  Only deltas that need no original weight are computed ahead; the others,
    and any the thread could not make, are computed on the spot.
    """

    def __init__(self, plan, keys, budget: int = PREFETCH_BYTES):
        self.budget, self.used = budget, 0
        self.ready: dict = {}
        self.cond = threading.Condition()
        self.stop = False
        self.failed: dict = {}
        self.order = [(k, c) for k in keys for c in plan.contributions.get(k, ())
                      if self.ahead(c)]
        self.planned = {self._key(c.module, c.target) for _k, c in self.order}
        self.thread = threading.Thread(target=self._run, name="bake-deltas", daemon=True)
        self.thread.start()

    @staticmethod
    def ahead(c) -> bool:
        # streamed deltas are built tile by tile inside the patch pass: nothing to do ahead
        return (not c.bias and c.strength != 0 and c.module.linear_in_strength and not c.module.uses_weight
                and not streams(c))

    @staticmethod
    def keeps(module) -> bool:
        """Streamed deltas are built in the patch pass and never kept (see ``patch.patched_value``)."""
        return False

    @staticmethod
    def _key(module, target):
        return id(module), target.weight_key, target.rows

    def _run(self):
        for _key, c in self.order:
            k = self._key(c.module, c.target)
            with self.cond:
                while self.used >= self.budget and self.ready and not self.stop:
                    self.cond.wait()
                if self.stop:
                    return
            try:
                delta = module_delta(c.module, c.target, None)
            except BaseException as exc:  # noqa: BLE001 - raised again where the delta is used
                with self.cond:
                    self.failed[k] = exc
                    self.cond.notify_all()
                continue
            with self.cond:
                self.ready[k] = delta
                self.used += delta.numel() * delta.element_size()
                self.cond.notify_all()

    def get(self, module, target, base):
        k = self._key(module, target)
        if k in self.planned:
            with self.cond:
                while k not in self.ready and k not in self.failed and self.thread.is_alive():
                    self.cond.wait(0.5)
                delta = self.ready.pop(k, None)
                if delta is not None:
                    self.used -= delta.numel() * delta.element_size()
                    self.cond.notify_all()
                self.planned.discard(k)
            if delta is not None:
                return delta
        return module_delta(module, target, base)  # raises what the thread hit, here

    def close(self):
        with self.cond:
            self.stop = True
            self.ready.clear()
            self.cond.notify_all()
        self.thread.join()


def bake_checkpoint(checkpoint: str, inputs: list[MergeInput], out_path: str | None, *,
                    dtype: str | None = None, dry_run: bool = False, overwrite: bool = False,
                    progress: ProgressFn | None = None, allow_partial: bool = False) -> BakeReport:
    """Write ``checkpoint`` with ``inputs`` baked in to ``out_path`` (see the module docstring)."""
    from .adapter import load_adapter
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

    entries, metadata, data_start = read_safetensors_header(checkpoint)
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
    items = []
    for key, out_name, shape in out_entries:
        begin, end = entries[key]["data_offsets"]
        src = entries[key]["dtype"]
        items.append(StreamItem(key, src, shape, data_start + begin, end - begin,
                                key in touched or out_name != src))
    out_dtype_of = {key: DTYPES[out_name][0] for key, out_name, _shape in out_entries}

    deltas = None

    def transform(item: StreamItem, tensor: torch.Tensor) -> torch.Tensor:
        out_dtype = out_dtype_of[item.key]
        if item.key in touched:
            if out_dtype == tensor.dtype:  # in place, in the read buffer
                return patched_value(tensor, plan.contributions[item.key], item.key, deltas, out=tensor)
            # one rounding, float32 -> output dtype
            return to_dtype(patched_value(tensor.to(torch.float32), plan.contributions[item.key], item.key,
                                          deltas), out_dtype, item.key)
        return tensor.to(out_dtype)

    bar = Progress(total_bytes, "bake", progress, unit="B")

    def advance(item: StreamItem, nbytes: int) -> None:
        # output bytes: a converted tensor comes whole, a raw copy in pieces of the same size
        bar.update(math.prod(item.shape) * DTYPES[out_names[item.key]][1] if item.as_tensor else nbytes)

    out_names = {key: name for key, name, _shape in out_entries}
    # one torch thread: the reader, writer and delta threads share the other core (two OpenMP
    # threads per op spin against them: measured 2.3x the user time for the same bake)
    threads = torch.get_num_threads()
    torch.set_num_threads(BAKE_THREADS)
    try:
        with atomic_path(out_path, overwrite) as tmp:
            writer = StreamWriter(tmp, out_entries, out_meta)
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
        torch.set_num_threads(threads)
        bar.close()
        for a in adapters:
            a.close()
    report.path = str(out_path)
    report.size_bytes = os.path.getsize(out_path)
    report.seconds = time.perf_counter() - started
    return report
