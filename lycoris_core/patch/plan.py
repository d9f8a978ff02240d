"""A stack of adapters mapped onto one model: which contributions land on which weight key.

``build_plan`` maps every adapter through the key map (``keymap.map_adapter``), resolves
block weights, and records per weight (or bias) key each module's contribution at its
effective strength: UNet strength × block weight for the diffusion model, CLIP strength ×
BASE weight for the text encoders.  Pure bookkeeping: no tensor is read here; a refusal
(another architecture, bad block weights) happens before anything is patched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..adapter import Adapter
from ..algorithms import AdapterModule
from ..errors import ArchitectureMismatchError, BlockWeightError, LycorisError
from ..keymap import MatchReport, Target, is_text_part, map_adapter
from .blocks import BlockWeights, parse_block_weights
from .cache import DeltaSource
from .kernel import accumulate, patched_value


@dataclass
class AdapterSpec:
    """One adapter in a stack, with its strengths and optional block weights."""

    adapter: Adapter
    strength_unet: float = 1.0
    strength_clip: float = 1.0
    blocks: BlockWeights | str | Sequence[float] | None = None

    def __post_init__(self):
        self.blocks = parse_block_weights(self.blocks)


@dataclass(frozen=True, eq=False)
class Contribution:
    """One module's share of one weight (or bias) key, at its effective strength."""

    module: AdapterModule
    target: Target
    strength: float
    bias: bool = False


@dataclass
class PatchPlan:
    """A stack of adapters mapped onto one model: contributions per weight/bias key."""

    specs: list[AdapterSpec]
    reports: list[MatchReport]
    contributions: dict[str, list[Contribution]] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self.contributions)

    def add(self, module: AdapterModule, target: Target, strength: float) -> None:
        """One module's contribution to ``target``'s weight key (and bias key, when it has a bias delta)."""
        self.contributions.setdefault(target.weight_key, []).append(Contribution(module, target, strength))
        if module.has_bias and target.bias_key is not None:
            self.contributions.setdefault(target.bias_key, []).append(Contribution(module, target, strength, bias=True))

    def __contains__(self, key: str) -> bool:
        return key in self.contributions

    def delta(self, key: str, base: torch.Tensor, source: DeltaSource | None = None) -> torch.Tensor:
        """float32 sum of every contribution to ``key`` (patched - original, before rounding)."""
        total = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        return accumulate(total, base, self.contributions[key], source, key=key)

    def patched(self, key: str, base: torch.Tensor, source: DeltaSource | None = None) -> torch.Tensor:
        """The patched tensor for ``key`` in base's dtype (fp8: seeded stochastic rounding)."""
        return patched_value(base, self.contributions.get(key, ()), key, source)

    def summary(self) -> list[str]:
        return [f"{spec.adapter.name}: {report.summary()}" for spec, report in zip(self.specs, self.reports)]


def contribution_strength(spec: AdapterSpec, target: Target, weights: dict[str, float] | None) -> float:
    """UNet strength x block weight, or CLIP strength x the text encoder's weight; modules outside
    blocks take plain strength.

    The UNet (diffusion-model) strength applies to every non-text part, the CLIP strength to every
    text encoder. An SD text encoder's weight is BASE; a DiT's is its own slot (CLIP, T5, ...),
    whose block ID on the target is the part name (clip_l, t5xxl, ...).
    """
    if not is_text_part(target.part):
        if weights is None or target.block is None:
            return spec.strength_unet
        return spec.strength_unet * weights.get(target.block, 0.0)
    text_weight = 1.0 if weights is None else weights.get(target.block or "BASE", weights.get("BASE", 0.0))
    return spec.strength_clip * text_weight


def build_plan(specs: Sequence[AdapterSpec], shapes: Mapping[str, tuple[int, ...]],
               allow_partial: bool = False) -> PatchPlan:
    """Map each adapter onto ``shapes`` (key -> shape) and collect contributions per key.

    Raises ``ArchitectureMismatchError`` for an adapter made for another model, and
    ``BlockWeightError`` for block weights that do not fit the model, before anything changes.
    """
    specs = list(specs)
    plan = PatchPlan(specs, [])
    for spec in specs:
        try:
            report = map_adapter(spec.adapter.modules, shapes, allow_partial=allow_partial)
            weights = spec.blocks.resolve(report.model) if spec.blocks is not None else None
        except (ArchitectureMismatchError, BlockWeightError) as exc:
            raise type(exc)(f"{spec.adapter.name}: {exc}") from exc
        plan.reports.append(report)
        for name, target in report.targets.items():
            plan.add(spec.adapter.modules[name], target, contribution_strength(spec, target, weights))
        for name, pieces in report.pieces.items():
            module = spec.adapter.modules[name]
            if not module.row_wise:
                raise LycorisError(f"{spec.adapter.name}: {name} is {module.describe()}, whose delta cannot be "
                                   "split over this model's weights (it needs the whole fused weight); "
                                   "nothing was applied")
            for target in pieces:
                piece = module if target.source_rows is None else module.row_piece(*target.source_rows)
                plan.add(piece, target, contribution_strength(spec, target, weights))
    return plan
