"""Patch a state dict or module in place from a stack of adapters, and restore it bit-identically.

The standalone front end of the patch kernel (ComfyUI keeps its own backups and calls
the kernel through ``nodes/``).  Weights are patched where they live: the kernel runs
on each weight's device.  Originals come back from the file the weights were loaded
from (``restore_from``: nothing kept in memory) or from backups of the touched tensors,
kept on the CPU for accelerator weights (VRAM holds only the patched weights, as in
ComfyUI) or beside the weight when ``backup_device="same"``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, MutableMapping, Sequence

import torch

from ..errors import LycorisError
from .cache import DEFAULT_CACHE_BYTES, DeltaCache
from .kernel import patched_value
from .plan import AdapterSpec, PatchPlan, build_plan

_TOKENS = itertools.count()


class WeightPatcher:
    """Patch weights in place from a stack of adapters; restore them bit-identically.

    ``weights`` is a mutable mapping of key -> tensor or an ``nn.Module``.  Every
    ``apply`` starts from the originals, so any sequence of applies, strength changes and
    restores ends bit-identical.  If an apply fails halfway, every weight is restored
    before the error propagates.
    """

    def __init__(self, weights, *, cache_bytes: int = DEFAULT_CACHE_BYTES, restore_from=None,
                 model_shapes: Mapping[str, tuple[int, ...]] | None = None, backup_device: str = "cpu",
                 device_cache_bytes: int = 0):
        if isinstance(weights, torch.nn.Module):
            weights = dict(weights.state_dict(keep_vars=True))
        self.weights: MutableMapping[str, torch.Tensor] = weights
        # the whole model's key -> shape, when ``weights`` holds only the part to patch
        self.shapes = dict(model_shapes) if model_shapes is not None else {k: tuple(v.shape) for k, v in weights.items()}
        self.cache = DeltaCache(cache_bytes, device_cache_bytes)
        self.restore_from = restore_from
        if backup_device not in ("cpu", "same"):
            raise ValueError(f"backup_device must be 'cpu' or 'same', not {backup_device!r}")
        self.backup_device = backup_device
        self._backups: dict[str, torch.Tensor] = {}
        self._patched: dict[str, int] = {}  # key -> generation of its original (the cache's identity)
        self._token = next(_TOKENS)
        self.plan: PatchPlan | None = None

    def original(self, key: str) -> torch.Tensor:
        """The unpatched tensor (a backup, the file's tensor, or the live one when untouched)."""
        if key in self._backups:
            return self._backups[key]
        if key not in self._patched:
            return self.weights[key]
        return self._source_tensor(key)

    def _source_tensor(self, key: str) -> torch.Tensor:
        source = self.restore_from
        tensor = source.mmap_tensor(key) if hasattr(source, "mmap_tensor") else source[key]
        live = self.weights[key]
        if tensor.shape != live.shape or tensor.dtype != live.dtype:
            raise LycorisError(f"restore source {source.name} has {key} as {tuple(tensor.shape)} {tensor.dtype}, "
                               f"the model has {tuple(live.shape)} {live.dtype}")
        return tensor

    def _remember(self, key: str) -> None:
        if key in self._patched:
            return
        live = self.weights[key].detach()
        if self.restore_from is None:
            keep_here = self.backup_device == "same" or live.device.type == "cpu"
            self._backups[key] = live.clone() if keep_here else live.to("cpu", copy=True)
        else:
            flat_src = self._source_tensor(key).reshape(-1)
            step = max(1, flat_src.numel() // 64)
            sample = flat_src[::step].to(live.device)  # a few values up, never the weight down
            if not bool((live.reshape(-1)[::step] == sample).all()):  # one sync (NaN-free: the file was read)
                raise LycorisError(f"restore source {self.restore_from.name} does not hold this model's {key}")
        self._patched[key] = next(_TOKENS)

    def _base(self, key: str) -> torch.Tensor:
        """The original on the live weight's device, for the kernel."""
        original, live = self.original(key), self.weights[key]
        return original if original.device == live.device else original.to(live.device, non_blocking=True)

    @torch.no_grad()
    def apply(self, specs: Sequence[AdapterSpec], allow_partial: bool = False, progress=None) -> PatchPlan:
        """Patch the weights for this stack (replacing any earlier stack)."""
        plan = build_plan(specs, self.shapes, allow_partial=allow_partial)
        self.cache.new_epoch(c.module for cs in plan.contributions.values() for c in cs)
        missing = [k for k in plan.keys() if k not in self.weights]
        if missing:
            raise LycorisError(f"{len(missing)} patched keys are not among the weights given, e.g. {missing[0]}")
        stale = set(self._patched) - set(plan.keys())
        keys = plan.keys()
        try:
            for i, key in enumerate(keys):
                live = self.weights[key].detach()
                untouched = key not in self._patched  # the live weight is the original: no copy to read
                self._remember(key)
                identity = (self._token, key, self._patched[key])
                patched_value(live if untouched else self._base(key), plan.contributions[key], key, self.cache,
                              out=live, identity=identity)
                if progress:
                    progress(i + 1, len(keys), "patching")
            for key in stale:
                self._restore_key(key)
        except BaseException:
            self.restore()
            raise
        self.plan = plan
        return plan

    def _restore_key(self, key: str) -> None:
        self.weights[key].detach().copy_(self.original(key))
        self._backups.pop(key, None)
        self._patched.pop(key, None)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every original weight back, bit-identical."""
        for key in list(self._patched):
            self._restore_key(key)
        self.plan = None
