"""Stand-in for the few comfy.model_management functions the patch path uses (CPU only)."""

from __future__ import annotations

import torch


def cast_to_device(tensor: torch.Tensor, device, dtype, copy: bool = False) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype, copy=copy)


def get_torch_device():
    return torch.device("cpu")


current_loaded_models: list = []  # the patchers load_models_gpu loaded, newest last


def free_memory(memory_required, device, keep_loaded=()):
    """Unload (unpatch) loaded models not in ``keep_loaded``; returns the unloaded ones, as ComfyUI does."""
    unloaded = [p for p in current_loaded_models if p not in keep_loaded]
    for patcher in unloaded:
        patcher.unpatch_model()
        current_loaded_models.remove(patcher)
    return unloaded


def unload_all_models():
    free_memory(1e30, get_torch_device())


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    """Like ModelPatcher.partially_load on a full load: re-patch when another patch set is live."""
    for patcher in models:
        if patcher not in current_loaded_models:
            current_loaded_models.append(patcher)
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
