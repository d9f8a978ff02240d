"""Key spellings LyCORIS does not write, from files written here by hand with safetensors.

Layouts (r = rank; linear A is (r, in), B is (out, r); conv A is (r, in, kh, kw), B is (out, r, 1, 1)):

* PEFT (``peft`` ``save_pretrained``)::

      base_model.model.<module path>.lora_A.weight      A
      base_model.model.<module path>.lora_B.weight      B
      base_model.model.<module path>.lora_magnitude_vector[.weight]   DoRA magnitude:
          linear (out,), conv (1, out, 1, 1) -- per OUTPUT channel despite the leading 1
      adapter_config.json beside the file: {"r", "lora_alpha", "alpha_pattern", "use_rslora"}

  No alpha tensor: the scale is lora_alpha/r (alpha_pattern overrides lora_alpha per module
  name suffix; use_rslora makes it lora_alpha/√r).  Without the sidecar the scale is 1.
  PEFT DoRA: W' = m ⊙ Wc / ‖Wc‖ with Wc = W0 + scale·B·A, the norm per output channel.
* PEFT state dict before the adapter name is stripped: ``<path>.lora_A.default.weight``.
* Old diffusers attention processors: ``unet.<block path>.processor.to_q_lora.down.weight`` /
  ``.up.weight`` (down is A, up is B), scale 1.
* diffusers LoRACompatibleLinear / kohya-converted: ``<path>.lora.down.weight`` / ``.lora.up.weight``
  (optionally ``<path>.alpha``) and ``<path>.lora_linear_layer.down.weight`` / ``.up.weight``.
* Never applied, always listed in ``unknown_keys`` with a reason: T-LoRA (``q_layer.weight``,
  ``p_layer.weight``, ``lambda_layer``), the extractor's sparse bias (``bias_indices``,
  ``bias_values``, ``bias_size``), keys with no known suffix, and known suffixes in a
  combination no algorithm uses.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lycoris_core import load_adapter

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
OUT, IN, RANK = 12, 10, 4
C = 8  # square conv: C -> C, 3x3


_SEEDS = iter(range(1, 1_000_000))


def rand(*shape):
    """A fresh, reproducible random tensor (each call its own seed)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(next(_SEEDS)))


@pytest.fixture(scope="module")
def factors():
    """A, B for a linear (OUT x IN) and a square 3x3 conv, plus their original weights."""
    return {
        "lin_a": rand(RANK, IN), "lin_b": rand(OUT, RANK), "lin_w0": rand(OUT, IN),
        "conv_a": rand(RANK, C, 3, 3), "conv_b": rand(C, RANK, 1, 1), "conv_w0": rand(C, C, 3, 3),
    }


def write(path, tensors, config=None, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)
    if config is not None:
        (path.parent / "adapter_config.json").write_text(json.dumps(config))
    return path


def lora_delta(b, a, scale, shape):
    return scale * (b.flatten(1) @ a.flatten(1)).reshape(shape)


def close(got, want, tol=1e-5):
    assert got.shape == want.shape
    err = float((got - want).norm() / want.norm())
    assert err < tol, err


def peft_file(factors, suffix_a=".lora_A.weight", suffix_b=".lora_B.weight"):
    prefix = "base_model.model."
    return {
        prefix + Q + suffix_a: factors["lin_a"], prefix + Q + suffix_b: factors["lin_b"],
        prefix + CONV + suffix_a: factors["conv_a"], prefix + CONV + suffix_b: factors["conv_b"],
    }


# ---- PEFT LoRA ---------------------------------------------------------------------------

def test_peft_alpha_from_sidecar_with_alpha_pattern(tmp_path, factors):
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "alpha_pattern": {CONV: 2},
              "use_rslora": False, "target_modules": ["to_q", "conv1"]}
    ad = load_adapter(write(tmp_path / "adapter_model.safetensors", peft_file(factors), config))
    assert ad.unknown_keys == []
    q, conv = ad.modules["base_model.model." + Q], ad.modules["base_model.model." + CONV]
    assert (q.algo, q.rank, q.alpha) == ("lora", RANK, 8)
    assert (conv.algo, conv.rank, conv.alpha) == ("locon", RANK, 2)
    close(q.delta(), lora_delta(factors["lin_b"], factors["lin_a"], 8 / RANK, (OUT, IN)))
    close(conv.delta(), lora_delta(factors["conv_b"], factors["conv_a"], 2 / RANK, (C, C, 3, 3)))
    w0 = factors["lin_w0"]
    close(q.apply(w0, 0.7), w0 + 0.7 * lora_delta(factors["lin_b"], factors["lin_a"], 2.0, (OUT, IN)))


def test_peft_rslora_scale_is_alpha_over_sqrt_rank(tmp_path, factors):
    config = {"r": RANK, "lora_alpha": 8, "use_rslora": True}
    ad = load_adapter(write(tmp_path / "adapter_model.safetensors", peft_file(factors), config))
    q = ad.modules["base_model.model." + Q]
    close(q.delta(), lora_delta(factors["lin_b"], factors["lin_a"], 8 / math.sqrt(RANK), (OUT, IN)))


def test_peft_without_config_is_scale_one_and_argument_config_wins(tmp_path, factors):
    tensors = peft_file(factors)
    path = write(tmp_path / "adapter_model.safetensors", tensors)
    q = load_adapter(path).modules["base_model.model." + Q]
    assert q.alpha is None
    close(q.delta(), lora_delta(factors["lin_b"], factors["lin_a"], 1.0, (OUT, IN)))
    for source in (path, tensors):  # a file, or a dict of tensors with the config passed in
        q = load_adapter(source, peft_config={"r": RANK, "lora_alpha": 2}).modules["base_model.model." + Q]
        close(q.delta(), lora_delta(factors["lin_b"], factors["lin_a"], 2 / RANK, (OUT, IN)))


def test_peft_alpha_in_safetensors_metadata(tmp_path, factors):
    """diffusers writes the PEFT config into the header as ``lora_adapter_metadata``."""
    meta = {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 16})}
    path = write(tmp_path / "pytorch_lora_weights.safetensors", peft_file(factors), metadata=meta)
    q = load_adapter(path).modules["base_model.model." + Q]
    close(q.delta(), lora_delta(factors["lin_b"], factors["lin_a"], 16 / RANK, (OUT, IN)))


def test_peft_default_adapter_name_spelling(tmp_path, factors):
    tensors = peft_file(factors, ".lora_A.default.weight", ".lora_B.default.weight")
    ad = load_adapter(tensors)
    assert ad.unknown_keys == []
    conv = ad.modules["base_model.model." + CONV]
    close(conv.delta(), lora_delta(factors["conv_b"], factors["conv_a"], 1.0, (C, C, 3, 3)))


@pytest.mark.parametrize("magnitude_suffix", [".lora_magnitude_vector", ".lora_magnitude_vector.weight"])
def test_peft_dora_magnitude_is_per_output_channel(tmp_path, factors, magnitude_suffix):
    """PEFT saves a conv magnitude as (1, out, 1, 1); on a square conv, reading that shape as
    LyCORIS's input-axis dora_scale gives a different, wrong weight."""
    tensors = peft_file(factors)
    lin_m = rand(OUT).abs() + 0.5
    conv_m = (rand(C).abs() + 0.5).reshape(1, C, 1, 1)
    tensors["base_model.model." + Q + magnitude_suffix] = lin_m
    tensors["base_model.model." + CONV + magnitude_suffix] = conv_m
    config = {"r": RANK, "lora_alpha": 8, "use_dora": True}
    ad = load_adapter(write(tmp_path / "adapter_model.safetensors", tensors, config))
    assert ad.unknown_keys == []

    for name, a, b, w0, m in (
        (Q, factors["lin_a"], factors["lin_b"], factors["lin_w0"], lin_m),
        (CONV, factors["conv_a"], factors["conv_b"], factors["conv_w0"], conv_m),
    ):
        module = ad.modules["base_model.model." + name]
        assert module.dora and module.dora_axis == "out"
        wc = w0 + lora_delta(b, a, 8 / RANK, w0.shape)
        row_norm = wc.flatten(1).norm(dim=1).reshape(-1, *([1] * (w0.dim() - 1)))
        w_dora = m.reshape(row_norm.shape) * wc / row_norm
        close(module.apply(w0, 1.0), w_dora)
        close(module.apply(w0, 0.5), 0.5 * (w0 + w_dora))
        assert torch.equal(module.apply(w0, 0.0), w0)


# ---- diffusers spellings -----------------------------------------------------------------

def test_old_diffusers_attention_processor_keys(factors):
    base = f"unet.{Q.rsplit('.', 1)[0]}.processor"
    tensors = {
        f"{base}.to_q_lora.down.weight": factors["lin_a"], f"{base}.to_q_lora.up.weight": factors["lin_b"],
        f"{base}.to_out_lora.down.weight": factors["lin_a"][:, :OUT].clone(),
        f"{base}.to_out_lora.up.weight": factors["lin_b"],
    }
    ad = load_adapter(tensors)
    assert ad.unknown_keys == []
    assert set(ad.modules) == {f"{base}.to_q", f"{base}.to_out"}
    close(ad.modules[f"{base}.to_q"].delta(), factors["lin_b"] @ factors["lin_a"])
    close(ad.modules[f"{base}.to_out"].delta(), factors["lin_b"] @ factors["lin_a"][:, :OUT])


def test_lora_dot_down_up_with_alpha(factors):
    name = f"unet.{Q}"
    tensors = {
        f"{name}.lora.down.weight": factors["lin_a"], f"{name}.lora.up.weight": factors["lin_b"],
        f"{name}.alpha": torch.tensor(1.0),
        f"unet.{CONV}.lora.down.weight": factors["conv_a"], f"unet.{CONV}.lora.up.weight": factors["conv_b"],
    }
    ad = load_adapter(tensors)
    assert ad.unknown_keys == []
    close(ad.modules[name].delta(), lora_delta(factors["lin_b"], factors["lin_a"], 1 / RANK, (OUT, IN)))
    close(ad.modules[f"unet.{CONV}"].delta(), lora_delta(factors["conv_b"], factors["conv_a"], 1.0, (C, C, 3, 3)))


def test_lora_linear_layer_spelling(factors):
    name = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    tensors = {f"{name}.lora_linear_layer.down.weight": factors["lin_a"],
               f"{name}.lora_linear_layer.up.weight": factors["lin_b"]}
    ad = load_adapter(tensors)
    assert ad.unknown_keys == [] and list(ad.modules) == [name]
    w0 = factors["lin_w0"]
    close(ad.modules[name].apply(w0, -0.5), w0 - 0.5 * factors["lin_b"] @ factors["lin_a"])


# ---- never silently dropped -----------------------------------------------------------------

def test_unsupported_and_stray_keys_are_listed_with_reasons(factors):
    lora = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tlora = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    tensors = {
        # one good module, with the extractor's sparse residual beside it
        f"{lora}.lora_down.weight": factors["lin_a"], f"{lora}.lora_up.weight": factors["lin_b"],
        f"{lora}.alpha": torch.tensor(2.0),
        f"{lora}.bias_indices": torch.tensor([[0, 1], [2, 3]], dtype=torch.int16),
        f"{lora}.bias_values": torch.tensor([0.1, 0.2]),
        f"{lora}.bias_size": torch.tensor([OUT, IN]),
        # T-LoRA: its SVD base is not in the file
        f"{tlora}.q_layer.weight": rand(RANK, IN), f"{tlora}.p_layer.weight": rand(OUT, RANK),
        f"{tlora}.lambda_layer": rand(1, RANK), f"{tlora}.alpha": torch.tensor(4.0),
        # strays: no known suffix; a model weight; half a LoRA; a magnitude with nothing to scale
        "random_key": torch.zeros(3),
        "model.diffusion_model.out.2.weight": rand(4, 4),
        "lora_unet_conv_in.lora_down.weight": rand(RANK, 4, 3, 3),
        "lora_unet_conv_out.lora_magnitude_vector": rand(4),
    }
    ad = load_adapter(tensors)
    assert list(ad.modules) == [lora]
    close(ad.modules[lora].delta(), lora_delta(factors["lin_b"], factors["lin_a"], 2 / RANK, (OUT, IN)))
    expected_unknown = set(tensors) - {f"{lora}.lora_down.weight", f"{lora}.lora_up.weight", f"{lora}.alpha"}
    assert set(ad.unknown_keys) == expected_unknown
    reasons = ad.unknown_reasons
    assert all(reasons[k] for k in expected_unknown)
    for suffix in ("bias_indices", "bias_values", "bias_size"):
        assert "sparse bias" in reasons[f"{lora}.{suffix}"]
    for suffix in ("q_layer.weight", "p_layer.weight", "lambda_layer"):
        assert "T-LoRA" in reasons[f"{tlora}.{suffix}"]
