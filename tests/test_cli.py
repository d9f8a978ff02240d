"""The bake/merge/convert/resize/extract commands: help, reports, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lycoris_core.adapter import load_adapter
from lycoris_core.testing.synthetic import synthetic_adapter
from lycoris_core.tools.cli import main

ROOT = Path(__file__).parents[1]


def tiny(spec):
    return spec.name in ("conv_in", "text_model.encoder.layers.0.self_attn.q_proj",
                         "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")


@pytest.fixture()
def loha(tmp_path):
    path = tmp_path / "loha.safetensors"
    save_file(synthetic_adapter("sd1", "loha", select=tiny, rank=4, dtype=torch.float32), str(path))
    return str(path)


@pytest.mark.parametrize("command", ["bake", "merge", "convert", "resize", "extract", "inspect", "demo"])
def test_help(command):
    proc = subprocess.run([sys.executable, "-m", "lycoris_core", command, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout


def test_convert_dry_run_prints_report(loha, tmp_path, capsys):
    assert main(["convert", loha, "--rank", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "kept_energy" in out and "lora_unet_conv_in" in out and "dry run" in out
    assert not list(tmp_path.glob("*.partial"))


def test_merge_writes_and_refuses_overwrite(loha, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["merge", "-a", f"{loha}@0.5,1", "-a", loha, "-o", str(out), "--mode", "energy",
                 "--param", "0.99", "--svd", "exact"]) == 0
    assert out.exists() and load_adapter(str(out)).modules
    assert main(["merge", "-a", loha, "-o", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


def test_resize_and_bad_arguments(loha, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert main(["resize", loha, "-o", str(out), "--rank", "1", "--save-dtype", "fp16"]) == 0
    assert max(m.rank for m in load_adapter(str(out)).modules.values()) == 1
    assert main(["merge", "-a", loha, "--mode", "ratio", "--dry-run"]) == 2  # ratio needs --param
    assert main(["merge", "-a", f"{loha}@x", "--dry-run"]) == 2
    assert main(["convert", loha]) == 2  # no output and no dry run
    assert main(["bake", str(tmp_path / "missing.safetensors"), "-a", loha, "-o", str(tmp_path / "o")]) == 2
