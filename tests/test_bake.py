"""bake: streamed, bit-exact with the patch engine, recipe in metadata, bounded memory.

The default tests use the real SD1.5 CLIP text encoder in single-file layout
(``cond_stage_model.transformer.*``, fp16, ~250 MB).  The full SD1.5 UNet+CLIP
checkpoint (~2 GB, fp16, random values, real key names and shapes) and the peak-RSS
check run with LYCORIS_LONG=1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lycoris_core.adapter import load_adapter
from lycoris_core.errors import OutputExistsError
from lycoris_core.numerics.rounding import to_dtype
from lycoris_core.patch import AdapterSpec, build_plan
from lycoris_core.testing.synthetic import synthetic_adapter
from lycoris_core.testing.synthetic import write_checkpoint as write_synthetic_checkpoint
from lycoris_core.tools.bake import bake_checkpoint
from lycoris_core.tools.merge import MergeInput

LONG = os.environ.get("LYCORIS_LONG") == "1"
TE_ALGOS = ["lora", "dora", "loha", "lokr", "full", "ia3", "glora", "diag-oft"]
UNET_ALGOS = TE_ALGOS + ["locon_tucker", "loha_tucker", "norm"]


def write_checkpoint(path, parts=("unet", "te1"), seed=0):
    """A single-file SD1.5 checkpoint with real keys and shapes and random fp16 values."""
    return write_synthetic_checkpoint(path, "sd1", parts, seed, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def te_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "sd15-te.safetensors", parts=("te1",))


def te_layers(spec):
    return spec.part == "te1" and spec.name.startswith(("text_model.encoder.layers.0.",
                                                        "text_model.encoder.layers.1.")) and len(spec.weight) > 1


def write_adapter(folder, algo, select, seed=0):
    path = Path(folder) / f"{algo}.safetensors"
    if not path.exists():
        save_file(synthetic_adapter("sd1", algo, select=select, rank=4, dtype=torch.float16, seed=seed), str(path))
    return str(path)


def check_bit_exact(checkpoint, out, inputs, dtype=None):
    shapes = {}
    with safe_open(checkpoint, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    specs = [AdapterSpec(load_adapter(i.path), i.strength_unet, i.strength_clip, i.blocks) for i in inputs]
    plan = build_plan(specs, shapes)
    assert plan.keys()
    with safe_open(checkpoint, "pt") as a, safe_open(out, "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in plan.keys():
            original = a.get_tensor(key)
            if dtype is None:
                want = plan.patched(key, original)
            else:
                want = to_dtype(plan.patched(key, original.float()), dtype, key)
            got = b.get_tensor(key)
            assert got.dtype == want.dtype
            assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)), key
        untouched = next(k for k in a.keys() if k not in plan)
        assert torch.equal(a.get_tensor(untouched).to(b.get_tensor(untouched).dtype), b.get_tensor(untouched))
    return plan


@pytest.mark.parametrize("algo", TE_ALGOS)
def test_bake_matches_patch_engine_bit_for_bit(te_checkpoint, tmp_path, algo):
    adapter = write_adapter(tmp_path, algo, te_layers)
    out = str(tmp_path / "baked.safetensors")
    inputs = [MergeInput(adapter, 1.0, 0.8)]
    report = bake_checkpoint(te_checkpoint, inputs, out)
    assert report.path == out and report.patched > 0
    check_bit_exact(te_checkpoint, out, inputs)


def test_bake_stack_converts_dtype_with_one_rounding(te_checkpoint, tmp_path):
    inputs = [MergeInput(write_adapter(tmp_path, "lora", te_layers), 1.0, 0.7),
              MergeInput(write_adapter(tmp_path, "loha", te_layers, seed=1), 1.0, -0.4)]
    out = str(tmp_path / "baked-bf16.safetensors")
    calls = []
    bake_checkpoint(te_checkpoint, inputs, out, dtype="bf16", progress=lambda d, t, s: calls.append((d, t)))
    check_bit_exact(te_checkpoint, out, inputs, dtype=torch.bfloat16)
    assert calls[-1][0] == calls[-1][1]
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in list(f.keys())[:5])
    recipe = json.loads(meta["lycoris_core_bake"])
    assert recipe["dtype"] == "bf16" and len(recipe["adapters"]) == 2
    assert recipe["adapters"][1]["strength_clip"] == -0.4 and len(recipe["adapters"][0]["sha256"]) == 64
    assert meta["format"] == "pt"  # the checkpoint's own metadata is kept


def test_bake_refuses_existing_output_and_dry_run_writes_nothing(te_checkpoint, tmp_path):
    inputs = [MergeInput(write_adapter(tmp_path, "lora", te_layers))]
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        bake_checkpoint(te_checkpoint, inputs, str(out))
    assert out.read_bytes() == b"x"
    report = bake_checkpoint(te_checkpoint, inputs, str(tmp_path / "dry.safetensors"), dry_run=True)
    assert report.path is None and report.patched > 0 and not (tmp_path / "dry.safetensors").exists()
    assert "dry run" in report.to_text()


# ---- the full-size checkpoint ------------------------------------------------------------------

def unet_and_te(spec):
    """Some of everything: 3x3 convs, 1x1 convs, linears, norms, CLIP layers."""
    if spec.part == "te1":
        return te_layers(spec)
    return spec.name.startswith(("conv_in", "down_blocks.0.resnets.0.", "down_blocks.0.attentions.0.",
                                 "mid_block.attentions.0.transformer_blocks.0.attn2"))


# VmHWM belongs to this process's own address space; ru_maxrss would carry over the forking pytest's peak
RSS_SCRIPT = """
import sys
from lycoris_core.tools.bake import bake_checkpoint
from lycoris_core.tools.merge import MergeInput
inputs = [MergeInput(p, 0.9, 0.8) for p in sys.argv[3:]]
bake_checkpoint(sys.argv[1], inputs, sys.argv[2], progress=lambda d, t, s: None)
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="full 2 GB SD1.5 checkpoint: run with LYCORIS_LONG=1")
def test_full_sd15_bake_bit_exact_and_low_memory(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full")
    ckpt = write_checkpoint(folder / "sd15.safetensors")
    size = os.path.getsize(ckpt)
    assert size > 1.9e9
    adapters = [write_adapter(folder, algo, unet_and_te, seed=i) for i, algo in enumerate(UNET_ALGOS)]
    out = str(folder / "baked.safetensors")
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, ckpt, out, *adapters], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1], timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.split()[-1])
    print(f"peak RSS {peak / 1e6:.0f} MB = {peak / size:.1%} of the checkpoint")
    assert peak < 0.30 * size
    check_bit_exact(ckpt, out, [MergeInput(p, 0.9, 0.8) for p in adapters])
