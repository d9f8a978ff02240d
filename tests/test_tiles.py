"""Deltas built in row tiles: the streamed patch path, the cache it fills and ``AdapterModule.apply`` agree bit for bit.

The layers here span several tiles with a ragged last one (14.7M and 2.4M elements),
which is where a product computed per tile and one computed whole could differ.
"""

from __future__ import annotations

import pytest
import torch

from lycoris_core import load_adapter
from lycoris_core.errors import AdapterFormatError
from lycoris_core.keymap import state_shapes
from lycoris_core.numerics.tiles import TILE_ELEMENTS, assemble, tile_rows
from lycoris_core.patch import AdapterSpec, DeltaCache, WeightPatcher, build_plan, patched_value, streams
from lycoris_core.testing.synthetic import synthetic_adapter

SD1 = state_shapes("sd1", "comfy")
BIG = ("mid_block.resnets.0.conv1", "text_model.encoder.layers.0.mlp.fc1")


def big_layers(spec) -> bool:
    return spec.name.endswith(BIG) or any(spec.name == b for b in BIG)


def adapter(algo, seed=0, **options):
    return load_adapter(synthetic_adapter("sd1", algo, select=big_layers, rank=8, seed=seed, **options))


@pytest.fixture(scope="module")
def weights():
    plan = build_plan([AdapterSpec(adapter("lora"))], SD1)
    gen = torch.Generator().manual_seed(3)
    out = {k: (torch.randn(SD1[k], generator=gen) * 0.05).half() for k in plan.keys()}
    assert len(out) >= 2 and all(v.numel() > TILE_ELEMENTS for k, v in out.items() if k.endswith("weight"))
    return out


@pytest.mark.parametrize("algo", ["lora", "loha", "locon_tucker", "loha_tucker", "lokr", "full", "dora"])
def test_streamed_patch_equals_apply_and_fills_the_cache_with_the_exact_delta(weights, algo):
    ad = adapter(algo)
    cheap = next(iter(ad.modules.values())).cheap_delta  # rebuilt per tile, never kept
    plan = build_plan([AdapterSpec(ad, 0.8, -0.6)], SD1)
    cache = DeltaCache(1 << 30)
    for name, target in plan.reports[0].targets.items():
        module, base = ad.modules[name], weights[target.weight_key]
        contributions = plan.contributions[target.weight_key]
        assert streams(contributions[0])
        assert tile_rows(base[0].numel()) < base.shape[0] and base.shape[0] % tile_rows(base[0].numel())
        expected = module.apply(base, contributions[0].strength)
        identity = ("this test's weights", target.weight_key)  # DoRA's delta is kept only under an identity
        assert torch.equal(patched_value(base, contributions, target.weight_key), expected), name
        assert torch.equal(patched_value(base, contributions, target.weight_key, cache, identity=identity),
                           expected), name
        w0 = base if module.uses_weight else None  # DoRA: rows renormalised against W0's rows
        kept = cache.peek(module, target, identity)
        if cheap:
            assert kept is None and cache.used == 0, name
            continue
        assert kept is not None and torch.equal(kept, module.delta(w0).reshape(kept.shape)), name
        # second pass: the same bits, from the cache
        hits = cache.hits
        assert torch.equal(patched_value(base, contributions, target.weight_key, cache, identity=identity),
                           expected), name
        assert cache.hits > hits


def test_streamed_and_whole_deltas_are_summed_in_stack_order(weights):
    # GLoRA needs W0 as a whole, so its delta is built whole, between two streamed ones
    lora, glora, lokr = adapter("lora", 1), adapter("glora", 2), adapter("lokr", 3)
    plan = build_plan([AdapterSpec(lora, 0.7), AdapterSpec(glora, -0.4), AdapterSpec(lokr, 1.3)], SD1)
    for key, contributions in plan.contributions.items():
        if key.endswith("bias"):
            continue
        base = weights[key]
        exact = base.float()
        for c in contributions:
            exact.add_(c.module.delta(base if c.module.uses_weight else None).reshape(base.shape), alpha=c.strength)
        assert torch.equal(patched_value(base, contributions, key), exact.half()), key
        assert [streams(c) for c in contributions] == [True, False, True]


def test_tiled_kron_is_torch_kron_bit_for_bit():
    """Each element of a Kronecker product is one product, so the tiled rows are exact."""
    for name, module in adapter("lokr", 4).modules.items():
        w1, w2 = module._factor("w1") * module.scale, module._factor("w2")
        if w2.dim() > 2:
            w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
        assert torch.equal(module.delta(), torch.kron(w1, w2).reshape(module.shape)), name


@pytest.mark.parametrize("algo", ["locon_tucker", "loha_tucker"])
def test_tiled_tucker_matches_the_one_shot_contraction(algo):
    checked = []
    for name, module in adapter(algo, 5).modules.items():
        t = module._t
        if not module.tucker:  # linear layers have no Tucker form
            continue
        if algo == "locon_tucker":
            whole = torch.einsum("ab...,oa,bi->oi...", t("lora_mid"), t("lora_up").flatten(1) * module.scale,
                                 t("lora_down").flatten(1))
        else:
            h1, h2 = (torch.einsum("ij...,ip,jr->pr...", t(f"hada_t{n}"), t(f"hada_w{n}_a"), t(f"hada_w{n}_b"))
                      for n in (1, 2))
            whole = h1 * h2 * module.scale
        delta = module.delta()
        assert delta.shape == whole.shape, name
        checked.append(name)
        assert torch.allclose(delta, whole, rtol=1e-5, atol=1e-6 * whole.abs().max()), name
    assert checked


def test_assemble_is_the_concatenation_of_its_tiles():
    up, down = torch.randn(37, 5), torch.randn(5, 70_001)  # tile_rows(70001) = 14: a ragged last tile

    def fill(a, b, out):
        torch.mm(up[a:b], down, out=out)

    whole = assemble(37, 70_001, fill)
    step = tile_rows(70_001)
    for a in range(0, 37, step):
        assert torch.equal(whole[a : a + step], up[a : a + step] @ down)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_a_streamed_delta_that_overflows_float32_is_named_and_nothing_is_patched(weights, dtype, algo):
    """The pass checks each tile's sum once; a non-finite sum is traced back to the adapter's delta."""
    tensors = synthetic_adapter("sd1", algo, select=big_layers, rank=8, seed=6, dtype=torch.float32)
    for key, tensor in tensors.items():
        if not key.endswith(".alpha"):
            tensor.fill_(3e30)  # finite factors, a product beyond float32
    ad = load_adapter(tensors)
    plan = build_plan([AdapterSpec(ad)], SD1)
    model = {k: v.to(dtype) for k, v in weights.items()}
    before = {k: v.clone() for k, v in model.items()}
    key = next(k for k in plan.keys() if k.endswith("weight"))
    assert streams(plan.contributions[key][0])
    with pytest.raises(AdapterFormatError, match="not finite"):
        patched_value(model[key], plan.contributions[key], key)
    with pytest.raises(AdapterFormatError, match="not finite"):
        WeightPatcher(model).apply([AdapterSpec(ad)])
    assert all(torch.equal(model[k], before[k]) for k in model)


@pytest.mark.parametrize("a, c, b, d", [(3, 2, 5, 4), (1, 3, 7, 2), (4, 1, 1, 6), (5, 3, 8, 1)])
def test_kron_rows_for_every_row_range(a, c, b, d):
    """Any tile, inside one block of w2's rows, across one boundary, or holding whole blocks."""
    from lycoris_core.algorithms.lokr import LoKr
    from lycoris_core.io.reader import DictSource

    gen = torch.Generator().manual_seed(a * 100 + b)
    w1, w2 = torch.randn(a, c, generator=gen), torch.randn(b, d, generator=gen)
    fill = LoKr("m", {"lokr_w1": "w1", "lokr_w2": "w2"}, DictSource({"w1": w1, "w2": w2})).row_fill()
    whole = torch.kron(w1, w2)
    for start in range(a * b):
        for stop in range(start + 1, a * b + 1):
            out = torch.full((stop - start, c * d), float("nan"))
            fill(start, stop, out)
            assert torch.equal(out, whole[start:stop]), (start, stop)


ZERO_SIZE = {
    "lora": {"m.lora_up.weight": torch.randn(0, 2), "m.lora_down.weight": torch.randn(2, 4)},
    "dora": {"m.lora_up.weight": torch.randn(0, 2), "m.lora_down.weight": torch.randn(2, 4),
             "m.dora_scale": torch.ones(0, 1)},
    "lokr w2 rows": {"m.lokr_w1": torch.randn(2, 2), "m.lokr_w2": torch.randn(0, 4)},
    "lokr w1 cols": {"m.lokr_w1": torch.randn(2, 0), "m.lokr_w2": torch.randn(3, 4)},
    "lokr w2 cols": {"m.lokr_w1": torch.randn(2, 2), "m.lokr_w2": torch.randn(3, 0)},
    "full": {"m.diff": torch.randn(0, 4)},
}


@pytest.mark.parametrize("case", sorted(ZERO_SIZE))
def test_zero_size_factors_give_an_empty_delta_not_a_crash(case):
    """A stranger's file may declare a zero-size dimension: the tiles must not divide by it."""
    module = load_adapter(ZERO_SIZE[case]).modules["m"]
    weight = torch.zeros(module.shape, dtype=torch.float16)
    assert module.delta(weight if module.uses_weight else None).shape == module.shape
    assert torch.equal(module.apply(weight, 0.7), weight)
