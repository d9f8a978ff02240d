"""A row piece of a module: the rows [start, start + length) of its delta, as a module of its own.

When a model stores a layer differently from the one an adapter was trained on, one module's
delta lands on several places: a kohya ``qkv`` trained on BFL's fused weight applied to a
diffusers model's separate ``to_q/to_k/to_v``, or diffusers' ``norm_out.linear`` whose
(scale, shift) halves are (shift, scale) in ComfyUI's weight.  Each place takes some rows of
the delta; a ``RowPiece`` is those rows, with the interface the patch kernel uses (tiled when
the module is, so a piece streams like any module).

Rows of a delta depend only on the same rows of the original weight for every algorithm but
Diag-OFT/BOFT (rotations mix rows) and DoRA on the input axis (a norm over all rows): those
cannot be split (``AdapterModule.row_wise``) and are refused by the caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import dora

if TYPE_CHECKING:
    from .base import AdapterModule


class RowPiece:
    """Rows [start, start + length) of ``module``'s delta (and of its bias delta)."""

    def __init__(self, module: AdapterModule, start: int, length: int):
        if not module.row_wise:
            raise ValueError(f"{module.name}: a {module.describe()} delta cannot be split by rows")
        self.module, self.start, self.length = module, start, length
        self.name = f"{module.name}[{start}:{start + length}]"
        self.shape = (length, *module.shape[1:])
        for attr in ("algo", "rank", "alpha", "uses_weight", "linear_in_strength", "cheap_delta", "dora",
                     "has_bias", "streams", "tiled"):
            setattr(self, attr, getattr(module, attr))
        self.source = module.source

    def describe(self) -> str:
        return f"{self.module.describe()} rows {self.start}..{self.start + self.length}"

    def check_finite(self, delta: torch.Tensor) -> torch.Tensor:
        return self.module.check_finite(delta)

    def fits(self, weight_shape) -> bool:
        weight_shape = tuple(weight_shape)
        return weight_shape == self.shape or (weight_shape[:1] == self.shape[:1]
                                              and torch.Size(weight_shape).numel() == torch.Size(self.shape).numel())

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.narrow(0, self.start, self.length)

    def _shifted(self, fill):
        start = self.start

        def shifted(lo, hi, out):
            fill(start + lo, start + hi, out)

        return shifted

    def row_fill(self, device=None):
        return self._shifted(self.module.row_fill(device))

    def delta_fill(self, weight, device=None):
        device = weight.device if weight is not None else device
        raw = self.row_fill(device)
        if not self.module.dora:
            return raw
        w0 = weight.reshape(weight.shape[0], weight.numel() // max(weight.shape[0], 1))
        return dora.row_fill(raw, w0, self._rows(self.module._dora_scale(self.module.shape[0], device)))

    def _full_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The module's whole original weight with only this piece's rows known (the rest never matters)."""
        full = torch.zeros((self.module.shape[0], *weight.shape[1:]), dtype=torch.float32, device=weight.device)
        self._rows(full).copy_(weight)
        return full

    def raw_delta(self, weight=None, device=None):
        full = None if weight is None else self._full_weight(weight)
        return self._rows(self.module.raw_delta(full, device))

    def raw_strength_delta(self, weight, strength, device=None):
        return self.raw_delta(weight, device) * float(strength)

    def delta(self, weight=None, device=None):
        return self.check_finite(self.raw_delta(weight, device))

    def low_rank_factors(self):
        """The module's (U, V) with U cut to this piece's rows (None when the module has none)."""
        factors = self.module.low_rank_factors()
        return None if factors is None else (self._rows(factors[0]), factors[1])

    def bias_delta(self, device=None):
        bias = self.module.bias_delta(device)
        return None if bias is None else self._rows(bias)
