"""ComfyUI glue: node classes only; every computation lives in ``lycoris_core``.

Importing this package needs no ComfyUI: ``folder_paths``, ``comfy.*`` and ``server``
are imported when a node runs or, for the HTTP routes, guarded here.
"""

from . import routes
from .loaders import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

routes.register()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
