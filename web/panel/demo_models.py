"""The embedded demo: three small adapters and a small checkpoint, made once into a cache.

The adapters come from ``lycoris_core.testing.demo``.  The checkpoint holds only the SD1.5 weights
those adapters touch, under their real checkpoint key names and shapes (asked from
``lycoris_core.keymap``), so preview, match report, merge and bake all work on a machine
with no models.  Values are seeded random: it demonstrates the tools, not a model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lycoris_core import load_adapter
from lycoris_core.io.writer import save_tensors
from lycoris_core.keymap import map_adapter, state_shapes
from lycoris_core.testing.demo import write_demo_files

DEMO_ENV = "LYCORIS_DEMO_DIR"
DEMO_CHECKPOINT = "demo_sd15_slice.safetensors"
DEMO_CHECKPOINT_META = {
    "modelspec.architecture": "stable-diffusion-v1",
    "modelspec.title": "comfyui-lycoris demo checkpoint (SD1.5 slice, random values)",
}


def demo_root() -> Path:
    env = os.environ.get(DEMO_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "comfyui-lycoris" / "demo"


def demo_checkpoint(folder, adapter_paths=None, overwrite: bool = False) -> Path:
    """Write the demo checkpoint: the SD1.5 checkpoint-space weights the demo adapters touch."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full = state_shapes("sd1", "checkpoint")
    wanted: dict[str, tuple[int, ...]] = {}
    for path in adapter_paths or ():
        adapter = load_adapter(path)
        try:
            report = map_adapter(adapter.modules, full, allow_partial=True)
            for target in report.targets.values():
                wanted[target.weight_key] = full[target.weight_key]
                if target.bias_key:
                    wanted[target.bias_key] = full[target.bias_key]
        finally:
            adapter.close()
    gen = torch.Generator().manual_seed(1234)
    tensors = {
        key: (torch.randn(*shape, generator=gen) * 0.02).to(torch.float16) for key, shape in sorted(wanted.items())
    }
    return save_tensors(tensors, folder / DEMO_CHECKPOINT, DEMO_CHECKPOINT_META, overwrite=overwrite)


def ensure_demo(root: str | os.PathLike | None = None) -> Path:
    """Create ``<root>/loras`` (LoRA, LoHa, LoKr) and ``<root>/checkpoints`` once; return root."""
    root = Path(root) if root is not None else demo_root()
    loras, checkpoints = root / "loras", root / "checkpoints"
    names = [f"demo_{a}.safetensors" for a in ("lora", "loha", "lokr")]
    if not all((loras / n).is_file() for n in names):
        loras.mkdir(parents=True, exist_ok=True)
        write_demo_files(loras, overwrite=True)
    if not (checkpoints / DEMO_CHECKPOINT).is_file():
        demo_checkpoint(checkpoints, [loras / n for n in names])
    return root
