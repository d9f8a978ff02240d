"""ComfyUI glue: node classes only; every computation lives in ``lycoris_core``."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
