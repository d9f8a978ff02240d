"""The front-end extension is served once, whatever the folder the pack is cloned into.

ComfyUI registers a pack's web folder from ``WEB_DIRECTORY`` (under the folder's name) and,
separately, from ``[tool.comfy] web`` in pyproject.toml (under the project's name).  With
both, a clone into ``custom_nodes/ComfyUI-LyCORIS`` served ``lycoris.js`` twice and the
browser refused the second copy ("Extension named 'comfyui-lycoris.info' already
registered").  The pack now declares only ``WEB_DIRECTORY``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from real_comfyui import COMFYUI, PROJECT, SKIP_REASON

LOAD_PACK = """
import asyncio, json, sys
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
assert asyncio.run(nodes.load_custom_node(sys.argv[1]))
print("WEB " + json.dumps(dict(nodes.EXTENSION_WEB_DIRS)))
"""


def test_the_web_folder_is_declared_once():
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "web" not in config.get("tool", {}).get("comfy", {})
    init = (PROJECT / "__init__.py").read_text(encoding="utf-8")
    assert 'WEB_DIRECTORY = "./web/js"' in init and (PROJECT / "web" / "js" / "lycoris.js").is_file()


def test_comfyui_serves_the_extension_once_under_any_folder_name(tmp_path):
    """ComfyUI's own loader on a clone named ComfyUI-LyCORIS (COMFYUI_PYTHON: a python that imports ComfyUI)."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    if COMFYUI is None:
        pytest.skip(SKIP_REASON)
    pack = tmp_path / "custom_nodes" / "ComfyUI-LyCORIS"
    pack.parent.mkdir()
    pack.symlink_to(PROJECT, target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(COMFYUI), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([python, "-c", LOAD_PACK, str(pack)], cwd=str(COMFYUI), env=env,
                          capture_output=True, text=True, timeout=300)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WEB ")), None)
    if line is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"{python} cannot run ComfyUI's loader (set COMFYUI_PYTHON): {last}")

    served = json.loads(line[4:])
    assert list(served.values()) == [str(pack / "web" / "js")], served
    assert Path(served["ComfyUI-LyCORIS"]).resolve() == (PROJECT / "web" / "js").resolve()


def test_the_pack_also_imports_as_a_plain_module():
    """pytest imports the root ``__init__.py`` as a module named ``__init__`` when the folder's name is not
    an identifier (a clone named ``comfyui-lycoris``): it must not need a parent package then."""
    done = subprocess.run([sys.executable, "-c", "import importlib.util, sys; "
                           f"spec = importlib.util.spec_from_file_location('__init__', {str(PROJECT / '__init__.py')!r}); "
                           "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
                           "print(sorted(m.NODE_CLASS_MAPPINGS)[0], m.WEB_DIRECTORY)"],
                          cwd="/", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["LycorisInfo", "./web/js"]
