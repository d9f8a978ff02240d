"""Subprocess script: ComfyUI's own view of DiT models, as JSON (an oracle for tests/test_dit_*).

Run as `python dit_comfy_oracle.py <comfyui dir>` with a JSON list on stdin; each item is
{"case": name, "shapes": {bare native key: shape}, "text": family or null}. For each case
ComfyUI detects the model from those shapes (model_detection.model_config_from_unet, as
UNETLoader does), builds it on the meta device and reports its config, its diffusion-model
state dict shapes and its LoRA key map (comfy.lora.model_lora_keys_unet); for `text` it builds
the family's text encoders on the meta device and reports their shapes and
model_lora_keys_clip. Prints one line: `ORACLE <json>`. A subprocess keeps ComfyUI's global
state out of the test session.
"""

import json
import sys


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _key_map_value(value):
    """A key-map value as JSON: a key, [key, [dim, start, length]], or [key, null, function name]."""
    if isinstance(value, str):
        return value
    if len(value) == 2:
        return [value[0], list(value[1])]
    return [value[0], None if value[1] is None else list(value[1]), value[2].__name__]


def _text_model(family):
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.hidream as hidream
    import comfy.text_encoders.hunyuan_video as hunyuan
    import comfy.text_encoders.lumina2 as lumina2
    import comfy.text_encoders.qwen_image as qwen
    import comfy.text_encoders.sd3_clip as sd3
    import comfy.text_encoders.wan as wan

    return {
        "flux": lambda: flux.flux_clip()(device="meta"),
        "sd3": lambda: sd3.sd3_clip(clip_l=True, clip_g=True, t5=True)(device="meta"),
        "wan": lambda: wan.te()(device="meta"),
        "qwen_image": lambda: qwen.te()(device="meta"),
        "hunyuan_video": lambda: hunyuan.hunyuan_video_clip()(device="meta"),
        "hidream": lambda: hidream.hidream_clip(clip_l=True, clip_g=True, t5=True, llama=True)(device="meta"),
        "lumina2": lambda: lumina2.te()(device="meta"),
    }[family]()


class _StateDictOnly:
    def __init__(self, sd):
        self.sd = sd

    def state_dict(self):
        return self.sd


def main(comfy_dir: str) -> None:
    sys.path.insert(0, comfy_dir)
    import logging

    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = True
    logging.disable(logging.CRITICAL)
    import comfy.lora
    import comfy.model_detection

    result = {}
    for item in json.load(sys.stdin):
        out = {}
        with torch.device("meta"):
            sd = {k: torch.empty(v, device="meta") for k, v in item["shapes"].items()}
            config = comfy.model_detection.model_config_from_unet(sd, "")
            model = config.get_model(sd, "", device="meta")
        out["model_config"] = type(config).__name__
        out["unet_config"] = _jsonable(config.unet_config)
        out["shapes"] = {k: list(v.shape) for k, v in model.diffusion_model.state_dict().items()}
        key_map = comfy.lora.model_lora_keys_unet(model, {})
        out["key_map"] = {k: _key_map_value(v) for k, v in key_map.items()}
        if item.get("text"):
            with torch.device("meta"):
                te = _text_model(item["text"])
            te_sd = te.state_dict()
            out["text_shapes"] = {k: list(v.shape) for k, v in te_sd.items()}
            out["text_key_map"] = comfy.lora.model_lora_keys_clip(_StateDictOnly(te_sd), {})
        result[item["case"]] = out
    print("ORACLE " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
