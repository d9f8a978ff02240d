"""The node classes: loader, model-only loader, stack and info.

Each node only gathers its inputs and calls ``glue``; ComfyUI caches one instance per
node id, but nothing is kept on the instance: loaded files and deltas live in the
shared caches of ``glue`` so every node and every strength change reuses them.
"""

from __future__ import annotations

from lycoris_core.adapter.cache import file_key

from . import glue
from .info import adapter_info, summary_text
from .train import TrainLycoris

CATEGORY = "loaders/lycoris"
STACK_ROWS = 6

STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "display": "slider"}
BLOCKS_TOOLTIP = (
    "Optional block weights. SD1/SD2/SDXL: a preset (ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5, NONE), "
    "a vector of 17/26 numbers (SD1/SD2) or 12/20 (SDXL) starting with BASE, or a named form like "
    "'in=0.5, mid=1, out03-05=0'. Diffusion transformers: one number per slot of the model's table "
    "(Flux: 61 = CLIP, T5, IN, D00-D18, S00-S37, OUT, as lora-block-weight; SD3 joint, Wan/Qwen blocks, ...), "
    "or a named form like 'double=0.5, single03-10=0, t5=0'. Empty = full strength everywhere."
)


def _adapter_input(with_none: bool = False):
    names = glue.adapter_names()
    return ((["None", *names] if with_none else names), {"tooltip": "A LoRA/LyCORIS file from models/loras"})


def _blocks_input():
    return ("STRING", {"default": "", "multiline": False, "tooltip": BLOCKS_TOOLTIP})


def _file_state(names) -> str:
    """IS_CHANGED value: re-run when an adapter file is replaced under the same name."""
    parts = []
    for name in names:
        if not name or name == glue.NONE:
            continue
        try:
            parts.append(repr(file_key(glue.adapter_path(name))))
        except Exception as exc:  # the node itself will report a missing file
            parts.append(f"{name}: {exc}")
    return "|".join(parts)


def _report(lines: list[str], names: list[str]) -> str:
    out = list(lines) or ["no adapter applied (no adapter chosen, or every strength is 0)"]
    triggers = glue.trigger_lines(names)
    out.append("trigger words: " + ("; ".join(triggers) if triggers else "none found"))
    return "\n".join(out)


def _result(text: str, *outputs):
    return {"ui": {"lycoris": [text]}, "result": (*outputs, text)}


class _OneAdapter:
    """What the single-adapter nodes share: re-run when their file changes on disk."""

    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def IS_CHANGED(cls, adapter_name=None, **_):
        return _file_state([adapter_name])


class LycorisLoader(_OneAdapter):
    DESCRIPTION = ("Apply one LoRA/LyCORIS adapter (LoRA, LoCon, LoHa, LoKr, full, IA3, GLoRA, OFT/BOFT, DoRA) to MODEL "
                   "and CLIP: SD1/SD2/SDXL, Flux, Chroma, SD3/3.5, Wan, Qwen-Image, HunyuanVideo, Lumina 2, HiDream.")
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "info")
    OUTPUT_TOOLTIPS = ("The patched diffusion model.", "The patched text encoder.",
                       "How the adapter matched the model, and its trigger words.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "adapter_name": _adapter_input(),
                "strength_model": ("FLOAT", dict(STRENGTH, tooltip="Strength on the diffusion model.")),
                "strength_clip": ("FLOAT", dict(STRENGTH, tooltip="Strength on the text encoder.")),
            },
            "optional": {"block_weights": _blocks_input()},
        }

    def apply(self, model, clip, adapter_name, strength_model, strength_clip, block_weights=""):
        model, clip, _, lines = glue.apply_stack(
            model, clip, [(adapter_name, strength_model, strength_clip, block_weights)]
        )
        return _result(_report(lines, [adapter_name]), model, clip)


class LycorisLoaderModelOnly(_OneAdapter):
    DESCRIPTION = ("Apply one LoRA/LyCORIS adapter to the diffusion model only (e.g. a Flux or Wan model from "
                   "UNETLoader).")
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("MODEL", "info")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "adapter_name": _adapter_input(),
                "strength_model": ("FLOAT", dict(STRENGTH)),
            },
            "optional": {"block_weights": _blocks_input()},
        }

    def apply(self, model, adapter_name, strength_model, block_weights=""):
        model, _, _, lines = glue.apply_stack(model, None, [(adapter_name, strength_model, 0.0, block_weights)])
        return _result(_report(lines, [adapter_name]), model)


class LycorisStack:
    DESCRIPTION = (
        f"Apply up to {STACK_ROWS} adapters in one pass: a weight touched by several adapters is "
        "patched once with all their contributions summed."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "info")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        optional = {"clip": ("CLIP",)}
        for i in range(1, STACK_ROWS + 1):
            optional[f"enabled_{i}"] = ("BOOLEAN", {"default": True})
            optional[f"adapter_name_{i}"] = _adapter_input(with_none=True)
            optional[f"strength_model_{i}"] = ("FLOAT", dict(STRENGTH))
            optional[f"strength_clip_{i}"] = ("FLOAT", dict(STRENGTH))
            optional[f"block_weights_{i}"] = _blocks_input()
        return {"required": {"model": ("MODEL",)}, "optional": optional}

    @classmethod
    def IS_CHANGED(cls, **inputs):
        return _file_state(cls._names(inputs))

    @staticmethod
    def _rows(inputs) -> list[tuple[str, float, float, str]]:
        rows = []
        for i in range(1, STACK_ROWS + 1):
            name = inputs.get(f"adapter_name_{i}", glue.NONE)
            if not inputs.get(f"enabled_{i}", True) or not name or name == glue.NONE:
                continue
            rows.append((name, float(inputs.get(f"strength_model_{i}", 1.0)),
                         float(inputs.get(f"strength_clip_{i}", 1.0)), inputs.get(f"block_weights_{i}", "")))
        return rows

    @classmethod
    def _names(cls, inputs) -> list[str]:
        return [r[0] for r in cls._rows(inputs)]

    def apply(self, model, clip=None, **inputs):
        rows = self._rows(inputs)
        model, clip, _, lines = glue.apply_stack(model, clip, rows)
        return _result(_report(lines, [r[0] for r in rows]), model, clip)


class LycorisInfo(_OneAdapter):
    DESCRIPTION = ("Describe an adapter file: algorithms, ranks, alpha, base model, architecture and variant, parts, "
                   "trigger words, blocks.")
    RETURN_TYPES = ("STRING", "STRING", "STRING")
    RETURN_NAMES = ("summary", "trigger_words", "blocks_touched")
    FUNCTION = "describe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"adapter_name": _adapter_input()}}

    def describe(self, adapter_name):
        adapter = glue.load(adapter_name)
        info = adapter_info(adapter, adapter_name)
        summary = summary_text(adapter)
        words = ", ".join(info["trigger_words"])
        blocks = ", ".join(info["blocks"])
        return {"ui": {"lycoris": [summary]}, "result": (summary, words, blocks)}


NODE_CLASS_MAPPINGS = {
    "LycorisLoader": LycorisLoader,
    "LycorisLoaderModelOnly": LycorisLoaderModelOnly,
    "LycorisStack": LycorisStack,
    "LycorisInfo": LycorisInfo,
    "LycorisTrain": TrainLycoris,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LycorisLoader": "Load LyCORIS",
    "LycorisLoaderModelOnly": "Load LyCORIS (model only)",
    "LycorisStack": "LyCORIS Stack",
    "LycorisInfo": "LyCORIS Info",
    "LycorisTrain": "Train LyCORIS",
}
