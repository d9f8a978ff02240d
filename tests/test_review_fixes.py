"""Defects a review found, each pinned by a test that failed before its fix.

1. bake --dtype: a patched tensor rounded into a narrower dtype is range-checked there.
2. Non-finite detection by extremes, not by a sum: a sum of finite values may overflow.
3. Library code never changes torch's process-wide thread count.
4. A kept weight-dependent delta is never used on another weight.
5. An unreadable PEFT config is refused, not ignored (the adapter would apply at the wrong strength).
6. ``Adapter.path`` is the file it was read from, not a guess.
7. LoKr with two decomposed factors of different ranks: the rank is w1's.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lycoris_core import AdapterFormatError, WeightRangeError, load_adapter
from lycoris_core.io.reader import SafetensorsSource
from lycoris_core.keymap import state_shapes
from lycoris_core.patch import AdapterSpec, DeltaCache, WeightPatcher, build_plan, patched_value
from lycoris_core.testing.synthetic import synthetic_adapter
from lycoris_core.tools import svd
from lycoris_core.tools.bake import bake_checkpoint
from lycoris_core.tools.common import MergeInput
from lycoris_core.tools.merge import merge_adapters

Q_PROJ = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CKPT_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def small_checkpoint(path, dtype) -> str:
    """The first CLIP layer of an SD1.5 single file, in ``dtype`` (small, and still mapped by name)."""
    shapes = state_shapes("sd1", "checkpoint", ("te1",))
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(dtype) for k, s in shapes.items() if ".layers.0." in k}
    save_file(tensors, str(path))
    return str(path)


def full_adapter(path, value: float, shape=(768, 768)) -> str:
    save_file({f"{Q_PROJ}.diff": torch.full(shape, value)}, str(path))
    return str(path)


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
def test_bake_to_fp16_refuses_values_fp16_cannot_hold(tmp_path, source):
    ckpt = small_checkpoint(tmp_path / "ckpt.safetensors", source)
    adapter = full_adapter(tmp_path / "big.safetensors", 7e4)  # beyond fp16's 65504
    out = tmp_path / "baked.safetensors"
    with pytest.raises(WeightRangeError, match=r"q_proj.*float16"):
        bake_checkpoint(ckpt, [MergeInput(adapter)], str(out), dtype="fp16")
    assert not out.exists() and not list(tmp_path.glob(".baked*"))


def test_a_valid_delta_whose_sum_overflows_is_applied():
    # every value is finite and so is every patched value; only their sum is not
    weights = {CKPT_Q: torch.zeros(768, 768)}
    adapter = load_adapter({f"{Q_PROJ}.diff": torch.full((768, 768), 2e38)})
    WeightPatcher(weights).apply([AdapterSpec(adapter)], allow_partial=True)
    assert torch.equal(weights[CKPT_Q], torch.full((768, 768), 2e38))
    assert torch.equal(adapter.modules[Q_PROJ].delta(), torch.full((768, 768), 2e38))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sum_that_overflows_is_refused_not_written_as_inf(dtype):
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.layer_norm1.weight"
    name = "lora_te_text_model_encoder_layers_0_layer_norm1"
    original = torch.ones(768, dtype=dtype)
    weights = {key: original.clone()}
    w_norm = torch.zeros(768)
    w_norm[5] = 2e38  # each adapter's delta is finite, and so is its sum
    a, b = (load_adapter({f"{name}.w_norm": w_norm.clone()}) for _ in range(2))
    with pytest.raises(WeightRangeError, match="not finite"):
        WeightPatcher(weights).apply([AdapterSpec(a), AdapterSpec(b)], allow_partial=True)
    assert torch.equal(weights[key], original)


def test_library_code_leaves_the_thread_count_alone(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    ckpt = small_checkpoint(tmp_path / "ckpt.safetensors", torch.float16)
    adapter = tmp_path / "lora.safetensors"
    save_file(synthetic_adapter("sd1", "lora", select=lambda s: s.part == "te1" and ".layers.0." in s.name
                                and len(s.weight) == 2, rank=4), str(adapter))
    bake_checkpoint(ckpt, [MergeInput(str(adapter))], str(tmp_path / "baked.safetensors"))
    merge_adapters([MergeInput(str(adapter))], str(tmp_path / "merged.safetensors"), rank_param=2)
    svd.truncate(torch.randn(64, 48), "fixed", 4)  # small: the old code switched to one thread here
    svd.tucker2(torch.randn(16, 12, 3, 3), "fixed", 2)
    assert calls == []


def test_a_kept_weight_dependent_delta_is_never_used_on_another_weight():
    gen = torch.Generator().manual_seed(0)
    module = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    adapter = load_adapter({f"{module}.lora_down.weight": torch.randn(4, 768, generator=gen) * 0.1,
                            f"{module}.lora_up.weight": torch.randn(768, 4, generator=gen) * 0.1,
                            f"{module}.dora_scale": torch.rand(768, 1, generator=gen) + 0.5})
    key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    plan = build_plan([AdapterSpec(adapter, 1.0, 0.7)], {key: (768, 768)}, allow_partial=True)
    first = torch.randn(768, 768, generator=gen) * 0.02
    second = first.clone()
    second.view(-1)[1::1024] += 0.5  # the same 256 sampled elements the old fingerprint compared
    cache = DeltaCache(1 << 30)
    m = adapter.modules[module]
    for weight in (first, second):
        assert torch.equal(patched_value(weight, plan.contributions[key], key, cache), m.apply(weight, 0.7))


def peft_file(folder, metadata=None) -> str:
    gen = torch.Generator().manual_seed(1)
    name = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    path = folder / "pytorch_lora_weights.safetensors"
    save_file({f"{name}.lora_A.weight": torch.randn(4, 768, generator=gen),
               f"{name}.lora_B.weight": torch.randn(768, 4, generator=gen)}, str(path), metadata=metadata)
    return str(path)


def test_an_unreadable_peft_sidecar_is_refused_naming_it(tmp_path):
    path = peft_file(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"lora_alpha": 8,', encoding="utf-8")
    with pytest.raises(AdapterFormatError, match="adapter_config.json.*not valid JSON"):
        load_adapter(path)


def test_unreadable_peft_metadata_is_refused_naming_the_file(tmp_path):
    path = peft_file(tmp_path, metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(AdapterFormatError, match="pytorch_lora_weights.*lora_adapter_metadata.*not valid JSON"):
        load_adapter(path)
    path = peft_file(tmp_path, metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": 8})})
    assert load_adapter(path).alpha_source == "metadata"


def test_adapter_path_is_the_file_it_was_read_from(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    save_file({f"{Q_PROJ}.diff": torch.zeros(2, 2)}, "x.safetensors")
    adapter = load_adapter("x.safetensors")
    monkeypatch.chdir(tmp_path)  # the name as given no longer resolves from here
    assert adapter.path == str(tmp_path / "a" / "x.safetensors")
    assert load_adapter({f"{Q_PROJ}.diff": torch.zeros(2, 2)}).path is None
    assert SafetensorsSource(adapter.path).name == adapter.path


def test_lokr_rank_is_w1s_when_both_factors_are_decomposed_with_different_ranks():
    # LyCORIS itself reads w1_a's rank first (and then cannot load w2 factors of another rank);
    # ComfyUI takes w2's.  We pin LyCORIS's reading: scale = alpha / rank(w1).
    gen = torch.Generator().manual_seed(2)
    t = {"m.lokr_w1_a": torch.randn(8, 2, generator=gen), "m.lokr_w1_b": torch.randn(2, 8, generator=gen),
         "m.lokr_w2_a": torch.randn(8, 3, generator=gen), "m.lokr_w2_b": torch.randn(3, 8, generator=gen),
         "m.alpha": torch.tensor(4.0)}
    m = load_adapter(t).modules["m"]
    assert (m.rank, m.scale) == (2, 2.0)
    expected = 2.0 * torch.kron(t["m.lokr_w1_a"] @ t["m.lokr_w1_b"], t["m.lokr_w2_a"] @ t["m.lokr_w2_b"])
    torch.testing.assert_close(m.delta(), expected)
    # one decomposed factor: its rank, whichever it is
    w2_only = {k: v for k, v in t.items() if not k.startswith("m.lokr_w1_")} | {"m.lokr_w1": torch.randn(8, 8)}
    assert load_adapter(w2_only).modules["m"].rank == 3
