"""Stand-in for comfy/weight_adapter/base.py: the adapter interface ComfyUI dispatches on."""

from __future__ import annotations

import torch


class WeightAdapterBase:
    name: str
    loaded_keys: set[str]
    weights: list[torch.Tensor]

    @classmethod
    def load(cls, x: str, lora: dict, alpha: float, dora_scale: torch.Tensor, loaded_keys=None):
        raise NotImplementedError

    def to_train(self):
        raise NotImplementedError

    @classmethod
    def create_train(cls, weight, *args):
        raise NotImplementedError

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        raise NotImplementedError
