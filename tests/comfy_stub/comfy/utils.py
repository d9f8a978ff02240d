"""Stand-in for the parameter helpers of comfy/utils.py."""

from __future__ import annotations

import torch


def get_attr(obj, attr: str):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj, attr: str, value):
    *path, last = attr.split(".")
    for name in path:
        obj = getattr(obj, name)
    prev = getattr(obj, last)
    setattr(obj, last, value)
    return prev


def set_attr_param(obj, attr: str, value):
    """Replace the parameter with a NEW Parameter object (requires_grad=False)."""
    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj, attr: str, value):
    get_attr(obj, attr).data.copy_(value)


PROGRESS_BAR_ENABLED = True
PROGRESS_BAR_HOOK = None


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    """As ComfyUI's: ``update_absolute`` clamps to the total and calls the global hook (the UI's bar)."""

    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)
