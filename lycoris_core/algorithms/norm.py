"""Norm layers (LyCORIS ``train_norm``): w_norm and b_norm are added to γ and β."""

from __future__ import annotations

from .base import AdapterModule


class Norm(AdapterModule):
    algo = "norm"
    cheap_delta = True
    required = ("w_norm",)
    optional = ("b_norm",)

    def _validate(self) -> None:
        self.shape = self._shape("w_norm")
        if len(self.shape) != 1:
            raise self._fail(f"w_norm must be 1-D, got {self.shape}", "w_norm")
        if self._has("b_norm") and self._shape("b_norm") != self.shape:
            raise self._fail(f"b_norm {self._shape('b_norm')} does not match w_norm {self.shape}", "b_norm")

    def _raw_delta(self, weight):
        return self._t("w_norm")

    @property
    def has_bias(self) -> bool:
        return self._has("b_norm")

    def bias_delta(self):
        return self._t("b_norm") if self._has("b_norm") else None
