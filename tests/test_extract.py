"""extract: tuned − base per layer, streamed from two single files, kohya names, exact at full rank."""

import pytest
import torch
from safetensors import safe_open

from lycoris_core.adapter import load_adapter
from lycoris_core.errors import ArchitectureMismatchError
from lycoris_core.io.stream import StreamWriter
from lycoris_core.keymap import state_shapes
from lycoris_core.tools.extract import extract_adapter

Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
FC1 = "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"


def write_pair(folder, deltas):
    shapes = state_shapes("sd1", "checkpoint", ("te1",))
    paths = []
    for name, add in (("base", False), ("tuned", True)):
        path = folder / f"{name}.safetensors"
        w = StreamWriter(path, [(k, "F32", s) for k, s in shapes.items()], {})
        g = torch.Generator().manual_seed(0)
        for key, shape in shapes.items():
            t = torch.empty(shape).uniform_(-0.05, 0.05, generator=g) if shape else torch.zeros(shape)
            if add and key in deltas:
                t = t + deltas[key]
            w.write(key, t)
        w.close()
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    gen = torch.Generator().manual_seed(5)
    deltas = {
        Q: torch.randn(768, 3, generator=gen) @ torch.randn(3, 768, generator=gen) * 0.01,
        FC1: torch.randn(3072, 6, generator=gen) @ torch.randn(6, 768, generator=gen) * 0.01,
    }
    return write_pair(tmp_path_factory.mktemp("extract"), deltas), deltas


def test_extract_recovers_low_rank_deltas(pair, tmp_path):
    (base, tuned), deltas = pair
    out = tmp_path / "x.safetensors"
    report = extract_adapter(base, tuned, str(out), rank_param=8, save_dtype="fp32")
    adapter = load_adapter(str(out))
    assert set(adapter.modules) == {"lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                    "lora_te_text_model_encoder_layers_3_mlp_fc1"}
    got = adapter.modules["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].delta()
    assert float((got - deltas[Q]).norm() / deltas[Q].norm()) < 1e-4
    assert adapter.modules["lora_te_text_model_encoder_layers_3_mlp_fc1"].rank == 8
    assert any(r["skipped"] == "unchanged" for r in report.rows)
    assert any("embedding" in r["skipped"] for r in report.rows)
    assert report.total_error < 1e-4
    with safe_open(str(out), "pt") as f:
        assert "lycoris_core_recipe" in f.metadata()


def test_extract_lower_rank_reports_measured_error(pair, tmp_path):
    (base, tuned), deltas = pair
    out = tmp_path / "x.safetensors"
    report = extract_adapter(base, tuned, str(out), rank_param=2, save_dtype="fp32")
    adapter = load_adapter(str(out))
    row = next(r for r in report.merged if r["module"].endswith("layers_3_mlp_fc1"))
    got = adapter.modules[row["module"]].delta()
    measured = float((got - deltas[FC1]).norm() / deltas[FC1].norm())
    assert row["rank"] == 2 and row["rel_error"] == pytest.approx(measured, rel=1e-4)


def test_extract_dry_run_and_energy_mode(pair, tmp_path):
    (base, tuned), _ = pair
    report = extract_adapter(base, tuned, None, rank_mode="energy", rank_param=0.999999, dry_run=True)
    assert report.path is None
    assert sorted(r["rank"] for r in report.merged) == [3, 6]  # the true ranks of the two deltas


def test_extract_refuses_other_architectures(pair, tmp_path):
    (base, _), _ = pair
    other = tmp_path / "other.safetensors"
    w = StreamWriter(other, [("foo.weight", "F32", (4, 4))], {})
    w.write("foo.weight", torch.zeros(4, 4))
    w.close()
    with pytest.raises(ArchitectureMismatchError):
        extract_adapter(base, str(other), None, dry_run=True)
