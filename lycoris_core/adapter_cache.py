"""Loaded adapters shared across nodes, front ends and strength changes.

An ``Adapter`` holds only a validated header and lazily read tensors, so keeping it
costs little; keeping the *same object* is what matters: ``patch.DeltaCache`` keys its
strength-1 deltas by module object, so a slider change on a cached adapter rebuilds
nothing.  Entries are keyed by (real path, size, mtime_ns): a file replaced on disk is
read again.  The budget counts the adapters' file sizes, least recently used first out.
Thread-safe (ComfyUI runs nodes on a worker thread and HTTP handlers on the event loop).
Pure core: never imports ComfyUI.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable

from .adapter import Adapter, load_adapter

DEFAULT_ADAPTER_CACHE_BYTES = 4 << 30  # 4 GiB of adapter files


def file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    """(real path, size, mtime_ns) of a file; raises OSError if it is missing."""
    real = os.path.realpath(os.fspath(path))
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns


class AdapterCache:
    """LRU of loaded adapters, bounded by the sum of their file sizes in bytes."""

    def __init__(self, budget_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES,
                 loader: Callable[[str], Adapter] = load_adapter):
        self.budget = max(0, int(budget_bytes))
        self.used = 0
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

    def get(self, path: str | os.PathLike) -> Adapter:
        """The adapter at ``path``, loaded once per (path, size, mtime)."""
        key = file_key(path)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
            stale = [k for k in self._items if k[0] == key[0]]
            for k in stale:  # the same file, changed on disk: the old entry can never hit again
                self._drop(k)
        adapter = self._loader(key[0])  # outside the lock: reading a header may take a moment
        size = key[1]
        with self._lock:
            if key in self._items:  # another thread loaded it meanwhile; keep one object
                self._items.move_to_end(key)
                return self._items[key]
            if size <= self.budget:
                while self.used + size > self.budget and self._items:
                    self._drop(next(iter(self._items)))
                self._items[key] = adapter
                self.used += size
        return adapter

    def _drop(self, key) -> None:
        # evicted adapters are not closed: patches still held by a model may read them later
        self._items.pop(key)
        self.used -= key[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used = 0


def budget_from_env(var: str, default_bytes: int) -> int:
    """A byte budget from an environment variable in MiB (blank or invalid -> default)."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default_bytes
    try:
        return max(0, int(float(raw) * (1 << 20)))
    except ValueError:
        return default_bytes
