"""merge / convert / resize: exact sums, full-rank round trips, reported = measured errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lycoris_core.adapter import load_adapter
from lycoris_core.errors import LycorisError, OutputExistsError
from lycoris_core.testing.synthetic import synthetic_adapter
from lycoris_core.tools.merge import MergeInput, merge_adapters

SMALL = {
    "conv_in", "conv_out", "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "text_model.encoder.layers.0.self_attn.q_proj",
}


def small(spec):
    """A few real SD1.5 modules: 3x3 convs (conv_in/out), a 1x1 conv, linears, one CLIP linear."""
    return spec.name in SMALL


def write_adapter(tmp_path, algo, seed=0, rank=8, name=None, **options):
    path = tmp_path / (name or f"{algo}-{seed}.safetensors")
    save_file(synthetic_adapter("sd1", algo, select=small, rank=rank, dtype=torch.float32, seed=seed,
                                **options), str(path))
    return str(path)


def deltas(path):
    a = load_adapter(path)
    return {n: m.delta() for n, m in a.modules.items() if not m.uses_weight}


def compare(original, converted):
    """Worst relative Frobenius error per module of converted against original deltas."""
    worst = 0.0
    for name, d0 in original.items():
        d1 = converted[name].reshape(d0.shape)
        worst = max(worst, float((d1 - d0).norm() / d0.norm()))
    return worst


@pytest.mark.parametrize("algo", ["loha", "lokr", "locon_tucker"])
@pytest.mark.parametrize("tucker", [False, True])
def test_convert_full_rank_reproduces_delta(tmp_path, algo, tucker):
    src = write_adapter(tmp_path, algo)
    out = tmp_path / "out.safetensors"
    report = merge_adapters([MergeInput(src)], str(out), rank_param=100000, conv_tucker=tucker, svd="exact")
    assert report.path == str(out) and report.size_bytes == out.stat().st_size
    converted = load_adapter(str(out))
    assert {m.algo for m in converted.modules.values()} <= {"lora", "locon"}
    assert all(m.alpha == m.rank for m in converted.modules.values())  # scale 1 stated as alpha = rank
    original = deltas(src)
    assert set(original) == set(converted.modules)
    assert compare(original, {n: m.delta() for n, m in converted.modules.items()}) < 1e-4
    assert report.total_error < 1e-4
    if tucker:
        assert any(m.tucker for m in converted.modules.values())


@pytest.mark.parametrize("mode,param", [("fixed", 4), ("ratio", 0.3), ("energy", 0.9), ("threshold", 0.05)])
def test_lower_rank_reported_error_equals_measured(tmp_path, mode, param):
    src = write_adapter(tmp_path, "loha")
    out = tmp_path / "out.safetensors"
    report = merge_adapters([MergeInput(src)], str(out), rank_mode=mode, rank_param=param, save_dtype="fp16")
    original = deltas(src)
    converted = {n: m.delta() for n, m in load_adapter(str(out)).modules.items()}
    err_sq = tot_sq = 0.0
    for row in report.merged:
        d0 = original[row["module"]]
        d1 = converted[row["module"]].reshape(d0.shape)
        measured = float((d1 - d0).norm() / d0.norm())
        assert row["rel_error"] == pytest.approx(measured, rel=1e-3, abs=1e-6)
        err_sq += float((d1 - d0).norm()) ** 2
        tot_sq += float(d0.norm()) ** 2
    assert report.total_error == pytest.approx((err_sq / tot_sq) ** 0.5, rel=1e-3)
    if mode == "fixed":
        assert max(r["rank"] for r in report.merged) == 4


def test_merge_is_exact_sum_without_strength_squared(tmp_path):
    a = write_adapter(tmp_path, "lora", seed=1)
    b = write_adapter(tmp_path, "loha", seed=2)
    out = tmp_path / "out.safetensors"
    merge_adapters([MergeInput(a, 0.5, 0.25), MergeInput(b, -0.7, 1.0)], str(out), rank_param=100000,
                   svd="exact")
    da, db = deltas(a), deltas(b)
    merged = {n: m.delta() for n, m in load_adapter(str(out)).modules.items()}
    for name in da:
        s = (0.5, -0.7) if name.startswith("lora_unet") else (0.25, 1.0)
        want = s[0] * da[name] + s[1] * db[name].reshape(da[name].shape)
        got = merged[name].reshape(want.shape)
        assert float((got - want).norm() / want.norm()) < 1e-4


def test_differently_named_modules_are_aligned(tmp_path):
    a = write_adapter(tmp_path, "lora", seed=3)
    tensors = load_file(a)
    # the same layers in diffusers/PEFT naming: unet.<dotted>.lora_A.weight / lora_B.weight
    renamed = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if not module.startswith("lora_unet_"):
            continue
        from lycoris_core.keymap.names import resolve

        (_part, canonical), = resolve(module, "sd1")[0][:1]
        role = {"lora_down": "lora_A.weight", "lora_up": "lora_B.weight", "alpha": "alpha"}[suffix.split(".")[0]]
        renamed[f"unet.{canonical}.{role}"] = value
    b = str(tmp_path / "peft.safetensors")
    save_file(renamed, b)
    out = tmp_path / "out.safetensors"
    report = merge_adapters([MergeInput(a), MergeInput(b)], str(out), rank_param=100000, svd="exact")
    merged = {n: m.delta() for n, m in load_adapter(str(out)).modules.items()}
    da = deltas(a)
    for name, d in da.items():
        if name.startswith("lora_unet"):
            assert float((merged[name].reshape(d.shape) - 2 * d).norm() / (2 * d).norm()) < 1e-4
    assert not any(r["module"].startswith("unet.") for r in report.merged)


def test_base_needing_modules_skipped_without_base(tmp_path):
    src = write_adapter(tmp_path, "ia3")
    lora = write_adapter(tmp_path, "lora")
    report = merge_adapters([MergeInput(src), MergeInput(lora)], None, dry_run=True)
    assert report.path is None
    reasons = [r["skipped"] for r in report.skipped]
    assert reasons and all("needs the base weight" in r for r in reasons if "ia3" in r)
    assert any("ia3" in r for r in reasons)
    assert "skipped: ia3 needs the base weight" in report.to_text()
    with pytest.raises(LycorisError):
        merge_adapters([MergeInput(src)], None, dry_run=True)  # nothing left to merge


def test_outputs_are_never_overwritten(tmp_path):
    src = write_adapter(tmp_path, "lora")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        merge_adapters([MergeInput(src)], str(out), rank_param=4)
    assert out.read_bytes() == b"keep me"
    merge_adapters([MergeInput(src)], str(out), rank_param=4, overwrite=True)
    assert len(load_adapter(str(out)).modules) > 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_dry_run_writes_nothing_and_progress_is_called(tmp_path):
    src = write_adapter(tmp_path, "lokr")
    calls = []
    report = merge_adapters([MergeInput(src)], str(tmp_path / "x.safetensors"), rank_param=4, dry_run=True,
                            progress=lambda d, t, s: calls.append((d, t, s)))
    assert not (tmp_path / "x.safetensors").exists()
    assert calls and calls[-1][0] == calls[-1][1]
    assert report.rows and all(0 <= r["kept_energy"] <= 1 for r in report.merged)


def test_block_weights_scale_unet_blocks(tmp_path):
    src = write_adapter(tmp_path, "lora")
    out = tmp_path / "out.safetensors"
    # down_blocks.0 = IN01/IN02; zero the input blocks, keep BASE (text encoder)
    merge_adapters([MergeInput(src, blocks="BASE=1,IN=0,MID=1,OUT=1")], str(out), rank_param=100000, svd="exact")
    names = set(load_adapter(str(out)).modules)
    # conv_in and down_blocks.0 are IN00-IN02 (zeroed); conv_out lies outside every block
    assert names == {"lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_conv_out"}


def test_auto_merge_of_low_rank_inputs_is_factored_and_exact(tmp_path):
    a = write_adapter(tmp_path, "lora", seed=5)
    b = write_adapter(tmp_path, "loha", seed=6, rank=2)
    auto = merge_adapters([MergeInput(a, 0.5, 0.25), MergeInput(b, -0.7, 1.0)], None, rank_param=6, dry_run=True)
    exact = merge_adapters([MergeInput(a, 0.5, 0.25), MergeInput(b, -0.7, 1.0)], None, rank_param=6, svd="exact",
                           dry_run=True)
    methods = {r["module"]: r["method"] for r in auto.merged}
    assert "factored" in methods.values()
    ref = {r["module"]: r["rel_error"] for r in exact.merged}
    for row in auto.merged:
        assert row["rel_error"] <= ref[row["module"]] * 1.001 + 1e-6
