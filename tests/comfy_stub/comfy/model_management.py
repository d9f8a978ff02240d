"""Stand-in for the few comfy.model_management functions the patch path uses (CPU only)."""

from __future__ import annotations

import torch


def cast_to_device(tensor: torch.Tensor, device, dtype, copy: bool = False) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype, copy=copy)


def get_torch_device():
    return torch.device("cpu")


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    """Like ModelPatcher.partially_load on a full load: re-patch when another patch set is live."""
    for patcher in models:
        model = patcher.model
        current = getattr(model, "current_weight_patches_uuid", None)
        if current is not None and (current != patcher.patches_uuid or force_patch_weights):
            patcher.unpatch_model()
        if getattr(model, "current_weight_patches_uuid", None) is None:
            patcher.patch_model(patcher.load_device)


def load_model_gpu(model):
    return load_models_gpu([model])


class InterruptProcessingException(Exception):
    pass


interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    interrupt_processing = value


def processing_interrupted():
    return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()
