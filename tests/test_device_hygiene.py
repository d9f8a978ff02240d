"""Every patch path runs where the weight lives: proven with weights on the ``meta`` device.

A meta tensor has a shape and no data, so any hidden copy of a weight, a delta or a
factor back to the host fails there.  ``HostTraffic`` (a ``TorchDispatchMode``) makes
that explicit: it fails the test on any copy of device data to the CPU and counts host
synchronisations (``.item()``, ``bool(t)``, ``float(t)``), answering them itself on meta.
The engine may sync once per weight (its range check); factors may be uploaded (CPU →
device) once per (adapter, device) and are then kept.  No GPU is needed, and the same
code runs on cuda, mps or xpu: nothing here names a device but ``meta``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from lycoris_core import load_adapter
from lycoris_core.io.reader import SafetensorsSource
from lycoris_core.keymap import state_shapes
from lycoris_core.patch import AdapterSpec, WeightPatcher, accumulate, build_plan, patched_value
from lycoris_core.testing.synthetic import synthetic_adapter
from nodes.glue import _LycorisPatchMixin

aten = torch.ops.aten
META = torch.device("meta")
SD1 = state_shapes("sd1", "comfy")
SYNCS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default}


class HostTraffic(TorchDispatchMode):
    """Fails on device -> host copies; counts syncs of device tensors and uploads of host tensors."""

    def __init__(self):
        super().__init__()
        self.syncs = 0
        self.uploads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS and args[0].device.type != "cpu":
            self.syncs += 1
            return True if args[0].dtype == torch.bool else 0.0  # what a finite, in-range check answers
        if func is aten._to_copy.default:
            target = kwargs.get("device")
            if target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu":
                raise AssertionError(f"a device tensor {tuple(args[0].shape)} was copied to the host")
            if target is not None and torch.device(target).type != "cpu" and args[0].device.type == "cpu":
                self.uploads += 1
        if func in (aten.copy_.default, aten._copy_from.default):
            dst, src = args[0], args[1]
            if dst.device.type == "cpu" and src.device.type != "cpu":
                raise AssertionError(f"a device tensor {tuple(src.shape)} was copied into host memory")
        return func(*args, **kwargs)


def layers(spec) -> bool:
    """A few of every kind: self/cross attention, a 3x3 and a 1x1 conv, a time-embedding linear, CLIP."""
    return spec.name in (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.0.resnets.0.time_emb_proj",
        "text_model.encoder.layers.0.self_attn.q_proj",
        "text_model.encoder.layers.0.mlp.fc1",
    )


ALGOS = ["lora", "locon_tucker", "loha", "loha_tucker", "lokr", "full", "dora", "glora", "ia3", "diag-oft",
         "boft", "norm"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real adapter files (read from disk through the engine's reader), one per algorithm."""
    folder = tmp_path_factory.mktemp("hygiene")
    out = {}
    for i, algo in enumerate(ALGOS):
        path = folder / f"{algo}.safetensors"
        select = (lambda s: s.part == "unet" and s.name.startswith("down_blocks.0.")) if algo == "norm" else layers
        save_file(synthetic_adapter("sd1", algo, select=select, rank=4, seed=i), str(path))
        out[algo] = str(path)
    return out


def meta_weights(keys, dtype=torch.float16) -> dict[str, torch.Tensor]:
    return {k: torch.empty(SD1[k], dtype=dtype, device=META) for k in keys}


def keys_of(adapter) -> list[str]:
    return build_plan([AdapterSpec(adapter)], SD1).keys()


@pytest.mark.parametrize("algo", ALGOS)
def test_weight_patcher_apply_strength_change_and_restore_stay_on_the_device(files, algo):
    adapter = load_adapter(files[algo])
    keys = keys_of(adapter)
    weights = meta_weights(keys)
    patcher = WeightPatcher(weights, model_shapes=SD1, backup_device="same")
    with HostTraffic() as traffic:
        patcher.apply([AdapterSpec(adapter, 0.8, 0.6)])
        first_uploads = traffic.uploads
        patcher.apply([AdapterSpec(adapter, -0.3, 1.2)])  # strength change
        patcher.restore()
    assert traffic.syncs <= 2 * len(keys)  # one range check per weight and pass
    if algo == "full":  # a stored diff is weight-sized: streamed up tile by tile, never kept on the device
        assert first_uploads == traffic.uploads == 0 and adapter.resident_bytes == 0
        return
    assert first_uploads > 0 and traffic.uploads == first_uploads, "factors are uploaded once, then kept"
    assert adapter.resident_bytes > 0
    adapter.release()
    assert adapter.resident_bytes == 0


def test_originals_from_the_weights_file_are_uploaded_never_kept_on_the_host(files, tmp_path):
    adapter = load_adapter(files["loha"])
    keys = keys_of(adapter)
    gen = torch.Generator().manual_seed(0)
    host = {k: (torch.randn(SD1[k], generator=gen) * 0.05).half() for k in keys}
    save_file(host, str(tmp_path / "model.safetensors"))
    source = SafetensorsSource(tmp_path / "model.safetensors")
    weights = meta_weights(keys)
    patcher = WeightPatcher(weights, model_shapes=SD1, restore_from=source)
    with HostTraffic() as traffic:
        patcher.apply([AdapterSpec(adapter, 0.5)])
        patcher.apply([AdapterSpec(adapter, 0.9)])
        patcher.restore()
    assert traffic.syncs <= 3 * len(keys)  # the file check once per weight, then one range check per pass
    assert patcher._backups == {}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16])
def test_narrow_dtypes_round_on_the_device(files, dtype):
    adapter = load_adapter(files["lora"])
    keys = keys_of(adapter)
    weights = meta_weights(keys, dtype)
    with HostTraffic() as traffic:
        WeightPatcher(weights, model_shapes=SD1, backup_device="same").apply([AdapterSpec(adapter, 0.7)])
    assert traffic.syncs <= len(keys)
    assert all(w.dtype == dtype and w.device == META for w in weights.values())


def test_a_stack_of_every_algorithm_on_one_weight_syncs_once(files):
    adapters = [load_adapter(files[a]) for a in ALGOS if a != "norm"]
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    plan = build_plan([AdapterSpec(a, 0.5) for a in adapters], {key: SD1[key]}, allow_partial=True)
    assert len(plan.contributions[key]) == len(adapters)
    base = torch.empty(SD1[key], dtype=torch.float16, device=META)
    with HostTraffic() as traffic:
        out = patched_value(base, plan.contributions[key], key)
    assert traffic.syncs == 1 and out.device == META


class ComfyPatch(_LycorisPatchMixin):
    """The node pack's patch object without ComfyUI's base class (its methods are the node's own)."""


@pytest.mark.parametrize("mode", ["full weight", "low-VRAM fp16 copy", "function", "offset"])
def test_the_comfyui_patch_object_computes_on_the_working_copys_device(files, mode):
    adapter = load_adapter(files["lora"])
    plan = build_plan([AdapterSpec(adapter, 0.9)], SD1)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    patch = ComfyPatch(key, SD1[key], plan.contributions[key], None, identity=(0, key))
    dtype = torch.float16 if mode == "low-VRAM fp16 copy" else torch.float32
    weight = torch.empty(SD1[key], dtype=dtype, device=META)
    function, offset = (lambda a: a), None
    if mode == "function":  # e.g. a scaled-fp8 weight's scale
        function = lambda a: a * 0.5  # noqa: E731
    if mode == "offset":
        offset = (0, 64, 128)
        weight = weight.narrow(*offset)
    with HostTraffic() as traffic:
        out = patch.calculate_weight(weight, key, 1.0, 1.0, offset, function, dtype)
    assert out.device == META and out.dtype == dtype and traffic.syncs <= 1


def test_weight_dependent_deltas_read_the_original_on_the_device(files):
    for algo in ("dora", "glora", "ia3", "diag-oft", "boft"):
        adapter = load_adapter(files[algo])
        for key, contributions in build_plan([AdapterSpec(adapter, 0.4)], SD1).contributions.items():
            work = torch.empty(SD1[key], dtype=torch.float32, device=META)
            with HostTraffic() as traffic:
                accumulate(work, None, contributions, key=key)  # the working copy is the original: copied once
            assert traffic.syncs <= 1, (algo, key)
