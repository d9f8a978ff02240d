"""Subprocess script: a DiT diffusion model loaded by ComfyUI's own UNETLoader path, patched by ComfyUI's
LoRA loader and by this project's model-only loader node, compared on every weight ComfyUI loads.

Run as `python dit_comfy_apply.py <comfyui dir> <project dir> <model file> <loras dir>` with a python that
imports ComfyUI (COMFYUI_PYTHON) and a JSON list of cases on stdin:
{"file": adapter file name in <loras dir>, "strength": s, "formula": [...]}; each formula item is
{"key": weight or bias key, "kind": "lora" | "bias", "up"/"down"/"scale" (lora: W0 + s·scale·up@down on
`rows`) or "diff" (bias: b0 + s·diff on `rows`), "rows": [start, length] or null}, for what ComfyUI drops.
For each case: `comfy.sd.load_lora_for_models` + a forced full patch (`load_models_gpu`, as KSampler
does), the state dict kept, the model unloaded (restored), then `LycorisLoaderModelOnly` + the same
forced patch, compared key by key. Prints one line `RESULT <json>`. The subprocess keeps ComfyUI's
global state (and its `nodes` module name) out of the test session.
"""

import importlib.util
import json
import logging
import os
import sys

from log_lines import WarningLines  # tests/ is this script's folder, first on sys.path


def _load_pack(project):
    """The project as ComfyUI loads a custom node: its folder imported as a package."""
    spec = importlib.util.spec_from_file_location("comfyui_lycoris", os.path.join(project, "__init__.py"),
                                                  submodule_search_locations=[project])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_lycoris"] = pack
    spec.loader.exec_module(pack)
    return importlib.import_module("comfyui_lycoris.nodes.loaders")


FLOOR = 1e-6  # float32 sums that cancel to ~0 differ in their last bits, i.e. by many bf16 steps of ~0


def _within_one_ulp(a, b, torch):
    """Elements of a and b (bf16) further apart than one bf16 step at their magnitude (or FLOOR)."""
    a, b = a.float(), b.float()
    allowed = torch.maximum(a.abs(), b.abs()) * 2.0 ** -7 + FLOOR
    return int(((a - b).abs() > allowed).sum())


def main(comfy_dir, project, model_path, lora_dir):
    os.environ["LYCORIS_CACHE_MB"] = "0"  # no delta cache: the memory goes to the three copies compared here
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import torch

    torch.set_num_threads(2)
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import folder_paths
    from safetensors import safe_open

    folder_paths.add_model_folder_path("loras", lora_dir)
    loaders = _load_pack(project)
    lines = WarningLines()
    logging.getLogger().addHandler(lines)
    logging.getLogger().setLevel(logging.INFO)

    model = comfy.sd.load_diffusion_model(model_path, model_options={"dtype": torch.bfloat16})  # UNETLoader
    result = {"model_class": type(model.model).__name__, "unet_config": {
        k: v for k, v in model.model.model_config.unet_config.items() if isinstance(v, (int, bool, str))}}
    keys = list(model.model.state_dict())
    result["weights"] = len(keys)
    cases = json.load(sys.stdin)
    for case in cases:
        out = {}
        name, strength = case["file"], case["strength"]
        formula_keys = {f["key"] for f in case.get("formula", ())}
        originals = {k: v.detach().clone() for k, v in model.model.state_dict().items() if k in formula_keys}

        lines.lines.clear()
        sd = comfy.utils.load_torch_file(os.path.join(lora_dir, name), safe_load=True)
        theirs, _ = comfy.sd.load_lora_for_models(model, None, sd, strength, 0)
        out["comfy_not_loaded"] = sum(1 for x in lines.lines if x.startswith("lora key not loaded"))
        out["comfy_patched"] = len(theirs.patches)
        mm.load_models_gpu([theirs], force_full_load=True)
        patched = {k: v.detach().clone() for k, v in theirs.model.state_dict().items()}
        mm.unload_all_models()
        del theirs

        ours, text = loaders.LycorisLoaderModelOnly().apply(model, name, strength)["result"]
        out["ours_summary"] = text.splitlines()[0]
        out["ours_patched"] = len(ours.patches)
        mm.load_models_gpu([ours], force_full_load=True)
        state = ours.model.state_dict()
        differ, beyond, identical, elements, max_diff = [], [], 0, 0, 0.0
        for key in keys:
            if key in formula_keys:
                continue
            a, b = state[key], patched[key]
            if torch.equal(a, b):
                identical += 1
                continue
            differ.append(key)
            elements += int((a != b).sum())
            max_diff = max(max_diff, float((a.float() - b.float()).abs().max()))
            if _within_one_ulp(a, b, torch):
                beyond.append(key)
        out["compared"] = len(keys) - len(formula_keys)
        out["identical"] = identical
        out["one_ulp_apart"] = len(differ) - len(beyond)
        out["beyond_one_ulp"] = beyond
        out["elements_differing"] = elements
        out["max_abs_difference"] = max_diff
        checks = {}
        with safe_open(os.path.join(lora_dir, name), "pt") as f:
            for item in case.get("formula", ()):
                key = item["key"]
                base = originals[key].float()
                rows = item["rows"] or [0, base.shape[0]]
                want = base.clone()
                if item["kind"] == "lora":
                    delta = f.get_tensor(item["up"]).float() @ f.get_tensor(item["down"]).float()
                    want[rows[0]:rows[0] + rows[1]] += strength * item["scale"] * delta
                else:
                    want[rows[0]:rows[0] + rows[1]] += strength * f.get_tensor(item["diff"]).float()
                want = want.to(torch.bfloat16)
                checks[key] = {"comfy_unchanged": bool(torch.equal(patched[key], originals[key])),
                               "ours_changed": not bool(torch.equal(state[key], originals[key])),
                               "ours_beyond_one_ulp": _within_one_ulp(state[key], want, torch)}
        out["formula"] = checks
        mm.unload_all_models()
        del ours, patched, state
        result[name] = out
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:5])
