"""A generic training loop: the caller supplies the loss of one micro-batch, the loop does the rest.

Nothing here knows about diffusion: ``loss_fn(index)`` builds the noisy input, runs the
model and returns a scalar (the ComfyUI node samples noise and sigmas through ComfyUI's
own model sampling; tests and benchmarks use a diffusers UNet).  Gradient accumulation
averages micro-batch gradients; ``callback(step, total, loss)`` runs after every
optimizer step (progress bars, interruption), and may raise to stop cleanly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.utils.checkpoint
from torch import nn

OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}
LOSSES = {
    "MSE": nn.MSELoss,
    "L1": nn.L1Loss,
    "Huber": nn.HuberLoss,
    "SmoothL1": nn.SmoothL1Loss,
}


def make_optimizer(params: Iterable[torch.Tensor], name: str = "AdamW", lr: float = 1e-4, **kwargs):
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](list(params), lr=lr, **kwargs)


def make_loss(name: str = "MSE") -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]()


class LossNotFiniteError(RuntimeError):
    """The loss became NaN/Inf: training stops before the factors are corrupted further."""


def train_loop(loss_fn: Callable[[int], torch.Tensor], optimizer: torch.optim.Optimizer, steps: int,
               grad_accumulation: int = 1, callback: Callable[[int, int, float], None] | None = None,
               max_grad_norm: float | None = None, params: Iterable[torch.Tensor] | None = None) -> list[float]:
    """Run ``steps`` optimizer steps; returns the mean loss of each step.

    ``loss_fn`` receives the running micro-batch index (0 … steps·grad_accumulation − 1).
    ``max_grad_norm`` clips the gradient norm of ``params`` (default: the optimizer's).
    """
    if steps < 1 or grad_accumulation < 1:
        raise ValueError("steps and grad_accumulation must be at least 1")
    clip = None
    if max_grad_norm:
        clip = list(params) if params is not None else [p for g in optimizer.param_groups for p in g["params"]]
    losses: list[float] = []
    optimizer.zero_grad(set_to_none=True)
    for step in range(steps):
        total = 0.0
        for micro in range(grad_accumulation):
            loss = loss_fn(step * grad_accumulation + micro)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise LossNotFiniteError(f"loss is {value} at step {step + 1}; lower the learning rate")
            (loss / grad_accumulation).backward()
            total += value
            del loss
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / grad_accumulation)
        if callback is not None:
            callback(step + 1, steps, losses[-1])
    return losses


_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def checkpoint_blocks(root: nn.Module) -> Callable[[], None]:
    """Gradient checkpointing on the outermost non-container children of ``root``.

    Each such block's activations are recomputed in backward instead of kept (RNG state is
    preserved, so dropout masks repeat).  Returns a function that undoes it.
    """
    blocks: list[nn.Module] = []

    def walk(module: nn.Module):
        for child in module.children():
            if isinstance(child, _CONTAINERS):
                walk(child)
            else:
                blocks.append(child)

    walk(root)
    undo = []
    for block in blocks:
        had = "forward" in block.__dict__
        original = block.forward

        def forward(*args, _f=original, **kwargs):
            if not torch.is_grad_enabled():
                return _f(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_f, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        undo.append((block, had, original))

    def restore():
        for block, had, original in undo:
            if had:
                block.forward = original
            else:
                block.__dict__.pop("forward", None)

    return restore


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor on the same memory as ``t`` (no copy)."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.size(),
                                                              t.stride())


@contextlib.contextmanager
def frozen_base(root: nn.Module):
    """The model as a frozen base for training, for the duration of the block; all undone after.

    - No gradient for its own parameters (``requires_grad`` off, the flags restored after).
    - ComfyUI runs nodes in inference mode, so a model's parameters are inference tensors,
      which autograd refuses to save for backward (any layer after the first adapted one needs
      its weight for the input gradient).  Each such parameter and buffer is replaced by a normal
      tensor on the same memory (no copy); the original objects come back after.
    """
    swapped, flags = [], []
    with torch.inference_mode(False):
        for module in root.modules():
            for name, value in list(module._parameters.items()):
                if value is None:
                    continue
                if value.is_inference() and type(value) in (torch.Tensor, nn.Parameter):
                    module._parameters[name] = nn.Parameter(_alias(value), requires_grad=False)
                    swapped.append((module._parameters, name, value))
                elif value.requires_grad:
                    value.requires_grad_(False)
                    flags.append(value)
            for name, value in list(module._buffers.items()):
                if value is not None and value.is_inference() and type(value) is torch.Tensor:
                    module._buffers[name] = _alias(value)
                    swapped.append((module._buffers, name, value))
    try:
        yield len(swapped)
    finally:
        for table, name, value in reversed(swapped):
            table[name] = value
        for value in flags:
            value.requires_grad_(True)
