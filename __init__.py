"""ComfyUI entry point of comfyui-lycoris: node classes and the front-end folder.

ComfyUI imports this folder as a package from ``custom_nodes/``.  The engine
(``lycoris_core``) is a plain package beside it, put on ``sys.path`` here so the
same code imports identically inside ComfyUI, in tests and in the panel.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

if __package__:  # ComfyUI (and any importer) loads the folder as a package
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:  # loaded as a plain module, as pytest does when the folder's name is not an identifier
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
