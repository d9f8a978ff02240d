"""Training LyCORIS adapters: trainable modules that share the loader's math, memory-lean.

Pure torch (no ComfyUI).  A typical run::

    from lycoris_core.train import AdapterConfig, create_network, find_targets

    targets = find_targets(unet, "unet-attn", "lora_unet") + find_targets(te, "clip", "lora_te")
    net = create_network(targets, AdapterConfig(algo="loha", rank=8, alpha=4))
    opt = make_optimizer(net.parameters(), "AdamW", 1e-4)
    with net.attached():
        train_loop(loss_of_batch, opt, steps=1000)
    net.save("my_loha.safetensors", torch.float16, training_metadata(net.config, arch="sd1"))

The saved file loads in this project (``load_adapter``), in ComfyUI's LoraLoader and in
lycoris-lora's ``create_network_from_weights``, with the delta the network trained.
"""

from .config import ALGORITHMS, AdapterConfig, build_module, module_from_file
from .functions import (
    HadaRebuiltOp,
    HadaWeight,
    HadaWeightTucker,
    KronLinear,
    KronWeight,
    LayerSpec,
    RebuiltOp,
    rebuilt_forward,
)
from .loop import (
    LOSSES,
    OPTIMIZERS,
    LossNotFiniteError,
    checkpoint_blocks,
    frozen_base,
    make_loss,
    make_optimizer,
    train_loop,
)
from .modules import TrainFull, TrainIA3, TrainLoCon, TrainLoHa, TrainLoKr, TrainModule, factorization
from .network import TrainableNetwork, create_network
from .save import SAVE_DTYPES, file_tensors, save_adapter, training_metadata
from .targets import PRESETS, Preset, Target, find_targets, kohya_name, ldm_to_diffusers, preset, unet_naming

__all__ = [
    "ALGORITHMS", "LOSSES", "frozen_base", "OPTIMIZERS", "PRESETS", "SAVE_DTYPES", "AdapterConfig", "HadaRebuiltOp", "HadaWeight", "HadaWeightTucker",
    "KronLinear", "KronWeight", "LayerSpec", "LossNotFiniteError", "Preset", "RebuiltOp", "Target", "TrainFull",
    "TrainIA3", "TrainLoCon", "TrainLoHa", "TrainLoKr", "TrainModule", "TrainableNetwork", "build_module",
    "checkpoint_blocks", "create_network", "factorization", "file_tensors", "find_targets", "kohya_name",
    "ldm_to_diffusers", "make_loss", "make_optimizer", "module_from_file", "preset", "rebuilt_forward",
    "save_adapter", "train_loop", "training_metadata", "unet_naming",
]
