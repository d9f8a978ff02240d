"""Safetensors files streamed tensor by tensor: written header first, copied with overlapping I/O.

``StreamWriter`` writes a file whose header is known up front, so tensors (or raw byte
ranges) can be appended as they are produced and a 23 GB checkpoint never sits in
memory.  ``stream_copy`` copies entries from a source file to a writer through three
threads: a reader ``pread``s ahead into a few reused buffers (no memory map, no
per-tensor allocation: fresh large allocations cost page faults), the calling thread
transforms the entries that need it in their read buffer, and a writer thread appends
the bytes.  torch and the read/write syscalls release the GIL, so the three overlap.
Untouched entries are copied as raw bytes in chunks, never becoming tensors.

Owns byte movement only: what a transform does to a tensor is the caller's business.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from dataclasses import dataclass

import torch

from .reader import DTYPES
from .writer import WriteError

CHUNK_BYTES = 4 << 20  # raw copies go through buffers of this size
RAW_BUFFERS = 4  # how far the reader may run ahead on raw copies
TENSOR_BUFFERS = 2  # whole-tensor buffers for transformed tensors (each sized for the largest)
NAME_OF = {v[0]: k for k, v in DTYPES.items()}  # torch dtype -> safetensors dtype name


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
        if key != want_key or NAME_OF[tensor.dtype] != dtype or tuple(tensor.shape) != shape:
            raise WriteError(f"stream writer: got {key} {tensor.dtype} {tuple(tensor.shape)}, "
                             f"expected {want_key} {dtype} {shape}")
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise WriteError(f"stream writer: {key} has {data.nbytes} bytes, expected {nbytes}")
        self.write_bytes(key, memoryview(data))

    _partial = 0  # bytes of the current entry written so far

    def write_bytes(self, key: str, data) -> None:
        """Append raw bytes (a buffer) of the current entry; an entry may come in several pieces."""
        if self.index >= len(self.expected):
            raise WriteError(f"stream writer: {key} is past the last tensor")
        want_key, _dtype, _shape, nbytes = self.expected[self.index]
        view = memoryview(data).cast("B")
        if key != want_key or self._partial + view.nbytes > nbytes:
            raise WriteError(f"stream writer: got {view.nbytes} bytes of {key}, expected {want_key} "
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
            raise WriteError(f"stream writer closed after {self.index} of {len(self.expected)} tensors")
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
    _StreamCopy(items, writer).run(src_path, transform, on_written)


class _StreamCopy:
    """The three threads of one ``stream_copy``: reader, the caller's transform, writer."""

    def __init__(self, items: list[StreamItem], writer: StreamWriter):
        self.items, self.writer = items, writer
        # sized once for the largest tensor: regrowing a buffer costs fresh pages each time
        largest = max((item.nbytes for item in items if item.as_tensor), default=0)
        self.raw_pool, self.tensor_pool = _Pool(RAW_BUFFERS, CHUNK_BYTES), _Pool(TENSOR_BUFFERS, largest)
        self.ready: queue.Queue = queue.Queue()  # (item, buffer, nbytes, pool) read, or None at the end
        self.to_write: queue.Queue = queue.Queue()  # (key, data, nbytes, pool, buffer), or None to stop
        self.stop = threading.Event()
        self.failures: list[BaseException] = []

    def read_loop(self, fd: int) -> None:
        try:
            for item in self.items:
                if item.as_tensor:
                    if self.stop.is_set():
                        return
                    if item.nbytes == 0:
                        continue  # nothing to write: the writer skips empty entries
                    buf = self.tensor_pool.take(item.nbytes)
                    _read_into(fd, buf, item.nbytes, item.offset)
                    self.ready.put((item, buf, item.nbytes, self.tensor_pool))
                    continue
                for start in range(0, item.nbytes, CHUNK_BYTES):
                    if self.stop.is_set():
                        return
                    n = min(CHUNK_BYTES, item.nbytes - start)
                    buf = self.raw_pool.take(n)
                    _read_into(fd, buf, n, item.offset + start)
                    self.ready.put((item, buf, n, self.raw_pool))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.failures.append(exc)
        finally:
            self.ready.put(None)

    def write_loop(self) -> None:
        while True:
            job = self.to_write.get()
            if job is None:
                return
            key, data, nbytes, pool, buf = job
            try:
                if not self.failures:
                    self.writer.skip_empty()
                    self.writer.write_bytes(key, memoryview(data.numpy())[:nbytes])
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.failures.append(exc)
                self.stop.set()
            finally:
                if pool is not None:
                    pool.give(buf)

    def hand_over(self, job, transform) -> None:
        """One read piece to the writer, transformed first when it is a whole tensor."""
        item, buf, nbytes, pool = job
        if not item.as_tensor:
            self.to_write.put((item.key, buf, nbytes, pool, buf))
            return
        tensor = buf[:nbytes].view(DTYPES[item.dtype][0]).reshape(item.shape)
        result = tensor if transform is None else transform(item, tensor)
        if result is tensor or result.data_ptr() == tensor.data_ptr():
            self.to_write.put((item.key, buf, nbytes, pool, buf))
        else:
            pool.give(buf)
            flat = result.contiguous().reshape(-1).view(torch.uint8)
            self.to_write.put((item.key, flat, flat.numel(), None, None))

    def run(self, src_path: str, transform, on_written) -> None:
        fd = os.open(src_path, os.O_RDONLY)
        reader = threading.Thread(target=self.read_loop, args=(fd,), name="stream-reader", daemon=True)
        writing = threading.Thread(target=self.write_loop, name="stream-writer", daemon=True)
        reader.start()
        writing.start()
        try:
            while (job := self.ready.get()) is not None:
                if self.failures:
                    job[3].give(job[1])
                    continue
                self.hand_over(job, transform)
                if on_written is not None:
                    on_written(job[0], job[2])
        finally:
            self.stop.set()
            self.to_write.put(None)
            writing.join()
            # the writer gave every buffer back: a reader blocked in take() can finish
            while reader.is_alive():
                try:
                    job = self.ready.get(timeout=0.1)
                except queue.Empty:
                    continue
                if job is not None:
                    job[3].give(job[1])
            reader.join()
            os.close(fd)
        if self.failures:
            raise self.failures[0]
