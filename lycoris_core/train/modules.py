"""Trainable adapter modules, one per adapted Linear/Conv layer, in LyCORIS's file layout.

Each module owns its factors as float32 master parameters named by the roles the
loader reads (``lora_up``, ``hada_w1_a``, ``lokr_w2_b``, ``dora_scale``, …) with the
exact shapes LyCORIS saves, so ``file_tensors()`` *is* the saved state and the file's
delta, rebuilt by ``lycoris_core.load_adapter``, equals ``effective_delta()``.

How a module runs its layer (``forward``):

- **bypass** (LoRA/LoCon, LoKr, (IA)³; not with DoRA or grouped convs):
  ``base(x) + s·branch(x)``; no weight-sized ΔW, no weight-sized gradient.  LoKr's branch
  touches activation-sized tensors several times, so with ``bypass=True`` a LoKr layer takes
  it only while the activations are small against the weight (tokens ≤ out/2, measured on
  CPU: ``bench/train.py``); ``bypass="always"`` forces it.  Both keep nothing weight-sized.
- **rebuild** (LoHa, DoRA, full, or ``bypass=False``): ``op(x, W0 + ΔW)`` through
  ``RebuiltOp``, which saves only x and the factors and rebuilds the weight in backward;
  LoHa's ΔW goes through ``HadaWeight`` and LoKr's through ``KronWeight``.

Dropouts follow LyCORIS's definitions (lycoris/modules/base.py): module dropout skips
the adapter for a step; rank dropout masks the rank channels of LoRA/LoCon (in both
modes) and the output rows of ΔW for every other algorithm; dropout drops elements of
the adapter branch's output (ignored with DoRA, as LyCORIS does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .functions import (
    HadaRebuiltOp,
    HadaWeight,
    HadaWeightTucker,
    KronLinear,
    KronWeight,
    LayerSpec,
    rebuilt_forward,
)

EPS = torch.finfo(torch.float32).eps  # the loader's DoRA epsilon, whatever the math dtype
_PLAIN_FORWARDS = {nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
# attributes of layers whose forward does more than cast and run (ComfyUI's lowvram patches, scaled fp8)
_OWN_MATH = ("scale_weight", "scale_input", "weight_scale")


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's LoKr split of a dimension: (m, n), m <= n, m·n = dimension.

    A positive ``factor`` dividing the dimension gives (factor, dimension/factor), sorted;
    otherwise m is the largest divisor not above √dimension (nor above ``factor`` when
    one is given), the most balanced split.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    cap = dimension if factor <= 0 else factor
    best = 1
    for m in range(1, math.isqrt(dimension) + 1):
        if m > cap:
            break
        if dimension % m == 0:
            best = m
    return best, dimension // best


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer's math runs in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def role_suffix(role: str) -> str:
    """File suffix of a role: LoRA factors are saved as ``<role>.weight``."""
    return f"{role}.weight" if role.startswith("lora_") else role


def _kaiming(t: torch.Tensor, generator) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


class TrainModule(nn.Module):
    """One adapted layer.  Subclasses define the roles, their init and the ΔW math."""

    algo = "?"
    #: roles in the order the math takes them (``_delta`` gets them in this order)
    roles: tuple[str, ...] = ()
    supports_bypass = False
    supports_dora = False
    #: LoRA/LoCon drop rank channels; every other algorithm drops output rows of ΔW
    rank_mask_on_rank = False

    def __init__(self, name: str, layer: nn.Module, shapes: Mapping[str, tuple[int, ...]], alpha: float | None,
                 *, dora_on_output: bool | None = None, dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, rank_dropout_scale: bool = False, bypass: bool | str = True,
                 factor_dtype: torch.dtype | None = None):
        super().__init__()
        self.lora_name = name
        self.spec = LayerSpec.of(layer)
        self.shape = tuple(layer.weight.shape)
        self._layer = [layer]  # a reference, not a child: the model keeps owning its layer
        self._org_forward = None
        self.present = tuple(r for r in self.roles if r in shapes)
        for role in self.present:
            self.register_parameter(role, nn.Parameter(torch.zeros(shapes[role], dtype=torch.float32)))
        self.dora = dora_on_output is not None
        if self.dora:
            if not self.supports_dora:
                raise ValueError(f"{self.algo} does not support DoRA")
            self.wd_on_out = bool(dora_on_output)
            w0 = layer.weight.detach().to(torch.float32)
            self.dora_scale = nn.Parameter(self._norm(w0))
        # alpha as float32 holds it: the file stores it so, and the trained scale is then the file's
        self.alpha = None if alpha is None else float(torch.tensor(float(alpha), dtype=torch.float32))
        self.rank = self._rank()
        self.scale = 1.0 if self.rank is None or not self.alpha else self.alpha / self.rank
        self.dropout = float(dropout)
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.rank_dropout_scale = bool(rank_dropout_scale)
        if bypass not in (True, False, "always"):
            raise ValueError(f"bypass must be True, False or 'always', got {bypass!r}")
        self.bypass = bypass
        self.factor_dtype = factor_dtype
        self._plain_layer = type(layer).forward in _PLAIN_FORWARDS
        self._plain_weight = type(layer.weight) in (torch.Tensor, nn.Parameter) and not any(
            hasattr(layer, a) for a in _OWN_MATH)

    # ---- per-algorithm hooks ------------------------------------------------------------------
    def _rank(self) -> int | None:
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The seeds' init: the input side random, the output side zero, so ΔW starts at 0."""
        raise NotImplementedError

    def _delta(self, params, dtype, mask) -> torch.Tensor:
        """Scaled ΔW (before DoRA) shaped like the weight, in ``dtype``, differentiable."""
        raise NotImplementedError

    def _branch(self, x, params, mask) -> torch.Tensor:
        """ΔW·x without ΔW (bypass algorithms only)."""
        raise NotImplementedError

    # ---- shared machinery ---------------------------------------------------------------------
    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    def factors(self) -> list[torch.Tensor]:
        """The tensors the math takes, in ``roles`` order, then ``dora_scale``."""
        out = [getattr(self, r) for r in self.present]
        if self.dora:
            out.append(self.dora_scale)
        return out

    @property
    def use_bypass(self) -> bool:
        return self.supports_bypass and bool(self.bypass) and not self.dora and self.spec.groups == 1

    def _bypass_pays(self, x) -> bool:
        """Whether this input is better served by the bypass than by a rebuilt weight."""
        return True

    @property
    def rank_mask_size(self) -> int:
        return self.rank if self.rank_mask_on_rank else self.spec.out_features

    def _math_dtype(self, params) -> torch.dtype:
        return self.factor_dtype or params[0].dtype

    def _p(self, params, dtype) -> dict[str, torch.Tensor]:
        return {r: p.to(dtype) for r, p in zip(self.present, params)}

    def _norm(self, w: torch.Tensor) -> torch.Tensor:
        """‖w‖ along DoRA's axis, shaped like dora_scale: (out, 1, …) or (1, in, 1, …)."""
        if self.wd_on_out:
            return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *([1] * (w.dim() - 1)))
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        return norm.reshape(1, w.shape[1], *([1] * (w.dim() - 2)))

    def _weight(self, w0, params, out_dtype, mask) -> torch.Tensor:
        """W' = W0 + ΔW, or DoRA's dora_scale·(W0 + ΔW)/‖W0 + ΔW‖, in ``out_dtype``."""
        dtype = self._math_dtype(params)
        n = len(self.present)
        merged = w0.to(dtype) + self._delta(params[:n], dtype, mask)
        if self.dora:
            merged = merged * (params[n].to(dtype) / (self._norm(merged) + EPS))
        return merged.to(out_dtype)

    def _builder(self, out_dtype, mask):
        def build(w0, *params):
            if w0 is None:
                return self._delta(params, self._math_dtype(params), mask).to(out_dtype)
            return self._weight(w0, params, out_dtype, mask)

        return build

    def _rank_mask(self, device) -> torch.Tensor | None:
        if not (self.training and self.rank_dropout):
            return None
        mask = (torch.rand(self.rank_mask_size, device=device) > self.rank_dropout).to(torch.float32)
        if self.rank_dropout_scale:
            mask = mask / mask.mean().clamp_min(1.0 / self.rank_mask_size)
        return mask

    def _row_mask(self, delta, mask):
        """Rank dropout of the non-LoRA algorithms: output rows of ΔW."""
        if mask is None:
            return delta
        return delta * mask.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))

    def _casts_itself(self, x) -> bool:
        """The layer's weight can simply be cast to the compute dtype (no pending weight functions)."""
        layer = self.layer
        if self._plain_layer:
            return True
        return (self._plain_weight and layer.weight.device == x.device
                and not getattr(layer, "weight_function", None) and not getattr(layer, "bias_function", None))

    def base_forward(self, x, *args, **kwargs):
        """The frozen layer.  A weight in another dtype than the math (fp16/fp8 storage, autocast,
        ComfyUI's manual cast) is cast inside ``RebuiltOp``: autograd keeps no cast copy of it."""
        w = self.layer.weight
        dtype = compute_dtype(x)
        if w.dtype == dtype or not self._casts_itself(x):
            return self._org_forward(x, *args, **kwargs)
        return rebuilt_forward(x.to(dtype), w, self.layer.bias, self.spec, lambda w0: w0.to(dtype), ())

    def forward(self, x, *args, **kwargs):
        if self.training and self.module_dropout and float(torch.rand(())) < self.module_dropout:
            return self._org_forward(x, *args, **kwargs)
        dtype = compute_dtype(x)
        mask = self._rank_mask(x.device)
        params = self.factors()
        if self.use_bypass and (self.bypass == "always" or self._bypass_pays(x)):
            base = self.base_forward(x, *args, **kwargs)
            branch = self._branch(x.to(dtype), [p.to(dtype) for p in params], mask)
            if self.training and self.dropout:
                branch = F.dropout(branch, self.dropout)
            return base + branch.to(base.dtype)
        own_weight = not self._casts_itself(x)  # weight functions, scaled fp8: only its forward knows W0
        if own_weight and self.dora:
            raise ValueError(f"{self.lora_name}: DoRA needs the layer's weight, which this layer computes in "
                             "its own forward (weight functions or a scaled fp8 weight); train it without DoRA")
        if own_weight or (self.training and self.dropout and not self.dora):
            base = self.base_forward(x, *args, **kwargs)  # the layer's own forward, then ΔW·x beside it
            branch = rebuilt_forward(x.to(dtype), None, None, self.spec, self._builder(dtype, mask), params)
            if self.training and self.dropout:
                branch = F.dropout(branch, self.dropout)
            return base + branch.to(base.dtype)
        return self._rebuilt(x.to(dtype), self.layer.weight, self._bias(), dtype, mask, params)

    def _rebuilt(self, x, w0, bias, dtype, mask, params):
        """op(x, W0 + ΔW) with nothing weight-sized kept for backward."""
        return rebuilt_forward(x, w0, bias, self.spec, self._builder(dtype, mask), params)

    def _bias(self):
        return self.layer.bias

    # ---- hooking into the layer -----------------------------------------------------------------
    def attach(self) -> None:
        """Route the layer's forward through this module (the model's tree is not changed)."""
        if self._org_forward is not None:
            return
        layer = self.layer
        self._had_instance_forward = "forward" in layer.__dict__
        self._org_forward = layer.forward
        layer.forward = self.forward

    def detach_(self) -> None:
        """Give the layer its own forward back."""
        if self._org_forward is None:
            return
        layer = self.layer
        if self._had_instance_forward:
            layer.forward = self._org_forward
        else:
            del layer.forward
        self._org_forward = None

    @property
    def attached(self) -> bool:
        return self._org_forward is not None

    # ---- what loaders see ----------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """suffix -> float32 tensor, exactly the keys and shapes LyCORIS saves for this module."""
        out = {role_suffix(r): getattr(self, r).detach().to(torch.float32) for r in self.present}
        if self.rank is not None or self.algo in ("lokr",):
            out["alpha"] = torch.tensor(float(self.saved_alpha), dtype=torch.float32)
        if self.dora:
            out["dora_scale"] = self.dora_scale.detach().to(torch.float32)
        return out

    @property
    def saved_alpha(self) -> float:
        return float(self.alpha) if self.alpha else float(self.rank or 1)

    @torch.no_grad()
    def effective_delta(self) -> torch.Tensor:
        """float32 ΔW at strength 1 as a loader rebuilds it from the saved file (DoRA included)."""
        params = [p.detach().to(torch.float32) for p in self.factors()]
        w0 = self.layer.weight.detach().to(torch.float32)
        if self.dora or self.algo == "ia3":
            return self._weight(w0, params, torch.float32, None) - w0
        return self._delta(params[: len(self.present)], torch.float32, None)

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy role -> tensor values in (continuing from a file); shapes must match."""
        for role, value in tensors.items():
            target = getattr(self, role)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{self.lora_name}: {role} has shape {tuple(value.shape)}, "
                                 f"the module needs {tuple(target.shape)}")
            target.copy_(value.to(torch.float32))

    def extra_repr(self) -> str:
        parts = [self.lora_name, self.algo, f"rank={self.rank}", f"alpha={self.alpha}"]
        if self.dora:
            parts.append(f"dora({'out' if self.wd_on_out else 'in'})")
        parts.append("bypass" if self.use_bypass else "rebuild")
        return ", ".join(parts)


# ---- LoRA / LoCon ----------------------------------------------------------------------------

class TrainLoCon(TrainModule):
    """ΔW = (α/r)·up·down (Tucker: up ×₁ mid ×₂ down); bypass runs down → (mid) → up."""

    algo = "locon"
    roles = ("lora_up", "lora_mid", "lora_down")
    supports_bypass = True
    supports_dora = True
    rank_mask_on_rank = True

    @staticmethod
    def plan(spec: LayerSpec, rank: int, tucker: bool = False) -> dict[str, tuple[int, ...]]:
        out, inp = spec.out_features, spec.in_features
        if spec.kind == "linear":
            return {"lora_down": (rank, inp), "lora_up": (out, rank)}
        ones = (1,) * spec.dims
        if tucker and spec.is_kxk:
            return {"lora_down": (rank, inp, *ones), "lora_mid": (rank, rank, *spec.kernel),
                    "lora_up": (out, rank, *ones)}
        return {"lora_down": (rank, inp, *spec.kernel), "lora_up": (out, rank, *ones)}

    def _rank(self):
        return self.lora_down.shape[0]

    @property
    def tucker(self) -> bool:
        return "lora_mid" in self.present

    def reset_parameters(self, generator=None):
        with torch.no_grad():
            _kaiming(self.lora_down, generator)
            if self.tucker:
                _kaiming(self.lora_mid, generator)
            self.lora_up.zero_()

    def _delta(self, params, dtype, mask):
        p = self._p(params, dtype)
        up = p["lora_up"].flatten(1) * self.scale
        if mask is not None:
            up = up * mask.to(dtype)
        down = p["lora_down"].flatten(1)
        if self.tucker:
            return torch.einsum("ab...,oa,bi->oi...", p["lora_mid"], up, down)
        return (up @ down).reshape(self.shape)

    def _branch(self, x, params, mask):
        p = dict(zip(self.present, params))
        spec = self.spec
        if spec.kind == "linear":
            h = F.linear(x, p["lora_down"])
            if mask is not None:
                h = h * mask.to(h.dtype)
            return F.linear(h, p["lora_up"] * self.scale)
        conv = (F.conv1d, F.conv2d, F.conv3d)[spec.dims - 1]
        geometry = {"stride": spec.stride, "padding": spec.padding, "dilation": spec.dilation}
        if self.tucker:
            h = conv(conv(x, p["lora_down"]), p["lora_mid"], **geometry)
        else:
            h = conv(x, p["lora_down"], **geometry)
        if mask is not None:
            h = h * mask.to(h.dtype).view(-1, *([1] * spec.dims))
        return conv(h, p["lora_up"] * self.scale)


# ---- LoHa ------------------------------------------------------------------------------------

class TrainLoHa(TrainModule):
    """ΔW = (α/r)·(w1a w1b) ⊙ (w2a w2b), Tucker halves for k×k convs; custom backward."""

    algo = "loha"
    roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    supports_dora = True

    @staticmethod
    def plan(spec: LayerSpec, rank: int, tucker: bool = False) -> dict[str, tuple[int, ...]]:
        out, inp = spec.out_features, spec.in_features
        if tucker and spec.is_kxk:
            core = (rank, rank, *spec.kernel)
            return {"hada_w1_a": (rank, out), "hada_w1_b": (rank, inp), "hada_w2_a": (rank, out),
                    "hada_w2_b": (rank, inp), "hada_t1": core, "hada_t2": core}
        cols = inp * _prod(spec.kernel)
        return {"hada_w1_a": (out, rank), "hada_w1_b": (rank, cols), "hada_w2_a": (out, rank),
                "hada_w2_b": (rank, cols)}

    def _rank(self):
        return self.hada_w1_b.shape[0]

    @property
    def tucker(self) -> bool:
        return "hada_t1" in self.present

    def reset_parameters(self, generator=None):
        with torch.no_grad():  # LyCORIS's LoHa init; w2_a = 0 makes ΔW start at 0
            self.hada_w1_b.normal_(0.0, 1.0, generator=generator)
            self.hada_w1_a.normal_(0.0, 0.1, generator=generator)
            self.hada_w2_b.normal_(0.0, 1.0, generator=generator)
            self.hada_w2_a.zero_()
            if self.tucker:
                self.hada_t1.normal_(0.0, 0.1, generator=generator)
                self.hada_t2.normal_(0.0, 0.1, generator=generator)

    def _rebuilt(self, x, w0, bias, dtype, mask, params):
        if self.tucker or self.dora or not self.spec.fused_backward:
            return super()._rebuilt(x, w0, bias, dtype, mask, params)
        p = self._p(params, self._math_dtype(params))
        rows = self.scale if mask is None else mask * self.scale
        return HadaRebuiltOp.apply(x, w0, bias, self.spec, rows, p["hada_w1_a"], p["hada_w1_b"],
                                   p["hada_w2_a"], p["hada_w2_b"])

    def _delta(self, params, dtype, mask):
        p = self._p(params, dtype)
        if self.tucker:
            delta = HadaWeightTucker.apply(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"],
                                           p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"], self.scale)
        else:
            delta = HadaWeight.apply(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"],
                                     self.scale).reshape(self.shape)
        return self._row_mask(delta, mask)


# ---- LoKr ------------------------------------------------------------------------------------

class TrainLoKr(TrainModule):
    """ΔW = s·kron(w1, w2); w1 full or w1_a w1_b, w2 full, w2_a w2_b or Tucker (t2, w2_a, w2_b)."""

    algo = "lokr"
    roles = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    supports_bypass = True
    supports_dora = True

    @staticmethod
    def plan(spec: LayerSpec, rank: int, tucker: bool = False, factor: int = -1, decompose_both: bool = False,
             full_matrix: bool = False, unbalanced: bool = False) -> dict[str, tuple[int, ...]]:
        """LyCORIS's shapes: out = a·b, in = c·d; w1 (a, c) is the small block, w2 (b, d, k…) the big."""
        a, b = factorization(spec.out_features, factor)
        if unbalanced:
            a, b = b, a
        c, d = factorization(spec.in_features, factor)
        kernel = spec.kernel
        plan: dict[str, tuple[int, ...]] = {}
        if decompose_both and rank < max(a, c) / 2 and not full_matrix:
            plan.update(lokr_w1_a=(a, rank), lokr_w1_b=(rank, c))
        else:
            plan["lokr_w1"] = (a, c)
        if rank >= max(b, d) / 2 or full_matrix:
            plan["lokr_w2"] = (b, d, *kernel)
        elif tucker and spec.is_kxk:
            plan.update(lokr_t2=(rank, rank, *kernel), lokr_w2_a=(rank, b), lokr_w2_b=(rank, d))
        else:
            plan.update(lokr_w2_a=(b, rank), lokr_w2_b=(rank, d * _prod(kernel)))
        return plan

    def _rank(self):
        if "lokr_w2_b" in self.present:
            return self.lokr_w2_b.shape[0]
        if "lokr_w1_b" in self.present:
            return self.lokr_w1_b.shape[0]
        return None  # both blocks full: scale 1 whatever alpha says (LyCORIS forces alpha = dim)

    @property
    def tucker(self) -> bool:
        return "lokr_t2" in self.present

    def reset_parameters(self, generator=None):
        with torch.no_grad():
            for role in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_t2"):
                if role in self.present:
                    _kaiming(getattr(self, role), generator)
            for role in ("lokr_w2", "lokr_w2_b"):  # the big block starts at 0
                if role in self.present:
                    getattr(self, role).zero_()

    def _bypass_pays(self, x) -> bool:
        # the branch costs ~10 passes over activation-sized tensors, the rebuild a few over the
        # weight plus its gradient: bypass while the tokens are at most half the output width
        tokens = x.numel() // max(1, x.shape[self.spec.channel_axis(x)])
        return 2 * tokens <= self.spec.out_features

    def _blocks(self, p):
        """(w1 (a, c), w2 (b, d·k…)) from whichever factors the module has."""
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"].flatten(1)
        elif self.tucker:
            w2 = torch.einsum("ij...,ip,jr->pr...", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]).flatten(1)
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        return w1, w2

    def _delta(self, params, dtype, mask):
        w1, w2 = self._blocks(self._p(params, dtype))
        return self._row_mask(KronWeight.apply(w1, w2, self.scale).reshape(self.shape), mask)

    def _branch(self, x, params, mask):
        w1, w2 = self._blocks(dict(zip(self.present, params)))
        spec = self.spec
        a, c = w1.shape
        if spec.kind == "linear":
            y = KronLinear.apply(x, w1, w2, self.scale)
            if mask is not None:
                y = y * mask.to(y.dtype)
            return y
        # conv: kron(w1, w2) mixes channels only, so convolve each of the c input groups
        # with w2 (b, d, k…), then mix the groups with w1
        unbatched = x.dim() == spec.dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        n, d = x.shape[0], spec.in_features // c
        conv = (F.conv1d, F.conv2d, F.conv3d)[spec.dims - 1]
        w2k = w2.reshape(w2.shape[0], d, *spec.kernel)
        h = conv(x.reshape(n * c, d, *x.shape[2:]), w2k, stride=spec.stride, padding=spec.padding,
                 dilation=spec.dilation)
        spatial = h.shape[2:]
        y = torch.matmul(w1 * self.scale, h.reshape(n, c, -1)).reshape(n, a * w2.shape[0], *spatial)
        if mask is not None:
            y = y * mask.to(y.dtype).view(-1, *([1] * spec.dims))
        return y.squeeze(0) if unbatched else y


# ---- (IA)³ -----------------------------------------------------------------------------------

class TrainIA3(TrainModule):
    """W' = W0 ⊙ (1 + w) on output rows (or input columns): a scale on the layer's output (input)."""

    algo = "ia3"
    roles = ("weight",)

    def __init__(self, name, layer, shapes, alpha=None, *, on_input: bool = False, **kwargs):
        super().__init__(name, layer, shapes, None, **kwargs)
        self.on_input = bool(on_input)

    @staticmethod
    def plan(spec: LayerSpec, on_input: bool = False) -> dict[str, tuple[int, ...]]:
        channels = spec.in_features if on_input else spec.out_features
        if spec.kind == "linear":
            return {"weight": (channels,)}
        return {"weight": (1, channels, *([1] * spec.dims))}

    def _rank(self):
        return None

    def reset_parameters(self, generator=None):
        with torch.no_grad():
            self.weight.zero_()

    def _view(self, w, ndim, axis):
        shape = [1] * ndim
        shape[axis] = -1
        return w.reshape(shape)

    def _weight(self, w0, params, out_dtype, mask):
        dtype = self._math_dtype(params)
        w = params[0].to(dtype).reshape(-1)
        w0 = w0.to(dtype)
        return (w0 + w0 * self._view(w, w0.dim(), 1 if self.on_input else 0)).to(out_dtype)

    def _delta(self, params, dtype, mask):
        raise RuntimeError("(IA)3's delta depends on the original weight; use effective_delta()")

    def forward(self, x, *args, **kwargs):
        if self.training and self.module_dropout and float(torch.rand(())) < self.module_dropout:
            return self._org_forward(x, *args, **kwargs)
        dtype = compute_dtype(x)
        w = self.weight.to(dtype).reshape(-1)
        axis = self.spec.channel_axis(x)
        scale = self._view(w, x.dim(), axis)
        if self.on_input:  # W0 (x ⊙ (1 + w))
            return self.base_forward(x.to(dtype) * (1 + scale), *args, **kwargs)
        base = self.base_forward(x, *args, **kwargs)  # W0x + b, so ΔW x = w ⊙ (base − b)
        bias = self.layer.bias
        pre = base if bias is None else base - self._view(bias.to(base.dtype), base.dim(), axis)
        return base + pre * scale.to(base.dtype)

    def file_tensors(self):
        return {"weight": self.weight.detach().to(torch.float32),
                "on_input": torch.tensor(int(self.on_input))}


# ---- full / diff -----------------------------------------------------------------------------

class TrainFull(TrainModule):
    """ΔW = diff (and Δb = diff_b): the whole weight trains, as a difference from W0."""

    algo = "full"
    roles = ("diff", "diff_b")

    @staticmethod
    def plan(spec: LayerSpec, has_bias: bool) -> dict[str, tuple[int, ...]]:
        plan = {"diff": spec.weight_shape}
        if has_bias:
            plan["diff_b"] = (spec.out_features,)
        return plan

    def _rank(self):
        return None

    def reset_parameters(self, generator=None):
        with torch.no_grad():
            for role in self.present:
                getattr(self, role).zero_()

    def factors(self):
        return [self.diff]

    def _delta(self, params, dtype, mask):
        return self._row_mask(params[0].to(dtype), mask)

    def _weight(self, w0, params, out_dtype, mask):
        dtype = self._math_dtype(params)
        return (w0.to(dtype) + self._delta(params, dtype, mask)).to(out_dtype)

    def _bias(self):
        bias = self.layer.bias
        if "diff_b" not in self.present:
            return bias
        return bias.to(self.diff_b.dtype) + self.diff_b

    @torch.no_grad()
    def effective_delta(self):
        return self.diff.detach().to(torch.float32).clone()


MODULE_CLASSES: dict[str, type[TrainModule]] = {
    "lora": TrainLoCon, "locon": TrainLoCon, "loha": TrainLoHa, "lokr": TrainLoKr,
    "ia3": TrainIA3, "full": TrainFull,
}
