"""Where a real ComfyUI checkout is, for the tests that check against ComfyUI's own code.

Found, in order: ``COMFYUI_PATH``; a ``ComfyUI/`` beside the project folder; the ComfyUI
this project is installed in (``<ComfyUI>/custom_nodes/<this project>``).  None when
there is none (CI): those tests skip.  ComfyUI's code is run only in subprocesses, so its
import-time global settings stay out of the test session.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def is_checkout(path: Path) -> bool:
    return (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def find_comfyui() -> Path | None:
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env)] if env else []
    candidates += [PROJECT.parent / "ComfyUI", PROJECT.parent / "comfyui"]
    if PROJECT.parent.name == "custom_nodes":
        candidates.append(PROJECT.parent.parent)
    return next((p.resolve() for p in candidates if is_checkout(p)), None)


COMFYUI = find_comfyui()
SKIP_REASON = ("no ComfyUI checkout: set COMFYUI_PATH, or clone ComfyUI beside this project "
               "(../ComfyUI) or install the project in ComfyUI/custom_nodes")
