"""Where the patch kernel gets whole deltas: the strength-1 delta cache, or any ``DeltaSource``.

A strength change re-adds the same strength-1 deltas at new strengths, so keeping them
turns a rebuild into one pass per weight.  Whether that pays depends on the device:

* **CPU weights**: a rank-32 rebuild costs ~64 FLOP per element against 4 bytes read
  back from RAM, so for a standalone patcher (``WeightPatcher``: the panel's strength
  slider) keeping deltas wins, default ``DEFAULT_CACHE_BYTES`` (see docs/benchmarks.md,
  "Patch").  Inside ComfyUI every patch also pays ComfyUI's own float32 copy of each
  weight, so there it does not pay back the cost of filling it, and the nodes keep none
  unless ``LYCORIS_CACHE_MB`` asks ("Real ComfyUI").  Whatever the budget, the cache
  never takes memory below the system's reserve (``lycoris_core.memory``): it gives back
  entries of earlier passes first, and keeps nothing when memory is short.
* **Accelerator weights**: the same rebuild is microseconds of GPU time, and VRAM is the
  user's scarcest resource, so nothing is kept by default (``device_budget`` 0); host RAM
  never holds deltas of GPU weights, which would mean a weight-sized copy over PCIe.

Identity: a delta that depends on the original weight (DoRA, GLoRA, (IA)³) is kept only
under an ``identity`` the caller vouches for (the same original weight, exactly: e.g. a
patcher's own backups); without one it is rebuilt every time.  So a kept delta is never
used on another weight.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Protocol

import torch

from .. import memory
from ..algorithms import AdapterModule
from ..keymap import Target

DEFAULT_CACHE_BYTES = min(4 << 30, memory.total_bytes() // 6)  # a whole SD1.5 LoRA's deltas fit in 4 GiB


class DeltaSource(Protocol):
    """What the patch kernel asks of a delta store (``DeltaCache``; bake's prefetcher).

    The kernel builds every delta it is not handed, so a source that keeps nothing is
    ``peek`` -> None, ``reserve`` -> False.
    """

    def peek(self, module: AdapterModule, target: Target, identity: Hashable | None = None) -> torch.Tensor | None:
        """A strength-1 delta for ``target`` kept (or prepared) earlier, or None."""

    def reserve(self, module: AdapterModule, target: Target, identity: Hashable | None, nbytes: int,
                device: torch.device) -> bool:
        """Will a delta of ``nbytes`` on ``device`` be kept?  (Makes room for it when so.)"""

    def put(self, module: AdapterModule, target: Target, identity: Hashable | None, delta: torch.Tensor) -> None:
        """Keep a delta that ``reserve`` agreed to."""


class DeltaCache:
    """Strength-1 float32 deltas of linear-in-strength modules, bounded in bytes.

    Patching walks every key in the same order each time, so plain LRU under a budget
    smaller than the working set would evict each delta just before it is needed again
    (0% hits).  Instead entries of the modules in the current pass (epoch) are never
    evicted: when the budget is full of them, new deltas are simply not kept, and a
    budget that covers a third of an adapter saves a third of the work.  Entries of
    modules no longer applied go first, least recently used first.
    """

    def __init__(self, budget_bytes: int = DEFAULT_CACHE_BYTES, device_budget_bytes: int = 0):
        self.budget = max(0, int(budget_bytes))
        self.device_budget = max(0, int(device_budget_bytes))
        self.used = 0  # host bytes
        self.device_used = 0
        self._items: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.epoch = 0
        self.hits = self.misses = 0

    def new_epoch(self, modules: Iterable[AdapterModule] = ()) -> None:
        """Call at the start of each patch pass with the pass's modules: their entries stay.

        Also gives memory back when the system is short of it (entries of earlier passes first).
        """
        live = set(modules)
        with self._lock:
            self.epoch += 1
            for key, (delta, _epoch) in self._items.items():
                if key[0] in live:
                    self._items[key] = (delta, self.epoch)
            self._shrink_to_spare()

    @staticmethod
    def _key(module: AdapterModule, target: Target, identity: Hashable | None) -> tuple:
        return module, target.weight_key, target.rows, identity if module.uses_weight else None

    def keeps(self, module: AdapterModule, device: torch.device | str = "cpu") -> bool:
        """Deltas worth keeping: not cheap to rebuild (kron, a stored diff), on a device with a budget."""
        budget = self.budget if torch.device(device).type == "cpu" else self.device_budget
        return budget > 0 and not module.cheap_delta

    def _keyable(self, module: AdapterModule, identity: Hashable | None) -> bool:
        return not module.uses_weight or identity is not None

    def peek(self, module: AdapterModule, target: Target, identity: Hashable | None = None) -> torch.Tensor | None:
        """The kept delta, or None (nothing is computed)."""
        if not self._keyable(module, identity):
            return None
        key = self._key(module, target, identity)
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._items[key] = (hit[0], self.epoch)
            self._items.move_to_end(key)
            self.hits += 1
            return hit[0]

    def reserve(self, module: AdapterModule, target: Target, identity: Hashable | None, nbytes: int,
                device: torch.device) -> bool:
        return (self.keeps(module, device) and self._keyable(module, identity)
                and self.room(nbytes, device))

    def room(self, size: int, device: torch.device | str = "cpu") -> bool:
        """Make room for ``size`` bytes by dropping entries of earlier passes; False if it cannot.

        On the host the room is also bounded by the memory free above the system's reserve.
        """
        host = torch.device(device).type == "cpu"
        budget = self.budget if host else self.device_budget
        if size > budget:
            return False
        with self._lock:
            spare = memory.spare_bytes() if host else budget
            while (self.used if host else self.device_used) + size > budget or size > spare:
                freed = self._evict_one(host)
                if freed is None:
                    return False  # everything left is in use this pass: do not thrash
                spare += freed
            return True

    def _evict_one(self, host: bool) -> int | None:
        """Drop the least recently used entry of an earlier pass on the host (or a device); its size."""
        for key, (delta, epoch) in self._items.items():
            if epoch == self.epoch:
                return None
            if (delta.device.type == "cpu") == host:
                del self._items[key]
                return self._account(delta, -1)
        return None

    def _account(self, delta: torch.Tensor, sign: int) -> int:
        size = delta.numel() * delta.element_size()
        if delta.device.type == "cpu":
            self.used += sign * size
        else:
            self.device_used += sign * size
        return size

    def _shrink_to_spare(self) -> None:
        """Give back entries of earlier passes until the host is above its reserve again."""
        deficit = memory.reserve_bytes() - memory.available_bytes()
        while deficit > 0:
            freed = self._evict_one(host=True)
            if freed is None:
                return
            deficit -= freed

    def put(self, module: AdapterModule, target: Target, identity: Hashable | None, delta: torch.Tensor) -> None:
        if not self._keyable(module, identity):
            return
        size = delta.numel() * delta.element_size()
        key = self._key(module, target, identity)
        host = delta.device.type == "cpu"
        with self._lock:
            used, budget = (self.used, self.budget) if host else (self.device_used, self.device_budget)
            if key not in self._items and used + size <= budget:
                self._items[key] = (delta, self.epoch)
                self._account(delta, +1)

    def clear(self) -> None:
        """Drop every entry (e.g. when the application unloads models to free memory)."""
        with self._lock:
            self._items.clear()
            self.used = self.device_used = 0
