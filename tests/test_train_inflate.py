"""``python -m lycoris_core inflate``: 2-D conv adapters to 3-D by the centre-slice embedding.

Inputs are real files written by lycoris-lora (``lycoris_factory``) on the tiny SD1.5
model.  For every conv module: the inflated 3-D conv, run on a depth-1 volume with depth
padding D//2, gives the 2-D result; on a deeper volume, every slice gives its own 2-D
result; the 3-D delta is the centre embedding of the 2-D one.  lycoris-lora reads the
inflated file onto Conv3d layers with the same result.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from lycoris_factory import make_adapter
from thread_fixtures import one_thread  # noqa: F401  (autouse)
from torch import nn

from lycoris_core import load_adapter
from lycoris_core.tools.cli import main
from lycoris_core.tools.inflate import embed_kernel, inflate_adapter

VARIANTS = ["lora", "locon-tucker", "loha", "loha-tucker", "lokr", "lokr-factor", "lokr-tucker", "lokr-full-matrix",
            "lora-dora-out", "loha-dora-in", "full", "ia3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("inflate")
    cache = {}

    def get(variant):
        if variant not in cache:
            path, layers = make_adapter(variant, torch.float32, out)
            inflated = out / f"{variant}-3d.safetensors"
            shapes = {name: tuple(layer.weight.shape) for name, layer in layers.items()}  # the tiny model's layers
            report = inflate_adapter(path, inflated, shapes=shapes)
            cache[variant] = (path, inflated, layers, report)
        return cache[variant]

    return get


def conv3d_of(conv2d: nn.Conv2d, depth: int) -> nn.Conv3d:
    """The inflated base layer: same channels, depth padding depth//2, the weight centre-embedded."""
    conv = nn.Conv3d(conv2d.in_channels, conv2d.out_channels, (depth, *conv2d.kernel_size),
                     stride=(1, *conv2d.stride), padding=(depth // 2, *conv2d.padding), bias=conv2d.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(embed_kernel(conv2d.weight, depth))
        if conv2d.bias is not None:
            conv.bias.copy_(conv2d.bias)
    return conv


@pytest.mark.parametrize("variant", VARIANTS)
def test_inflated_conv_equals_the_2d_conv_slice_by_slice(files, variant):
    path, inflated, layers, report = files(variant)
    flat, volume = load_adapter(path), load_adapter(inflated)
    assert set(flat.modules) == set(volume.modules)
    assert report.inflated or variant == "ia3"  # every variant has 3×3 convs; (IA)³ vectors need no kernel
    g = torch.Generator().manual_seed(0)
    for name in report.inflated + report.pointwise:
        layer = layers[name]
        conv2d = layer.module
        w0 = layer.weight
        depth = 1 if conv2d.kernel_size == (1, 1) else conv2d.kernel_size[0]
        w3 = embed_kernel(w0, depth)
        d2 = flat.modules[name].delta(w0)
        d3 = volume.modules[name].delta(w3)
        assert tuple(d3.shape) == tuple(w3.shape)
        assert float((d3 - embed_kernel(d2, depth)).abs().max()) <= 1e-6 * max(1.0, float(d2.abs().max())), name
        x = torch.randn(2, conv2d.in_channels, 3, 5, 5, generator=g)  # 3 depth slices
        conv3 = conv3d_of(conv2d, depth)
        y3 = F.conv3d(x, w3 + d3, conv3.bias, conv3.stride, conv3.padding)
        for s in range(x.shape[2]):
            y2 = F.conv2d(x[:, :, s], w0 + d2, conv2d.bias, conv2d.stride, conv2d.padding)
            assert torch.allclose(y3[:, :, s], y2, rtol=1e-5, atol=1e-5), (name, s)
        single = F.conv3d(x[:, :, :1], w3 + d3, conv3.bias, conv3.stride, conv3.padding)  # a depth-1 volume
        assert torch.allclose(single[:, :, 0], F.conv2d(x[:, :, 0], w0 + d2, conv2d.bias, conv2d.stride,
                                                        conv2d.padding), rtol=1e-5, atol=1e-5)
    for name in report.unchanged:
        assert torch.equal(flat.modules[name].delta(layers[name].weight), volume.modules[name].delta(layers[name].weight))


@pytest.mark.parametrize("variant", ["locon-tucker", "loha", "lokr"])
def test_lycoris_reads_the_inflated_file_on_conv3d_layers(files, variant):
    import lycoris.kohya as lk

    path, inflated, layers, report = files(variant)
    root = nn.Module()
    for name in report.inflated:
        root.add_module(name.removeprefix("lora_unet_"), conv3d_of(layers[name].module, layers[name].module.kernel_size[0]))
    volume = load_adapter(inflated)
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    lyco, _ = lk.create_network_from_weights(1.0, str(inflated), None, None, root, for_inference=True)
    assert len(lyco.unet_loras) == len(report.inflated)
    lyco.apply_to(None, root, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(1)
    for name in report.inflated:
        conv = getattr(root, name.removeprefix("lora_unet_"))
        x = torch.randn(1, conv.in_channels, 3, 6, 6, generator=g)
        with torch.no_grad():
            theirs = conv(x)
        ours = F.conv3d(x, conv.weight + volume.modules[name].delta(conv.weight), conv.bias, conv.stride, conv.padding)
        assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-5), name


def test_cli_inflate_writes_refuses_and_reports(files, tmp_path, capsys):
    path, _, _, _ = files("lora")
    out = tmp_path / "x3d.safetensors"
    assert main(["inflate", str(path), "-o", str(out), "--depth", "5"]) == 0
    assert "k×k convs inflated" in capsys.readouterr().out
    module = next(m for m in load_adapter(out).modules.values() if len(m.shape) == 5 and m.shape[2] == 5)
    assert module.shape[3:] == (3, 3)
    assert main(["inflate", str(path), "-o", str(out)]) == 2  # exists: kept
    assert "already exists" in capsys.readouterr().err
    assert main(["inflate", str(path), "-o", str(tmp_path / "y.safetensors"), "--depth", "2"]) == 2
    assert "odd" in capsys.readouterr().err
    glora, _ = make_adapter("glora", torch.float32, tmp_path)
    assert main(["inflate", str(glora), "--dry-run"]) == 2
    assert "glora" in capsys.readouterr().err
    before = path.read_bytes()
    assert main(["inflate", str(path), "-o", str(path), "--overwrite"]) == 2  # never onto its own input
    assert "must not be one of the inputs" in capsys.readouterr().err and path.read_bytes() == before
    for depth in ("4", "0", "-1"):  # the user's value is named, not the kernel
        assert main(["inflate", str(path), "-o", str(tmp_path / "z.safetensors"), "--depth", depth]) == 2
        assert f"got {depth}" in capsys.readouterr().err


def _loha(name, out, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.hada_w1_a": torch.randn(out, 2, generator=g), f"{name}.hada_w1_b": torch.randn(2, cols, generator=g),
            f"{name}.hada_w2_a": torch.randn(out, 2, generator=g), f"{name}.hada_w2_b": torch.randn(2, cols, generator=g),
            f"{name}.alpha": torch.tensor(1.0)}


def test_flattened_loha_kernels_come_from_the_sd_tables_or_are_refused(tmp_path):
    from lycoris_core.io.writer import save_tensors
    from lycoris_core.tools.inflate import InflateError

    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # SD1.5: (320, 320, 3, 3), stored as (r, 2880)
    linear = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # (320, 320)
    path = save_tensors({**_loha(conv, 320, 2880), **_loha(linear, 320, 320, 1)}, tmp_path / "sd.safetensors")
    report = inflate_adapter(path, tmp_path / "sd3d.safetensors")
    assert report.inflated == [conv] and report.unchanged == [linear]
    w0 = torch.randn(320, 320, 3, 3)
    d2 = load_adapter(path).modules[conv].delta(w0)
    d3 = load_adapter(tmp_path / "sd3d.safetensors").modules[conv].delta(embed_kernel(w0, 3))
    assert torch.allclose(d3, embed_kernel(d2, 3))

    odd = save_tensors(_loha("lycoris_blocks_0_conv", 8, 72), tmp_path / "odd.safetensors")  # 72 = 8·3·3, or a linear?
    with pytest.raises(InflateError, match="--base"):
        inflate_adapter(odd, tmp_path / "odd3d.safetensors")
    assert not (tmp_path / "odd3d.safetensors").exists()
