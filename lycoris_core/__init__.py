"""comfyui-lycoris core engine: read LyCORIS adapters safely and rebuild their weight deltas.

Pure torch + safetensors + numpy.  Nothing here imports ComfyUI, Gradio, or the
project's ``nodes``/``web`` layers; they build on this package, never the reverse.
"""

from .adapter import Adapter, load_adapter
from .algorithms import AdapterModule
from .errors import (
    AdapterFormatError,
    ArchitectureMismatchError,
    BlockWeightError,
    LycorisError,
    OutputExistsError,
    PickleRefusedError,
    WeightRangeError,
)

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterFormatError",
    "AdapterModule",
    "ArchitectureMismatchError",
    "BlockWeightError",
    "LycorisError",
    "OutputExistsError",
    "PickleRefusedError",
    "WeightRangeError",
    "load_adapter",
]
