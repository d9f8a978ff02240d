"""Caches fit beside the model: budgets hold in a real process, and memory is given back when short.

* A child process runs the node (through the ComfyUI stand-in) on one model with one
  adapter after another, as a user trying adapters does, forcing each patch; its peak
  anonymous RSS stays within: the model, ComfyUI's patched copies of the touched weights,
  the configured delta-cache budget, and a fixed allowance for the interpreter's working set.
* The delta cache keeps nothing when the system is below its memory reserve, and gives back
  entries of earlier passes at the next pass when memory runs low (the available memory is
  what the kernel reports: here it is pinned to chosen values).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lycoris_core import load_adapter, memory
from lycoris_core.keymap import state_shapes
from lycoris_core.patch import AdapterSpec, DeltaCache, build_plan, contribution_delta
from lycoris_core.testing.synthetic import synthetic_adapter

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
SD1 = state_shapes("sd1", "comfy")

CHILD = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import torch
import nodes_env as env
import comfy.model_management as mm
from nodes import glue
from nodes.loaders import LycorisLoaderModelOnly

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("RssAnon:"))

names = sys.argv[3:]
env.use_loras(sys.argv[2])
paths = [f"{sys.argv[2]}/{n}" for n in names]
model = env.make_model(env.touched_keys(paths))
touched = sum(p.numel() * p.element_size() for p in model.model.parameters() if p.stride() and any(p.stride()))
start, peak = rss(), 0
with torch.inference_mode():
    for name in names:
        patched, _ = LycorisLoaderModelOnly().apply(model, name, 0.8)["result"]
        mm.load_models_gpu([patched])
        peak = max(peak, rss())
        mm.unload_all_models()  # as ComfyUI does when the next prompt's model replaces it
        peak = max(peak, rss())
print("MEM " + json.dumps({"start": start, "peak": peak, "touched": touched, "cache": glue.DELTAS.budget,
                          "used": glue.DELTAS.used}))
"""


def test_a_sequence_of_adapters_keeps_rss_within_the_configured_budgets(tmp_path):
    from safetensors.torch import save_file

    def attention(spec):
        return spec.part == "unet" and (".attn1." in spec.name or ".attn2." in spec.name)

    names = []
    for i, algo in enumerate(("lora", "loha", "lora", "lokr", "loha", "lora")):
        name = f"{algo}_{i}.safetensors"
        save_file(synthetic_adapter("sd1", algo, select=attention, rank=16, seed=i), str(tmp_path / name))
        names.append(name)
    budget_mb = 128
    env = dict(os.environ, LYCORIS_CACHE_MB=str(budget_mb), LYCORIS_ADAPTER_CACHE_MB="64", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(tmp_path), *names], env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("MEM ")), None)
    assert line, done.stderr[-3000:]
    m = json.loads(line[4:])
    assert m["cache"] == budget_mb * MiB
    growth = m["peak"] - m["start"]
    # ComfyUI's patched copies (CPU: the originals stay as backups) + the delta budget + two float32 tiles
    # of workspace and the allocator's slack
    allowed = m["touched"] + budget_mb * MiB + 96 * MiB
    assert growth <= allowed, f"grew {growth / MiB:.0f} MiB, allowed {allowed / MiB:.0f} MiB"


def lora_contributions():
    adapter = load_adapter(synthetic_adapter("sd1", "lora", select=lambda s: s.part == "te1" and len(s.weight) == 2,
                                             rank=8))
    plan = build_plan([AdapterSpec(adapter)], SD1)
    return [(key, c) for key, cs in plan.contributions.items() for c in cs]


def test_the_delta_cache_keeps_nothing_below_the_memory_reserve(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: memory.reserve_bytes() - MiB)  # already short
    cache = DeltaCache(1 << 30)
    for key, c in lora_contributions()[:8]:
        contribution_delta(c, torch.zeros(SD1[key]), cache)
    assert cache.used == 0


def test_the_delta_cache_gives_memory_back_when_it_runs_low(monkeypatch):
    free = {"bytes": 64 << 30}
    monkeypatch.setattr(memory, "available_bytes", lambda: free["bytes"])
    cache = DeltaCache(1 << 30)
    items = lora_contributions()[:12]
    for key, c in items:
        contribution_delta(c, torch.zeros(SD1[key]), cache)
    kept = cache.used
    assert kept > 0
    free["bytes"] = memory.reserve_bytes() - kept // 2  # something else took the memory
    cache.new_epoch([])  # the next pass: entries of earlier passes go until the reserve is back
    assert 0 < kept - cache.used and cache.used <= kept // 2 + max(c.module.dense_params * 4 for _, c in items)
