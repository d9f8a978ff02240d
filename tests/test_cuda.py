"""On a CUDA GPU (skipped without one): the device path agrees with the CPU and restores exactly.

Products on the GPU round differently from the CPU's, so results agree within float32
matrix-product tolerance, not bit for bit; on one device the engine is deterministic.
The device-independent guarantees (no host copies, one sync per weight) are proven for
every device by ``test_device_hygiene`` on the meta device.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lycoris_core import load_adapter
from lycoris_core.keymap import state_shapes
from lycoris_core.patch import AdapterSpec, WeightPatcher, build_plan
from lycoris_core.testing.synthetic import synthetic_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SD1 = state_shapes("sd1", "comfy")
CUDA = torch.device("cuda")


def attention(spec) -> bool:
    return spec.name.startswith(("down_blocks.0.", "mid_block.", "text_model.encoder.layers.0.")) and len(spec.weight) > 1


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda")
    out = []
    for i, algo in enumerate(("lora", "loha", "lokr", "dora")):
        path = folder / f"{algo}.safetensors"
        save_file(synthetic_adapter("sd1", algo, select=attention, rank=8, seed=i), str(path))
        out.append(load_adapter(str(path)))
    return out


def weights_for(adapters, device, dtype=torch.float16) -> dict[str, torch.Tensor]:
    keys = build_plan([AdapterSpec(a) for a in adapters], SD1).keys()
    gen = torch.Generator().manual_seed(0)
    return {k: (torch.randn(SD1[k], generator=gen) * 0.05).to(device, dtype) for k in keys}


def test_a_stack_of_four_on_the_gpu_matches_the_cpu_and_restores_bit_identically(adapters):
    specs = [AdapterSpec(a, 0.6 + 0.1 * i, 0.8) for i, a in enumerate(adapters)]
    cpu = weights_for(adapters, "cpu", torch.float32)
    gpu = {k: v.to(CUDA) for k, v in cpu.items()}
    originals = {k: v.clone() for k, v in gpu.items()}
    WeightPatcher(cpu, model_shapes=SD1).apply(specs)
    patcher = WeightPatcher(gpu, model_shapes=SD1)
    patcher.apply(specs)
    for key in cpu:
        assert gpu[key].device.type == "cuda"
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-4, atol=1e-5)
    patcher.apply([AdapterSpec(a, -0.4) for a in adapters])  # strength change, from the originals
    patcher.restore()
    assert all(torch.equal(gpu[k], originals[k]) for k in gpu)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_on_the_gpu_is_reproducible(adapters, dtype):
    results = []
    for _ in range(2):
        weights = weights_for(adapters[:1], CUDA, torch.float32)
        weights = {k: v.to(dtype) for k, v in weights.items()}
        WeightPatcher(weights, model_shapes=SD1).apply([AdapterSpec(adapters[0], 0.9)])
        results.append({k: v.view(torch.uint8).cpu() for k, v in weights.items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_strength_change_on_the_gpu_equals_a_fresh_apply_bit_for_bit(adapters):
    first = weights_for(adapters, CUDA)
    second = {k: v.clone() for k, v in first.items()}
    patcher = WeightPatcher(first, model_shapes=SD1)
    patcher.apply([AdapterSpec(a, 1.0) for a in adapters])
    patcher.apply([AdapterSpec(a, 0.3) for a in adapters])
    WeightPatcher(second, model_shapes=SD1).apply([AdapterSpec(a, 0.3) for a in adapters])
    assert all(torch.equal(first[k], second[k]) for k in first)
