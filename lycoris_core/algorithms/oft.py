"""Orthogonal fine-tuning: Diag-OFT (3-D ``oft_blocks``) and BOFT (4-D, butterfly stages).

Each block B gives a Cayley rotation R = (I+Q)(I-Q)⁻¹ with Q = B - Bᵀ; when the
saved ``alpha`` (the constraint) is positive, ‖Q‖ is clamped to alpha·out_dim.
Rotations act on the output rows of W0, then the optional ``rescale`` multiplies
them.  Strength s moves every rotation and the rescale from identity toward the
trained value (R → I + s(R-I)), so s = 0 leaves W0 exactly and s = 1 matches
LyCORIS.  That is not linear in s, hence ``linear_in_strength = False``.

Reference (Diag-OFT; BOFT chains butterfly-permuted stages of the same)::

    R_k = (I + Q_k)(I - Q_k)⁻¹,  Q_k = B_k - B_kᵀ  (scaled to norm ≤ alpha·out)
    w = blockdiag(R_1ᵀ … R_n)ᵀ-mixed rows of w0, times rescale
    delta = w - w0
"""

from __future__ import annotations

import math

import torch

from .base import AdapterModule


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Rotations from skew parts of ``blocks`` (..., b, b), norm-clamped as LyCORIS does."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:  # shrink to the constraint, on the device: no host sync to compare
        q_norm = torch.linalg.vector_norm(q) + 1e-8
        q = q * (constraint / q_norm).clamp(max=1.0)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    # (I + Q) @ inverse(I - Q), solved rather than inverted
    return torch.linalg.solve(eye - q, eye + q, left=False)


class _Orthogonal(AdapterModule):
    required = ("oft_blocks",)
    optional = ("rescale",)
    block_dims = 0  # 3: Diag-OFT (n, b, b); 4: BOFT (stages, n, b, b)
    uses_weight = True
    linear_in_strength = False

    @property
    def row_wise(self) -> bool:
        return False  # rotations mix the rows of each block

    def _constraint(self) -> float:
        return (self.alpha or 0.0) * self.shape[0]

    def _check_rescale(self) -> None:
        if self._has("rescale"):
            r = self._shape("rescale")
            if not r or r[0] != self.shape[0] or math.prod(r) != self.shape[0]:
                raise self._fail(f"rescale {r} does not match {self.shape[0]} output rows", "rescale")

    @classmethod
    def claims(cls, roles, shape_of) -> bool:
        return "oft_blocks" in roles and len(shape_of("oft_blocks")) == cls.block_dims

    def fits(self, weight_shape) -> bool:
        return len(weight_shape) >= 1 and weight_shape[0] == self.shape[0]

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[0]

    def _rescaled(self, rotated: torch.Tensor, strength: float) -> torch.Tensor:
        if not self._has("rescale"):
            return rotated
        rescale = self._t("rescale", rotated.device).reshape(rotated.shape[0], *([1] * (rotated.dim() - 1)))
        return rotated * (1 + strength * (rescale - 1))

    def raw_strength_delta(self, weight, strength, device=None):
        self._check_weight(weight)
        w0 = weight.to(torch.float32)
        return self._rotate(w0, float(strength)) - w0

    def raw_delta(self, weight=None, device=None):
        return self.raw_strength_delta(weight, 1.0, device)

    def reference_delta(self, weight=None):
        return (self._rotate(weight.double(), 1.0, torch.float64) - weight.double())


class DiagOFT(_Orthogonal):
    algo = "diag-oft"
    block_dims = 3

    def _validate(self) -> None:
        blocks = self._shape("oft_blocks")
        if len(blocks) != 3 or blocks[1] != blocks[2] or not blocks[0] or not blocks[1]:
            raise self._fail(f"diag-oft blocks must be (n, b, b) with n, b > 0, got {blocks}", "oft_blocks")
        self.rank = blocks[1]
        self.shape = (blocks[0] * blocks[1],)
        self._check_rescale()

    def _rotate(self, w0: torch.Tensor, strength: float, dtype=torch.float32) -> torch.Tensor:
        blocks = self._t("oft_blocks", w0.device).to(dtype)
        n, b, _ = blocks.shape
        rot = cayley(blocks, self._constraint())
        eye = torch.eye(b, dtype=dtype, device=w0.device)
        rot = eye + strength * (rot - eye)
        w = w0.reshape(n, b, *w0.shape[1:])
        # each block of output rows is mixed by Rᵀ
        out = torch.einsum("knm,kn...->km...", rot, w).reshape(w0.shape)
        return self._rescaled(out, strength)

    def reference_delta(self, weight=None):
        w0 = weight.double()
        rot = torch.block_diag(*cayley(self._t("oft_blocks").double(), self._constraint()))
        return self._rescaled((rot.T @ w0.flatten(1)).reshape(w0.shape), 1.0) - w0


class BOFT(_Orthogonal):
    algo = "boft"
    block_dims = 4

    def _validate(self) -> None:
        blocks = self._shape("oft_blocks")
        if len(blocks) != 4 or blocks[2] != blocks[3] or blocks[2] % 2 or not all(blocks):
            raise self._fail(f"boft blocks must be (stages, n, b, b) with even b > 0, got {blocks}", "oft_blocks")
        stages, n, b, _ = blocks
        if n & (n - 1) or stages > bin(max(n - 1, 0)).count("1") + 1:
            raise self._fail(f"boft block count {n} / stages {stages} is not a butterfly", "oft_blocks")
        self.rank = b
        self.shape = (n * b,)
        self._check_rescale()

    def _rotate(self, w0: torch.Tensor, strength: float, dtype=torch.float32) -> torch.Tensor:
        blocks = self._t("oft_blocks", w0.device).to(dtype)
        stages, _n, b, _ = blocks.shape
        rots = cayley(blocks, self._constraint())
        eye = torch.eye(b, dtype=dtype, device=w0.device)
        half = b // 2
        x = w0
        for i in range(stages):
            rot = strength * rots[i] + (1 - strength) * eye
            k = (2 ** i) * half
            # butterfly: interleave rows with stride k, rotate blocks of b, undo the interleave
            x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            x = torch.einsum("bij,bj...->bi...", rot, x)
            x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        return self._rescaled(x, strength)
