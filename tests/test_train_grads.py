"""Gradients of the trainable modules against plain autograd on the same math (float64).

The reference here is written from the formulas in /work/shared/reference/lycoris-formats.md
with ordinary torch ops (``W' = W0 + ΔW``, ``F.linear``/``F.conv*d``), so it shares no code
with ``lycoris_core.train``.  Every algorithm, Tucker, DoRA on both axes, LoKr's factor
forms, bypass and rebuild paths, on linear, 1×1, k×k (strided), grouped, 1-D and 3-D convs.
Also: ``gradcheck`` on every custom function, and which tensors autograd keeps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lycoris_core.train import (
    AdapterConfig,
    HadaRebuiltOp,
    HadaWeight,
    HadaWeightTucker,
    KronLinear,
    KronWeight,
    LayerSpec,
    RebuiltOp,
    Target,
    create_network,
    factorization,
)

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


def layer_of(kind: str, dtype=F64) -> nn.Module:
    torch.manual_seed(3)
    layers = {
        "linear": lambda: nn.Linear(24, 36),
        "conv3x3": lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1),
        "conv1x1": lambda: nn.Conv2d(16, 32, 1),
        "grouped": lambda: nn.Conv2d(16, 32, 3, padding=1, groups=2),
        "conv1d": lambda: nn.Conv1d(12, 20, 3, padding=1),
        "conv3d": lambda: nn.Conv3d(8, 12, 3, padding=1),
    }
    return layers[kind]().to(dtype)


def input_for(kind: str, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    shapes = {"linear": (2, 3, 24), "conv3x3": (2, 16, 7, 7), "conv1x1": (2, 16, 5, 5), "grouped": (2, 16, 5, 5),
              "conv1d": (2, 12, 9), "conv3d": (1, 8, 4, 5, 5)}
    return torch.randn(shapes[kind], generator=g, dtype=dtype)


def network(layer, **kwargs):
    kwargs.setdefault("rank", 4)
    kwargs.setdefault("alpha", 3.0)
    net = create_network([Target("lora_unet_layer", "layer", layer)], AdapterConfig(**kwargs), seed=1).to(F64)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in net.parameters():  # every factor non-zero, or half the gradients are trivially 0
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return net, net["lora_unet_layer"]


# ---- the reference: plain autograd, straight from the formulas --------------------------------------

def tucker(t, wa, wb):
    return torch.einsum("ij...,ip,jr->pr...", t, wa, wb)


def reference_weight(m, w0):
    p = {r: getattr(m, r) for r in m.present}
    s = m.scale
    if m.algo in ("lora", "locon"):
        up, down = p["lora_up"].flatten(1), p["lora_down"].flatten(1)
        if "lora_mid" in p:
            delta = torch.einsum("oa,ab...,bi->oi...", up, p["lora_mid"], down) * s
        else:
            delta = (up @ down).reshape(w0.shape) * s
    elif m.algo == "loha":
        if "hada_t1" in p:
            delta = tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            delta = ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(w0.shape)
        delta = delta * s
    elif m.algo == "lokr":
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        delta = torch.kron(w1, w2.flatten(1)).reshape(w0.shape) * s
    elif m.algo == "ia3":
        view = [1] * w0.dim()
        view[1 if m.on_input else 0] = -1
        return w0 * (1 + p["weight"].reshape(view))
    elif m.algo == "full":
        return w0 + p["diff"]
    weight = w0 + delta
    if m.dora:
        if m.wd_on_out:
            norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (weight.dim() - 1)))
        else:
            norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, -1, *([1] * (weight.dim() - 2)))
        weight = weight * (m.dora_scale / (norm + EPS32))
    return weight


def reference_forward(m, layer, x):
    weight = reference_weight(m, layer.weight)
    bias = layer.bias
    if m.algo == "full" and "diff_b" in m.present:
        bias = bias + m.diff_b
    return LayerSpec.of(layer).forward(x, weight, bias)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


CASES = [
    ("lora", {}), ("lora-tucker", {"use_tucker": True}), ("lora-rebuild", {"bypass": False}),
    ("lora-dora-out", {"dora": True}), ("lora-dora-in", {"dora": True, "dora_on_output": False}),
    ("loha", {"algo": "loha"}), ("loha-tucker", {"algo": "loha", "use_tucker": True}),
    ("loha-dora", {"algo": "loha", "dora": True}),
    ("loha-tucker-dora-in", {"algo": "loha", "use_tucker": True, "dora": True, "dora_on_output": False}),
    ("lokr", {"algo": "lokr", "rank": 2}), ("lokr-rebuild", {"algo": "lokr", "rank": 2, "bypass": False}),
    ("lokr-bypass", {"algo": "lokr", "rank": 2, "bypass": "always"}),
    ("lokr-decompose-both", {"algo": "lokr", "rank": 1, "decompose_both": True, "factor": 4}),
    ("lokr-tucker", {"algo": "lokr", "rank": 2, "use_tucker": True}),
    ("lokr-full", {"algo": "lokr", "full_matrix": True}),
    ("lokr-factor-unbalanced", {"algo": "lokr", "rank": 2, "factor": 4, "unbalanced_factorization": True}),
    ("lokr-dora", {"algo": "lokr", "rank": 2, "dora": True}),
    ("ia3", {"algo": "ia3"}), ("full", {"algo": "full"}),
]
KINDS = ["linear", "conv3x3", "conv1x1", "grouped", "conv1d", "conv3d"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_gradients_match_plain_autograd(case, kind):
    kwargs = dict(dict(CASES)[case])
    layer = layer_of(kind)
    net, m = network(layer, **kwargs)
    x = input_for(kind).requires_grad_(True)
    probe = torch.Generator().manual_seed(9)

    with net.attached():
        y = layer(x)
    r = torch.randn(y.shape, generator=probe, dtype=F64)
    params = list(net.parameters())
    got = torch.autograd.grad((y * r).sum(), [x, *params])

    y_ref = reference_forward(m, layer, x)
    want = torch.autograd.grad((y_ref * r).sum(), [x, *params])
    assert rel(y.detach(), y_ref.detach()) <= 1e-12
    for (name, _), g, w in zip([("x", None), *net.named_parameters()], got, want):
        assert rel(g, w) <= 1e-10, (case, kind, name, rel(g, w))


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_bias_gradient_of_full(kind):
    layer = layer_of(kind)
    net, m = network(layer, algo="full")
    x = input_for(kind)
    with net.attached():
        y = layer(x)
    (g,) = torch.autograd.grad(y.sum(), [m.diff_b])
    want = torch.ones_like(y).sum(dim=[d for d in range(y.dim()) if d != (y.dim() - 1 if kind == "linear" else 1)])
    assert rel(g, want) <= 1e-12


# ---- gradcheck on the custom functions ------------------------------------------------------------

def _r(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64, requires_grad=True)


def test_gradcheck_hada_weight():
    args = (_r(5, 3, seed=1), _r(3, 7, seed=2), _r(5, 3, seed=3), _r(3, 7, seed=4))
    assert torch.autograd.gradcheck(lambda *a: HadaWeight.apply(*a, 0.7), args)


def test_gradcheck_hada_weight_tucker():
    args = (_r(3, 3, 3, 3, seed=1), _r(3, 5, seed=2), _r(3, 4, seed=3),
            _r(2, 2, 3, 3, seed=4), _r(2, 5, seed=5), _r(2, 4, seed=6))
    assert torch.autograd.gradcheck(lambda *a: HadaWeightTucker.apply(*a, 1.3), args)


def test_gradcheck_kron_weight():
    assert torch.autograd.gradcheck(lambda a, b: KronWeight.apply(a, b, 0.5), (_r(2, 3, seed=1), _r(4, 10, seed=2)))


def test_gradcheck_kron_linear():
    args = (_r(2, 3, 12, seed=1), _r(5, 3, seed=2), _r(2, 4, seed=3))
    assert torch.autograd.gradcheck(lambda x, a, b: KronLinear.apply(x, a, b, 0.5), args)


SMALL = {  # gradcheck perturbs every input element: small layers keep it fast
    "linear": (lambda: nn.Linear(6, 5), (2, 6)),
    "conv3x3": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (1, 4, 5, 5)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (1, 4, 4, 4)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (1, 3, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (1, 2, 3, 3, 3)),
}


@pytest.mark.parametrize("kind", list(SMALL))
def test_gradcheck_rebuilt_op(kind):
    make, x_shape = SMALL[kind]
    torch.manual_seed(0)
    layer = make().to(F64)
    spec = LayerSpec.of(layer)
    shape = tuple(layer.weight.shape)
    w0 = layer.weight.detach()
    x = _r(*x_shape, seed=4)
    up, down = _r(shape[0], 2, seed=1), _r(2, math.prod(shape[1:]), seed=2)
    bias = _r(shape[0], seed=3)

    def build(w, u, d):
        return w + (u @ d).reshape(shape) * 0.5

    assert torch.autograd.gradcheck(lambda x, b, u, d: RebuiltOp.apply(x, w0, b, spec, build, u, d),
                                    (x, bias, up, down))


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
@pytest.mark.parametrize("rows", ["scale", "masked"])
def test_gradcheck_hada_rebuilt_op(kind, rows):
    make, x_shape = SMALL[kind]
    torch.manual_seed(0)
    layer = make().to(F64)
    spec = LayerSpec.of(layer)
    out, cols = layer.weight.shape[0], math.prod(layer.weight.shape[1:])
    w0 = layer.weight.detach()
    scale = 0.7 if rows == "scale" else torch.tensor([0.0, 1.4] * (out // 2) + [1.4] * (out % 2), dtype=F64)
    args = (_r(*x_shape, seed=4), _r(out, seed=3), _r(out, 2, seed=1), _r(2, cols, seed=2), _r(out, 2, seed=5),
            _r(2, cols, seed=6))
    assert torch.autograd.gradcheck(lambda x, b, a1, b1, a2, b2: HadaRebuiltOp.apply(x, w0, b, spec, scale, a1, b1, a2, b2),
                                    args)


# ---- what autograd keeps ----------------------------------------------------------------------------

def saved_tensors(fn) -> list[torch.Tensor]:
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("case", ["lora", "lora-tucker", "loha", "loha-tucker", "lokr", "lokr-bypass", "lokr-rebuild",
                                  "lora-dora-out", "lokr-dora", "full"])
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_no_weight_sized_tensor_is_saved(case, kind):
    """The point of the custom functions: nothing as large as the weight waits for the backward,
    except tensors that exist anyway (the input, the frozen weight, the parameters themselves)."""
    layer = layer_of(kind, torch.float32).requires_grad_(False)
    net, m = network(layer, **dict(CASES)[case])
    net.float()
    x = input_for(kind, torch.float32).requires_grad_(True)
    existing = {x.data_ptr(), layer.weight.data_ptr(), *(p.data_ptr() for p in net.parameters())}
    size = layer.weight.numel()
    with net.attached():
        ours = saved_tensors(lambda: layer(x))
    plain = saved_tensors(lambda: reference_forward(m, layer, x))
    assert [t.numel() for t in ours if t.data_ptr() not in existing and t.numel() >= size] == []
    assert any(t.numel() >= size for t in plain if t.data_ptr() not in existing)  # plain autograd keeps W'


def test_factorization_matches_lycoris():
    from lycoris.functional import factorization as lyco

    for dim in [*range(1, 130), 320, 640, 768, 1024, 1280, 2560, 3072, 5120]:
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dim, factor) == lyco(dim, factor), (dim, factor)
