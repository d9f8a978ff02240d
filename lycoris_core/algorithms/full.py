"""Full ("diff"): the file stores ΔW itself, plus an optional bias delta.

Reference::

    delta = diff                      # bias delta = diff_b
"""

from __future__ import annotations

import math

from .base import AdapterModule


class Full(AdapterModule):
    algo = "full"
    suffixes = {".diff": "diff", ".diff_b": "diff_b"}
    cheap_delta = True
    tiled = True
    required = ("diff",)
    optional = ("diff_b",)

    def _validate(self) -> None:
        self.shape = self._shape("diff")
        if not self.shape:
            raise self._fail("diff must have at least one dimension", "diff")
        if self._has("diff_b") and self._shape("diff_b") != (self.shape[0],):
            raise self._fail(f"diff_b {self._shape('diff_b')} does not match {self.shape[0]} rows", "diff_b")

    def row_fill(self, device=None):
        # rows cast from the stored dtype as they are needed (uploaded tile by tile to another
        # device): exact, no full-size float32 copy, and a weight-sized diff is never kept on a GPU
        diff = self.source.stored(self.keys["diff"])
        diff = diff.reshape(diff.shape[0], math.prod(diff.shape[1:]))  # sizes spelled out: 0-row diffs

        def fill(start, stop, out):
            out.copy_(diff[start:stop])

        return fill

    def reference_delta(self, weight=None):
        return self._t("diff").double()

    @property
    def has_bias(self) -> bool:
        return self._has("diff_b")

    def bias_delta(self, device=None):
        return self._t("diff_b", device) if self._has("diff_b") else None
