"""What every adapter module shares: factor access, scale, DoRA, strength and apply.

An ``AdapterModule`` binds one module's tensors (by role) to the math of its
algorithm.  Shapes are checked from the file header when the module is built, so
a malformed file fails early with the file and key named; tensor data is read only
when a delta is asked for.  Every delta is built on the device it is asked for (the
weight's): factors are moved there once, in float32, and kept (``resident_bytes``).
Pure math: no I/O beyond the lazy tensor source, no knowledge of models or ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import AdapterFormatError
from ..io.reader import TensorSource
from ..numerics.checks import is_finite
from ..numerics.rounding import check_range, to_dtype
from ..numerics.tiles import CPU, RowFill, assemble
from . import dora
from .piece import RowPiece

#: file suffixes every algorithm that has them shares
COMMON_SUFFIXES = {".alpha": "alpha"}
DORA_SUFFIXES = {
    ".dora_scale": "dora_scale",
    ".lora_magnitude_vector": "dora_scale",  # PEFT DoRA, output axis
    ".lora_magnitude_vector.weight": "dora_scale",
    ".lora_magnitude_vector.default.weight": "dora_scale",
}


def _device(device) -> torch.device:
    return CPU if device is None else torch.device(device)


class AdapterModule:
    """One adapted layer: its algorithm, factors and the delta they rebuild."""

    algo: str = "?"
    #: file suffix -> role where writers spell a role otherwise than ".<role>"; the registry builds
    #: its suffix table from every class's ``all_suffixes``
    suffixes: dict[str, str] = {}
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
    #: the delta is built in row tiles by ``row_fill`` (set by modules that can, see ``numerics.tiles``)
    tiled: bool = False
    #: the role of a stored bias delta, for algorithms that carry one (full: diff_b, norms: b_norm)
    bias_role: str | None = None

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
        self._resident: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.alpha = self._read_alpha() if "alpha" in self.keys else default_alpha
        if self.alpha is not None and not math.isfinite(self.alpha):  # e.g. NaN from a PEFT config
            raise self._fail(f"alpha {self.alpha} is not a finite number", "alpha")
        self._validate()
        if self.dora:
            self._validate_dora()
            self.uses_weight = True

    # ---- detection -------------------------------------------------------------------------
    @classmethod
    def all_suffixes(cls) -> dict[str, str]:
        """Every suffix this algorithm reads: ".<role>" for each role, its own spellings, alpha, DoRA's."""
        plain = {} if cls.suffixes else {f".{role}": role for role in (*cls.required, *cls.optional)}
        return {**plain, **cls.suffixes, **COMMON_SUFFIXES, **(DORA_SUFFIXES if cls.supports_dora else {})}

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

    def _t(self, role: str, device=None) -> torch.Tensor:
        """A factor as float32 (the one precision all delta math uses) on ``device``.

        On the CPU it is read from the file each time; on any other device it is moved
        there once and kept, so a patch never re-uploads it (``release`` drops the copies).
        """
        device = _device(device)
        if device.type == "cpu":
            return self.source[self.keys[role]].to(torch.float32)
        kept = self._resident.get((role, device))
        if kept is None:
            kept = self._resident[(role, device)] = self.source[self.keys[role]].to(device, torch.float32)
        return kept

    @property
    def resident_bytes(self) -> int:
        """Bytes of factors kept on devices other than the CPU."""
        return sum(t.numel() * t.element_size() for t in self._resident.values())

    def release(self, device=None) -> None:
        """Drop the factors kept on ``device`` (every device when None)."""
        for key in [k for k in self._resident if device is None or k[1] == torch.device(device)]:
            del self._resident[key]

    def _fail(self, message: str, role: str | None = None) -> AdapterFormatError:
        key = self.keys.get(role) if role else None
        return AdapterFormatError(self.source.name, message, key or next(iter(self.keys.values()), None))

    def check_finite(self, delta: torch.Tensor) -> torch.Tensor:
        """Finite factors can still multiply past float32's range: refuse, never patch Inf/NaN."""
        if not is_finite(delta):
            raise self._fail("delta is not finite: factors or alpha too large for float32")
        return delta

    def _read_alpha(self) -> float | None:
        if math.prod(self._shape("alpha")) != 1:
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

    def _raw_delta(self, weight: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """float32 delta at strength 1 before DoRA, shaped like self.shape or weight, on ``device``.

        The tiled algorithms assemble it from ``row_fill``, so it has the patch kernel's bits.
        """
        return assemble(self.shape[0], math.prod(self.shape) // max(self.shape[0], 1),
                        self.row_fill(device), device).reshape(self.shape)

    def row_fill(self, device=None) -> RowFill:
        """Writes rows of the raw delta (before DoRA) into a tile on ``device``; only when ``tiled``."""
        raise NotImplementedError

    def reference_delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The algorithm's formula (before DoRA) written plainly in float64, as its module docstring has it."""
        raise NotImplementedError

    def reference(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW by the plain formulas in float64, DoRA included: what tests hold ``delta`` against."""
        raw = self.reference_delta(weight)
        if not self.dora:
            return raw
        w0 = weight.double()
        return dora.reference_delta(w0, raw.reshape(w0.shape), self._t("dora_scale"), self.dora_axis)

    @property
    def row_wise(self) -> bool:
        """Each row of the delta depends only on the same row of W0 (so it may be split by rows)."""
        return not self.dora or self.dora_axis == "out"

    def row_piece(self, start: int, length: int):
        """Rows [start, start + length) of this module's delta, as a module (one object per range)."""
        pieces = self.__dict__.setdefault("_pieces", {})
        if (start, length) not in pieces:
            pieces[(start, length)] = RowPiece(self, start, length)
        return pieces[(start, length)]

    @property
    def _dora_rows(self) -> bool:
        """DoRA normalised per output row: each row of the delta needs only its own row of W0."""
        return self.dora and self.dora_axis == "out"

    @property
    def streams(self) -> bool:
        """The patch engine may build this delta tile by tile while it patches (``delta_fill``)."""
        return self.tiled and (not self.uses_weight or self._dora_rows)

    def delta_fill(self, weight: torch.Tensor | None, device=None) -> RowFill:
        """Writes rows of ``delta(weight)`` into a tile; only when ``streams``.

        ``weight`` is the original weight (any dtype, rows first, on the tile's device),
        needed by DoRA only.
        """
        device = weight.device if weight is not None else _device(device)
        raw = self.row_fill(device)
        if not self.dora:
            return raw
        rows = weight.shape[0]
        w0 = weight.reshape(rows, weight.numel() // max(rows, 1))
        return dora.row_fill(raw, w0, self._dora_scale(rows, device))

    def bias_delta(self, device=None) -> torch.Tensor | None:
        """float32 bias delta at strength 1 on ``device``, for algorithms that carry one."""
        return self._t(self.bias_role, device) if self.has_bias else None

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U, V), float32, with U @ V == delta() flattened to (out, in·k·k), or None.

        Only for deltas that are cheaply low rank and do not depend on the original
        weight; merge uses them for an exact SVD without the dense delta's cost.
        """
        return None

    @property
    def has_bias(self) -> bool:
        return self.bias_role is not None and self._has(self.bias_role)

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return sum(math.prod(self._shape(r)) for r in self.keys if r != "alpha")

    @property
    def dense_params(self) -> int:
        return math.prod(self.shape)

    def fits(self, weight_shape) -> bool:
        """Can this module patch a weight of that shape?"""
        weight_shape = tuple(weight_shape)
        if self.shape == weight_shape:
            return True
        if not weight_shape or not self.shape or self.shape[0] != weight_shape[0]:
            return False
        if math.prod(self.shape) != math.prod(weight_shape):
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
    def raw_delta(self, weight: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """float32 ΔW at strength 1 on the weight's device (or ``device``), not checked for finiteness.

        The patch kernel uses this and checks the whole sum once; callers outside it use ``delta``.
        """
        self._check_weight(weight)
        device = weight.device if weight is not None else _device(device)
        if self.streams and weight is not None and self.dora:  # DoRA by rows: the patch kernel's tiles
            rows = weight.shape[0]
            return assemble(rows, weight.numel() // max(rows, 1), self.delta_fill(weight), device).reshape(weight.shape)
        w0 = None if weight is None else weight.to(torch.float32)
        raw = self._raw_delta(w0, device)
        if w0 is not None:
            raw = raw.reshape(w0.shape)
        if self.dora:
            axis_len = w0.shape[0] if self.dora_axis == "out" else w0.shape[1]
            return dora.merge_into(raw, w0, self._dora_scale(axis_len, device), self.dora_axis)
        return raw

    def delta(self, weight: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """float32 ΔW at strength 1, shaped like the target weight (or self.shape), checked finite."""
        return self.check_finite(self.raw_delta(weight, device))

    def raw_strength_delta(self, weight: torch.Tensor | None, strength: float, device=None) -> torch.Tensor:
        """float32 W'(s) - W0, unchecked: strength times ΔW for everything linear in strength."""
        return self.raw_delta(weight, device) * float(strength)  # never in place: it may be a kept factor

    def strength_delta(self, weight: torch.Tensor | None, strength: float, device=None) -> torch.Tensor:
        """float32 W'(s) - W0, checked finite."""
        return self.check_finite(self.raw_strength_delta(weight, strength, device))

    def apply(self, weight: torch.Tensor, strength: float = 1.0, key: str | None = None) -> torch.Tensor:
        """The patched weight in weight's dtype and device: float32 math, one rounding.

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
        peft = "lora_magnitude_vector" in self.keys["dora_scale"]
        axis = dora.axis_of(shape, out, peft)
        if axis is None:
            what = "magnitude" if peft else "dora_scale"
            raise self._fail(f"{what} shape {shape} is neither (out, 1, ...) matching {out} output rows "
                             "nor (1, in, ...)", "dora_scale")
        self.dora_axis = axis

    def _dora_scale(self, channels: int, device=None) -> torch.Tensor:
        scale = self._t("dora_scale", device)
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
