"""Stand-in for the ``comfy`` package (model patcher, LoRA dispatch, weight adapters, CLIP)."""
