"""The Train LyCORIS node in a real ComfyUI, on a random-weight SD1.5 UNet; ComfyUI's own
LoraLoaderModelOnly reads the file back (skipped without a ComfyUI checkout).

Where ComfyUI is: ``COMFYUI_PATH``, else a ``ComfyUI/`` folder beside this project.  Which
Python runs it: ``COMFYUI_PYTHON`` (ComfyUI's own environment; on a machine without
torchvision, a wrapper that adds placeholder packages), else this one.  If ComfyUI does not
import there, the test is skipped with the reason; once it has imported, any failure fails.
The work runs in a subprocess (``train_comfy_oracle.py``): ComfyUI's import-time globals stay
out of this session.  ``LYCORIS_LONG=1`` adds LoHa (rebuilt each step: slow on a CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = Path(os.environ.get("COMFYUI_PATH") or ROOT.parent / "ComfyUI")
PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
RUNS = ["lora:unet-full"] + (["loha:unet-attn"] if os.environ.get("LYCORIS_LONG") == "1" else [])


@pytest.fixture(scope="module")
def comfy_results(tmp_path_factory):
    if not (COMFYUI / "comfy").is_dir():
        pytest.skip(f"no ComfyUI checkout at {COMFYUI} (set COMFYUI_PATH)")
    work = tmp_path_factory.mktemp("comfy")
    script = Path(__file__).with_name("train_comfy_oracle.py")
    done = subprocess.run([PYTHON, str(script), str(COMFYUI), str(ROOT), str(work), *RUNS],
                          capture_output=True, text=True, timeout=1500)
    lines = done.stdout.splitlines()
    if "ready" not in lines:
        pytest.skip(f"ComfyUI at {COMFYUI} does not import with {PYTHON} (set COMFYUI_PYTHON): {done.stderr[-400:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in lines[lines.index("ready") + 1:] if line.startswith("{")]
    assert [r["run"] for r in results] == RUNS
    return results


@pytest.mark.parametrize("index", range(len(RUNS)), ids=RUNS)
def test_trained_file_loads_in_comfyui_like_our_model_output(comfy_results, index):
    r = comfy_results[index]
    assert r["not_loaded"] == []  # ComfyUI maps every module name
    assert r["modules"] >= 128 and r["nonzero"] >= r["modules"] - 2  # mid-block q/k at 1×1 get no gradient
    assert r["changed_theirs"] == r["nonzero"] == r["changed_ours"] and r["same_keys"]
    assert r["worst_relative"] < 1e-4  # ComfyUI's patched weights equal our MODEL output's
    assert r["restored"]  # the input model is back as it was
    assert len(r["losses"]) == 2 and all(v == v for v in r["losses"])
