"""The patch engine: exact values, exact restore, block weights, stacking, fp8, safety."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lycoris_core import AdapterFormatError, ArchitectureMismatchError, load_adapter
from lycoris_core.io.reader import SafetensorsSource
from lycoris_core.keymap import state_shapes
from lycoris_core.patch import AdapterSpec, DeltaCache, WeightPatcher, build_plan, contribution_delta
from lycoris_core.testing.synthetic import synthetic_adapter

SD1 = state_shapes("sd1", "comfy")
SDXL = state_shapes("sdxl", "comfy")
ALGOS = ["lora", "dora", "locon_tucker", "loha", "loha_tucker", "lokr", "full", "ia3", "glora", "diag-oft", "boft",
         "norm"]


def small_blocks(spec) -> bool:
    """A real-name subset: one resnet+attention block, the mid attention, time embedding, one CLIP layer."""
    name = spec.name
    if spec.part != "unet":
        return "layers.0." in name and ("self_attn" in name or "mlp" in name)
    picked = ("down_blocks.0.resnets.0.", "down_blocks.0.attentions.0.", "mid_block.attentions.0.transformer_blocks.0.attn",
              "time_embedding.", "conv_out")
    return name.startswith(picked) and len(spec.weight) >= 2


_ADAPTERS: dict = {}


def make_adapter(algo: str, seed: int = 0, arch: str = "sd1"):
    """Adapters are immutable once loaded, so each (algo, seed) is built once per session."""
    key = (algo, seed, arch)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = load_adapter(synthetic_adapter(arch, algo, select=small_blocks, rank=4, seed=seed))
    return _ADAPTERS[key]


@pytest.fixture(scope="module")
def base_weights():
    """fp16 random weights for every key the small adapters touch (real SD1.5 names and shapes)."""
    keys = set()
    for algo in ALGOS:
        plan = build_plan([AdapterSpec(make_adapter(algo))], SD1)
        keys.update(plan.keys())
    gen = torch.Generator().manual_seed(1)
    return {k: (torch.randn(SD1[k], generator=gen) * 0.05).half() for k in sorted(keys)}


def fresh(base, dtype=torch.float16):
    return {k: v.to(dtype).clone() for k, v in base.items()}


@pytest.mark.parametrize("algo", ALGOS)
def test_patched_weights_equal_module_apply(base_weights, algo):
    ad = make_adapter(algo)
    weights = fresh(base_weights)
    plan = WeightPatcher(weights, model_shapes=SD1).apply([AdapterSpec(ad, 0.7, 0.4)])
    assert plan.reports[0].summary().startswith("sd1 adapter on sd1 model")
    checked = 0
    for name, target in plan.reports[0].targets.items():
        strength = 0.7 if target.part == "unet" else 0.4
        expected = ad.modules[name].apply(base_weights[target.weight_key], strength)
        assert torch.equal(weights[target.weight_key], expected), name
        checked += 1
        if target.bias_key:
            bias = (base_weights[target.bias_key].float() + strength * ad.modules[name].bias_delta()).half()
            assert torch.equal(weights[target.bias_key], bias)
    assert checked == len(ad.modules)


def test_stacked_adapters_are_summed_in_float32_with_one_rounding(base_weights):
    a, b = make_adapter("lora", seed=1), make_adapter("loha", seed=2)
    weights = fresh(base_weights)
    plan = WeightPatcher(weights, model_shapes=SD1).apply([AdapterSpec(a, 0.5, 1.0), AdapterSpec(b, -0.8, 0.3)])
    key = plan.reports[0].targets[next(iter(a.modules))].weight_key
    name_b = next(n for n, t in plan.reports[1].targets.items() if t.weight_key == key)
    name_a = next(n for n, t in plan.reports[0].targets.items() if t.weight_key == key)
    w0 = base_weights[key]
    exact = (w0.float() + 0.5 * a.modules[name_a].delta() - 0.8 * b.modules[name_b].delta()).half()
    # summing in float32 differs from rounding after each adapter, so this pins the order of operations
    assert (weights[key].float() - exact.float()).abs().max() <= 2 ** -14
    assert torch.equal(weights[key], plan.patched(key, w0))


def test_stack_order_does_not_matter_for_weight_dependent_algorithms(base_weights):
    a, b = make_adapter("dora", seed=3), make_adapter("diag-oft", seed=4)
    w1, w2 = fresh(base_weights), fresh(base_weights)
    WeightPatcher(w1, model_shapes=SD1).apply([AdapterSpec(a), AdapterSpec(b)])
    WeightPatcher(w2, model_shapes=SD1).apply([AdapterSpec(b), AdapterSpec(a)])
    for k in w1:
        assert torch.allclose(w1[k].float(), w2[k].float(), atol=2e-3, rtol=0), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("from_file", [False, True])
def test_restore_is_bit_identical(base_weights, tmp_path, dtype, from_file):
    weights = fresh(base_weights, dtype)
    original = {k: v.clone() for k, v in weights.items()}
    source = None
    if from_file:
        path = tmp_path / "model.safetensors"
        save_file(original, str(path))
        source = SafetensorsSource(path)
    patcher = WeightPatcher(weights, model_shapes=SD1, restore_from=source)
    patcher.apply([AdapterSpec(make_adapter("lokr"), 1.3, 0.2), AdapterSpec(make_adapter("boft"), 0.6)])
    assert any(not torch.equal(weights[k], original[k]) for k in weights)
    patcher.apply([AdapterSpec(make_adapter("glora"), 0.2, blocks="OUTALL")])
    patcher.restore()
    for k in weights:
        assert torch.equal(weights[k], original[k]), k
    if from_file:
        assert patcher._backups == {}  # originals came from the file, not from copies


ops = st.lists(
    st.tuples(
        st.sampled_from(["apply", "restore"]),
        st.lists(st.tuples(st.sampled_from(ALGOS), st.floats(-2, 2, allow_nan=False),
                           st.floats(-2, 2, allow_nan=False),
                           st.sampled_from([None, "ALL0.5", "in=0, out=2", "MIDD", "0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"])),
                 min_size=1, max_size=3),
    ),
    min_size=1, max_size=6,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=ops, cache_mb=st.sampled_from([0, 1, 64]))
def test_random_sequences_end_bit_identical(base_weights, sequence, cache_mb):
    weights = fresh(base_weights)
    original = {k: v.clone() for k, v in weights.items()}
    adapters = {algo: make_adapter(algo, seed=i) for i, algo in enumerate(ALGOS)}
    patcher = WeightPatcher(weights, model_shapes=SD1, cache_bytes=cache_mb << 20)
    for op, stack in sequence:
        if op == "restore":
            patcher.restore()
            continue
        specs = [AdapterSpec(adapters[a], su, sc, blocks) for a, su, sc, blocks in stack]
        plan = patcher.apply(specs)
        for key in plan.keys():  # every patched value is what a computation from the originals gives
            assert torch.equal(weights[key], plan.patched(key, original[key], patcher.cache)), key
    patcher.restore()
    for k in weights:
        assert torch.equal(weights[k], original[k]), k


def test_strength_change_reuses_cached_deltas(base_weights):
    weights = fresh(base_weights)
    patcher = WeightPatcher(weights, model_shapes=SD1, cache_bytes=256 << 20)
    ad = make_adapter("loha")
    patcher.apply([AdapterSpec(ad, 1.0)])
    misses = patcher.cache.misses
    plan = patcher.apply([AdapterSpec(ad, 0.25, 0.5)])
    assert patcher.cache.misses == misses and patcher.cache.hits >= len(ad.modules)
    key = plan.keys()[0]
    assert torch.equal(weights[key], plan.patched(key, base_weights[key]))


def test_a_budget_smaller_than_the_adapter_keeps_its_share_across_strength_changes(base_weights):
    """A strength change must not evict kept deltas it is about to use (it walks the keys in the same order)."""
    ad = make_adapter("lora")
    full = WeightPatcher(fresh(base_weights), model_shapes=SD1, cache_bytes=1 << 30)
    full.apply([AdapterSpec(ad)])
    patcher = WeightPatcher(fresh(base_weights), model_shapes=SD1, cache_bytes=full.cache.used // 2)
    patcher.apply([AdapterSpec(ad, 1.0)])
    kept = len(patcher.cache._items)
    assert 0 < kept < len(full.cache._items)
    for strength in (0.5, -0.3):
        hits = patcher.cache.hits
        patcher.apply([AdapterSpec(ad, strength)])
        assert patcher.cache.hits - hits == kept and len(patcher.cache._items) == kept


def test_zero_budget_caches_nothing_and_gives_the_same_bits(base_weights):
    ad = make_adapter("lora")
    w_cached, w_plain = fresh(base_weights), fresh(base_weights)
    WeightPatcher(w_cached, model_shapes=SD1, cache_bytes=1 << 30).apply([AdapterSpec(ad, 0.9)])
    p = WeightPatcher(w_plain, model_shapes=SD1, cache_bytes=0)
    p.apply([AdapterSpec(ad, 0.9)])
    assert p.cache.used == 0
    assert all(torch.equal(w_cached[k], w_plain[k]) for k in w_cached)


def test_delta_cache_respects_its_budget():
    ad = make_adapter("lora")
    plan = build_plan([AdapterSpec(ad)], SD1)
    cache = DeltaCache(budget_bytes=3 << 20)
    for key in plan.keys():
        for c in plan.contributions[key]:
            contribution_delta(c, torch.zeros(SD1[key]), cache)  # as the kernel asks for it
            assert cache.used <= cache.budget
    assert cache.used > 0


def test_block_weights_scale_blocks_base_and_leave_outside_modules_at_plain_strength(base_weights):
    ad = make_adapter("lora")
    weights = fresh(base_weights)
    plan = WeightPatcher(weights, model_shapes=SD1).apply([AdapterSpec(ad, 0.8, 0.5, blocks="base=0.5, in=0, mid=2")])
    seen = set()
    for name, target in plan.reports[0].targets.items():
        expected = {"IN01": 0.0, "M00": 1.6, "BASE": 0.25, None: 0.8}[target.block]
        seen.add(target.block)
        w0 = base_weights[target.weight_key]
        assert torch.equal(weights[target.weight_key], ad.modules[name].apply(w0, expected)), name
    assert seen == {"IN01", "M00", "BASE", None}


@pytest.mark.parametrize("algo", ["dora", "diag-oft", "boft", "ia3"])
def test_block_weight_acts_as_module_strength_for_nonlinear_algorithms(base_weights, algo):
    ad = make_adapter(algo)
    weights = fresh(base_weights)
    plan = WeightPatcher(weights, model_shapes=SD1).apply([AdapterSpec(ad, 1.0, 1.0, blocks="default=1, mid=0.5")])
    for name, target in plan.reports[0].targets.items():
        if target.block == "M00":
            w0 = base_weights[target.weight_key]
            assert torch.equal(weights[target.weight_key], ad.modules[name].apply(w0, 0.5))


def test_wrong_architecture_is_refused_and_nothing_changes(base_weights):
    sdxl_adapter = load_adapter(synthetic_adapter("sdxl", "lora", rank=2))
    weights = fresh(base_weights)
    before = {k: v.clone() for k, v in weights.items()}
    with pytest.raises(ArchitectureMismatchError, match="sdxl.*sd1|sd1.*sdxl"):
        WeightPatcher(weights, model_shapes=SD1).apply([AdapterSpec(sdxl_adapter)])
    assert all(torch.equal(weights[k], before[k]) for k in weights)


def test_a_failure_halfway_leaves_no_weight_patched(base_weights):
    tensors = synthetic_adapter("sd1", "lora", select=small_blocks, rank=4)
    last = sorted(k for k in tensors if k.endswith("lora_up.weight"))[-1]
    tensors[last] = tensors[last].clone()
    tensors[last][0, 0] = float("nan")
    weights = fresh(base_weights)
    before = {k: v.clone() for k, v in weights.items()}
    patcher = WeightPatcher(weights, model_shapes=SD1)
    patcher.apply([AdapterSpec(make_adapter("loha"))])  # an earlier, good stack
    with pytest.raises(AdapterFormatError, match="NaN"):
        patcher.apply([AdapterSpec(load_adapter(tensors))])
    assert all(torch.equal(weights[k], before[k]) for k in weights)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_weights_round_stochastically_and_reproducibly(base_weights, dtype):
    ad = make_adapter("lora")
    runs = []
    for _ in range(2):
        weights = fresh(base_weights, dtype)
        WeightPatcher(weights, model_shapes=SD1).apply([AdapterSpec(ad, 1.0)])
        runs.append(weights)
    key = next(k for k in runs[0] if k.endswith("to_q.weight"))
    assert torch.equal(runs[0][key].view(torch.uint8), runs[1][key].view(torch.uint8))
    # stochastic rounding keeps the delta on average where round-to-nearest would erase most of it
    name, target = next((n, t) for n, t in build_plan([AdapterSpec(ad)], SD1).reports[0].targets.items()
                        if t.weight_key == key)
    w0 = base_weights[key].to(dtype)
    exact = w0.float() + ad.modules[name].delta()
    sr_error = (runs[0][key].float() - exact).mean().abs()
    nearest_error = (exact.to(dtype).float() - exact).mean().abs()
    assert sr_error <= nearest_error + 1e-4
    assert torch.equal(runs[0][key].view(torch.uint8), ad.modules[name].apply(w0, 1.0, key=key).view(torch.uint8))


def test_sdxl_real_layout_maps_and_patches_a_subset():
    ad = load_adapter(synthetic_adapter("sdxl", "lokr", rank=2,
                                        select=lambda s: s.part == "te2" and "layers.0." in s.name and len(s.weight) == 2))
    plan = build_plan([AdapterSpec(ad, 1.0, 0.5)], SDXL)
    assert "te2 6/6" in plan.reports[0].summary()
    key = plan.keys()[0]
    w0 = torch.randn(SDXL[key]).half()
    name = next(n for n, t in plan.reports[0].targets.items() if t.weight_key == key)
    assert torch.equal(plan.patched(key, w0), ad.modules[name].apply(w0, 0.5))
