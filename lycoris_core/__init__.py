"""comfyui-lycoris core engine: read LyCORIS adapters safely, rebuild their deltas, patch, merge.

Pure torch + safetensors + numpy.  Nothing here imports ComfyUI, Gradio, or the
project's ``nodes``/``web`` layers; they build on this package, never the reverse.
The packages, lowest first (each may import only those above it):

- ``errors``: the one error family; ``memory``: how much host memory caches may take;
- ``numerics``: row tiles per device, the on-device range check, one rounding;
- ``io``: reading tensor files safely, writing them atomically, streaming;
- ``algorithms``: each algorithm's delta math (one file each) and the suffix table;
- ``keymap``: architecture tables, naming schemes, detection, the match report;
- ``adapter``: ``load_adapter`` and the ``Adapter``; metadata, description, the file cache;
- ``patch``: plans, the one patch kernel, the delta cache, ``WeightPatcher``;
- ``tools``: merge / convert / resize / bake / extract / inflate and the CLI;
- ``train``: trainable modules of every algorithm with the loader's math and memory-saving
  backward, training loop, saving in the layout real files use;
- ``testing``: synthetic adapters and the demo (fixtures, not engine).
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
