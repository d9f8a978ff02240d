"""Write a trained network as a file every loader reads: kohya names, LyCORIS suffixes, metadata.

Layout (as lycoris-lora's ``save_weights`` writes it): ``<lora_name>.<suffix>`` for every
factor, ``<lora_name>.alpha`` per module (0-dim), text-encoder modules first, every tensor
in the save dtype.  An alpha the save dtype cannot hold exactly stays float32, so the
file's scale is the one that was trained.  Metadata: kohya's ``ss_*`` fields
(``ss_network_module = lycoris.kohya``, dim, alpha, JSON ``ss_network_args``) and the SAI
model spec (``modelspec.*``).  Writes are atomic and never replace a file silently
(``lycoris_core.io.writer``).
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from ..io.writer import SAVE_DTYPES, save_tensors
from .config import AdapterConfig, number_text

# base-model facts per detected architecture: (ss_base_model_version, ss_v2, modelspec architecture, implementation)
_ARCH = {
    "sd1": ("sd_v1", "False", "stable-diffusion-v1", "diffusers"),
    "sd2": ("sd_v2", "True", "stable-diffusion-v2-512", "diffusers"),
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models"),
}


def file_tensors(network, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The state dict as it is written: every tensor in ``dtype`` except an alpha it would round."""
    out = {}
    for key, tensor in network.file_tensors().items():
        value = tensor.detach().to("cpu")
        cast = value.to(dtype)
        if key.endswith(".alpha") and float(cast) != float(value):
            cast = value.to(torch.float32)
        out[key] = cast.contiguous()
    return out


def training_metadata(config: AdapterConfig, *, arch: str | None = None, title: str | None = None,
                      resolution: tuple[int, int] | None = None, prediction: str | None = None,
                      steps: int | None = None, learning_rate: float | None = None, optimizer: str | None = None,
                      seed: int | None = None, batch_size: int | None = None, grad_accumulation: int | None = None,
                      mixed_precision: str | None = None, preset: str | None = None, started: float | None = None,
                      extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """kohya ``ss_*`` and ``modelspec.*`` fields for a trained file; every value a string."""
    now = time.time()
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": number_text(config.alpha if config.alpha else config.rank),
        "ss_network_args": json.dumps(config.network_args()),
        "ss_training_comment": "trained with comfyui-lycoris",
        "ss_training_finished_at": str(now),
    }
    if started is not None:
        meta["ss_training_started_at"] = str(started)
    optional = {
        "ss_max_train_steps": steps, "ss_steps": steps, "ss_learning_rate": learning_rate, "ss_unet_lr": learning_rate,
        "ss_optimizer": optimizer, "ss_seed": seed, "ss_batch_size_per_device": batch_size,
        "ss_gradient_accumulation_steps": grad_accumulation, "ss_mixed_precision": mixed_precision,
        "ss_output_name": title, "lycoris_preset": preset,
    }
    meta.update({k: number_text(v) if isinstance(v, float) else str(v) for k, v in optional.items() if v is not None})
    base, v2, spec_arch, implementation = _ARCH.get(arch or "", (None, None, arch or "unknown", "unknown"))
    if base is not None:
        meta["ss_base_model_version"] = base
        meta["ss_v2"] = v2
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec_arch}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title or "LyCORIS adapter",
        "modelspec.date": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds"),
    })
    if resolution is not None:
        meta["modelspec.resolution"] = f"{resolution[0]}x{resolution[1]}"
    if prediction is not None:
        meta["modelspec.prediction_type"] = prediction
    if extra:
        meta.update({str(k): str(v) for k, v in extra.items()})
    return meta


def save_adapter(network, path, *, dtype: torch.dtype = torch.float16, metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False) -> Path:
    """Write the network atomically; an existing file is kept unless ``overwrite``."""
    if dtype not in SAVE_DTYPES.values():
        raise ValueError(f"save dtype must be fp16, bf16 or fp32, got {dtype}")
    meta = dict(metadata) if metadata is not None else training_metadata(network.config)
    return save_tensors(file_tensors(network, dtype), path, meta, overwrite=overwrite)
