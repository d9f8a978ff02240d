"""AUTOMATIC1111 / Forge extension entry: the LyCORIS panel as a web UI tab.

The web UI runs every file in an extension's ``scripts/`` folder; this one registers
``on_ui_tabs`` to add the same ``gr.Blocks`` that ``python -m web.panel`` serves.  The
panel package is loaded under a private name so it cannot clash with another ``web``
module, and it is pointed at the web UI's own ``models/Lora`` and
``models/Stable-diffusion`` folders (``LYCORIS_MODELS`` still overrides).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from modules import script_callbacks

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_lycoris_panel"
TAB_TITLE = "LyCORIS"
TAB_ID = "lycoris_panel"


def _load_panel():
    """web/panel as a top-level package of its own; lycoris_core from this extension."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    init = ROOT / "web" / "panel" / "__init__.py"
    spec = importlib.util.spec_from_file_location(PACKAGE, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(PACKAGE, None)
        raise
    return module


def _webui_models() -> Path | None:
    """The web UI's models folder, when its path module says where it is."""
    try:
        from modules import paths

        return Path(paths.models_path)
    except Exception:  # noqa: BLE001 - any web UI without that module: fall back to discovery
        return None


def folders_for_webui(panel):
    folders_mod = sys.modules[f"{PACKAGE}.folders"]
    if os.environ.get(folders_mod.MODELS_ENV):
        return panel.discover_folders()
    models = _webui_models()
    if models is not None and models.is_dir():
        return folders_mod.from_models_dir(models, "A1111")
    return panel.discover_folders()


def on_ui_tabs():
    panel = _load_panel()
    ui = panel.build_ui(folders_for_webui(panel), title="LyCORIS panel")
    return [(ui, TAB_TITLE, TAB_ID)]


script_callbacks.on_ui_tabs(on_ui_tabs)
