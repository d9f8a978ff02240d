"""Numbers a stranger's adapter may hold (issue 8): each is a clear error or a documented behaviour.

- NaN / Inf in any factor, alpha, scale or magnitude: ``AdapterFormatError`` naming the key
  (alpha and on_input when the file is loaded, factors when the delta is built).
- Finite factors whose delta overflows float32, and a non-finite alpha from a PEFT config:
  ``AdapterFormatError`` too (never Inf/NaN written into a model).
- alpha 0 or missing: alpha = rank (scale 1).  Negative alpha: used as written (sign flip).
- rank 0 (any factor of any algorithm): ``AdapterFormatError`` naming the key.
- rank larger than the layer: legal math, applied as written (ΔW = α/r·up·down).
"""

from __future__ import annotations

import json

import pytest
import torch
from reliability_util import tally
from safetensors.torch import save_file

from lycoris_core import AdapterFormatError, WeightRangeError, load_adapter
from lycoris_core.keymap import state_shapes
from lycoris_core.patch import AdapterSpec, WeightPatcher
from lycoris_core.testing.synthetic import module_tensors

SD1 = state_shapes("sd1", "comfy")
# real SD1.5 modules (kohya name -> comfy weight key)
ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
ATTN_KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "lora_unet_conv_in"
CONV_KEY = "diffusion_model.input_blocks.0.0.weight"
NORM = "lora_unet_down_blocks_0_resnets_0_norm1"
NORM_KEY = "diffusion_model.input_blocks.1.0.in_layers.0.weight"

CASES = {  # algo -> (module, weight key)
    "lora": (ATTN, ATTN_KEY), "dora": (ATTN, ATTN_KEY), "locon_tucker": (CONV, CONV_KEY),
    "loha": (ATTN, ATTN_KEY), "loha_tucker": (CONV, CONV_KEY), "lokr": (ATTN, ATTN_KEY),
    "full": (ATTN, ATTN_KEY), "ia3": (ATTN, ATTN_KEY), "glora": (ATTN, ATTN_KEY),
    "diag-oft": (ATTN, ATTN_KEY), "boft": (ATTN, ATTN_KEY), "norm": (NORM, NORM_KEY),
}


def tensors_for(algo: str, seed: int = 0, rank: int = 4, **options) -> dict[str, torch.Tensor]:
    module, key = CASES[algo]
    gen = torch.Generator().manual_seed(seed)
    parts = module_tensors(algo, SD1[key], gen, rank=rank, **options)
    return {f"{module}.{suffix}": value for suffix, value in parts.items()}


def weight_for(algo: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(SD1[CASES[algo][1]], generator=gen) * 0.05


def build_delta(source, algo: str) -> torch.Tensor:
    adapter = load_adapter(source)
    (module,) = adapter.modules.values()
    delta = module.delta(weight_for(algo))
    if module.has_bias:
        module.bias_delta()
    return delta


# ---- NaN / Inf ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("algo", sorted(CASES))
@pytest.mark.parametrize("via", ["dict", "file"])
def test_non_finite_value_in_any_tensor_is_refused_naming_the_key(tmp_path, algo, value, via):
    t = tally("numbers")
    clean = tensors_for(algo)
    for key, tensor in clean.items():
        if not tensor.is_floating_point():
            continue
        poisoned = {k: v.clone() for k, v in clean.items()}
        poisoned[key].view(-1)[poisoned[key].numel() // 2] = value
        source = poisoned
        if via == "file":
            source = tmp_path / "poisoned.safetensors"
            save_file(poisoned, str(source))
        with pytest.raises(AdapterFormatError) as err:
            build_delta(source, algo)
        assert err.value.key == key and "NaN or Inf" in str(err.value)
        t.add("non-finite values refused")


@pytest.mark.parametrize("algo", ["lora", "dora", "locon_tucker", "loha", "loha_tucker", "lokr", "glora"])
def test_finite_factors_whose_delta_overflows_float32_are_refused(algo):
    tensors = tensors_for(algo)
    for key, tensor in tensors.items():
        if not key.endswith(".alpha") and "dora_scale" not in key:
            tensor.fill_(1e15)  # finite, but products reach 1e30 * rank * ... and Hadamards square them
    # loha multiplies two products: 1e30 * 1e30 overflows; lora/lokr need a little more
    for key in tensors:
        if key.endswith((".lora_up.weight", "lokr_w1", ".b1.weight")):
            tensors[key].fill_(3e30)
    with pytest.raises(AdapterFormatError, match="not finite") as err:
        build_delta(tensors, algo)
    assert err.value.key in tensors
    tally("numbers").add("float32 overflows refused")


def test_huge_finite_alpha_is_refused():
    tensors = tensors_for("lora")
    tensors[f"{ATTN}.alpha"] = torch.tensor(1e300, dtype=torch.float64)
    with pytest.raises(AdapterFormatError, match="alpha"):
        load_adapter(tensors)
    tally("numbers").add("float32 overflows refused")


def peft_lora() -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors_for("lora").items() if not k.endswith(".alpha")}


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_peft_alpha_is_refused(tmp_path, alpha):
    with pytest.raises(AdapterFormatError, match="not a finite number"):
        load_adapter(peft_lora(), peft_config={"lora_alpha": alpha})
    # the same from a stranger's header: Python's json reads NaN and Infinity
    path = tmp_path / "peft.safetensors"
    save_file(peft_lora(), str(path), metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": alpha})})
    with pytest.raises(AdapterFormatError, match="not a finite number"):
        load_adapter(path)
    tally("numbers").add("non-finite values refused", 2)


HOSTILE_PEFT = {"alpha str": {"lora_alpha": "x"}, "alpha list": {"lora_alpha": [1]},
                "alpha dict": {"lora_alpha": {"a": 1}}, "alpha_pattern list": {"lora_alpha": 4, "alpha_pattern": [1]},
                "config a number": 5}


@pytest.mark.parametrize("case", sorted(HOSTILE_PEFT))
def test_hostile_peft_metadata_in_the_header_is_a_format_error(tmp_path, case):
    path = tmp_path / "peft.safetensors"
    save_file(peft_lora(), str(path), metadata={"lora_adapter_metadata": json.dumps(HOSTILE_PEFT[case])})
    try:
        load_adapter(path)
    except AdapterFormatError:
        return
    pytest.fail("loaded")


# ---- alpha ---------------------------------------------------------------------------------

def lora_product(tensors, module=ATTN) -> torch.Tensor:
    up = tensors[f"{module}.lora_up.weight"].float().flatten(1)
    down = tensors[f"{module}.lora_down.weight"].float().flatten(1)
    return up @ down


@pytest.mark.parametrize("alpha,scale", [(None, 1.0), (0.0, 1.0), (2.0, 0.5), (-2.0, -0.5), (-4.0, -1.0),
                                         (16.0, 4.0)], ids=["missing", "zero", "half", "negative", "minus-rank",
                                                            "above-rank"])
def test_alpha_rule_missing_or_zero_means_rank_negative_is_used_as_written(alpha, scale):
    tensors = tensors_for("lora", rank=4)
    if alpha is None:
        del tensors[f"{ATTN}.alpha"]
    else:
        tensors[f"{ATTN}.alpha"] = torch.tensor(alpha)
    module = load_adapter(tensors).modules[ATTN]
    assert module.scale == scale
    torch.testing.assert_close(module.delta(), scale * lora_product(tensors), rtol=1e-6, atol=0)
    tally("numbers").add("alpha rules checked")


@pytest.mark.parametrize("algo", ["loha", "lokr", "glora", "locon_tucker"])
def test_negative_alpha_flips_the_sign_for_every_rank_algorithm(algo):
    plus, minus = tensors_for(algo), tensors_for(algo)
    for t, a in ((plus, 2.0), (minus, -2.0)):
        for key in t:
            if key.endswith(".alpha"):
                t[key] = torch.tensor(a)
    w = weight_for(algo)
    d_plus = load_adapter(plus).modules[CASES[algo][0]].delta(w)
    d_minus = load_adapter(minus).modules[CASES[algo][0]].delta(w)
    torch.testing.assert_close(d_minus, -d_plus)
    tally("numbers").add("alpha rules checked")


# ---- rank 0 ---------------------------------------------------------------------------------

r = torch.randn
RANK_ZERO = {  # every factor that carries a rank, at 0 -> the key that must be named
    "lora": ({"lora_down.weight": r(0, 6), "lora_up.weight": r(8, 0)}, "lora_down.weight"),
    "lora conv": ({"lora_down.weight": r(0, 4, 3, 3), "lora_up.weight": r(8, 0, 1, 1)}, "lora_down.weight"),
    "lora tucker up": ({"lora_down.weight": r(4, 6, 1, 1), "lora_mid.weight": r(0, 4, 3, 3),
                        "lora_up.weight": r(8, 0, 1, 1)}, "lora_up.weight"),
    "lora tucker down": ({"lora_down.weight": r(0, 6, 1, 1), "lora_mid.weight": r(4, 0, 3, 3),
                          "lora_up.weight": r(8, 4, 1, 1)}, "lora_down.weight"),
    "loha": ({"hada_w1_a": r(8, 0), "hada_w1_b": r(0, 6), "hada_w2_a": r(8, 0), "hada_w2_b": r(0, 6)},
             "hada_w1_b"),
    "loha second half": ({"hada_w1_a": r(8, 2), "hada_w1_b": r(2, 6), "hada_w2_a": r(8, 0), "hada_w2_b": r(0, 6)},
                         "hada_w2_b"),
    "loha tucker": ({"hada_w1_a": r(0, 8), "hada_w1_b": r(0, 6), "hada_t1": r(0, 0, 3, 3), "hada_w2_a": r(0, 8),
                     "hada_w2_b": r(0, 6), "hada_t2": r(0, 0, 3, 3)}, "hada_w1_b"),
    "lokr w2": ({"lokr_w1": r(2, 2), "lokr_w2_a": r(4, 0), "lokr_w2_b": r(0, 3)}, "lokr_w2_b"),
    "lokr w1": ({"lokr_w1_a": r(2, 0), "lokr_w1_b": r(0, 2), "lokr_w2": r(4, 3)}, "lokr_w1_b"),
    "lokr w1 with low-rank w2": ({"lokr_w1_a": r(2, 0), "lokr_w1_b": r(0, 2), "lokr_w2_a": r(4, 2),
                                 "lokr_w2_b": r(2, 3)}, "lokr_w1_b"),
    "lokr tucker": ({"lokr_w1": r(2, 2), "lokr_w2_a": r(0, 4), "lokr_w2_b": r(0, 3), "lokr_t2": r(0, 0, 3, 3)},
                    "lokr_w2_b"),
    "glora": ({"a1.weight": r(6, 0), "a2.weight": r(0, 6), "b1.weight": r(8, 0), "b2.weight": r(0, 6)},
              "a2.weight"),
    "diag-oft block size": ({"oft_blocks": r(4, 0, 0)}, "oft_blocks"),
    "diag-oft no blocks": ({"oft_blocks": r(0, 2, 2)}, "oft_blocks"),
    "boft block size": ({"oft_blocks": r(1, 4, 0, 0)}, "oft_blocks"),
}


@pytest.mark.parametrize("case", sorted(RANK_ZERO))
@pytest.mark.parametrize("via", ["dict", "file"])
def test_rank_zero_is_refused_naming_the_key(tmp_path, case, via):
    parts, role = RANK_ZERO[case]
    tensors = {f"{ATTN}.{k}": v for k, v in parts.items()}
    source = tensors
    if via == "file":
        source = tmp_path / "rank0.safetensors"
        save_file(tensors, str(source))
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(source)
    assert err.value.key == f"{ATTN}.{role}", str(err.value)
    assert "must be positive" in str(err.value) or "> 0" in str(err.value)
    tally("numbers").add("rank-0 spellings refused")


# ---- rank larger than the layer ------------------------------------------------------------

@pytest.mark.parametrize("algo,rank", [("lora", 400), ("lora", 1000), ("loha", 400), ("locon_tucker", 64)])
def test_rank_larger_than_the_layer_is_legal_math_applied_as_written(algo, rank):
    """A 320x320 layer with rank 400/1000 (conv_in 320x4x3x3 with Tucker rank 64): loads, maps, patches."""
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors_for(algo, rank=rank).items()}
    tensors[f"{CASES[algo][0]}.alpha"] = torch.tensor(float(rank) / 2)
    adapter = load_adapter(tensors)
    module = adapter.modules[CASES[algo][0]]
    assert module.rank == rank and module.scale == 0.5
    key = CASES[algo][1]
    weight = (weight_for(algo)).half()
    weights = {key: weight.clone()}
    patcher = WeightPatcher(weights, model_shapes=SD1)
    plan = patcher.apply([AdapterSpec(adapter, 0.8)])
    assert plan.keys() == [key]
    assert torch.equal(weights[key], module.apply(weight, 0.8))
    if algo == "lora":
        torch.testing.assert_close(module.delta(), 0.5 * lora_product(tensors), rtol=1e-5, atol=1e-7)
    patcher.restore()
    assert torch.equal(weights[key], weight)
    tally("numbers").add("rank > layer applied")


# ---- the weight's own range ----------------------------------------------------------------

def test_delta_beyond_the_fp16_range_is_refused_and_nothing_is_written():
    tensors = tensors_for("lora")
    tensors[f"{ATTN}.lora_up.weight"].fill_(300.0)
    tensors[f"{ATTN}.lora_down.weight"].fill_(300.0)  # 4 * 300 * 300 = 360000 > 65504, finite in float32
    weights = {ATTN_KEY: torch.zeros(SD1[ATTN_KEY], dtype=torch.float16)}
    with pytest.raises(WeightRangeError, match="65504"):
        WeightPatcher(weights, model_shapes=SD1).apply([AdapterSpec(load_adapter(tensors))])
    assert torch.equal(weights[ATTN_KEY], torch.zeros_like(weights[ATTN_KEY]))
