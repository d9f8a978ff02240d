"""A small, faithful stand-in for the parts of ComfyUI 0.3.64 (commit a125cd84) the nodes use.

Written from the behaviour documented in /work/notes/comfyui.md (section 9 is the
checklist); no ComfyUI code is copied.  ``activate()`` puts this folder first on
``sys.path`` so ``import comfy...``, ``import folder_paths`` and ``import server``
resolve here, exactly as they do inside ComfyUI.  ComfyUI's ``nodes`` module is
provided as ``comfy_nodes`` because our pack has its own ``nodes`` package.
"""

from __future__ import annotations

import os
import sys

STUB_DIR = os.path.dirname(os.path.abspath(__file__))


def activate() -> None:
    if STUB_DIR not in sys.path:
        sys.path.insert(0, STUB_DIR)
