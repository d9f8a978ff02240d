"""Full ("diff"): the file stores ΔW itself, plus an optional bias delta."""

from __future__ import annotations

from .base import AdapterModule


class Full(AdapterModule):
    algo = "full"
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

    def _raw_delta(self, weight):
        return self._t("diff")

    def row_fill(self):
        # rows cast from the stored dtype as they are needed: exact, and no full-size float32 copy
        diff = self.source.stored(self.keys["diff"])
        diff = diff.reshape(diff.shape[0], -1)

        def fill(start, stop, out):
            out.copy_(diff[start:stop])

        return fill

    @property
    def has_bias(self) -> bool:
        return self._has("diff_b")

    def bias_delta(self):
        return self._t("diff_b") if self._has("diff_b") else None
