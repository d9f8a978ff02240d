"""(IA)³: W' = W0 ⊙ (1 + s·w), w scaling output rows, or input columns when on_input.

Reference::

    delta = w0 * w.reshape(-1, 1, …)        # rows; or (1, -1, 1, …) on_input
"""

from __future__ import annotations

import math

from .base import AdapterModule


class IA3(AdapterModule):
    algo = "ia3"
    cheap_delta = True
    required = ("weight", "on_input")
    uses_weight = True

    def _validate(self) -> None:
        if math.prod(self._shape("on_input")) != 1:
            raise self._fail("on_input must be a scalar", "on_input")
        self.on_input = bool(self.source[self.keys["on_input"]].reshape(()).item())  # at load, on the CPU
        vector = self._shape("weight")
        # linear: (C,); conv: (1, C, 1, ...)
        if len(vector) == 1:
            self.channels = vector[0]
        elif len(vector) >= 2 and vector[0] == 1 and math.prod(vector[2:]) == 1:
            self.channels = vector[1]
        else:
            raise self._fail(f"ia3 weight {vector} is neither (C,) nor (1, C, 1, ...)", "weight")
        self.shape = vector

    def fits(self, weight_shape) -> bool:
        axis = 1 if self.on_input else 0
        return len(weight_shape) > axis and weight_shape[axis] == self.channels

    @property
    def dense_params(self) -> int:
        return self.channels

    def _view(self, weight):
        view = [1] * weight.dim()
        view[1 if self.on_input else 0] = -1
        return view

    def _raw_delta(self, weight, device):
        return weight * self._t("weight", device).reshape(-1).reshape(self._view(weight))

    def reference_delta(self, weight=None):
        return weight.double() * self._t("weight").double().reshape(self._view(weight))
