"""Where the panel may read and write: the two model folders, and the checks on every name.

Owns folder discovery (``--models``, the ``LYCORIS_MODELS`` variable, ComfyUI's ``models/``
found by walking up from this project, A1111's folders when the web UI hands them over, or
the embedded demo) and the validation of every file name a browser sends.  Names reaching
the server are untrusted: each is resolved and checked to lie inside its folder on every
call, never taken from a cached list.  Imports no Gradio.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .demo_models import ensure_demo

MODELS_ENV = "LYCORIS_MODELS"
SUFFIX = ".safetensors"
PROJECT_ROOT = Path(__file__).resolve().parents[2]

# subfolder names accepted under a models folder, first match wins (ComfyUI, then A1111)
LORA_DIRS = ("loras", "lora", "Lora", "LyCORIS")
CHECKPOINT_DIRS = ("checkpoints", "Stable-diffusion", "stable-diffusion")

_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 _.()+,=@-]{0,150}$")


class PanelError(ValueError):
    """A refusal worth showing to the user as it is (bad name, missing file, ...)."""


@dataclass(frozen=True)
class Folders:
    """The adapter folder, the checkpoint folder and where they came from."""

    loras: Path
    checkpoints: Path
    origin: str  # "--models", "LYCORIS_MODELS", "ComfyUI", "A1111", "demo", ...

    @property
    def is_demo(self) -> bool:
        return self.origin == "demo"

    def root(self, kind: str) -> Path:
        if kind == "lora":
            return self.loras
        if kind == "checkpoint":
            return self.checkpoints
        raise PanelError(f"unknown folder kind {kind!r}")

    def describe(self) -> str:
        return f"adapters: `{self.loras}` · checkpoints: `{self.checkpoints}` ({self.origin})"

    # ---- listing -------------------------------------------------------------------------
    def list(self, kind: str) -> list[str]:
        """Names (relative, '/'-separated) of the .safetensors files inside a folder."""
        root = self.root(kind)
        if not root.is_dir():
            return []
        real_root = root.resolve()
        names = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith(".") or not filename.lower().endswith(SUFFIX):
                    continue
                path = Path(dirpath) / filename
                if not _inside(path.resolve(), real_root):  # symlink leading out
                    continue
                names.append(path.relative_to(root).as_posix())
        return sorted(names, key=str.lower)

    # ---- validation of names from the browser ----------------------------------------
    def resolve(self, kind: str, name) -> Path:
        """The file a name chosen in the page stands for; refused unless inside its folder."""
        label = "adapter" if kind == "lora" else "checkpoint"
        if not isinstance(name, str) or not name.strip():
            raise PanelError(f"choose a {label} first")
        name = name.strip()
        if "\x00" in name or len(name) > 1024:
            raise PanelError(f"{label} name is not valid")
        if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            raise PanelError(f"{label} must be chosen from the list, not given as an absolute path")
        parts = re.split(r"[\\/]", name)
        if any(p in ("", ".", "..") for p in parts):
            raise PanelError(f"{label} name {name!r} is not a plain name inside the folder")
        root = self.root(kind).resolve()
        path = (root / Path(*parts)).resolve()
        if not _inside(path, root):
            raise PanelError(f"{label} {name!r} lies outside the {label} folder")
        if not path.name.lower().endswith(SUFFIX):
            raise PanelError(f"{label} {name!r} is not a .safetensors file")
        if not path.is_file():
            raise PanelError(f"{label} {name!r} was not found in {self.root(kind)}")
        return path

    def output(self, kind: str, name, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
        """A validated output path in a folder; existing files only with ``overwrite``."""
        if not isinstance(name, str) or not name.strip():
            raise PanelError("give the output a file name")
        name = name.strip()
        if "." not in name:
            name += SUFFIX
        if "/" in name or "\\" in name or "\x00" in name:
            raise PanelError("output name must be a plain file name, without folders")
        if ".." in name:
            raise PanelError("output name must not contain '..'")
        if not name.lower().endswith(SUFFIX) or name.lower() == SUFFIX:
            raise PanelError("output name must end in .safetensors (other formats are not written)")
        if not _OUTPUT_NAME.match(name):
            raise PanelError(
                "output name may use letters, digits, spaces and _ . ( ) + , = @ - only, and must not start with a dot"
            )
        root = self.root(kind)
        if not root.is_dir():
            raise PanelError(f"output folder {root} does not exist")
        path = root.resolve() / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise PanelError(f"{name} exists and is not a regular file; choose another name")
        if any(path == p.resolve() for p in inputs):
            raise PanelError(f"{name} is one of the inputs; write to a new name")
        if path.exists() and not overwrite:
            raise PanelError(f"{name} already exists; tick 'Overwrite' to replace it, or choose another name")
        return path


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _pick(base: Path, names: tuple[str, ...]) -> Path:
    for n in names:
        if (base / n).is_dir():
            return base / n
    return base / names[0]


def from_models_dir(models: str | os.PathLike, origin: str) -> Folders:
    """A folder holding ``loras/`` and ``checkpoints/`` (A1111's ``Lora/`` and ``Stable-diffusion/`` work too)."""
    base = Path(models).expanduser()
    if not base.is_dir():
        raise PanelError(f"models folder {base} ({origin}) does not exist")
    base = base.resolve()
    return Folders(_pick(base, LORA_DIRS), _pick(base, CHECKPOINT_DIRS), origin)


def comfyui_models(project_root: Path = PROJECT_ROOT) -> Path | None:
    """``<ComfyUI>/models`` when this project sits in ``<ComfyUI>/custom_nodes/<this>``."""
    parent = project_root.parent
    if parent.name != "custom_nodes":
        return None
    models = parent.parent / "models"
    return models if (models / "loras").is_dir() or (models / "checkpoints").is_dir() else None


def discover_folders(models: str | os.PathLike | None = None, *, demo: bool = False,
                     project_root: Path = PROJECT_ROOT) -> Folders:
    """Explicit folder, then the environment, then ComfyUI's folders, then the demo."""
    if models:
        return from_models_dir(models, "--models")
    if demo:
        return demo_folders()
    env = os.environ.get(MODELS_ENV)
    if env:
        return from_models_dir(env, MODELS_ENV)
    comfy = comfyui_models(project_root)
    if comfy is not None:
        return from_models_dir(comfy, "ComfyUI")
    return demo_folders()


def demo_folders() -> Folders:
    base = ensure_demo()
    return Folders(base / "loras", base / "checkpoints", "demo")
