"""The standalone Gradio panel: preview adapters and merge, convert, resize or bake them.

``build_ui()`` returns the ``gr.Blocks`` (launch it, or mount it: the A1111/Forge tab in
``scripts/lycoris_panel.py`` does).  ``python -m web.panel`` starts it on 127.0.0.1:7860.
All work is done by ``lycoris_core``; this package only chooses files safely and shows results.
"""

from .folders import Folders, PanelError, discover_folders
from .ui import build_ui

__all__ = ["Folders", "PanelError", "build_ui", "discover_folders"]
