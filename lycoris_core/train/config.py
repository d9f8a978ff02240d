"""What to train: the algorithm and its options, validated once, mapped onto one layer.

Option names follow LyCORIS (``lora_dim`` → rank, ``conv_dim`` → conv_rank, ``use_tucker``,
``dora_wd`` → dora, ``wd_on_output`` → dora_on_output, ``factor``, ``decompose_both``,
``full_matrix``, ``unbalanced_factorization``, the three dropouts), with LyCORIS's rules:
alpha = rank when it is 0/None (scale α/r); k×k convs use conv_rank/conv_alpha, and a
conv_rank of 0 leaves them out; 1×1 convs use the linear rank; LoKr with both blocks
full trains at scale 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .functions import LayerSpec
from .modules import MODULE_CLASSES, TrainIA3, TrainLoCon, TrainLoHa, TrainLoKr, TrainModule
from .targets import Target

ALGORITHMS = ("lora", "locon", "loha", "lokr", "ia3", "full")
# (IA)³ scales the input of a feed-forward's output layer, the output of everything else
IA3_ON_INPUT = (r"(.*[._])?ff[._]net[._]2", r"(.*[._])?mlp[._]fc2")


@dataclass(frozen=True)
class AdapterConfig:
    algo: str = "lora"
    rank: int = 8
    alpha: float | None = 1.0
    conv_rank: int | None = None  # k×k convs; None: same as rank; 0: leave k×k convs out
    conv_alpha: float | None = None  # None: same as alpha
    use_tucker: bool = False  # CP/Tucker form for k×k convs (lora_mid, hada_t*, lokr_t2)
    dora: bool = False  # weight decomposition (lora/locon, loha, lokr)
    dora_on_output: bool = True  # LyCORIS's wd_on_output; False (input axis) suits ComfyUI's DoRA
    factor: int = -1  # LoKr
    decompose_both: bool = False
    full_matrix: bool = False
    unbalanced_factorization: bool = False
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    bypass: bool | str = True  # ΔW·x beside the frozen layer where it allows and pays; "always"; False: never
    factor_dtype: torch.dtype | None = None  # dtype of the rebuilt ΔW math (not the bypass: compute dtype); None: float32
    ia3_on_input: tuple[str, ...] = field(default=IA3_ON_INPUT)

    def __post_init__(self):
        if self.algo not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.conv_rank is not None and self.conv_rank < 0:
            raise ValueError(f"conv_rank must be 0 (no k×k convs) or more, got {self.conv_rank}")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.dora and self.algo in ("ia3", "full"):
            raise ValueError(f"DoRA applies to lora/locon, loha and lokr, not {self.algo}")
        if self.dropout and self.algo in ("ia3", "full"):
            raise ValueError(f"dropout is defined for lora/locon, loha and lokr, not {self.algo}")
        if self.rank_dropout and self.algo == "ia3":
            raise ValueError("rank dropout is defined for lora/locon, loha, lokr and full, not ia3")
        if self.factor_dtype not in (None, torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"factor_dtype must be a float dtype, got {self.factor_dtype}")

    @property
    def trains_kxk_convs(self) -> bool:
        return self.conv_rank != 0

    def rank_alpha(self, spec: LayerSpec) -> tuple[int, float | None]:
        if spec.is_kxk:
            rank = self.rank if self.conv_rank is None else self.conv_rank
            alpha = self.alpha if self.conv_alpha is None else self.conv_alpha
            return rank, alpha
        return self.rank, self.alpha

    def network_args(self) -> dict[str, str]:
        """kohya's ``ss_network_args``: every value a string, booleans only when set (never "False",
        which kohya's un-parsed ``decompose_both`` would read as True)."""
        conv_rank = self.rank if self.conv_rank is None else self.conv_rank
        conv_alpha = self.alpha if self.conv_alpha is None else self.conv_alpha
        args = {"algo": self.algo, "conv_dim": str(conv_rank), "conv_alpha": number_text(conv_alpha)}
        for key, value in (("dropout", self.dropout), ("rank_dropout", self.rank_dropout),
                           ("module_dropout", self.module_dropout)):
            if value:
                args[key] = number_text(value)
        flags = {"use_tucker": self.use_tucker, "dora_wd": self.dora, "decompose_both": self.decompose_both,
                 "full_matrix": self.full_matrix, "unbalanced_factorization": self.unbalanced_factorization,
                 "rank_dropout_scale": self.rank_dropout_scale}
        args.update({k: "True" for k, v in flags.items() if v})
        if self.dora:
            args["wd_on_output"] = str(self.dora_on_output)
        if self.algo == "lokr" and self.factor != -1:
            args["factor"] = str(self.factor)
        return args



def number_text(value) -> str:
    """A number as kohya's metadata writes it: 4 not 4.0, 0.5 as is; None as "None"."""
    if value is None:
        return "None"
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _common(config: AdapterConfig) -> dict:
    return {"dropout": config.dropout, "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout,
            "rank_dropout_scale": config.rank_dropout_scale, "bypass": config.bypass,
            "factor_dtype": config.factor_dtype}


def build_module(target: Target, config: AdapterConfig, generator: torch.Generator | None = None) -> TrainModule:
    """A freshly initialised trainable module for one layer (the seeds' init: ΔW starts at 0)."""
    spec = LayerSpec.of(target.layer)
    rank, alpha = config.rank_alpha(spec)
    dora = config.dora_on_output if config.dora else None
    common = _common(config)
    if config.algo in ("lora", "locon"):
        module = TrainLoCon(target.name, target.layer, TrainLoCon.plan(spec, rank, config.use_tucker), alpha,
                            dora_on_output=dora, **common)
        module.algo = config.algo
    elif config.algo == "loha":
        module = TrainLoHa(target.name, target.layer, TrainLoHa.plan(spec, rank, config.use_tucker), alpha,
                           dora_on_output=dora, **common)
    elif config.algo == "lokr":
        plan = TrainLoKr.plan(spec, rank, config.use_tucker, config.factor, config.decompose_both,
                              config.full_matrix, config.unbalanced_factorization)
        if "lokr_w2_b" not in plan and "lokr_w1_b" not in plan:
            alpha = rank  # LyCORIS: both blocks full -> alpha = dim, scale 1
        module = TrainLoKr(target.name, target.layer, plan, alpha, dora_on_output=dora, **common)
    elif config.algo == "ia3":
        on_input = any(re.fullmatch(p, target.name) or re.fullmatch(p, target.path) for p in config.ia3_on_input)
        module = TrainIA3(target.name, target.layer, TrainIA3.plan(spec, on_input), on_input=on_input, **common)
    else:
        cls = MODULE_CLASSES["full"]
        module = cls(target.name, target.layer, cls.plan(spec, target.layer.bias is not None), None, **common)
    module.reset_parameters(generator)
    return module


def module_from_file(target: Target, file_module, config: AdapterConfig) -> TrainModule:
    """A trainable module that continues from a loaded adapter module (``load_adapter``)."""
    algo = file_module.algo
    cls = MODULE_CLASSES.get(algo)
    if cls is None:
        raise ValueError(f"{target.name}: cannot continue training a {algo} module")
    tensors = {role: file_module.source[key] for role, key in file_module.keys.items()
               if role not in ("alpha", "dora_scale", "on_input")}
    shapes = {role: tuple(t.shape) for role, t in tensors.items()}
    common = _common(config)
    if cls is TrainIA3:
        module = TrainIA3(target.name, target.layer, shapes, on_input=file_module.on_input, **common)
    else:
        dora = None
        if getattr(file_module, "dora", False):
            dora = file_module.dora_axis == "out"
        module = cls(target.name, target.layer, shapes, file_module.alpha, dora_on_output=dora, **common)
        if dora is not None:
            tensors["dora_scale"] = file_module.source[file_module.keys["dora_scale"]]
    if cls is TrainLoCon:
        module.algo = file_module.algo  # "lora" or "locon", as the loader named it
    module.load_tensors(tensors)
    return module


__all__ = ["ALGORITHMS", "AdapterConfig", "TrainLoCon", "TrainLoHa", "TrainLoKr", "build_module", "module_from_file"]
