"""DoRA: a learned magnitude re-normalising W0 + ΔW, as pure functions.

W' = m · (W0 + ΔW) / ‖W0 + ΔW‖, the norm taken per output row (``out``: PEFT, and
LyCORIS with ``wd_on_out``) or per input column (``in``: LyCORIS's default), so the
patch is ΔW_dora = W' − W0.  Any low-rank algorithm may carry a ``dora_scale`` (m).

Reference (what the fast paths are tested against)::

    merged = w0 + raw
    axes = all dims but 0 (out) or all but 1 (in)
    delta = scale * merged / (norm(merged over axes) + eps) - w0
"""

from __future__ import annotations

import math

import torch

from ..numerics.tiles import WORKSPACE, RowFill

EPS = torch.finfo(torch.float32).eps


def reference_delta(w0: torch.Tensor, raw: torch.Tensor, scale: torch.Tensor, axis: str) -> torch.Tensor:
    """The formula itself, in float64 (for tests)."""
    merged = w0.double() + raw.double()
    dims = tuple(d for d in range(merged.dim()) if d != (0 if axis == "out" else 1))
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
    return scale.double().reshape(norm.shape) * merged / (norm + EPS) - w0.double()


def axis_of(scale_shape: tuple[int, ...], out_rows: int | None, peft: bool) -> str | None:
    """"out" or "in" from the saved magnitude's shape; None when it fits neither.

    PEFT's ``lora_magnitude_vector`` is always per output channel, though conv layers
    save it as (1, out, 1, 1), which read by shape alone looks like LyCORIS's input axis.
    """
    if peft:
        return "out" if out_rows is None or math.prod(scale_shape) == out_rows else None
    if len(scale_shape) == 1 or (len(scale_shape) >= 2 and math.prod(scale_shape[1:]) == 1
                                 and (scale_shape[0] != 1 or out_rows == 1)):
        return "out" if out_rows is None or scale_shape[0] == out_rows else None
    if len(scale_shape) >= 2 and scale_shape[0] == 1:
        return "in"
    return None


def merge_into(raw: torch.Tensor, w0: torch.Tensor, scale: torch.Tensor, axis: str) -> torch.Tensor:
    """ΔW_dora, in place in ``raw`` (a fresh float32 delta shaped like ``w0``): no other full-size temporary."""
    merged = raw.add_(w0)
    if axis == "out":
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        view = (merged.shape[0],) + (1,) * (merged.dim() - 1)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        view = (1, merged.shape[1]) + (1,) * (merged.dim() - 2)
    return merged.mul_(scale.reshape(view) / (norm.reshape(view) + EPS)).sub_(w0)


def row_fill(raw: RowFill, w0: torch.Tensor, scale: torch.Tensor) -> RowFill:
    """Rows of ΔW_dora on the output axis: each row needs only its own row of W0.

    ``w0`` is (rows, cols) in any dtype on the tile's device, ``scale`` (rows,) float32 there.
    """
    column = scale.reshape(-1, 1)

    def fill(start, stop, out):
        raw(start, stop, out)
        base = WORKSPACE.take("w0", out.shape, out.device)
        base.copy_(w0[start:stop])
        merged = out.add_(base)
        norm = merged.norm(dim=1, keepdim=True)
        merged.mul_(column[start:stop] / (norm + EPS)).sub_(base)

    return fill
