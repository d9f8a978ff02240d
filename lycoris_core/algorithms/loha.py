"""LoHa: ΔW = (α/r)·(w1a·w1b) ⊙ (w2a·w2b); in Tucker form each half is t ×₁ a ×₂ b.

Reference::

    half(n) = w{n}a @ w{n}b                                   # plain
    half(n) = einsum("ij…,ip,jr->pr…", t{n}, w{n}a, w{n}b)    # Tucker
    delta = scale * half(1) * half(2)
"""

from __future__ import annotations

import torch

from ..numerics.tiles import WORKSPACE
from .base import AdapterModule


class LoHa(AdapterModule):
    algo = "loha"
    required = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    supports_dora = True
    optional = ("hada_t1", "hada_t2")

    def _validate(self) -> None:
        w1a, w1b = self._shape("hada_w1_a"), self._shape("hada_w1_b")
        w2a, w2b = self._shape("hada_w2_a"), self._shape("hada_w2_b")
        if any(len(s) != 2 for s in (w1a, w1b, w2a, w2b)):
            raise self._fail("LoHa factors must be 2-D", "hada_w1_a")
        has_t1, has_t2 = self._has("hada_t1"), self._has("hada_t2")
        if has_t1 != has_t2:
            raise self._fail("LoHa Tucker needs both hada_t1 and hada_t2", "hada_t1" if has_t1 else "hada_t2")
        if has_t1:
            t1, t2 = self._shape("hada_t1"), self._shape("hada_t2")
            ok = (
                len(t1) >= 3 and t1 == t2 and w1a[0] == w1b[0] == t1[0] == t1[1]
                and w2a[0] == w2b[0] == t2[0] == t2[1] and w1a[1] == w2a[1] and w1b[1] == w2b[1]
            )
            if not ok:
                raise self._fail(f"LoHa Tucker factors do not agree: t1 {t1}, w1_a {w1a}, w1_b {w1b}", "hada_t1")
            self.tucker = True
            self.shape = (w1a[1], w1b[1], *t1[2:])
        else:
            if not (w1a[1] == w1b[0] and w2a[1] == w2b[0] and w1a[0] == w2a[0] and w1b[1] == w2b[1]):
                raise self._fail(
                    f"LoHa factors do not agree: w1_a {w1a}, w1_b {w1b}, w2_a {w2a}, w2_b {w2b}", "hada_w1_a"
                )
            self.shape = (w1a[0], w1b[1])
        self._set_rank_scale(w1b[0], "hada_w1_b")
        self.tiled = True
        if w2b[0] <= 0:
            raise self._fail(f"rank must be positive, got {w2b[0]}", "hada_w2_b")

    def _half(self, n: int, scale: float = 1.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A (out, r) and B (r, in·k...) so that rows of half n are rows of A @ B.

        Tucker: t ×₁ a ×₂ b = aᵀ @ (t ×₂ b), the core joined with b once.
        """
        a, b = self._t(f"hada_w{n}_a", device) * scale, self._t(f"hada_w{n}_b", device)
        if not self.tucker:
            return a, b
        core = torch.einsum("ij...,jr->ir...", self._t(f"hada_t{n}", device), b).flatten(1)
        return a.t().contiguous(), core

    def row_fill(self, device=None):
        # scale folded into a small factor; the Hadamard product in place in the tile
        a1, b1 = self._half(1, self.scale, device)
        a2, b2 = self._half(2, 1.0, device)

        def fill(start, stop, out):
            torch.mm(a1[start:stop], b1, out=out)
            out.mul_(torch.mm(a2[start:stop], b2, out=WORKSPACE.take("hadamard", out.shape, out.device)))

        return fill

    def reference_delta(self, weight=None):
        def half(n):
            a, b = self._t(f"hada_w{n}_a").double(), self._t(f"hada_w{n}_b").double()
            if self.tucker:
                return torch.einsum("ij...,ip,jr->pr...", self._t(f"hada_t{n}").double(), a, b)
            return a @ b

        return (self.scale * half(1) * half(2)).reshape(self.shape)

    def low_rank_factors(self):
        """Khatri–Rao factors: (A1 B1) ⊙ (A2 B2) = U V with U (out, r1·r2) the row-wise and
        V (r1·r2, in) the column-wise Khatri–Rao products.  None for Tucker and DoRA."""
        if self.tucker or self.dora:
            return None
        a1, a2 = self._t("hada_w1_a") * self.scale, self._t("hada_w2_a")
        b1, b2 = self._t("hada_w1_b"), self._t("hada_w2_b")
        u = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
        v = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        return u, v
