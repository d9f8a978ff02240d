"""Stand-in for comfy.weight_adapter: the base class, reachable from both module paths.

Built-in adapters (LoRA, LoHa, ...) are not reproduced; the registry is empty.
"""

from .base import WeightAdapterBase

adapters: list[type] = []
adapter_maps: dict[str, type] = {}

__all__ = ["WeightAdapterBase", "adapters", "adapter_maps"]
