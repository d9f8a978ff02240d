"""Deltas built in row tiles: the streamed patch path, the cache it fills and ``AdapterModule.apply`` agree bit for bit.

The layers here span several tiles with a ragged last one (14.7M and 2.4M elements),
which is where a product computed per tile and one computed whole could differ.
"""

from __future__ import annotations

import pytest
import torch

from lycoris_core import load_adapter
from lycoris_core.keymap import state_shapes
from lycoris_core.patch import AdapterSpec, DeltaCache, build_plan, patched_value, streams
from lycoris_core.synthetic import synthetic_adapter
from lycoris_core.tiles import TILE_ELEMENTS, assemble, tile_rows

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


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_streamed_patch_equals_apply_and_fills_the_cache_with_the_exact_delta(weights, algo):
    ad = adapter(algo)
    plan = build_plan([AdapterSpec(ad, 0.8, -0.6)], SD1)
    cache = DeltaCache(1 << 30)
    for name, target in plan.reports[0].targets.items():
        module, base = ad.modules[name], weights[target.weight_key]
        contributions = plan.contributions[target.weight_key]
        assert streams(contributions[0])
        assert tile_rows(base[0].numel()) < base.shape[0] and base.shape[0] % tile_rows(base[0].numel())
        expected = module.apply(base, contributions[0].strength)
        assert torch.equal(patched_value(base, contributions, target.weight_key), expected), name
        assert torch.equal(patched_value(base, contributions, target.weight_key, cache), expected), name
        kept = cache.peek(module, target, None)
        assert kept is not None and torch.equal(kept, module.delta().reshape(kept.shape)), name
        # second pass: the same bits, from the cache
        hits = cache.hits
        assert torch.equal(patched_value(base, contributions, target.weight_key, cache), expected), name
        assert cache.hits > hits


def test_streamed_and_whole_deltas_are_summed_in_stack_order(weights):
    lora, lokr, loha = adapter("lora", 1), adapter("lokr", 2), adapter("loha", 3)
    plan = build_plan([AdapterSpec(lora, 0.7), AdapterSpec(lokr, -0.4), AdapterSpec(loha, 1.3)], SD1)
    for key, contributions in plan.contributions.items():
        if key.endswith("bias"):
            continue
        base = weights[key]
        exact = base.float()
        for c in contributions:
            exact.add_(c.module.delta().reshape(base.shape), alpha=c.strength)
        assert torch.equal(patched_value(base, contributions, key), exact.half()), key
        assert [streams(c) for c in contributions] == [True, False, True]


def test_assemble_is_the_concatenation_of_its_tiles():
    up, down = torch.randn(37, 5), torch.randn(5, 70_001)  # tile_rows(70001) = 14: a ragged last tile

    def fill(a, b, out):
        torch.mm(up[a:b], down, out=out)

    whole = assemble(37, 70_001, fill)
    step = tile_rows(70_001)
    for a in range(0, 37, step):
        assert torch.equal(whole[a : a + step], up[a : a + step] @ down)
