"""An adapter file as the engine sees it: modules, alpha, metadata, description, cache.

- ``load``: ``load_adapter`` groups a file's keys into modules and detects each one's
  algorithm; keys it does not understand are kept with a reason; PEFT's alpha is read
  from ``adapter_config.json`` or diffusers' ``lora_adapter_metadata``;
- ``metadata``: what the header says about itself (trigger words, base model) and the
  preview image beside the file;
- ``describe``: the one summary of an adapter the CLI, the Info node and the panel show;
- ``cache``: loaded adapters shared across nodes and strength changes, in a byte budget.

Reads files only through ``io``; knows nothing of ComfyUI, Gradio or patching.
"""

from .load import Adapter, load_adapter

__all__ = ["Adapter", "load_adapter"]
