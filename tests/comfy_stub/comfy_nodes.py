"""Stand-in for how ComfyUI's ``nodes`` module imports a custom node pack (named
``comfy_nodes`` here because the pack has its own ``nodes`` package).

A folder pack is imported as a package whose module name is its full path (dots
replaced), so only relative imports reach its own files; ids already registered
(built-ins) are ignored; WEB_DIRECTORY is recorded under the folder's base name.
"""

from __future__ import annotations

import importlib.util
import os
import sys

BUILT_IN_IDS = {"LoraLoader", "LoraLoaderModelOnly", "CheckpointLoaderSimple", "CLIPTextEncode", "KSampler"}
NODE_CLASS_MAPPINGS: dict[str, type] = dict.fromkeys(BUILT_IN_IDS, object)
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
EXTENSION_WEB_DIRS: dict[str, str] = {}


def load_custom_node(module_path: str):
    module_name = os.path.basename(module_path)
    sys_name = module_path.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(sys_name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[sys_name] = module
    spec.loader.exec_module(module)
    web_dir = getattr(module, "WEB_DIRECTORY", None)
    if web_dir is not None and os.path.isdir(os.path.join(module_path, web_dir)):
        EXTENSION_WEB_DIRS[module_name] = os.path.abspath(os.path.join(module_path, web_dir))
    for node_id, cls in getattr(module, "NODE_CLASS_MAPPINGS", {}).items():
        if node_id not in BUILT_IN_IDS:
            NODE_CLASS_MAPPINGS[node_id] = cls
            cls.RELATIVE_PYTHON_MODULE = f"custom_nodes.{module_name}"
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
    return module
