"""The one patch kernel: round(W0 + Σ sᵢ·ΔWᵢ) per weight, on the weight's device, in row tiles.

Every front end goes through here — the standalone ``WeightPatcher``, the ComfyUI patch
object, bake and merge's summed delta — so they agree bit for bit:

* ``patched_value(base, contributions, key)``: the patched tensor in base's dtype (or
  another), written into ``out`` when given (may be ``base`` itself);
* ``accumulate(work, base, contributions)``: adds into a working copy in place (ComfyUI's
  float32 copy, or its fp16/bf16 copy in low-VRAM mode: summed in float32, rounded once).

Per tile of output rows: the float32 rows of the source, every contribution added in the
order given (the float32 sum's order matters), then the rows written back with one
rounding.  Low-rank deltas are built tile by tile into a reused buffer and added while
still in cache (``numerics.tiles``: the tile size is the device's); deltas that need
the whole original weight (GLoRA, (IA)³, OFT/BOFT, DoRA on the input axis) or land on a
row slice of a fused weight are built whole first.  Deltas that depend on the original
weight always read the *original* (never the running sum), so a stack's order never
changes the result.  Whether the result fits the destination dtype is checked on the
device for the whole weight and answered with one host sync; when it does not, the
contributions are checked one by one so the adapter at fault is named.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..algorithms import AdapterModule
from ..keymap import Target
from ..numerics.checks import RangeCheck
from ..numerics.rounding import FP8_FORMATS, range_error, to_dtype
from ..numerics.tiles import WORKSPACE, RowFill, tiles
from .cache import DeltaSource

if TYPE_CHECKING:
    from .plan import Contribution


def _base_view(target: Target, base: torch.Tensor | None) -> torch.Tensor | None:
    """The original weight as the module sees it: its rows of a fused weight, untransposed."""
    if base is None:
        return None
    if target.rows is not None:
        base = base.narrow(0, target.rows[0], target.rows[1])
    return base.t() if target.transposed else base


def module_delta(module: AdapterModule, target: Target, base: torch.Tensor | None,
                 strength: float = 1.0, device=None) -> torch.Tensor:
    """The module's float32 delta for this target, built on base's device (or ``device``).

    Not checked for finiteness here: the kernel checks the whole sum once.
    """
    view = _base_view(target, base)
    device = base.device if base is not None else device
    if module.linear_in_strength:
        delta = module.raw_delta(view if module.uses_weight else None, device)
    else:
        delta = module.raw_strength_delta(view, strength, device)
    delta = delta.reshape(target.shape)
    # contiguous once here, so every later (cached) use is a flat view, never a copy
    return (delta.t() if target.transposed else delta).contiguous()


def contribution_delta(c: Contribution, base: torch.Tensor, source: DeltaSource | None = None,
                       scale: float = 1.0, identity: Hashable | None = None) -> tuple[torch.Tensor, float]:
    """(delta, alpha) so that adding ``alpha * delta`` applies ``c`` at its strength times ``scale``.

    Linear-in-strength deltas come at strength 1 (from ``source`` when it has them) with the
    strength as alpha; OFT/BOFT deltas are built at their strength and added once.
    """
    strength = c.strength * scale
    if c.bias:
        return c.module.bias_delta(base.device), strength
    if not c.module.linear_in_strength:
        return module_delta(c.module, c.target, base, strength), 1.0
    delta = source.peek(c.module, c.target, identity) if source is not None else None
    if delta is None:
        delta = module_delta(c.module, c.target, base)
        if source is not None and source.reserve(c.module, c.target, identity,
                                                 delta.numel() * delta.element_size(), delta.device):
            source.put(c.module, c.target, identity, delta)
    return delta, strength


def streams(c: Contribution) -> bool:
    """Built tile by tile while patching (see ``numerics.tiles``): a whole-weight delta (no slice)."""
    return not c.bias and c.target.rows is None and not c.target.transposed and c.module.streams


class _Streamed(NamedTuple):
    """A delta built tile by tile during the pass; ``keep`` (or None) receives it for the cache."""

    contribution: Contribution
    fill: RowFill
    alpha: float
    keep: torch.Tensor | None


class _Whole(NamedTuple):
    """A delta built beforehand (or kept), added over rows [first, first + len)."""

    delta: torch.Tensor  # 2-D: rows x cols of the weight
    alpha: float
    first: int
    contribution: Contribution


def _terms(base: torch.Tensor, rows: int, cols: int, live: Sequence[Contribution], source: DeltaSource | None,
           scale: float, identity: Hashable | None) -> list[_Streamed | _Whole]:
    """What the tiled pass adds, in the contributions' order."""
    terms: list[_Streamed | _Whole] = []
    for c in live:
        if streams(c):
            kept = source.peek(c.module, c.target, identity) if source is not None else None
            if kept is not None:
                terms.append(_Whole(kept.reshape(rows, cols), c.strength * scale, 0, c))
                continue
            keep = None
            if source is not None and source.reserve(c.module, c.target, identity, rows * cols * 4, base.device):
                keep = torch.empty((rows, cols), dtype=torch.float32, device=base.device)
            terms.append(_Streamed(c, c.module.delta_fill(base if c.module.uses_weight else None, base.device),
                                   c.strength * scale, keep))
            continue
        delta, alpha = contribution_delta(c, base, source, scale, identity)
        first = c.target.rows[0] if c.target.rows is not None else 0
        terms.append(_Whole(delta.reshape(-1, cols), alpha, first, c))
    return terms


def _tile_pass(src: torch.Tensor, dst: torch.Tensor, base: torch.Tensor, live: Sequence[Contribution], key: str,
               source: DeltaSource | None, scale: float, identity: Hashable | None,
               check_dtype: torch.dtype | None = None) -> None:
    """dst = round(src + Σ live) row tile by row tile; ``src``/``dst`` contiguous, may be one tensor.

    The result is checked against ``check_dtype`` (dst's by default).
    """
    rows = src.shape[0] if src.dim() else 1
    cols = src.numel() // max(rows, 1)
    terms = _terms(base, rows, cols, live, source, scale, identity)
    s2, d2 = src.view(rows, cols), dst.view(rows, cols)
    # a float32 destination that is the source is summed in place, unless a streamed delta
    # still has to read the original rows from it (DoRA by rows with base == dst); tensors are
    # compared as objects (a meta tensor has no address), and aliases take the copying path
    reads_dst = base is dst and any(isinstance(t, _Streamed) and t.contribution.module.uses_weight for t in terms)
    in_place = dst.dtype == torch.float32 and dst is src and not reads_dst
    check = RangeCheck()
    for start, stop in tiles(rows, cols, dst.device):
        if in_place:  # ComfyUI's float32 working copy: add into its rows directly
            part = d2[start:stop]
        else:
            part = WORKSPACE.take("sum", (stop - start, cols), dst.device)
            part.copy_(s2[start:stop])
        for term in terms:
            if isinstance(term, _Streamed):
                tile = WORKSPACE.take("delta", part.shape, dst.device)
                term.fill(start, stop, tile)
                if term.keep is not None:
                    term.keep[start:stop].copy_(tile)
                part.add_(tile, alpha=term.alpha)
            else:
                lo, hi = max(start, term.first), min(stop, term.first + term.delta.shape[0])
                if lo < hi:
                    part[lo - start : hi - start].add_(term.delta[lo - term.first : hi - term.first], alpha=term.alpha)
        check.add(part)
        if not in_place:
            d2[start:stop].copy_(part)
    check_dtype = check_dtype or dst.dtype
    if not check.within(torch.finfo(check_dtype).max):
        _blame(terms, rows, cols, dst.device)
        raise range_error(key, check.peak(), check_dtype)
    for term in terms:
        if isinstance(term, _Streamed) and term.keep is not None:
            c = term.contribution
            source.put(c.module, c.target, identity, term.keep.view(c.target.shape))


def _blame(terms: Sequence[_Streamed | _Whole], rows: int, cols: int, device: torch.device) -> None:
    """After a failed check: raise the adapter's own ``AdapterFormatError`` if one delta is non-finite.

    Returns when every delta is finite (the weight, or the sum, is what does not fit).
    """
    for term in terms:
        module = term.contribution.module
        if isinstance(term, _Whole):
            module.check_finite(term.delta)
            continue
        for start, stop in tiles(rows, cols, device):
            tile = WORKSPACE.take("delta", (stop - start, cols), device)
            term.fill(start, stop, tile)
            module.check_finite(tile)


def _live(contributions: Iterable[Contribution], scale: float) -> list[Contribution]:
    return [c for c in contributions if c.strength * scale != 0]


def patched_value(base: torch.Tensor, contributions: Sequence[Contribution], key: str,
                  source: DeltaSource | None = None, out: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None, identity: Hashable | None = None) -> torch.Tensor:
    """round(base + Σ contributions) in ``dtype`` (base's by default), on base's device.

    Written into ``out`` when given (``out`` may be ``base``: each tile is read before it is
    written).  ``identity`` names the original weight for ``source`` (see ``patch.cache``).
    Per element this is exactly ``AdapterModule.apply``'s arithmetic: a float32 copy, each
    delta added in order, one rounding (fp8: seeded stochastic rounding, drawn per tensor).
    """
    dtype = dtype or (out.dtype if out is not None else base.dtype)
    live = _live(contributions, 1.0)
    if not live and dtype == base.dtype:
        return base.clone() if out is None else out.copy_(base)
    if dtype in FP8_FORMATS or not base.is_contiguous() or (out is not None and not out.is_contiguous()):
        # fp8's rounding noise is drawn per tensor: sum the whole tensor, then round once
        work = base.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        _tile_pass(work, work, base, live, key, source, 1.0, identity, check_dtype=dtype)
        result = to_dtype(work, dtype, key)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(base.shape, dtype=dtype, device=base.device)
    _tile_pass(base, out, base, live, key, source, 1.0, identity)
    return out


def accumulate(work: torch.Tensor, base: torch.Tensor | None, contributions: Iterable[Contribution],
               source: DeltaSource | None = None, scale: float = 1.0, identity: Hashable | None = None,
               key: str = "weight") -> torch.Tensor:
    """Add every contribution, times ``scale``, into ``work`` in place and return it.

    ``work`` is a working copy of the weight (float32, or a narrower dtype: the sum is
    formed in float32 and rounded once into it).  ``base`` is the original weight (any
    dtype) that weight-dependent deltas read, never a view of ``work``; ``None`` (or
    ``work`` itself) means ``work`` still holds it, and it is copied once first when a
    contribution needs it.  ``scale`` multiplies every
    strength (ComfyUI's strength_patch).  Raises ``WeightRangeError`` when the result is
    not finite or does not fit ``work``'s dtype.
    """
    live = _live(contributions, scale)
    if not live:
        return work
    if base is None or base is work:
        needs_original = any(c.module.uses_weight and not c.bias for c in live)
        base = work.detach().clone() if needs_original else work
    if work.is_contiguous():
        _tile_pass(work, work, base, live, key, source, scale, identity)
        return work
    total = work.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    _tile_pass(total, total, base, live, key, source, scale, identity, check_dtype=work.dtype)
    return work.copy_(total)  # a non-contiguous view: summed on a copy, written back once
