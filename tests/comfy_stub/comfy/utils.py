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
