"""Is a float32 result safe to write?  One on-device reduction and at most one host sync.

Every refusal of a non-finite or out-of-range value goes through here: the reader's
NaN/Inf check of stored tensors, an algorithm's delta, and the patch kernel's sums.
Nothing here sums: a sum of finite values can overflow (refusing a valid delta).
``aminmax`` gives both extremes in one pass; NaN propagates into them and an Inf is
one of them, so comparing the two extremes with a limit answers every question.
"""

from __future__ import annotations

import torch


def extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``x`` as 0-d tensors on its device; no sync, no full-size temporary."""
    flat = x.reshape(-1)
    try:
        return torch.aminmax(flat)
    except (RuntimeError, NotImplementedError):  # dtypes without aminmax (fp8): through float32
        return torch.aminmax(flat.float())


def limit_of(dtype: torch.dtype) -> float:
    """The largest finite magnitude ``dtype`` holds (float32's for non-float dtypes)."""
    return torch.finfo(dtype if dtype.is_floating_point else torch.float32).max


class RangeCheck:
    """Running extremes of one tensor's tiles, answered with one host sync at the end."""

    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def add(self, tile: torch.Tensor) -> None:
        if not tile.numel():
            return
        lo, hi = extremes(tile)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def within(self, limit: float) -> bool:
        """All values finite and within ±limit (NaN fails). The one sync of the check."""
        if self.lo is None:
            return True
        return bool((self.lo >= -limit) & (self.hi <= limit))

    def peak(self) -> float:
        """The largest magnitude seen, for an error message (after ``within`` failed)."""
        if self.lo is None:
            return 0.0
        return float(torch.maximum(self.lo.abs(), self.hi.abs()))  # NaN stays NaN


def is_finite(x: torch.Tensor) -> bool:
    """Every element finite (one reduction, one sync); empty and non-float tensors are."""
    if not x.is_floating_point() or not x.numel():
        return True
    check = RangeCheck()
    check.add(x)
    return check.within(limit_of(x.dtype))
