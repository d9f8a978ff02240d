"""Norm layers (LyCORIS ``train_norm``): w_norm and b_norm are added to γ and β.

Reference::

    delta = w_norm                    # bias delta = b_norm
"""

from __future__ import annotations

from .base import AdapterModule


class Norm(AdapterModule):
    algo = "norm"
    suffixes = {".w_norm": "w_norm", ".b_norm": "b_norm"}
    cheap_delta = True
    required = ("w_norm",)
    optional = ("b_norm",)

    def _validate(self) -> None:
        self.shape = self._shape("w_norm")
        if len(self.shape) != 1:
            raise self._fail(f"w_norm must be 1-D, got {self.shape}", "w_norm")
        if self._has("b_norm") and self._shape("b_norm") != self.shape:
            raise self._fail(f"b_norm {self._shape('b_norm')} does not match w_norm {self.shape}", "b_norm")

    def _raw_delta(self, weight, device):
        return self._t("w_norm", device)

    def reference_delta(self, weight=None):
        return self._t("w_norm").double()

    @property
    def has_bias(self) -> bool:
        return self._has("b_norm")

    def bias_delta(self, device=None):
        return self._t("b_norm", device) if self._has("b_norm") else None
