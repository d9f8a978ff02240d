"""A short real training run: a small diffusers UNet (+ CLIP) with LoRA/LoCon, LoHa and LoKr.

Random-init ``UNet2DConditionModel`` with reduced channels and a tiny ``CLIPTextModel``
(``lycoris_factory.tiny_models``: SD1.5 layout and module names), random latents, 20 AdamW
steps on one fixed noisy batch.  The loss must fall; the saved file must give back the
trained deltas through ``load_adapter`` (within 1e-6) and the trained model's output
through lycoris-lora's own ``create_network_from_weights``.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import tomllib
import torch
from lycoris_factory import SD15_PRESET, tiny_models
from thread_fixtures import one_thread  # noqa: F401  (autouse)

from lycoris_core import load_adapter
from lycoris_core.train import (
    AdapterConfig,
    create_network,
    find_targets,
    make_optimizer,
    train_loop,
    training_metadata,
)

RUNS = {
    # algorithm -> (config, unet preset, learning rate): LoCon over every layer (k×k convs at
    # conv rank), LoHa and LoKr over the transformer blocks; the text encoder trains too.
    # LoKr starts from a smaller effective step (one zero block), hence LyCORIS's advice of a higher rate.
    "lora": (AdapterConfig("lora", rank=4, alpha=4, conv_rank=2, conv_alpha=2), "unet-full", 2e-3),
    "loha": (AdapterConfig("loha", rank=4, alpha=4), "unet-transformer", 2e-3),
    "lokr": (AdapterConfig("lokr", rank=2, alpha=2, factor=4), "unet-transformer", 1e-2),
}


def batch(seed: int = 0):
    """Two latents, their noise, timesteps and token ids: one fixed batch, so the loss can only fall."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([200, 700])
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).float()[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    tokens = torch.randint(3, 1000, (2, 7), generator=g)
    return noisy, noise, timesteps, tokens


def predict(unet, te, noisy, timesteps, tokens):
    context = te.text_model(tokens).last_hidden_state
    return unet(noisy, timesteps, encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """algo -> (network, unet, te, untouched copies of both, loss curve, saved path)."""
    out = tmp_path_factory.mktemp("trained")
    noisy, noise, timesteps, tokens = batch()
    results = {}
    for algo, (config, unet_preset, lr) in RUNS.items():
        unet, te = tiny_models(seed=1)
        unet.requires_grad_(False)
        te.requires_grad_(False)
        original = (copy.deepcopy(unet), copy.deepcopy(te))
        targets = find_targets(te, "clip", "lora_te") + find_targets(unet, unet_preset, "lora_unet")
        net = create_network(targets, config, seed=0)
        optimizer = make_optimizer(net.parameters(), "AdamW", lr=lr)
        loss_fn = torch.nn.MSELoss()
        with net.attached():
            losses = train_loop(lambda i, u=unet, t=te, f=loss_fn: f(predict(u, t, noisy, timesteps, tokens), noise),
                                optimizer, steps=20)
        path = net.save(out / f"{algo}.safetensors", torch.float32,
                        training_metadata(config, arch="sd1", steps=20, learning_rate=lr, optimizer="AdamW"))
        results[algo] = (net, unet, te, original, losses, path)
    return results


@pytest.mark.parametrize("algo", list(RUNS))
def test_loss_goes_down(trained, algo):
    losses = trained[algo][4]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses


@pytest.mark.parametrize("algo", list(RUNS))
def test_saved_file_round_trips_through_load_adapter(trained, algo):
    net, unet, te, _, _, path = trained[algo]
    adapter = load_adapter(path)
    assert set(adapter.modules) == set(net.names())
    assert not adapter.unknown_keys
    assert adapter.metadata["ss_network_module"] == "lycoris.kohya"
    for name, module in net.adapters.items():
        ours = module.effective_delta()
        theirs = adapter.modules[name].delta(module.layer.weight.detach())
        assert ours.abs().max() > 0, name  # it trained
        assert float((theirs - ours).abs().max()) <= 1e-6 * max(1.0, float(ours.abs().max())), name


@contextlib.contextmanager
def lycoris_sd15_preset():
    """lycoris-lora 4.1.3's default targets crash on a diffusers UNet (duplicate TimestepEmbedding
    names, lycoris-formats.md §4); its presets are class state, so set the classic SD1.5 one and restore."""
    import lycoris.kohya as lk

    cls = lk.LycorisNetworkKohya
    names = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
             "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME",
             "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {n: getattr(cls, n) for n in names}
    cls.MODULE_ALGO_MAP, cls.NAME_ALGO_MAP, cls.USE_FNMATCH, cls.TARGET_EXCLUDE_NAME = {}, {}, False, []
    cls.apply_preset(tomllib.loads(SD15_PRESET))
    try:
        yield lk
    finally:
        for n, v in saved.items():
            setattr(cls, n, v)


@pytest.mark.parametrize("algo", list(RUNS))
def test_saved_file_loads_in_lycoris_with_the_same_output(trained, algo):
    net, unet, te, (unet0, te0), _, path = trained[algo]
    noisy, _, timesteps, tokens = batch(seed=3)
    with torch.no_grad(), net.attached():
        ours = predict(unet, te, noisy, timesteps, tokens)
    unet1, te1 = copy.deepcopy(unet0), copy.deepcopy(te0)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    with lycoris_sd15_preset() as lk:
        lyco, _ = lk.create_network_from_weights(1.0, str(path), None, te1, unet1, for_inference=True)
    assert len(lyco.unet_loras) + len(lyco.text_encoder_loras) == len(net)
    lyco.apply_to(te1, unet1, apply_text_encoder=True, apply_unet=True)
    with torch.no_grad():
        theirs = predict(unet1, te1, noisy, timesteps, tokens)
        base = predict(unet0, te0, noisy, timesteps, tokens)
    effect = (ours - base).norm()
    assert effect > 0
    assert float((theirs - ours).norm() / effect) < 1e-4
