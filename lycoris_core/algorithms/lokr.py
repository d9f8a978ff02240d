"""LoKr: ΔW = s·kron(w1, w2), each factor full, low-rank (a @ b), or (w2) Tucker.

Scale trap: s = α/r with r from a decomposed factor; when both factors are full
LyCORIS forces α = r, so s = 1 whatever alpha the file stores.  Rank rule, for files
whose two factors are both decomposed with different ranks (LyCORIS never writes one,
a hand-made file can): r is w1's inner size (``w1_b.shape[0]``), as LyCORIS's own
loader reads it (``make_module_from_state_dict`` looks at ``w1a.size(1)`` first); only
a full w1 takes the rank from w2 (``w2_b.shape[0]``, which is the rank in the plain and
the Tucker form alike).

Reference::

    w1 = w1 or w1_a @ w1_b
    w2 = w2 or w2_a @ w2_b or einsum("ij…,ip,jr->pr…", t2, w2_a, w2_b)
    delta = s * kron(w1, w2)          # w1 as (a, c, 1, 1…) for conv w2
"""

from __future__ import annotations

import math

import torch

from .base import AdapterModule


class LoKr(AdapterModule):
    algo = "lokr"
    cheap_delta = True
    tiled = True
    required = ()
    optional = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    supports_dora = True

    @classmethod
    def claims(cls, roles: set[str], shape_of) -> bool:
        return bool(roles & {"lokr_w1", "lokr_w1_a"}) and bool(roles & {"lokr_w2", "lokr_w2_a"})

    def _w1_shape(self) -> tuple[int, int]:
        if self._has("lokr_w1"):
            w1 = self._shape("lokr_w1")
            if len(w1) != 2:
                raise self._fail(f"lokr_w1 must be 2-D, got {w1}", "lokr_w1")
            return w1
        if not self._has("lokr_w1_b"):
            raise self._fail("lokr_w1_a without lokr_w1_b", "lokr_w1_a")
        a, b = self._shape("lokr_w1_a"), self._shape("lokr_w1_b")
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise self._fail(f"lokr_w1_a {a} and lokr_w1_b {b} do not multiply", "lokr_w1_a")
        return a[0], b[1]

    def _w2_shape(self) -> tuple[int, ...]:
        if self._has("lokr_w2"):
            w2 = self._shape("lokr_w2")
            if len(w2) < 2:
                raise self._fail(f"lokr_w2 must be at least 2-D, got {w2}", "lokr_w2")
            return w2
        if not self._has("lokr_w2_b"):
            raise self._fail("lokr_w2_a without lokr_w2_b", "lokr_w2_a")
        a, b = self._shape("lokr_w2_a"), self._shape("lokr_w2_b")
        if len(a) != 2 or len(b) != 2:
            raise self._fail(f"lokr_w2_a {a} and lokr_w2_b {b} must be 2-D", "lokr_w2_a")
        if self._has("lokr_t2"):
            t2 = self._shape("lokr_t2")
            if len(t2) < 3 or t2[0] != a[0] or t2[1] != b[0]:
                raise self._fail(f"lokr_t2 {t2} does not join lokr_w2_a {a} and lokr_w2_b {b}", "lokr_t2")
            self.tucker = True
            return (a[1], b[1], *t2[2:])
        if a[1] != b[0]:
            raise self._fail(f"lokr_w2_a {a} and lokr_w2_b {b} do not multiply", "lokr_w2_a")
        return a[0], b[1]

    def _validate(self) -> None:
        w1, w2 = self._w1_shape(), self._w2_shape()
        self.shape = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        # the inner size of a decomposed factor; w1's first, as LyCORIS reads it (module docstring)
        rank_role = "lokr_w1_b" if self._has("lokr_w1_b") else "lokr_w2_b" if self._has("lokr_w2_b") else None
        if rank_role is not None:
            self._set_rank_scale(self._shape(rank_role)[0], rank_role)
        else:
            self.rank = None  # both full: scale 1, alpha ignored
            self.scale = 1.0
        for role in ("lokr_w1_b", "lokr_w2_b"):
            if self._has(role) and self._shape(role)[0] <= 0:
                raise self._fail("rank must be positive, got 0", role)

    def _factor(self, which: str, device=None) -> torch.Tensor:
        if self._has(f"lokr_{which}"):
            return self._t(f"lokr_{which}", device)
        a, b = self._t(f"lokr_{which}_a", device), self._t(f"lokr_{which}_b", device)
        if which == "w2" and self.tucker:
            return torch.einsum("ij...,ip,jr->pr...", self._t("lokr_t2", device), a, b)
        return a @ b

    def row_fill(self, device=None):
        """Rows of kron(w1, w2): row i1·b + i2 is w1[i1] ⊗ w2[i2], one product per element
        (the same bits as ``torch.kron``): the tile's whole blocks of b rows in one broadcast
        product, a partial block at either end on its own."""
        w1 = self._factor("w1", device) * self.scale  # scale on the small block
        w2 = self._factor("w2", device)
        b, c, dk = w2.shape[0], w1.shape[1], math.prod(w2.shape[1:])
        w1 = w1.reshape(w1.shape[0], c, 1)
        w2 = w2.reshape(b, 1, dk)  # sizes spelled out: a hostile file may have a zero-size factor

        def part(row, end, view):  # rows [row, end) within one block of b rows
            i1, i2 = divmod(row, b)
            torch.mul(w1[i1], w2[i2 : i2 + end - row], out=view)

        def fill(start, stop, out):
            view = out.view(stop - start, c, dk)
            first, last = -(-start // b), stop // b  # whole blocks [first, last): one product for all of them
            if first >= last:  # inside one block, or across one boundary
                middle = min(stop, (start // b + 1) * b)
                part(start, middle, view[: middle - start])
                if middle < stop:
                    part(middle, stop, view[middle - start :])
                return
            if start < first * b:
                part(start, first * b, view[: first * b - start])
            whole = view[first * b - start : last * b - start].view(last - first, b, c, dk)
            torch.mul(w1[first:last].unsqueeze(1), w2.unsqueeze(0), out=whole)
            if last * b < stop:
                part(last * b, stop, view[last * b - start :])

        return fill

    def reference_delta(self, weight=None):
        w1, w2 = self._factor("w1").double(), self._factor("w2").double()
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        return self.scale * torch.kron(w1, w2)

    def low_rank_factors(self):
        """kron(w1, w2) as U V through kron(AB, CD) = kron(A, C) kron(B, D).

        w2 = w2a w2b (low rank r):  kron(w1, w2a) (ab, c·r) @ kron(I_c, w2b) (c·r, cd·k), or
        kron(I_a, w2a) (ab, a·r) @ kron(w1, w2b) (a·r, cd·k), whichever inner size is smaller.
        w2 full:  kron(w1, I_b) @ kron(I_c, w2) (inner c·b) or kron(I_a, w2) @ kron(w1, I_d)
        (inner a·d).  None for the Tucker w2 and DoRA; the caller decides whether the inner
        size is small enough to be worth it.
        """
        if self.tucker or self.dora:
            return None
        w1 = self._factor("w1") * self.scale
        a, c = w1.shape
        if self._has("lokr_w2"):
            w2 = self._t("lokr_w2")
            b = w2.shape[0]
            w2 = w2.reshape(b, -1)
            dk = w2.shape[1]
            if c * b <= a * dk:
                return torch.kron(w1, torch.eye(b)), torch.kron(torch.eye(c), w2)
            return torch.kron(torch.eye(a), w2), torch.kron(w1, torch.eye(dk))
        w2a, w2b = self._t("lokr_w2_a"), self._t("lokr_w2_b")
        if c <= a:
            return torch.kron(w1, w2a), torch.kron(torch.eye(c), w2b)
        return torch.kron(torch.eye(a), w2a), torch.kron(w1, w2b)
