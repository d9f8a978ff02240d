"""Custom autograd functions that keep weight-sized tensors out of the saved graph.

Plain autograd on ``W0 + ΔW`` saves what every op needs for its backward: the two
dense halves of a LoHa Hadamard product, the rebuilt weight a linear/conv needs for
the input gradient, the broadcast product behind ``torch.kron``.  Each of those is as
large as the layer's weight, kept for every adapted layer until the backward pass
reaches it.  The functions here save only the small factors (and the layer input,
which the layer's own backward needs anyway) and rebuild the dense pieces inside
their backward, one layer at a time, deleting them as soon as they are used.

- ``HadaWeight`` / ``HadaWeightTucker``: LoHa's ΔW = s·(w1a w1b) ⊙ (w2a w2b), each half
  rebuilt in backward only while the other half's gradient needs it (the seeds' trick).
- ``KronWeight``: LoKr's ΔW = s·kron(w1, w2); both factor gradients are contracted
  straight from the incoming gradient, no weight-sized ``grad * w2`` broadcast.
- ``KronLinear``: y = s·x·kron(w1, w2)ᵀ without ever forming the Kronecker product.
- ``RebuiltOp``: y = op(x, build(W0, factors)) saving x and the factors; the weight is
  rebuilt in backward to give the input gradient and the factors' gradients.
- ``HadaRebuiltOp``: the same for LoHa in one piece: each half is rebuilt once in backward
  and serves both the input gradient (through W') and the factors' gradients, so the layer
  costs no more weight-sized passes than plain autograd while keeping none of them.

Every function is checked against plain autograd in float64 and by ``gradcheck``
(tests/test_train_grads.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


# ---- LoHa ------------------------------------------------------------------------------------

class HadaWeight(Function):
    """ΔW = scale·(w1a @ w1b) ⊙ (w2a @ w2b) with w_a (out, r), w_b (r, in·k…).

    Saves the four factors only.  Backward rebuilds w2a@w2b to get the first pair's
    gradient, frees it, then rebuilds w1a@w1b for the second pair.
    """

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        out = (w1a * scale) @ w1b  # scale on the small factor: no extra full-size pass
        return out.mul_(w2a @ w2b)

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        need = ctx.needs_input_grad
        g1a = g1b = g2a = g2b = None
        if need[0] or need[1]:
            half = (w2a * ctx.scale) @ w2b
            g = half.mul_(grad)  # grad ⊙ s·(w2a w2b), in the rebuilt half's memory
            if need[0]:
                g1a = g @ w1b.t()
            if need[1]:
                g1b = w1a.t() @ g
            del g, half
        if need[2] or need[3]:
            half = (w1a * ctx.scale) @ w1b
            g = half.mul_(grad)
            if need[2]:
                g2a = g @ w2b.t()
            if need[3]:
                g2b = w2a.t() @ g
            del g, half
        return g1a, g1b, g2a, g2b, None


def _tucker_rebuild(t, wa, wb):
    """t ×₁ waᵀ ×₂ wbᵀ: (out, in, k…) from t (r, r, k…), wa (r, out), wb (r, in)."""
    return torch.einsum("ij...,ip,jr->pr...", t, wa, wb)


def _tucker_grads(g, t, wa, wb, need):
    """Gradients of ⟨g, t ×₁ waᵀ ×₂ wbᵀ⟩ for (t, wa, wb); contractions through small partials."""
    gt = gwa = gwb = None
    if need[0]:
        gt = torch.einsum("pr...,ip,jr->ij...", g, wa, wb)
    if need[1]:
        tb = torch.einsum("ij...,jr->ir...", t, wb)  # (r, in, k…): small
        gwa = torch.einsum("ir...,pr...->ip", tb, g)
    if need[2]:
        ta = torch.einsum("ij...,ip->pj...", t, wa)  # (out, r, k…): small
        gwb = torch.einsum("pj...,pr...->jr", ta, g)
    return gt, gwa, gwb


class HadaWeightTucker(Function):
    """LoHa Tucker: ΔW = scale·R1 ⊙ R2, Rj = tj ×₁ wjaᵀ ×₂ wjbᵀ (out, in, k…).

    Saves the six factors; each half is rebuilt in backward only for the other half's
    gradient and deleted right after.
    """

    @staticmethod
    def forward(ctx, t1, w1a, w1b, t2, w2a, w2b, scale: float):
        ctx.save_for_backward(t1, w1a, w1b, t2, w2a, w2b)
        ctx.scale = scale
        out = _tucker_rebuild(t1, w1a * scale, w1b)
        return out.mul_(_tucker_rebuild(t2, w2a, w2b))

    @staticmethod
    def backward(ctx, grad):
        t1, w1a, w1b, t2, w2a, w2b = ctx.saved_tensors
        need = ctx.needs_input_grad
        first = second = (None, None, None)
        if any(need[0:3]):
            g = _tucker_rebuild(t2, w2a * ctx.scale, w2b).mul_(grad)
            first = _tucker_grads(g, t1, w1a, w1b, need[0:3])
            del g
        if any(need[3:6]):
            g = _tucker_rebuild(t1, w1a * ctx.scale, w1b).mul_(grad)
            second = _tucker_grads(g, t2, w2a, w2b, need[3:6])
            del g
        return (*first, *second, None)


# ---- LoKr ------------------------------------------------------------------------------------

class KronWeight(Function):
    """ΔW = scale·kron(w1, w2), w1 (a, c), w2 (b, d·k…) → (a·b, c·d·k…).

    Backward contracts the incoming gradient, viewed (a, b, c, d·k…), against the other
    factor by batched matrix products: no weight-sized ``grad * factor`` temporary.
    """

    @staticmethod
    def forward(ctx, w1, w2, scale: float):
        ctx.save_for_backward(w1, w2)
        ctx.scale = scale
        return torch.kron((w1 * scale).contiguous(), w2.contiguous())

    @staticmethod
    def backward(ctx, grad):
        w1, w2 = ctx.saved_tensors
        a, c = w1.shape
        b, dk = w2.shape
        g = grad.contiguous().view(a, b, c, dk)
        g1 = g2 = None
        if ctx.needs_input_grad[0]:
            # Σ_j,l g[i,j,k,l]·w2[j,l]: per (i, j) a (c, dk)·(dk,) product, then a sum over j
            g1 = torch.matmul(g, w2.unsqueeze(-1)).sum(1).squeeze(-1).mul_(ctx.scale)
        if ctx.needs_input_grad[1]:
            # Σ_i,k w1[i,k]·g[i,j,k,l]
            g2 = torch.matmul(w1.view(a, 1, 1, c), g).sum(0).squeeze(1).mul_(ctx.scale)
        return g1, g2, None


class KronLinear(Function):
    """y = scale·x·kron(w1, w2)ᵀ for x (…, c·d), w1 (a, c), w2 (b, d) → (…, a·b).

    Rows of x are viewed as (c, d) blocks X: Y = w1 X w2ᵀ.  Saves x, w1, w2; the two
    partial products are recomputed in backward, never kept.
    """

    @staticmethod
    def forward(ctx, x, w1, w2, scale: float):
        a, c = w1.shape
        b, d = w2.shape
        lead = x.shape[:-1]
        xs = x.reshape(-1, c, d)
        y = torch.matmul(w1 * scale, torch.matmul(xs, w2.t()))  # (M, a, b)
        ctx.save_for_backward(x, w1, w2)
        ctx.scale = scale
        return y.reshape(*lead, a * b)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2 = ctx.saved_tensors
        a, c = w1.shape
        b, d = w2.shape
        s = ctx.scale
        g = grad.reshape(-1, a, b)
        xs = x.reshape(-1, c, d)
        gx = g1 = g2 = None
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(torch.matmul((w1 * s).t(), g), w2).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            # Σ_m g[m] (X[m] w2ᵀ)ᵀ
            xw2 = torch.matmul(xs, w2.t())  # (M, c, b)
            g1 = torch.einsum("mij,mkj->ik", g, xw2).mul_(s)
            del xw2
        if ctx.needs_input_grad[2]:
            # Σ_m (w1ᵀ g[m])ᵀ X[m]
            w1g = torch.matmul(w1.t(), g)  # (M, c, b)
            g2 = torch.einsum("mkj,mkl->jl", w1g, xs).mul_(s)
            del w1g
        return gx, g1, g2, None


# ---- layer op with the weight rebuilt in backward ----------------------------------------------

@dataclass(frozen=True)
class LayerSpec:
    """What a Linear/ConvNd computes, as plain numbers: enough to run it and its backward."""

    kind: str  # "linear" | "conv"
    dims: int  # spatial dims of a conv (1, 2, 3); 0 for linear
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @classmethod
    def of(cls, layer: nn.Module) -> LayerSpec:
        shape = tuple(layer.weight.shape)
        if isinstance(layer, nn.Linear):
            return cls("linear", 0, shape)
        if isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
            if layer.padding_mode != "zeros":
                raise ValueError(f"conv padding_mode {layer.padding_mode!r} is not supported for training")
            padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
            return cls("conv", len(layer.kernel_size), shape, tuple(layer.stride), padding,
                       tuple(layer.dilation), layer.groups)
        raise TypeError(f"{type(layer).__name__} is not a Linear or Conv1d/2d/3d layer")

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    @property
    def is_kxk(self) -> bool:
        """A conv whose kernel is larger than 1 in some dimension (gets conv rank/alpha)."""
        return self.kind == "conv" and _prod(self.kernel) > 1

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Input channels the weight sees (in/groups for a grouped conv)."""
        return self.weight_shape[1]

    def conv_kwargs(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    def forward(self, x, weight, bias=None):
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        fn = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return fn(x, weight, bias, **self.conv_kwargs())

    def channel_axis(self, x) -> int:
        return x.dim() - 1 if self.kind == "linear" else 1

    def backward(self, grad, x, weight, need_x: bool, need_w: bool):
        """(grad of x, grad of weight) of ``forward(x, weight)`` without re-running it."""
        if self.kind == "linear":
            gx = grad @ weight if need_x else None
            gw = None
            if need_w:
                gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            return gx, gw
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, list(self.stride), list(self.padding), list(self.dilation),
            False, [0] * self.dims, self.groups, [need_x, need_w, False],
        )
        return gx, gw

    @property
    def fused_backward(self) -> bool:
        """False for string padding ("same"), which aten's convolution_backward does not take."""
        return not isinstance(self.padding, str)


class RebuiltOp(Function):
    """y = op(x, build(w0, *params), bias), saving x, w0 and the params only.

    ``build`` must be a pure function of its tensor arguments (random masks go in as
    closure constants).  ``w0`` is the layer's own weight (never a cast copy: the cast
    belongs inside ``build``) or None for a delta-only op.  In backward the weight is
    rebuilt under autograd, the layer's input and weight gradients come from one
    ``LayerSpec.backward`` call, and the weight gradient is pushed through the rebuild
    to the params.  Same three matrix products per layer as plain autograd; the price is
    one extra rebuild of the (low-rank) weight.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, spec: LayerSpec, build: Callable, *params):
        with torch.autocast(x.device.type, enabled=False):
            weight = build(w0, *params)
            b = None if bias is None else bias.to(weight.dtype)
            y = spec.forward(x, weight, b)
        del weight
        ctx.spec, ctx.build = spec, build
        ctx.has_w0 = w0 is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, w0 if w0 is not None else x.new_empty(0), *params)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w0, *params = ctx.saved_tensors
        w0 = w0 if ctx.has_w0 else None
        need = ctx.needs_input_grad
        need_x, need_bias, need_params = need[0], need[2], need[5:]
        leaves = [p.detach().requires_grad_(n) for p, n in zip(params, need_params)]
        wanted = [leaf for leaf, n in zip(leaves, need_params) if n]
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            weight = ctx.build(w0, *leaves)
        gx, gw = ctx.spec.backward(grad, x, weight.detach(), need_x, bool(wanted))
        param_grads = [None] * len(params)
        if wanted:
            got = iter(torch.autograd.grad(weight, wanted, gw.to(weight.dtype), allow_unused=True))
            param_grads = [next(got) if n else None for n in need_params]
        del weight, gw
        gb = None
        if need_bias:
            axis = ctx.spec.channel_axis(grad)
            gb = grad.sum(dim=[d for d in range(grad.dim()) if d != axis]).to(ctx.bias_dtype)
        return (gx, None, gb, None, None, *param_grads)


class HadaRebuiltOp(Function):
    """y = op(x, W0 + (rows·w1a w1b) ⊙ (w2a w2b), bias), saving x, W0 and the four factors.

    ``rows`` is the scale α/r, or a per-output-row tensor (α/r times a rank-dropout mask):
    it folds into w1a, so the masked ΔW rows cost nothing.  Backward rebuilds P1 = rows·w1a w1b
    and P2 = w2a w2b once, uses them for W' (the input gradient), then turns them in place into
    ∂L/∂P2 = G ⊙ P1 and ∂L/∂P1 = G ⊙ P2 for the factor gradients.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, spec: LayerSpec, rows, w1a, w1b, w2a, w2b):
        with torch.autocast(x.device.type, enabled=False):
            weight = HadaRebuiltOp._weight(w0, rows, w1a, w1b, w2a, w2b, x.dtype)
            y = spec.forward(x, weight, None if bias is None else bias.to(x.dtype))
        del weight
        ctx.spec, ctx.rows = spec, rows
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, w0, w1a, w1b, w2a, w2b)
        return y

    @staticmethod
    def _halves(rows, w1a, w1b, w2a, w2b):
        a1 = w1a * (rows if isinstance(rows, float) else rows.to(w1a.dtype).view(-1, 1))
        return a1, a1 @ w1b, w2a @ w2b

    @staticmethod
    def _weight(w0, rows, w1a, w1b, w2a, w2b, dtype, halves=None):
        _, p1, p2 = halves or HadaRebuiltOp._halves(rows, w1a, w1b, w2a, w2b)
        return torch.addcmul(w0.to(p1.dtype).reshape(p1.shape), p1, p2).reshape(w0.shape).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        x, w0, w1a, w1b, w2a, w2b = ctx.saved_tensors
        need = ctx.needs_input_grad
        spec, rows = ctx.spec, ctx.rows
        with torch.autocast(x.device.type, enabled=False):
            a1, p1, p2 = HadaRebuiltOp._halves(rows, w1a, w1b, w2a, w2b)
            weight = HadaRebuiltOp._weight(w0, rows, w1a, w1b, w2a, w2b, x.dtype, (a1, p1, p2))
            gx, gw = spec.backward(grad, x, weight, need[0], any(need[5:9]))
            del weight
            g1a = g1b = g2a = g2b = None
            if gw is not None:
                gw = gw.reshape(p1.shape).to(p1.dtype)
                d_p2 = p1.mul_(gw)  # ∂L/∂P2 = G ⊙ P1, in P1's memory
                d_p1 = p2.mul_(gw)  # ∂L/∂P1 = G ⊙ P2
                del gw
                if need[5]:
                    g1a = d_p1 @ w1b.t()
                    g1a = g1a * (rows if isinstance(rows, float) else rows.to(g1a.dtype).view(-1, 1))
                if need[6]:
                    g1b = a1.t() @ d_p1
                if need[7]:
                    g2a = d_p2 @ w2b.t()
                if need[8]:
                    g2b = w2a.t() @ d_p2
                del d_p1, d_p2
        gb = None
        if need[2]:
            axis = spec.channel_axis(grad)
            gb = grad.sum(dim=[d for d in range(grad.dim()) if d != axis]).to(ctx.bias_dtype)
        return gx, None, gb, None, None, g1a, g1b, g2a, g2b


def rebuilt_forward(x: torch.Tensor, w0: torch.Tensor | None, bias: torch.Tensor | None, spec: LayerSpec,
                    build: Callable, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``spec.forward(x, build(w0, *params), bias)`` with the memory profile of ``RebuiltOp``.

    Falls back to plain autograd for the rare layer aten's fused backward cannot take
    (string padding); the result is the same, only the saved tensors differ.
    """
    if spec.fused_backward:
        return RebuiltOp.apply(x, w0, bias, spec, build, *params)
    weight = build(w0, *params)
    return spec.forward(x, weight, None if bias is None else bias.to(weight.dtype))
