"""Long use (issue 8): many random apply / strength-change / restore cycles on real-size SD1.5 layers.

ComfyUI runs for days, changing adapters and strengths between prompts.  A random
sequence of 1,000 operations (on about 3M real-size parameters; 44M in the long run) over a stack of up to three
adapters of different algorithms (LoRA, LoHa, LoKr, DoRA, (IA)³, Diag-OFT, GLoRA),
random strengths (zero and negative included) and block weights must end with every
weight bit-identical to the original, must match a fresh single apply whenever it is
checked along the way, and must not grow resident memory after a warm-up.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from reliability_util import LONG, Memory, MiB, tally

from lycoris_core import load_adapter
from lycoris_core.io.reader import SafetensorsSource
from lycoris_core.keymap import state_shapes
from lycoris_core.patch import AdapterSpec, WeightPatcher, build_plan
from lycoris_core.testing.synthetic import default_targets, synthetic_adapter

SD1 = state_shapes("sd1", "comfy")
ALGOS = ("lora", "loha", "lokr", "dora", "ia3", "diag-oft", "glora")
BLOCKS = (None, None, "ALL0.5", "INS", "in=0.5, mid=1, out=0", "OUTALL")
STRENGTHS = (1.0, 0.8, 0.5, 0.0, -0.6, 1.3)

if LONG:  # all of SD1.5's down_blocks.1 and a whole CLIP layer: about 44M parameters (~90 MB of weights)
    PREFIXES = ("down_blocks.1.",)
    TE_PREFIXES = ("text_model.encoder.layers.0.",)
else:  # one real transformer block's attentions, a 3x3 conv, two CLIP projections: about 3.3M parameters
    PREFIXES = ("down_blocks.0.attentions.0.transformer_blocks.0.attn", "down_blocks.0.attentions.0.proj_in",
                "down_blocks.0.resnets.0.conv1")
    TE_PREFIXES = ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.out_proj")


def _select(spec) -> bool:
    if not default_targets(spec):
        return False
    if spec.part == "unet":
        return spec.name.startswith(PREFIXES)
    return spec.name.startswith(TE_PREFIXES)


@pytest.fixture(scope="module")
def pool():
    adapters = [load_adapter(synthetic_adapter("sd1", algo, select=_select, rank=8, seed=i))
                for i, algo in enumerate(ALGOS)]
    keys: set[str] = set()
    for adapter in adapters:
        keys.update(build_plan([AdapterSpec(adapter)], SD1, allow_partial=True).keys())
    return adapters, sorted(keys)


def make_weights(keys) -> dict[str, torch.Tensor]:
    """Real shapes; UNet in fp16, CLIP in fp32 (as ComfyUI may hold them)."""
    gen = torch.Generator().manual_seed(3)
    out = {}
    for key in keys:
        dtype = torch.float32 if key.startswith("clip_l.") else torch.float16
        out[key] = (torch.randn(SD1[key], generator=gen) * 0.05).to(dtype)
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def random_stack(rng: random.Random, adapters) -> list[AdapterSpec]:
    return [AdapterSpec(a, rng.choice(STRENGTHS), rng.choice(STRENGTHS), rng.choice(BLOCKS))
            for a in rng.sample(adapters, rng.randint(1, 3))]


def with_strengths(rng: random.Random, stack) -> list[AdapterSpec]:
    return [AdapterSpec(s.adapter, rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5), s.blocks) for s in stack]


def run_cycles(patcher: WeightPatcher, weights, originals, adapters, ops: int, rng: random.Random,
               area: str) -> dict:
    t = tally(area)
    memory = Memory()
    for adapter in adapters:  # prime the delta cache: from here on it stays at its budget (LRU)
        patcher.apply([AdapterSpec(adapter)])
    patcher.restore()
    warmup = max(60, ops // 10)
    stack = None
    samples: list[int] = []
    checks = set(rng.sample(range(warmup, ops), 5))
    for i in range(ops):
        op = rng.random()
        if stack is None or op < 0.4:
            stack = random_stack(rng, adapters)
            patcher.apply(stack)
            t.add("applies")
        elif op < 0.75:
            stack = with_strengths(rng, stack)
            patcher.apply(stack)
            t.add("strength changes")
        else:
            patcher.restore()
            stack = None
            t.add("restores")
            if i % 10 == 0:
                assert same(weights, originals), f"restore after {i} operations is not bit-exact"
        if i == warmup - 1 and stack is None:  # the warm-up ends with every kind of operation done once
            stack = random_stack(rng, adapters)
            patcher.apply(stack)
        if stack is not None and (i in checks or i == warmup - 1):  # the state equals one fresh apply
            fresh = {k: v.clone() for k, v in originals.items()}
            WeightPatcher(fresh, model_shapes=SD1, cache_bytes=0).apply(stack)
            assert same(weights, fresh), f"after {i} operations the weights drifted from a fresh apply"
            t.add("fresh-apply comparisons")
        if i == warmup - 1 or (i >= warmup and (i - warmup + 1) % (ops // 5) == 0):
            # measured in the same state as at the end: restored, cache warm
            patcher.restore()
            stack = None
            samples.append(memory.settled_rss())
    patcher.restore()
    assert same(weights, originals), "weights are not bit-identical after the last restore"
    samples.append(memory.settled_rss())
    return {"warm": samples[0], "end": samples[-1], "samples": samples}


def check_memory(numbers: dict, working: int, area: str) -> None:
    growth = numbers["end"] - numbers["warm"]
    tolerance = max(24 * MiB, working // 20)
    t = tally(area)
    t.note(f"RSS after warm-up {numbers['warm'] / MiB:.1f} MiB, at the end {numbers['end'] / MiB:.1f} MiB "
           f"(growth {growth / MiB:+.1f} MiB, tolerance {tolerance / MiB:.0f} MiB); samples after warm-up: "
           + ", ".join(f"{v / MiB:.1f}" for v in numbers["samples"]))
    assert growth <= tolerance, f"RSS grew {growth / MiB:.1f} MiB over the run"


OPS = 1000


def test_random_apply_strength_restore_cycles_end_bit_identical_without_memory_growth(pool):
    adapters, keys = pool
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights = make_weights(keys)
        originals = {k: v.clone() for k, v in weights.items()}
        working = sum(v.numel() * v.element_size() for v in weights.values())
        t = tally("long use")
        t.note(f"{len(keys)} real SD1.5 weights, {sum(v.numel() for v in weights.values()) / 1e6:.1f}M parameters "
               f"({working / MiB:.0f} MiB), adapters: {', '.join(ALGOS)}")
        # a cache smaller than all the pool's float32 deltas: eviction is part of the run
        patcher = WeightPatcher(weights, model_shapes=SD1, cache_bytes=2 * working)
        numbers = run_cycles(patcher, weights, originals, adapters, OPS, random.Random(2024), "long use")
        t.add("operations", OPS)
        t.stop()
        check_memory(numbers, working, "long use")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not LONG, reason="long run only (LYCORIS_LONG=1)")
def test_cycles_restoring_from_the_checkpoint_file(pool, tmp_path):
    """The same with originals read back from the file the weights came from (no backups in memory)."""
    from safetensors.torch import save_file

    adapters, keys = pool
    weights = make_weights(keys)
    path = tmp_path / "weights.safetensors"
    save_file(weights, str(path))
    originals = {k: v.clone() for k, v in weights.items()}
    working = sum(v.numel() * v.element_size() for v in weights.values())
    source = SafetensorsSource(path)
    patcher = WeightPatcher(weights, model_shapes=SD1, cache_bytes=2 * working, restore_from=source)
    ops = 300
    numbers = run_cycles(patcher, weights, originals, adapters, ops, random.Random(7), "long use (restore_from file)")
    tally("long use (restore_from file)").add("operations", ops)
    check_memory(numbers, working, "long use (restore_from file)")
    assert math.isfinite(working)
