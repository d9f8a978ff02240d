"""Every algorithm's fast delta (row tiles, folded scales, in-place DoRA) equals its plain formula.

Each algorithm file states its reference formula in its docstring and writes it plainly in
float64 (``reference_delta``; DoRA's in ``algorithms.dora``).  Here the float32 fast path is
held against it on linear and conv weights, every variant, with DoRA on both axes.
"""

from __future__ import annotations

import pytest
import torch

from lycoris_core import load_adapter
from lycoris_core.testing.synthetic import module_tensors

SHAPES = {"linear": (96, 80), "conv3": (48, 40, 3, 3), "conv1": (64, 32, 1, 1)}
CASES = [
    ("lora", {}), ("dora", {}), ("locon_tucker", {}), ("loha", {}), ("loha_tucker", {}),
    ("lokr", {}), ("lokr", {"full_w2": True}), ("lokr", {"factor": 4}), ("full", {}),
    ("ia3", {}), ("glora", {}), ("diag-oft", {}), ("boft", {}),
]


def module(algo, shape, options, seed=0, dora_axis=None):
    gen = torch.Generator().manual_seed(seed)
    tensors = module_tensors(algo, shape, gen, rank=4, alpha=3.0, **options)
    if dora_axis == "in":  # LyCORIS's default axis: (1, in, 1, ...)
        tensors["dora_scale"] = 1 + torch.randn(1, shape[1], *[1] * (len(shape) - 2), generator=gen) * 0.1
    return load_adapter({f"m.{k}": v for k, v in tensors.items()}).modules["m"]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
@pytest.mark.parametrize("algo,options", CASES, ids=[f"{a}{'-' + '-'.join(o) if o else ''}" for a, o in CASES])
def test_fast_delta_equals_the_reference_formula(algo, options, shape):
    m = module(algo, shape, options)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.05
    weight = w0 if m.uses_weight else None
    fast, ref = m.delta(weight).double(), m.reference(weight)
    assert fast.shape == ref.reshape(fast.shape).shape
    torch.testing.assert_close(fast, ref.reshape(fast.shape), rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("shape", [SHAPES["linear"], SHAPES["conv3"]], ids=["linear", "conv3"])
def test_dora_on_the_input_axis_equals_the_reference(shape):
    m = module("dora", shape, {}, dora_axis="in")
    assert m.dora_axis == "in"
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(8)) * 0.05
    torch.testing.assert_close(m.delta(w0).double(), m.reference(w0), rtol=1e-5, atol=1e-7)


def test_norms_and_their_bias_are_the_stored_values():
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    m = load_adapter({"n.w_norm": w, "n.b_norm": b}).modules["n"]
    assert (m.algo, m.has_bias) == ("norm", True)
    assert torch.equal(m.delta(), w) and torch.equal(m.bias_delta(), b)
    torch.testing.assert_close(m.delta().double(), m.reference())
