"""Loaded adapters shared across nodes, front ends and strength changes.

An ``Adapter`` holds only a validated header and lazily read tensors, so keeping it
costs little; keeping the *same object* is what matters: ``patch.DeltaCache`` keys its
strength-1 deltas by module object, and factors moved to an accelerator stay on the
module, so a slider change on a cached adapter rebuilds and uploads nothing.  Entries
are keyed by (real path, size, mtime_ns): a file replaced on disk is read again.  The
budget counts each adapter's file size plus its factors kept on accelerators; least
recently used first out, and an evicted adapter gives back its device copies and file
handles (patches still held by a model simply read it again).  Thread-safe (ComfyUI
runs nodes on a worker thread and HTTP handlers on the event loop).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable

from .load import Adapter, load_adapter

DEFAULT_ADAPTER_CACHE_BYTES = 2 << 30  # 2 GiB of adapter files and their device copies


def file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    """(real path, size, mtime_ns) of a file; raises OSError if it is missing."""
    real = os.path.realpath(os.fspath(path))
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns


class AdapterCache:
    """LRU of loaded adapters, bounded by their file sizes plus their accelerator copies, in bytes."""

    def __init__(self, budget_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES,
                 loader: Callable[[str], Adapter] = load_adapter):
        self.budget = max(0, int(budget_bytes))
        self.hits = self.misses = 0
        self._loader = loader
        self._items: OrderedDict[tuple[str, int, int], Adapter] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, path) -> bool:
        try:
            return file_key(path) in self._items
        except OSError:
            return False

    @property
    def used(self) -> int:
        """Bytes counted against the budget now (device copies grow as adapters are used)."""
        return sum(key[1] + adapter.resident_bytes for key, adapter in self._items.items())

    def get(self, path: str | os.PathLike) -> Adapter:
        """The adapter at ``path``, loaded once per (path, size, mtime)."""
        key = file_key(path)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                self._trim(keep=key)
                return hit
            self.misses += 1
            for stale in [k for k in self._items if k[0] == key[0]]:  # the same file, changed on disk
                self._drop(stale)
        adapter = self._loader(key[0])  # outside the lock: reading a header may take a moment
        with self._lock:
            if key in self._items:  # another thread loaded it meanwhile; keep one object
                self._items.move_to_end(key)
                return self._items[key]
            if key[1] <= self.budget:
                self._items[key] = adapter
                self._trim(keep=key)
        return adapter

    def _trim(self, keep) -> None:
        """Drop least recently used adapters (never ``keep``) until the budget holds."""
        while self.used > self.budget:
            oldest = next((k for k in self._items if k != keep), None)
            if oldest is None:
                return
            self._drop(oldest)

    def _drop(self, key) -> None:
        adapter = self._items.pop(key)
        adapter.release()  # its accelerator copies
        adapter.close()  # file handles; reading again reopens them

    def release_devices(self) -> None:
        """Give back every factor kept on an accelerator (the application needs the memory)."""
        with self._lock:
            for adapter in self._items.values():
                adapter.release()

    def clear(self) -> None:
        with self._lock:
            for key in list(self._items):
                self._drop(key)
