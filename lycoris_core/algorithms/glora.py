"""GLoRA: ΔW = (α/r)·(W0·A1·A2 + B1·B2), the A half contracted over W0's input axis."""

from __future__ import annotations

import torch

from .base import AdapterModule, prod


class GLoRA(AdapterModule):
    algo = "glora"
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
            prod(a1[1:]) == rank and a1[0] == prod(a2[1:])
            and prod(b1[1:]) == rank and b2[0] == rank
        )
        if not ok:
            raise self._fail(f"GLoRA factors do not agree: a1 {a1}, a2 {a2}, b1 {b1}, b2 {b2}", "a1")
        self.shape = (b1[0], b2[1], *b2[2:])
        if self.shape[1] != a1[0]:
            raise self._fail(f"GLoRA a1 {a1} and b2 {b2} disagree on input width", "a1")
        self._set_rank_scale(rank, "a2")

    def _raw_delta(self, weight):
        weight = weight.reshape(self.shape)  # fits() allows e.g. a (out, 1) module on a 1-D weight
        a1 = self._t("a1").flatten(1)  # (in, r)
        a2 = self._t("a2").flatten(1)  # (r, in)
        wa = torch.einsum("oi...,ij->oj...", weight, a1)
        wa = torch.einsum("oj...,ji->oi...", wa, a2)
        wb = (self._t("b1").flatten(1) @ self._t("b2").flatten(1)).reshape(weight.shape)
        return (wa + wb) * self.scale
