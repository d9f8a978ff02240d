"""The "Train LyCORIS" node through the ComfyUI stand-in.

The MODEL is a small real diffusers UNet behind the stand-in's ``BaseModel`` (EPS model
sampling, SD1.5 latent format) and ``ModelPatcher``, built under ``torch.inference_mode``
as ComfyUI's loaders build theirs, so its weights are inference tensors.  The node must
train through ComfyUI's guider/sampler path, report progress, save a file under
models/loras that ``load_adapter`` reads, return the input model (untouched) cloned with
the file applied, and leave no trace on the shared modules.
"""
# isort: skip_file

from __future__ import annotations

import json

import pytest
import torch

import nodes_env as env  # activates the stand-in before any comfy import
import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402
from comfy.model_base import BaseModel  # noqa: E402
from comfy.model_patcher import ModelPatcher  # noqa: E402
from lycoris_factory import tiny_models  # noqa: E402
from thread_fixtures import one_thread  # noqa: E402, F401  (autouse)

from lycoris_core import OutputExistsError, load_adapter  # noqa: E402
from nodes import glue  # noqa: E402
from nodes.loaders import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from nodes.train import TrainLycoris  # noqa: E402


def comfy_style(unet):
    """The diffusers UNet, called the way ComfyUI calls diffusion models: (x, timesteps, context=...).

    A subclass, not a wrapper, so module paths (and saved names) stay the diffusers ones.
    """
    base = type(unet)

    def forward(self, x, timesteps, context=None, **kwargs):
        return base.forward(self, x, timesteps, encoder_hidden_states=context).sample

    unet.__class__ = type("ComfyStyleUNet", (base,), {"forward": forward})
    return unet


@pytest.fixture()
def loras(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    env.use_loras(folder)
    glue.ADAPTERS.clear()
    return folder


@pytest.fixture()
def model():
    with torch.inference_mode():  # as ComfyUI's loaders run
        unet, _ = tiny_models(seed=2)
        patcher = ModelPatcher(BaseModel(comfy_style(unet)), torch.device("cpu"), torch.device("cpu"))
    return patcher


def inputs(n=3, captions=1, seed=0):
    with torch.inference_mode():
        g = torch.Generator().manual_seed(seed)
        latents = {"samples": torch.randn(n, 4, 8, 8, generator=g)}
        positive = [[torch.randn(1, 7, 32, generator=g), {}] for _ in range(captions)]
    return latents, positive


def run_node(model, latents, positive, **overrides):
    kwargs = dict(batch_size=2, grad_accumulation_steps=1, steps=6, learning_rate=5e-3, algorithm="lora", rank=4,
                  alpha=4.0, conv_rank=2, conv_alpha=2.0, preset="unet-attn", optimizer="AdamW", loss_function="MSE",
                  seed=1, training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False,
                  existing_adapter="[None]", file_name="trained", save_dtype="fp32")
    kwargs.update(overrides)
    with torch.inference_mode():  # ComfyUI executes nodes in inference mode
        return TrainLycoris().train(model, latents, positive, **kwargs)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("algorithm, preset, extra", [
    ("lora", "unet-full", {"use_tucker": True}),
    ("loha", "unet-attn", {"gradient_checkpointing": True}),
    ("lokr", "unet-transformer", {"lokr_factor": 4, "dora": True}),
])
def test_node_trains_saves_and_returns_the_patched_model(loras, model, algorithm, preset, extra):
    before = snapshot(model.model)
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        out = run_node(model, *inputs(), algorithm=algorithm, preset=preset, **extra)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    patched, lora, image, loss, path = out["result"]
    assert seen == [(i, 6) for i in range(1, 7)]
    assert len(loss["loss"]) == 6 and all(v == v for v in loss["loss"])
    assert image.shape == (1, 520, 840, 3) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert path.endswith("trained.safetensors") and "trained.safetensors" in out["ui"]["lycoris"][0]

    adapter = load_adapter(path)
    assert not adapter.unknown_keys and set(lora) == set(adapter.source)
    meta = adapter.metadata
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == algorithm
    assert meta["modelspec.resolution"] == "64x64" and meta["lycoris_preset"] == preset
    names = set(adapter.modules)
    assert names and all(n.startswith("lora_unet_") for n in names)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names

    # the input model is untouched (no gradient either), its layers have their own forwards back
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    assert all(p.grad is None for p in model.model.parameters())
    assert all("forward" not in m.__dict__ for m in model.model.modules())

    # the MODEL output: the input cloned, the file applied (W0 + ΔW on every trained layer)
    comfy.model_management.load_models_gpu([patched])
    state = patched.model.state_dict()
    for key, value in state.items():
        if key in before and not torch.equal(value, before[key]):
            path_ = key.removeprefix("diffusion_model.").removesuffix(".weight")
            name = "lora_unet_" + path_.replace(".", "_")
            assert name in adapter.modules, key
            want = before[key] + adapter.modules[name].delta(before[key])
            assert torch.allclose(value, want, atol=1e-6), key
    changed = {k for k, v in state.items() if k in before and not torch.equal(v, before[k])}
    assert len(changed) == len(names) + sum(1 for m in adapter.modules.values() if m.has_bias)
    patched.unpatch_model()
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())


def test_node_refuses_an_existing_file_before_training(loras, model):
    (loras / "trained.safetensors").write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        run_node(model, *inputs(), steps=100000)  # would take hours if it trained first
    assert (loras / "trained.safetensors").read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="plain name"):
        run_node(model, *inputs(), file_name="../escape")


def test_node_continues_an_existing_adapter(loras, model):
    first = run_node(model, *inputs(), algorithm="loha")["result"][4]
    second = run_node(model, *inputs(), algorithm="lora", existing_adapter="trained.safetensors", file_name="again",
                      steps=1, learning_rate=1e-7)["result"][4]
    a, b = load_adapter(first), load_adapter(second)
    assert set(a.modules) == set(b.modules) and all(m.algo == "loha" for m in b.modules.values())
    assert json.loads(b.metadata["ss_network_args"])["algo"] == "loha"  # the file's algorithm, not the input's
    for name, module in a.modules.items():
        w0 = torch.zeros(module.shape)
        d1, d2 = module.delta(w0), b.modules[name].delta(w0)
        assert float((d1 - d2).abs().max()) <= 1e-4 * float(d1.abs().max()), name


def test_node_pairs_each_latent_with_its_own_caption(loras, model):
    out = run_node(model, *inputs(n=3, captions=3), batch_size=3, steps=2)
    assert len(out["result"][3]["loss"]) == 2
    with pytest.raises(ValueError, match="one per latent"):
        run_node(model, *inputs(n=3, captions=2), file_name="other")


def test_node_bf16_training(loras, model):
    out = run_node(model, *inputs(), training_dtype="bf16", lora_dtype="bf16", algorithm="lokr", steps=2)
    assert all(v == v for v in out["result"][3]["loss"])


def test_interrupt_stops_without_a_file_or_a_trace(loras, model):
    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(model, *inputs())
    assert not list(loras.iterdir())
    assert all("forward" not in m.__dict__ for m in model.model.modules())
    assert all(p.grad is None for p in model.model.parameters())


def test_node_is_registered():
    assert NODE_CLASS_MAPPINGS["LycorisTrain"] is TrainLycoris
    assert NODE_DISPLAY_NAME_MAPPINGS["LycorisTrain"] == "Train LyCORIS"
    assert TrainLycoris.CATEGORY == "training"
    spec = TrainLycoris.INPUT_TYPES()
    for name in ("model", "latents", "positive", "batch_size", "grad_accumulation_steps", "steps", "learning_rate",
                 "optimizer", "loss_function", "seed", "training_dtype", "lora_dtype", "gradient_checkpointing",
                 "existing_adapter", "algorithm", "rank", "alpha", "conv_rank", "conv_alpha", "preset", "file_name"):
        assert name in spec["required"], name
    assert spec["required"]["existing_adapter"][0][-1] == "[None]"
