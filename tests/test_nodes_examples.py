"""examples/: the UI workflow and the API prompt reference only our node inputs that exist, with valid values.

(Built-in node types were checked against GET /object_info of the real ComfyUI 0.3.64; here only ours.)
"""

from __future__ import annotations

import json
from pathlib import Path

import nodes_env  # noqa: F401  (stand-in first: INPUT_TYPES reads folder_paths)
import pytest

from nodes.loaders import NODE_CLASS_MAPPINGS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def spec(node_type):
    types = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    return {**types["required"], **types.get("optional", {})}


@pytest.fixture(autouse=True)
def loras(tmp_path):
    nodes_env.write_adapters(tmp_path)
    nodes_env.use_loras(tmp_path)


def test_ui_workflow():
    wf = json.loads((EXAMPLES / "lycoris_workflow.json").read_text())
    ours = [n for n in wf["nodes"] if n["type"].startswith("Lycoris")]
    assert {"LycorisLoader", "LycorisStack"} <= {n["type"] for n in ours}
    for node in ours:
        inputs = spec(node["type"])
        widgets = [k for k, v in inputs.items() if isinstance(v[0], list) or v[0] in WIDGETS]
        assert len(node["widgets_values"]) == len(widgets), node["type"]
        for name, value in zip(widgets, node["widgets_values"], strict=True):
            kind, opts = inputs[name][0], (inputs[name][1] if len(inputs[name]) > 1 else {})
            if isinstance(kind, list):
                assert value in kind, (name, value)
            elif kind == "FLOAT":
                assert opts["min"] <= value <= opts["max"]
        for slot in node["inputs"]:
            assert inputs[slot["name"]][0] == slot["type"]
        assert [o["type"] for o in node["outputs"]] == list(NODE_CLASS_MAPPINGS[node["type"]].RETURN_TYPES)
    ids = {n["id"] for n in wf["nodes"]}
    for _lid, src, _s, dst, _d, _t in wf["links"]:
        assert src in ids and dst in ids


def test_api_prompt():
    prompt = json.loads((EXAMPLES / "api_prompt_sd15.json").read_text())
    for node in prompt.values():
        if not node["class_type"].startswith("Lycoris"):
            continue
        inputs = spec(node["class_type"])
        for name, value in node["inputs"].items():
            assert name in inputs, name
            if isinstance(inputs[name][0], list):
                assert value in inputs[name][0], (name, value)
