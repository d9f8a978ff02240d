"""The A1111/Forge extension entry adds the panel as a tab through on_ui_tabs.

A small stand-in of the web UI's ``modules.script_callbacks`` (and ``modules.paths``) is put
in ``sys.modules``; the script is run as the web UI runs it, and the tab it returns is
rendered inside an outer Blocks the way the web UI does, then used through the API.
"""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from gradio_client import Client  # noqa: E402
from panel_app import free_port, make_models  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lycoris_panel.py"


@pytest.fixture
def webui(monkeypatch, tmp_path):
    """Stand-in web UI modules: script_callbacks.on_ui_tabs records callbacks; paths.models_path."""
    models = tmp_path / "webui_models"
    make_models(tmp_path / "demo")
    (models / "Lora").mkdir(parents=True)
    (models / "Stable-diffusion").mkdir()
    for f in (tmp_path / "demo" / "loras").iterdir():
        (models / "Lora" / f.name).write_bytes(f.read_bytes())
    for f in (tmp_path / "demo" / "checkpoints").iterdir():
        (models / "Stable-diffusion" / f.name).write_bytes(f.read_bytes())

    callbacks = []
    modules = types.ModuleType("modules")
    modules.__path__ = []
    script_callbacks = types.ModuleType("modules.script_callbacks")
    script_callbacks.on_ui_tabs = callbacks.append
    paths = types.ModuleType("modules.paths")
    paths.models_path = str(models)
    modules.script_callbacks, modules.paths = script_callbacks, paths
    for name, mod in (("modules", modules), ("modules.script_callbacks", script_callbacks), ("modules.paths", paths)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("LYCORIS_MODELS", raising=False)
    for name in [n for n in sys.modules if n.startswith("comfyui_lycoris_panel")]:
        monkeypatch.delitem(sys.modules, name)
    yield types.SimpleNamespace(callbacks=callbacks, models=models)
    for name in [n for n in sys.modules if n.startswith("comfyui_lycoris_panel")]:
        sys.modules.pop(name, None)


def test_script_registers_one_tab_built_from_the_webui_model_folders(webui):
    runpy.run_path(str(SCRIPT), run_name="lycoris_panel")
    assert len(webui.callbacks) == 1
    tabs = webui.callbacks[0]()
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and title == "LyCORIS" and elem_id == "lycoris_panel"
    folders = blocks.lycoris_folders
    assert folders.origin == "A1111"
    assert folders.loras == (webui.models / "Lora").resolve()
    assert "demo_lokr.safetensors" in folders.list("lora")
    assert "comfyui_lycoris_panel.ui" in sys.modules  # loaded under its own name, not as "web"


def test_tab_works_when_rendered_inside_the_webui_blocks(webui):
    runpy.run_path(str(SCRIPT), run_name="lycoris_panel")
    interfaces = webui.callbacks[0]()
    with gr.Blocks(analytics_enabled=False) as outer:  # what the web UI does with on_ui_tabs results
        with gr.Tabs():
            with gr.Tab("txt2img"):
                gr.Markdown("stand-in")
            for interface, label, ifid in interfaces:
                with gr.Tab(label, id=ifid):
                    interface.render()
    outer.queue()
    _app, url, _ = outer.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                quiet=True)
    try:
        client = Client(url, verbose=False)
        summary, triggers, *_ = client.predict("demo_lora.safetensors", api_name="/preview")
        assert "demo_lora.safetensors" in summary and "lycotrigger" in triggers
        client.close()
    finally:
        outer.close()
