"""Write adapters into model weights at UNet/CLIP/block strengths, and restore exactly.

Owns the patch arithmetic every front end shares:
- ``build_plan`` maps a stack of adapters onto a model's weight keys (through
  ``keymap``) and records, per weight key, each module's contribution and strength;
- ``accumulate`` adds contributions into a float32 working copy: every delta in
  float32, several adapters summed in float32, deltas that depend on the original
  weight (DoRA, GLoRA, (IA)³, OFT, BOFT) computed from the *original* weight, so the
  order of a stack never matters; the caller rounds once into the weight's dtype;
- ``DeltaCache`` keeps strength-1 deltas under a byte budget so a strength change
  is one fused pass per weight instead of a rebuild;
- ``WeightPatcher`` patches a state dict or module in place and restores it
  bit-identically (from in-memory backups, or from the file the weights came from).
It never imports ComfyUI: the nodes wrap ``accumulate`` in ComfyUI's adapter interface.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .adapter import Adapter
from .algorithms import AdapterModule
from .blocks import BlockWeights, parse_block_weights
from .errors import ArchitectureMismatchError, BlockWeightError, LycorisError, WeightRangeError
from .keymap import MatchReport, Target, is_text_part, map_adapter
from .rounding import FP8_FORMATS, NARROW, check_range, to_dtype
from .tiles import WORKSPACE, RowFill, tiles


def _default_cache_bytes() -> int:
    """min(4 GiB, RAM / 6): a whole SD1.5 LoRA/LoCon's deltas fit in 4 GiB (see docs/benchmarks.md)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        ram = 16 << 30
    return min(4 << 30, ram // 6)


DEFAULT_CACHE_BYTES = _default_cache_bytes()


@dataclass
class AdapterSpec:
    """One adapter in a stack, with its strengths and optional block weights."""

    adapter: Adapter
    strength_unet: float = 1.0
    strength_clip: float = 1.0
    blocks: BlockWeights | str | Sequence[float] | None = None

    def __post_init__(self):
        self.blocks = parse_block_weights(self.blocks)


@dataclass(frozen=True, eq=False)
class Contribution:
    """One module's share of one weight (or bias) key, at its effective strength."""

    module: AdapterModule
    target: Target
    strength: float
    bias: bool = False


class DeltaCache:
    """Strength-1 float32 deltas of linear-in-strength modules, bounded in bytes.

    Patching walks every key in the same order each time, so plain LRU under a budget
    smaller than the working set would evict each delta just before it is needed again
    (0% hits).  Instead entries of the modules in the current pass (epoch) are never
    evicted: when the budget is full of them, new deltas are simply not kept, and a
    budget that covers a third of an adapter saves a third of the work.  Entries of
    modules no longer applied go first, least recently used first.
    """

    def __init__(self, budget_bytes: int = DEFAULT_CACHE_BYTES):
        self.budget = max(0, int(budget_bytes))
        self.used = 0
        self._items: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.epoch = 0
        self.hits = self.misses = 0

    def new_epoch(self, modules: Iterable[AdapterModule] = ()) -> None:
        """Call at the start of each patch pass with the pass's modules: their entries stay."""
        live = set(modules)
        with self._lock:
            self.epoch += 1
            for key, (delta, _epoch) in self._items.items():
                if key[0] in live:
                    self._items[key] = (delta, self.epoch)

    def _key(self, module: AdapterModule, target: Target, base: torch.Tensor | None) -> tuple:
        return module, target.weight_key, target.rows, _fingerprint(base) if module.uses_weight else None

    def peek(self, module: AdapterModule, target: Target, base: torch.Tensor | None) -> torch.Tensor | None:
        """The kept delta, or None (nothing is computed)."""
        key = self._key(module, target, base)
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._items[key] = (hit[0], self.epoch)
            self._items.move_to_end(key)
            self.hits += 1
            return hit[0]

    def get(self, module: AdapterModule, target: Target, base: torch.Tensor | None) -> torch.Tensor:
        """The delta, kept or computed (and kept when there is room)."""
        if not module.linear_in_strength:
            raise ValueError("only linear-in-strength deltas are cached")
        if not self.keeps(module):
            return module_delta(module, target, base)
        delta = self.peek(module, target, base)
        if delta is None:
            delta = module_delta(module, target, base)
            if self.room(delta.numel() * delta.element_size()):
                self.put(module, target, base, delta)
        return delta

    @staticmethod
    def keeps(module: AdapterModule) -> bool:
        """A cheap delta (kron, a stored diff) costs about as much to rebuild as to read back: never kept."""
        return not module.cheap_delta

    def room(self, size: int) -> bool:
        """Make room for ``size`` bytes by dropping entries of earlier passes; False if it cannot."""
        if size > self.budget:
            return False
        with self._lock:
            while self.used + size > self.budget:
                oldest_key, (oldest, epoch) = next(iter(self._items.items()))
                if epoch == self.epoch:
                    return False  # everything left is in use this pass: do not thrash
                del self._items[oldest_key]
                self.used -= oldest.numel() * oldest.element_size()
            return True

    def put(self, module: AdapterModule, target: Target, base: torch.Tensor | None, delta: torch.Tensor) -> None:
        size = delta.numel() * delta.element_size()
        key = self._key(module, target, base)
        with self._lock:
            if key not in self._items and self.used + size <= self.budget:
                self._items[key] = (delta, self.epoch)
                self.used += size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used = 0


def _fingerprint(base: torch.Tensor | None) -> bytes | None:
    """A cheap identity of an original weight, so a cached W0-dependent delta is never reused on another."""
    if base is None:
        return None
    flat = base.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 256)].to(torch.float32)
    return bytes(str(tuple(base.shape)), "ascii") + sample.cpu().numpy().tobytes()


def _base_view(target: Target, base: torch.Tensor | None) -> torch.Tensor | None:
    """The original weight as the module sees it: its rows of a fused weight, untransposed."""
    if base is None:
        return None
    if target.rows is not None:
        base = base.narrow(0, target.rows[0], target.rows[1])
    return base.t() if target.transposed else base


def module_delta(module: AdapterModule, target: Target, base: torch.Tensor | None,
                  strength: float = 1.0) -> torch.Tensor:
    """The module's delta for this target, computed on the CPU where its factors live."""
    view = _base_view(target, base)
    if view is not None and view.device.type != "cpu":
        view = view.to("cpu")
    needs = module.uses_weight
    if module.linear_in_strength:
        delta = module.delta(view if needs else None)
    else:
        delta = module.strength_delta(view, strength)
    delta = delta.reshape(target.shape)
    # contiguous once here, so every later (cached) use is a flat view, never a copy
    return (delta.t() if target.transposed else delta).contiguous()


def contribution_delta(c: Contribution, base: torch.Tensor, cache: DeltaCache | None = None,
                       scale: float = 1.0) -> tuple[torch.Tensor, float]:
    """(delta, alpha) so that adding ``alpha * delta`` applies ``c`` at its strength times ``scale``.

    Linear-in-strength deltas come at strength 1 (from the cache when given) with the
    strength as alpha; OFT/BOFT deltas are built at their strength and added once.
    """
    strength = c.strength * scale
    if c.bias:
        return c.module.bias_delta(), strength
    if c.module.linear_in_strength:
        delta = cache.get(c.module, c.target, base) if cache is not None else module_delta(c.module, c.target, base)
        return delta, strength
    return module_delta(c.module, c.target, base, strength), 1.0


def accumulate(out: torch.Tensor, base: torch.Tensor, contributions: Iterable[Contribution],
               cache: DeltaCache | None = None, scale: float = 1.0) -> torch.Tensor:
    """Add every contribution into ``out`` (float32, shaped like ``base``) in place.

    ``base`` is the original weight (any dtype): deltas that depend on it use it,
    never the running sum.  ``scale`` multiplies every strength (ComfyUI's strength_patch).
    """
    for c in contributions:
        if c.strength * scale == 0:
            continue
        rows = c.target.rows
        view = out if rows is None else out.narrow(0, rows[0], rows[1])
        delta, alpha = contribution_delta(c, base, cache, scale)
        view.add_(delta.reshape(view.shape).to(view.device), alpha=alpha)
    return out


def streams(c: Contribution) -> bool:
    """Built tile by tile while patching (see ``tiles``): a whole-weight delta that needs no W0."""
    return not c.bias and c.target.rows is None and not c.target.transposed and c.module.streams


class _Streamed(NamedTuple):
    """A delta built tile by tile during the pass; ``keep`` (or None) receives it for the cache."""

    contribution: Contribution
    fill: RowFill
    keep: torch.Tensor | None


class _Whole(NamedTuple):
    """A delta built beforehand (or cached), added over rows [first, first + len)."""

    delta: torch.Tensor  # 2-D: rows x cols of the weight
    alpha: float
    first: int


def _terms(base: torch.Tensor, rows: int, cols: int, live: Sequence[Contribution],
           cache: DeltaCache | None) -> list[_Streamed | _Whole]:
    """What the tiled pass adds, in the contributions' order (the float32 sum's order matters)."""
    terms: list[_Streamed | _Whole] = []
    for c in live:
        if streams(c):
            cacheable = cache is not None and cache.keeps(c.module)
            kept = cache.peek(c.module, c.target, base) if cacheable else None
            if kept is not None:
                terms.append(_Whole(kept.reshape(rows, cols), c.strength, 0))
                continue
            keep = None
            if cacheable and cache.room(rows * cols * 4):
                keep = torch.empty((rows, cols), dtype=torch.float32)
            terms.append(_Streamed(c, c.module.delta_fill(base), keep))
            continue
        delta, alpha = contribution_delta(c, base, cache)
        first = c.target.rows[0] if c.target.rows is not None else 0
        terms.append(_Whole(delta.reshape(-1, cols), alpha, first))
    return terms


def patched_value(base: torch.Tensor, contributions: Sequence[Contribution], key: str,
                  cache: DeltaCache | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """round(base + Σ contributions) in base's dtype, written into ``out`` when given.

    Per element this is exactly ``AdapterModule.apply``'s arithmetic (float32 copy, each
    delta added in order, one rounding), done in row tiles so the float32 sum, and the
    low-rank deltas built tile by tile, never make a round trip through memory.
    """
    live = [c for c in contributions if c.strength != 0]
    if not live:
        return base.clone() if out is None else out.copy_(base)
    if base.dtype in FP8_FORMATS or not base.is_contiguous() or base.dim() == 0:
        work = base.to(torch.float32, copy=True)  # fp8's rounding noise is drawn per tensor
        accumulate(work, base, live, cache)
        check_range(work, base.dtype, key)
        result = to_dtype(work, base.dtype, key)
        return result if out is None else out.copy_(result)
    rows = base.shape[0]
    cols = base.numel() // max(rows, 1)
    terms = _terms(base, rows, cols, live, cache)
    if out is None:
        out = torch.empty_like(base)
    src, dst = base.view(rows, cols), out.view(rows, cols)
    streamed = [t for t in terms if isinstance(t, _Streamed)]
    for start, stop in tiles(rows, cols):
        part = WORKSPACE.take("sum", (stop - start, cols))
        part.copy_(src[start:stop])
        for term in terms:
            if isinstance(term, _Streamed):
                tile = WORKSPACE.take("delta", part.shape)
                term.fill(start, stop, tile)
                if term.keep is not None:
                    term.keep[start:stop].copy_(tile)
                part.add_(tile, alpha=term.contribution.strength)
            else:
                lo, hi = max(start, term.first), min(stop, term.first + term.delta.shape[0])
                if lo < hi:
                    part[lo - start : hi - start].add_(term.delta[lo - term.first : hi - term.first], alpha=term.alpha)
        _check_tile(part, base.dtype, key, streamed, start, stop)
        dst[start:stop].copy_(part)
    for term in streamed:
        if term.keep is not None:
            c = term.contribution
            cache.put(c.module, c.target, base, term.keep.view(c.target.shape))
    return out


def _check_tile(part: torch.Tensor, dtype: torch.dtype, key: str, streamed: Sequence[_Streamed],
                start: int, stop: int) -> None:
    """One check per tile for the whole sum: a non-finite delta makes the sum non-finite.

    Only when the sum fails are the tile's streamed deltas rebuilt and checked one by
    one, so an overflowing adapter is named as the whole-delta path names it.
    """
    try:
        if dtype in NARROW:
            check_range(part, dtype, key)
        elif streamed and not math.isfinite(float(part.sum())):
            raise WeightRangeError(f"{key}: patched values are not finite")
    except WeightRangeError:
        for term in streamed:
            tile = WORKSPACE.take("delta", part.shape)
            term.fill(start, stop, tile)
            term.contribution.module._finite(tile)
        if dtype in NARROW:
            raise  # the weight itself, or the sum, is out of range
        # the float32 sum overflowed from finite deltas: the whole-delta path writes it as is, and so do we


@dataclass
class PatchPlan:
    """A stack of adapters mapped onto one model: contributions per weight/bias key."""

    specs: list[AdapterSpec]
    reports: list[MatchReport]
    contributions: dict[str, list[Contribution]] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self.contributions)

    def __contains__(self, key: str) -> bool:
        return key in self.contributions

    def delta(self, key: str, base: torch.Tensor, cache: DeltaCache | None = None) -> torch.Tensor:
        """float32 sum of every contribution to ``key`` (patched - original, before rounding)."""
        return accumulate(torch.zeros(base.shape, dtype=torch.float32), base, self.contributions[key], cache)

    def patched(self, key: str, base: torch.Tensor, cache: DeltaCache | None = None) -> torch.Tensor:
        """The patched tensor for ``key`` in base's dtype (fp8: seeded stochastic rounding)."""
        return patched_value(base, self.contributions.get(key, ()), key, cache)

    def summary(self) -> list[str]:
        return [f"{spec.adapter.name}: {report.summary()}" for spec, report in zip(self.specs, self.reports)]

    def blocks_touched(self) -> list[list[str]]:
        return [report.blocks_touched() for report in self.reports]


def contribution_strength(spec: AdapterSpec, target: Target, weights: dict[str, float] | None) -> float:
    """UNet strength x block weight, or CLIP strength x BASE weight; modules outside blocks take plain strength.

    The UNet/diffusion-model strength applies to every non-text part, the CLIP strength to every text encoder.
    """
    if not is_text_part(target.part):
        if weights is None or target.block is None:
            return spec.strength_unet
        return spec.strength_unet * weights.get(target.block, 0.0)
    base_weight = 1.0 if weights is None else weights.get("BASE", 0.0)
    return spec.strength_clip * base_weight


def build_plan(specs: Sequence[AdapterSpec], shapes: Mapping[str, tuple[int, ...]],
               allow_partial: bool = False) -> PatchPlan:
    """Map each adapter onto ``shapes`` (key -> shape) and collect contributions per key.

    Raises ``ArchitectureMismatchError`` for an adapter made for another model, and
    ``BlockWeightError`` for block weights that do not fit the model, before anything changes.
    """
    specs = list(specs)
    plan = PatchPlan(specs, [])
    for spec in specs:
        try:
            report = map_adapter(spec.adapter.modules, shapes, allow_partial=allow_partial)
            weights = spec.blocks.resolve(report.model_arch) if spec.blocks is not None else None
        except (ArchitectureMismatchError, BlockWeightError) as exc:
            raise type(exc)(f"{spec.adapter.name}: {exc}") from exc
        plan.reports.append(report)
        for name, target in report.targets.items():
            module = spec.adapter.modules[name]
            strength = contribution_strength(spec, target, weights)
            plan.contributions.setdefault(target.weight_key, []).append(Contribution(module, target, strength))
            if module.has_bias and target.bias_key is not None:
                plan.contributions.setdefault(target.bias_key, []).append(
                    Contribution(module, target, strength, bias=True)
                )
    return plan


class WeightPatcher:
    """Patch weights in place from a stack of adapters; restore them bit-identically.

    ``weights`` is a mutable mapping of key -> tensor or an ``nn.Module``.  Originals
    come back from ``restore_from`` (a ``TensorSource`` of the file the weights were
    loaded from: no copies kept in memory) or, without it, from in-memory backups of
    the touched tensors.  Every ``apply`` starts from the originals, so any sequence
    of applies, strength changes and restores ends bit-identical.  If an apply fails
    halfway, every weight is restored before the error propagates.
    """

    def __init__(self, weights, *, cache_bytes: int = DEFAULT_CACHE_BYTES, restore_from=None,
                 model_shapes: Mapping[str, tuple[int, ...]] | None = None):
        if isinstance(weights, torch.nn.Module):
            weights = dict(weights.state_dict(keep_vars=True))
        self.weights: MutableMapping[str, torch.Tensor] = weights
        # the whole model's key -> shape, when ``weights`` holds only the part to patch
        self.shapes = dict(model_shapes) if model_shapes is not None else {k: tuple(v.shape) for k, v in weights.items()}
        self.cache = DeltaCache(cache_bytes)
        self.restore_from = restore_from
        self._backups: dict[str, torch.Tensor] = {}
        self._patched: set[str] = set()
        self.plan: PatchPlan | None = None

    def original(self, key: str) -> torch.Tensor:
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
        live = self.weights[key]
        if self.restore_from is None:
            self._backups[key] = live.detach().clone()
        else:
            source = self._source_tensor(key)
            flat_live, flat_src = live.detach().reshape(-1), source.reshape(-1)
            step = max(1, flat_live.numel() // 64)
            if not torch.equal(flat_live[::step], flat_src[::step]):
                raise LycorisError(f"restore source {self.restore_from.name} does not hold this model's {key}")
        self._patched.add(key)

    @torch.no_grad()
    def apply(self, specs: Sequence[AdapterSpec], allow_partial: bool = False, progress=None) -> PatchPlan:
        """Patch the weights for this stack (replacing any earlier stack)."""
        plan = build_plan(specs, self.shapes, allow_partial=allow_partial)
        self.cache.new_epoch(c.module for cs in plan.contributions.values() for c in cs)
        missing = [k for k in plan.keys() if k not in self.weights]
        if missing:
            raise LycorisError(f"{len(missing)} patched keys are not among the weights given, e.g. {missing[0]}")
        stale = self._patched - set(plan.keys())
        keys = plan.keys()
        try:
            for i, key in enumerate(keys):
                self._remember(key)
                live = self.weights[key]
                patched_value(self.original(key), plan.contributions[key], key, self.cache, out=live.detach())
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
        self._patched.discard(key)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every original weight back, bit-identical."""
        for key in list(self._patched):
            self._restore_key(key)
        self.plan = None
