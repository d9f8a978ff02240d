"""Stand-in for the ``comfy_extras`` package (only what the training node imports)."""
