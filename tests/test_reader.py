"""The file reader refuses every malformed input with AdapterFormatError naming file and key."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors.torch import save_file

from lycoris_core import AdapterFormatError, PickleRefusedError, load_adapter
from lycoris_core.io.reader import read_safetensors_header


def raw_safetensors(path, header: dict, data: bytes = b"", header_len: int | None = None):
    """Write a safetensors file byte by byte, so tests can lie in any field."""
    blob = json.dumps(header).encode()
    length = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + blob + data)
    return path


def lora_tensors(rank=4, out=8, inp=6):
    return {
        "m.lora_down.weight": torch.randn(rank, inp),
        "m.lora_up.weight": torch.randn(out, rank),
        "m.alpha": torch.tensor(2.0),
    }


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file(lora_tensors(), str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def test_metadata_is_kept_and_modules_detected(good_file):
    ad = load_adapter(good_file)
    assert ad.metadata == {"ss_network_module": "networks.lora"}
    m = ad.modules["m"]
    assert (m.algo, m.rank, m.alpha, m.shape) == ("lora", 4, 2.0, (8, 6))
    assert ad.unknown_keys == []


def test_reading_is_lazy_tensor_data_is_checked_on_use(tmp_path):
    tensors = lora_tensors()
    tensors["m.lora_up.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    ad = load_adapter(path)  # header only: loads
    with pytest.raises(AdapterFormatError) as err:
        ad.modules["m"].delta()
    assert err.value.key == "m.lora_up.weight"
    assert "NaN" in str(err.value) and "nan.safetensors" in str(err.value)


def test_inf_in_dict_input_is_refused():
    tensors = lora_tensors()
    tensors["m.lora_down.weight"][1, 1] = float("inf")
    with pytest.raises(AdapterFormatError, match="NaN or Inf"):
        load_adapter(tensors).modules["m"].delta()


@pytest.mark.parametrize(
    "case",
    ["empty", "short", "header_too_long", "not_json", "not_object", "unknown_dtype", "offsets_past_end",
     "declared_larger", "negative_offset", "bad_shape", "overlap", "duplicate_key", "bad_metadata"],
)
def test_malformed_files_raise_the_typed_error(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    f32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    data = bytes(16)
    if case == "empty":
        path.write_bytes(b"")
    elif case == "short":
        path.write_bytes(b"\x01\x02")
    elif case == "header_too_long":
        raw_safetensors(path, {"a.diff": f32}, data, header_len=10**12)
    elif case == "not_json":
        blob = b"{not json"
        path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    elif case == "not_object":
        raw_safetensors(path, [1, 2, 3])
    elif case == "unknown_dtype":
        raw_safetensors(path, {"a.diff": dict(f32, dtype="Q7")}, data)
    elif case == "offsets_past_end":
        raw_safetensors(path, {"a.diff": dict(f32, data_offsets=[0, 1 << 40])}, data)
    elif case == "declared_larger":
        raw_safetensors(path, {"a.diff": dict(f32, shape=[1 << 20, 1 << 20])}, data)
    elif case == "negative_offset":
        raw_safetensors(path, {"a.diff": dict(f32, data_offsets=[-16, 0])}, data)
    elif case == "bad_shape":
        raw_safetensors(path, {"a.diff": dict(f32, shape=[2, -2])}, data)
    elif case == "overlap":
        raw_safetensors(path, {"a.diff": f32, "b.diff": dict(f32, data_offsets=[8, 24])}, bytes(24))
    elif case == "duplicate_key":
        blob = b'{"a.diff": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, ' \
               b'"a.diff": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}'
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    elif case == "bad_metadata":
        raw_safetensors(path, {"__metadata__": {"x": 1}, "a.diff": f32}, data)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(path)
    assert str(path) in str(err.value)


def test_error_names_the_key(tmp_path):
    path = raw_safetensors(tmp_path / "k.safetensors",
                           {"blk.diff": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}, bytes(16))
    with pytest.raises(AdapterFormatError) as err:
        read_safetensors_header(path)
    assert err.value.key == "blk.diff"


def test_pickle_is_refused_by_default_and_read_safely_on_opt_in(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(lora_tensors(), path)
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        load_adapter(path)
    ad = load_adapter(path, allow_pickle=True)
    assert ad.modules["m"].rank == 4


def test_pickle_content_is_detected_whatever_the_extension(tmp_path):
    path = tmp_path / "disguised.safetensors"
    torch.save(lora_tensors(), path)
    with pytest.raises(PickleRefusedError):
        load_adapter(path)


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.ckpt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(AdapterFormatError, match="weights_only"):
        load_adapter(path, allow_pickle=True)


def test_no_usable_module_is_an_error_naming_keys(tmp_path):
    path = tmp_path / "none.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, str(path))
    with pytest.raises(AdapterFormatError, match="no usable adapter module") as err:
        load_adapter(path)
    assert "out.2.weight" in str(err.value)


def test_factor_shape_disagreement_names_the_key():
    tensors = lora_tensors()
    tensors["m.lora_up.weight"] = torch.randn(8, 5)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(tensors)
    assert err.value.key == "m.lora_up.weight"


def test_dict_values_must_be_tensors():
    with pytest.raises(AdapterFormatError, match="not a tensor"):
        load_adapter({"m.lora_up.weight": [1, 2]})


def test_unknown_and_unsupported_keys_are_listed_not_dropped():
    tensors = lora_tensors()
    tensors["m.bias_indices"] = torch.zeros(3, dtype=torch.int16)
    tensors["n.q_layer.weight"] = torch.zeros(2, 2)
    tensors["stray"] = torch.zeros(1)
    tensors["lonely.lora_up.weight"] = torch.zeros(4, 2)
    ad = load_adapter(tensors)
    assert list(ad.modules) == ["m"]
    reasons = ad.unknown_reasons
    assert "sparse bias" in reasons["m.bias_indices"]
    assert "T-LoRA" in reasons["n.q_layer.weight"]
    assert set(reasons) == {"m.bias_indices", "n.q_layer.weight", "stray", "lonely.lora_up.weight"}


def test_strength_zero_is_exact_and_dtype_is_kept():
    ad = load_adapter(lora_tensors())
    w = torch.randn(8, 6).to(torch.bfloat16)
    assert torch.equal(ad.modules["m"].apply(w, 0.0), w)
    out = ad.modules["m"].apply(w, 0.7)
    assert out.dtype == torch.bfloat16
    expected = (w.float() + 0.7 * ad.modules["m"].delta()).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_stored_is_a_checked_view_of_the_file_even_at_an_odd_offset(tmp_path):
    """``stored`` (how a full diff is read once per patch pass) refuses NaN/Inf like ``[]``."""
    from lycoris_core.io.reader import SafetensorsSource

    good = tmp_path / "good.safetensors"
    tensors = {"a": torch.randn(3, 5).half(), "b": torch.randn(7)}
    save_file(tensors, str(good))
    source = SafetensorsSource(good)
    for key, value in tensors.items():
        assert torch.equal(source.stored(key), value) and torch.equal(source.stored(key), source[key])
    # a 1-byte tensor first puts the float32 data at an odd address: still read right
    odd = raw_safetensors(tmp_path / "odd.safetensors", {
        "pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }, b"\x07" + struct.pack("<2f", 1.5, -2.0))
    assert SafetensorsSource(odd).stored("w").tolist() == [1.5, -2.0]
    bad = raw_safetensors(tmp_path / "bad.safetensors", {
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }, struct.pack("<2f", 1.0, float("inf")))
    with pytest.raises(AdapterFormatError, match="NaN or Inf") as err:
        SafetensorsSource(bad).stored("w")
    assert err.value.key == "w"


NON_FINITE = [(dtype, bad) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                         torch.float8_e4m3fn, torch.float8_e5m2)
              for bad in (float("nan"), float("inf"), -float("inf"))
              if not (dtype == torch.float8_e4m3fn and math.isinf(bad))]  # e4m3fn has no Inf


@pytest.mark.parametrize("dtype, bad", NON_FINITE, ids=[f"{d}-{b}".replace("torch.", "") for d, b in NON_FINITE])
def test_non_finite_values_are_refused_in_every_float_dtype(tmp_path, dtype, bad):
    from lycoris_core.io.reader import DictSource, SafetensorsSource

    clean = torch.linspace(-3, 3, 1001).to(dtype)
    poisoned = clean.clone()
    poisoned[-1:] = torch.tensor([bad]).to(dtype)
    path = tmp_path / "t.safetensors"
    save_file({"clean": clean, "w": poisoned}, str(path))
    for source in (DictSource({"clean": clean, "w": poisoned}), SafetensorsSource(path)):
        assert torch.equal(source["clean"].float(), clean.float())
        for read in (source.__getitem__, source.stored):
            with pytest.raises(AdapterFormatError, match="NaN or Inf") as err:
                read("w")
            assert err.value.key == "w"
