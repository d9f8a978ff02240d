"""GLoRA: ΔW = (α/r)·(W0·A1·A2 + B1·B2), the A half contracted over W0's input axis.

Reference::

    wa = einsum("oi…,ir,rj->oj…", w0, a1, a2)        # a1 (in, r), a2 (r, in)
    delta = scale * (wa + (b1 @ b2).reshape(w0.shape))
"""

from __future__ import annotations

import math

import torch

from .base import AdapterModule


class GLoRA(AdapterModule):
    algo = "glora"
    suffixes = {".a1.weight": "a1", ".a2.weight": "a2", ".b1.weight": "b1", ".b2.weight": "b2"}
    required = ("a1", "a2", "b1", "b2")
    uses_weight = True
    supports_dora = True

    def _validate(self) -> None:
        a1, a2 = self._shape("a1"), self._shape("a2")
        b1, b2 = self._shape("b1"), self._shape("b2")
        if any(len(s) < 2 for s in (a1, a2, b1, b2)):
            raise self._fail("GLoRA factors must be at least 2-D", "a1")
        rank = a2[0]
        ok = (
            math.prod(a1[1:]) == rank and a1[0] == math.prod(a2[1:])
            and math.prod(b1[1:]) == rank and b2[0] == rank
        )
        if not ok:
            raise self._fail(f"GLoRA factors do not agree: a1 {a1}, a2 {a2}, b1 {b1}, b2 {b2}", "a1")
        self.shape = (b1[0], b2[1], *b2[2:])
        if self.shape[1] != a1[0]:
            raise self._fail(f"GLoRA a1 {a1} and b2 {b2} disagree on input width", "a1")
        self._set_rank_scale(rank, "a2")

    def _raw_delta(self, weight, device):
        weight = weight.reshape(self.shape)  # fits() allows e.g. a (out, 1) module on a 1-D weight
        a1 = self._t("a1", device).flatten(1)  # (in, r)
        a2 = self._t("a2", device).flatten(1)  # (r, in)
        wa = torch.einsum("oi...,ij->oj...", weight, a1)
        wa = torch.einsum("oj...,ji->oi...", wa, a2)
        wb = (self._t("b1", device).flatten(1) @ self._t("b2", device).flatten(1)).reshape(weight.shape)
        return (wa + wb) * self.scale

    def reference_delta(self, weight=None):
        w0 = weight.double().reshape(self.shape)
        a1, a2 = self._t("a1").double().flatten(1), self._t("a2").double().flatten(1)
        wa = torch.einsum("oi...,ir,rj->oj...", w0, a1, a2)
        return self.scale * (wa + (self._t("b1").double().flatten(1) @ self._t("b2").double().flatten(1)).reshape(w0.shape))
