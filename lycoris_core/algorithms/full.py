"""Stored deltas: "full" (the file stores ΔW itself) and norm layers (LyCORIS ``train_norm``).

Reference::

    delta = diff            # bias delta = diff_b
    delta = w_norm          # norms: added to γ; b_norm to β
"""

from __future__ import annotations

import math

from .base import AdapterModule


class Full(AdapterModule):
    algo = "full"
    cheap_delta = True
    tiled = True
    required = ("diff",)
    optional = ("diff_b",)
    bias_role = "diff_b"

    @property
    def _delta_role(self) -> str:
        return self.required[0]

    def _validate(self) -> None:
        role = self._delta_role
        self.shape = self._shape(role)
        if not self.shape:
            raise self._fail(f"{role} must have at least one dimension", role)
        if self._has(self.bias_role) and self._shape(self.bias_role) != (self.shape[0],):
            raise self._fail(f"{self.bias_role} {self._shape(self.bias_role)} does not match {self.shape[0]} rows",
                             self.bias_role)

    def row_fill(self, device=None):
        # rows cast from the stored dtype as they are needed (uploaded tile by tile to another
        # device): exact, no full-size float32 copy, and a weight-sized diff is never kept on a GPU
        stored = self.source.stored(self.keys[self._delta_role])
        rows = stored.reshape(stored.shape[0], math.prod(stored.shape[1:]))  # sizes spelled out: 0-row diffs

        def fill(start, stop, out):
            out.copy_(rows[start:stop])

        return fill

    def reference_delta(self, weight=None):
        return self._t(self._delta_role).double()


class Norm(Full):
    algo = "norm"
    required = ("w_norm",)
    optional = ("b_norm",)
    bias_role = "b_norm"

    def _validate(self) -> None:
        super()._validate()
        if len(self.shape) != 1:
            raise self._fail(f"w_norm must be 1-D, got {self.shape}", "w_norm")
