"""A set of trainable modules over a model: attach to its layers, train, save, detach.

The network never changes the model's module tree or state dict: each adapted layer's
``forward`` is routed through its trainable module while attached, and given back on
``detach``.  The factors live in the network (float32 masters on the layers' devices),
so an optimizer takes ``network.parameters()`` and nothing of the frozen model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .config import AdapterConfig, build_module, module_from_file
from .modules import TrainModule
from .save import save_adapter
from .targets import Target

log = logging.getLogger("comfyui-lycoris")


def _te_first(name: str) -> int:
    # LyCORIS/kohya write text-encoder modules first, then the UNet (a stable sort keeps the rest)
    return 0 if name.startswith("lora_te") else 1


class TrainableNetwork(nn.Module):
    def __init__(self, modules: Iterable[TrainModule], config: AdapterConfig):
        super().__init__()
        self.config = config
        self.adapters = nn.ModuleDict()
        for module in sorted(modules, key=lambda m: _te_first(m.lora_name)):
            if module.lora_name in self.adapters:
                raise ValueError(f"two modules named {module.lora_name}")
            self.adapters[module.lora_name] = module
        self.skipped_existing: list[str] = []

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self) -> Iterator[TrainModule]:
        return iter(self.adapters.values())

    def __getitem__(self, name: str) -> TrainModule:
        return self.adapters[name]

    def names(self) -> list[str]:
        return list(self.adapters)

    # ---- hooking -------------------------------------------------------------------------------
    def attach(self) -> TrainableNetwork:
        for module in self:
            module.attach()
        return self

    def detach_(self) -> TrainableNetwork:
        for module in self:
            module.detach_()
        return self

    @contextlib.contextmanager
    def attached(self):
        """``with network.attached(): ...`` trains or runs the model with the adapters; always detaches."""
        self.attach()
        try:
            yield self
        finally:
            self.detach_()

    # ---- what is saved -------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """``<module>.<suffix>`` -> float32 tensor, in LyCORIS's layout and order."""
        out = {}
        for module in self:
            for suffix, tensor in module.file_tensors().items():
                out[f"{module.lora_name}.{suffix}"] = tensor
        return out

    @torch.no_grad()
    def save(self, path, dtype: torch.dtype = torch.float16, metadata: Mapping[str, str] | None = None,
             overwrite: bool = False):
        return save_adapter(self, path, dtype=dtype, metadata=metadata, overwrite=overwrite)


def create_network(targets: Iterable[Target], config: AdapterConfig, *, seed: int = 0,
                   existing=None) -> TrainableNetwork:
    """Trainable modules for ``targets`` (from ``find_targets``), initialised by the seeds' rule.

    ``existing`` (a ``load_adapter`` result) continues training: modules it has are loaded from
    it (its algorithm, rank and alpha win for those layers), the others start fresh.  Its modules
    that no target matches are listed in ``skipped_existing``.
    """
    generator = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    modules = []
    used = set()
    for target in targets:
        layer = target.layer
        kxk = isinstance(layer, nn.modules.conv._ConvNd) and any(k != 1 for k in layer.kernel_size)
        if existing is not None and target.name in existing.modules:
            module = module_from_file(target, existing.modules[target.name], config)
            used.add(target.name)
        elif kxk and not config.trains_kxk_convs:
            continue
        else:
            module = build_module(target, config, generator)
        modules.append(module.to(device=layer.weight.device))
    if not modules:
        raise ValueError("no layer matched the preset; nothing to train")
    network = TrainableNetwork(modules, config)
    if existing is not None:
        network.skipped_existing = sorted(set(existing.modules) - used)
        if network.skipped_existing:
            log.warning("[LyCORIS] %d modules of the existing adapter match no target layer (e.g. %s)",
                        len(network.skipped_existing), network.skipped_existing[0])
    return network
