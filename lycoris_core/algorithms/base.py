"""What every adapter module shares: factor access, scale, DoRA, strength and apply.

An ``AdapterModule`` binds one module's tensors (by role) to the math of its
algorithm.  Shapes are checked from the file header when the module is built, so
a malformed file fails early with the file and key named; tensor data is read only
when a delta is asked for.  Pure math: no device policy, no I/O beyond the lazy
tensor source, no knowledge of models or ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import AdapterFormatError
from ..reader import TensorSource
from ..rounding import check_range, to_dtype
from ..tiles import WORKSPACE, RowFill, assemble


def prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


class AdapterModule:
    """One adapted layer: its algorithm, factors and the delta they rebuild."""

    algo: str = "?"
    #: roles this algorithm consumes; each class lists required and optional ones
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    #: True when the delta needs the original weight (ia3, glora, oft, boft; DoRA sets it too)
    uses_weight: bool = False
    #: False for algorithms whose result is not W0 + s*delta (oft, boft)
    linear_in_strength: bool = True
    #: algorithms whose delta may be re-normalised by a ``dora_scale``
    supports_dora: bool = False
    #: rebuilding the delta costs about one pass over it (kron, a stored diff): not worth caching
    cheap_delta: bool = False
    #: the delta is built in row tiles by ``row_fill`` (set by modules that can, see ``tiles``)
    tiled: bool = False

    def __init__(self, name: str, keys: Mapping[str, str], source: TensorSource,
                 default_alpha: float | None = None):
        self.name = name
        self.keys = dict(keys)  # role -> file key
        self.source = source
        self.rank: int | None = None
        self.tucker = False
        self.dora = self.supports_dora and "dora_scale" in self.keys
        self.shape: tuple[int, ...] = ()
        self.scale = 1.0
        self.alpha = self._read_alpha() if "alpha" in self.keys else default_alpha
        if self.alpha is not None and not math.isfinite(self.alpha):  # e.g. NaN from a PEFT config
            raise self._fail(f"alpha {self.alpha} is not a finite number", "alpha")
        self._validate()
        if self.dora:
            self._validate_dora()
            self.uses_weight = True

    # ---- detection -------------------------------------------------------------------------
    @classmethod
    def claims(cls, roles: set[str], shape_of) -> bool:
        """True when these roles (and, if needed, their shapes) are this algorithm's."""
        return set(cls.required) <= roles

    @classmethod
    def consumed(cls, roles: set[str]) -> set[str]:
        extra = {"alpha", "dora_scale"} if cls.supports_dora else {"alpha"}
        return roles & (set(cls.required) | set(cls.optional) | extra)

    # ---- file access ---------------------------------------------------------------------
    def _shape(self, role: str) -> tuple[int, ...]:
        return tuple(self.source.shape(self.keys[role]))

    def _has(self, role: str) -> bool:
        return role in self.keys

    def _t(self, role: str) -> torch.Tensor:
        """A factor as float32 (the one precision all delta math uses)."""
        return self.source[self.keys[role]].to(torch.float32)

    def _fail(self, message: str, role: str | None = None) -> AdapterFormatError:
        key = self.keys.get(role) if role else None
        return AdapterFormatError(self.source.name, message, key or next(iter(self.keys.values()), None))

    def _finite(self, delta: torch.Tensor) -> torch.Tensor:
        """Finite factors can still multiply past float32's range: refuse, never patch Inf/NaN.

        One reduction, no temporary: any Inf/NaN element makes the sum non-finite.
        """
        if not math.isfinite(float(delta.sum())):
            raise self._fail("delta is not finite: factors or alpha too large for float32")
        return delta

    def _read_alpha(self) -> float | None:
        if prod(self._shape("alpha")) != 1:
            raise self._fail(f"alpha must be a scalar, got shape {self._shape('alpha')}", "alpha")
        return float(self._t("alpha").reshape(()))

    def _set_rank_scale(self, rank: int, role: str) -> None:
        """alpha/rank, with alpha = rank when absent or 0 (LyCORIS's rule)."""
        if rank <= 0:
            raise self._fail(f"rank must be positive, got {rank}", role)
        self.rank = rank
        alpha = self.alpha
        if alpha is None or alpha == 0:
            self.scale = 1.0
        else:
            self.scale = alpha / rank

    # ---- per-algorithm hooks -------------------------------------------------------------
    def _validate(self) -> None:
        """Check factor shapes against each other; set rank, scale and shape."""
        raise NotImplementedError

    def _raw_delta(self, weight: torch.Tensor | None) -> torch.Tensor:
        """float32 delta at strength 1 before DoRA, shaped like self.shape or weight."""
        raise NotImplementedError

    def row_fill(self) -> RowFill:
        """Writes rows of the raw delta (before DoRA) into a tile; only when ``tiled``."""
        raise NotImplementedError

    @property
    def _dora_rows(self) -> bool:
        """DoRA normalised per output row: each row of the delta needs only its own row of W0."""
        return self.dora and self.dora_axis == "out"

    @property
    def streams(self) -> bool:
        """The patch engine may build this delta tile by tile while it patches (``delta_fill``)."""
        return self.tiled and (not self.uses_weight or self._dora_rows)

    def delta_fill(self, weight: torch.Tensor | None) -> RowFill:
        """Writes rows of ``delta(weight)`` into a tile; only when ``streams``.

        ``weight`` is the original weight (any dtype, rows first), needed by DoRA only.
        """
        raw = self.row_fill()
        if not self.dora:
            return raw
        rows = weight.shape[0]
        w0 = weight.reshape(rows, weight.numel() // max(rows, 1))
        scale = self._dora_scale(w0.shape[0]).reshape(-1, 1)
        eps = torch.finfo(torch.float32).eps

        def fill(start, stop, out):
            raw(start, stop, out)
            base = WORKSPACE.take("w0", out.shape)
            base.copy_(w0[start:stop])
            merged = out.add_(base)
            norm = merged.norm(dim=1, keepdim=True)
            merged.mul_(scale[start:stop] / (norm + eps)).sub_(base)

        return fill

    def _tiled_delta(self) -> torch.Tensor:
        rows = self.shape[0]
        return assemble(rows, prod(self.shape) // max(rows, 1), self.row_fill()).reshape(self.shape)

    def bias_delta(self) -> torch.Tensor | None:
        """float32 bias delta at strength 1, for algorithms that carry one."""
        return None

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U, V), float32, with U @ V == delta() flattened to (out, in·k·k), or None.

        Only for deltas that are cheaply low rank and do not depend on the original
        weight; merge uses them for an exact SVD without the dense delta's cost.
        """
        return None

    @property
    def has_bias(self) -> bool:
        return False

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return sum(prod(self._shape(r)) for r in self.keys if r != "alpha")

    @property
    def dense_params(self) -> int:
        return prod(self.shape)

    def fits(self, weight_shape) -> bool:
        """Can this module patch a weight of that shape?"""
        weight_shape = tuple(weight_shape)
        if self.shape == weight_shape:
            return True
        if not weight_shape or not self.shape or self.shape[0] != weight_shape[0]:
            return False
        if prod(self.shape) != prod(weight_shape):
            return False
        # linear delta on a 1x1 conv, or a flattened conv delta (out, in*kh*kw)
        return len(self.shape) == 2 or all(d == 1 for d in self.shape[2:])

    def _check_weight(self, weight: torch.Tensor | None) -> None:
        if weight is None:
            if self.uses_weight:
                raise ValueError(f"{self.name}: {self.algo}{' + DoRA' if self.dora else ''} needs the original weight")
            return
        if not self.fits(weight.shape):
            raise ValueError(f"{self.name}: adapter shape {self.shape} does not fit weight {tuple(weight.shape)}")

    # ---- public math ---------------------------------------------------------------------
    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ΔW at strength 1, shaped like the target weight (or self.shape)."""
        self._check_weight(weight)
        if self.streams and weight is not None and self.dora:  # DoRA by rows: the patch engine's tiles
            rows = weight.shape[0]
            delta = assemble(rows, weight.numel() // max(rows, 1), self.delta_fill(weight))
            return self._finite(delta.reshape(weight.shape))
        w0 = None if weight is None else weight.to(torch.float32)
        raw = self._raw_delta(w0)
        if w0 is not None:
            raw = raw.reshape(w0.shape)
        if self.dora:
            return self._finite(self._dora_delta(w0, raw))
        return self._finite(raw)

    def strength_delta(self, weight: torch.Tensor | None, strength: float) -> torch.Tensor:
        """float32 W'(s) - W0: strength times ΔW for everything linear in strength."""
        return self.delta(weight) * float(strength)

    def apply(self, weight: torch.Tensor, strength: float = 1.0, key: str | None = None) -> torch.Tensor:
        """The patched weight in weight's dtype: float32 math, one rounding.

        ``key`` seeds the stochastic rounding of fp8 weights (as the patch engine does).
        """
        if strength == 0:
            return weight.clone()
        out = weight.to(torch.float32, copy=True)
        if self.linear_in_strength:
            out.add_(self.delta(weight), alpha=strength)
        else:
            out.add_(self.strength_delta(weight, strength))
        check_range(out, weight.dtype, key)
        return to_dtype(out, weight.dtype, key)

    # ---- DoRA ----------------------------------------------------------------------------
    def _validate_dora(self) -> None:
        shape = self._shape("dora_scale")
        out = self.shape[0] if self.shape else None
        if "lora_magnitude_vector" in self.keys["dora_scale"]:
            # PEFT's magnitude is always per output channel, but conv layers save it
            # (1, out, 1, 1): read by shape alone it looks like LyCORIS's input axis.
            self.dora_axis = "out"
            if out is not None and prod(shape) != out:
                raise self._fail(f"magnitude shape {shape} does not match {out} output rows", "dora_scale")
        elif len(shape) == 1 or (len(shape) >= 2 and prod(shape[1:]) == 1 and (shape[0] != 1 or out == 1)):
            self.dora_axis = "out"
            if out is not None and shape[0] != out:
                raise self._fail(f"dora_scale shape {shape} does not match {out} output rows", "dora_scale")
        elif len(shape) >= 2 and shape[0] == 1:
            self.dora_axis = "in"
        else:
            raise self._fail(f"dora_scale shape {shape} is neither (out, 1, ...) nor (1, in, ...)", "dora_scale")

    def _dora_delta(self, w0: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Magnitude re-normalised by ‖W0 + ΔW‖ along the axis dora_scale was trained on, minus W0.

        Works in place in ``raw`` (a fresh tensor from ``_raw_delta``): no other full-size temporary.
        """
        merged = raw.add_(w0)
        eps = torch.finfo(torch.float32).eps
        if self.dora_axis == "out":
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
            view = (merged.shape[0],) + (1,) * (merged.dim() - 1)
        else:
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            view = (1, merged.shape[1]) + (1,) * (merged.dim() - 2)
        scale = self._dora_scale(prod(view)).reshape(view)
        return merged.mul_(scale / (norm.reshape(view) + eps)).sub_(w0)

    def _dora_scale(self, channels: int) -> torch.Tensor:
        scale = self._t("dora_scale")
        if scale.numel() != channels:  # the header check cannot know the weight's layout
            raise self._fail(f"dora_scale {tuple(scale.shape)} does not match the weight's {channels} "
                             f"{self.dora_axis}put channels", "dora_scale")
        return scale

    def describe(self) -> str:
        parts = [self.algo]
        if self.tucker:
            parts.append("tucker")
        if self.dora:
            parts.append("dora")
        return "+".join(parts)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} {self.describe()} rank={self.rank} "
            f"alpha={self.alpha} shape={self.shape}>"
        )

