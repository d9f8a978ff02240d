"""The one description of an adapter that every front end shows.

``describe`` gathers the facts once (algorithms, ranks, alpha and where it came from,
parameters against the dense weights, detected architecture and the blocks it
touches, trigger words, metadata); ``summary_lines`` renders them as text for the
CLI and the Info node; the panel and the JSON route render the same facts their way.
``block_norms`` is the per-block ‖ΔW‖ analysis behind the panel's chart.

Reads headers and, for ``block_norms`` only, the factors; never loads a model.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..keymap import block_order, map_adapter, state_shapes
from ..keymap.detect import identify_adapter
from ..keymap.dit.detect import FAMILY_LABEL
from .load import Adapter
from .metadata import base_model, preview_image, trigger_words

# metadata fields worth a line of their own; the rest are counted
HEADLINE_METADATA = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_sd_model_name", "ss_output_name", "modelspec.architecture", "modelspec.title",
    "modelspec.trigger_phrase", "sshs_model_hash",
)
METADATA_VALUE_LIMIT = 500


def _label(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _counts(counter: Counter) -> dict[str, int]:
    """Counter -> ordered dict, most frequent first (numbers as compact strings)."""
    return {_label(k): v for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def _short(value: str, limit: int = METADATA_VALUE_LIMIT) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


@dataclass
class AdapterSummary:
    """Everything shown about one adapter, as plain JSON-ready values."""

    name: str
    file_size: int | None
    modules: int
    parameters: int
    dense_parameters: int
    algorithms: dict[str, int]
    ranks: dict[str, int]
    alpha: dict[str, int]
    alpha_source: str | None
    base_model: str | None
    architecture: str
    parts: dict[str, dict[str, int]]
    blocks: list[str]
    module_blocks: dict[str, str] = field(repr=False)
    family: str | None = None  # sd1/sd2/sdxl, or the DiT family (flux, sd3, wan, qwen-image, ...)
    variant: str | None = None  # the published DiT variant the modules pin (flux-dev, wan2.1-i2v-14b), if any
    variants: list[str] = field(default_factory=list)  # DiT variants the modules fit equally well
    row_pieces: int = 0  # modules spread over several weights of the ComfyUI model (diffusers norm_out, ...)
    split_qkv: int = 0  # kohya split_qkv modules, applied at their trained scale
    trigger_words: list[str] = field(default_factory=list)
    unknown_keys: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    metadata_fields: int = 0
    has_preview: bool = False

    def as_json(self) -> dict:
        out = asdict(self)
        del out["module_blocks"]
        return out


_SUMMARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def describe(adapter: Adapter, name: str | None = None) -> AdapterSummary:
    """The facts about ``adapter`` (cached per adapter object: the cache shares objects)."""
    cached = _SUMMARIES.get(adapter)
    if cached is None:
        cached = _SUMMARIES[adapter] = _describe(adapter)
    if name is None or name == cached.name:
        return cached
    copy = AdapterSummary(**{**cached.__dict__, "name": name})
    return copy


def _describe(adapter: Adapter) -> AdapterSummary:
    path = adapter.path
    arch, guess = identify_adapter(adapter.modules, metadata=adapter.metadata)
    blocks, parts, module_blocks, pieces, split = [], {}, {}, 0, 0
    family = variant = None
    variants: list[str] = []
    if arch != "unknown":
        dit = guess is not None and arch == guess.name
        family = FAMILY_LABEL[guess.family] if dit else arch
        if dit:
            variants = list(guess.variants)
            variant = arch if arch in variants else None
        # mapped onto the full-size model of that architecture in ComfyUI's key space
        report = map_adapter(adapter.modules, state_shapes(arch, "comfy"), allow_partial=True,
                             metadata=adapter.metadata)
        blocks = report.blocks_touched()
        parts = {part: {"matched": m, "modules": n} for part, (m, n) in report.counts.items()}
        module_blocks = {name: t.block or "other" for name, t in report.targets.items()}
        module_blocks.update({name: ts[0].block or "other" for name, ts in report.pieces.items()})
        pieces, split = len(report.pieces), len(report.split_qkv)
    modules = adapter.modules.values()
    return AdapterSummary(
        name=os.path.basename(adapter.name),
        file_size=os.path.getsize(path) if path else None,
        modules=len(adapter.modules),
        parameters=adapter.num_params,
        dense_parameters=sum(m.dense_params for m in modules),
        algorithms=_counts(adapter.algorithms()),
        ranks=_counts(adapter.ranks()),
        alpha=_counts(adapter.alphas()),
        alpha_source=adapter.alpha_source,
        base_model=base_model(adapter.metadata),
        architecture=arch,
        parts=parts,
        blocks=blocks,
        module_blocks=module_blocks,
        family=family,
        variant=variant,
        variants=variants,
        row_pieces=pieces,
        split_qkv=split,
        trigger_words=trigger_words(adapter.metadata, path),
        unknown_keys=len(adapter.unknown_reasons),
        metadata={k: _short(v) for k, v in sorted(adapter.metadata.items()) if k in HEADLINE_METADATA},
        metadata_fields=len(adapter.metadata),
        has_preview=preview_image(path) is not None,
    )


def architecture_text(s: AdapterSummary) -> str:
    """The architecture as one phrase: 'sdxl', 'flux, variant flux-dev', 'wan (fits wan-t2v-14b, ...)'."""
    if s.family is None or s.family == s.architecture and not s.variants:
        return s.architecture
    if s.variant:
        return f"{s.family}, variant {s.variant}"
    if s.variants:
        return f"{s.family} (variant not pinned by the modules; fits {', '.join(s.variants)})"
    return s.family


def _counter_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "-"


def summary_lines(adapter: Adapter, all_metadata: bool = False, *, unknown_limit: int = 50) -> list[str]:
    """The summary as text: one fact per line (CLI ``inspect`` and the Info node)."""
    s = describe(adapter)
    lines = [
        f"file: {adapter.name}",
        f"modules: {s.modules}  parameters: {s.parameters:,}  dense equivalent: {s.dense_parameters:,}"
        + (f" ({s.parameters / s.dense_parameters:.1%})" if s.dense_parameters else ""),
        f"algorithms: {_counter_line(s.algorithms)}",
        f"ranks: {_counter_line(s.ranks)}",
        f"alpha: {_counter_line(s.alpha)}" + (f" (from {s.alpha_source})" if s.alpha_source else ""),
        f"base model (metadata): {s.base_model or 'not stated'}",
        f"architecture (from module names and shapes): {architecture_text(s)}",
    ]
    if s.parts:
        lines.append("parts: " + ", ".join(f"{p} {v['matched']}/{v['modules']}" for p, v in s.parts.items()))
    if s.row_pieces or s.split_qkv:
        lines.append(f"fused/split layers: {s.row_pieces} modules by row pieces, "
                     f"{s.split_qkv} kohya split_qkv at trained scale")
    if s.blocks:
        lines.append("blocks: " + ", ".join(s.blocks))
    shown = {k: v for k, v in adapter.metadata.items() if all_metadata or k in HEADLINE_METADATA}
    hidden = len(adapter.metadata) - len(shown)
    lines.append(f"metadata: {len(adapter.metadata)} fields" + (f" ({hidden} not shown)" if hidden else ""))
    for key in sorted(shown):
        lines.append(f"  {key}: {_short(shown[key], 200)}")
    reasons = adapter.unknown_reasons
    lines.append(f"unknown keys: {len(reasons)}")
    for key in adapter.unknown_keys[:unknown_limit]:
        lines.append(f"  {key}: {reasons[key]}")
    if len(reasons) > unknown_limit:
        lines.append(f"  ... and {len(reasons) - unknown_limit} more")
    return lines


def module_rows(adapter: Adapter) -> list[dict]:
    """One row per module: algorithm, rank, alpha, shape, parameters against dense, block."""
    blocks = describe(adapter).module_blocks
    rows = []
    for name, m in adapter.modules.items():
        rows.append({
            "module": name,
            "algorithm": m.describe(),
            "rank": m.rank if m.rank is not None else "",
            "alpha": "" if m.alpha is None else round(float(m.alpha), 4),
            "shape": "×".join(str(d) for d in m.shape),
            "params": m.num_params,
            "dense": m.dense_params,
            "share": f"{m.num_params / m.dense_params:.1%}" if m.dense_params else "",
            "block": blocks.get(name, "unmapped"),
        })
    return rows


@dataclass
class BlockNorms:
    """‖ΔW‖ (Frobenius, at strength 1) summed in quadrature per block, and what was left out."""

    norms: dict[str, float]
    modules: dict[str, int]
    needs_weight: int  # modules whose delta depends on the model's weight (not computable here)


def block_norms(adapter: Adapter, progress: Callable[[int, int, str], None] | None = None) -> BlockNorms:
    """Per-block ‖ΔW‖, in the block order of the key map (modules it does not place: "unmapped")."""
    blocks = describe(adapter).module_blocks
    norms: dict[str, float] = {}
    counts: dict[str, int] = {}
    needs_weight = 0
    total = len(adapter.modules)
    for i, (name, m) in enumerate(adapter.modules.items()):
        if m.uses_weight:
            needs_weight += 1
        else:
            block = blocks.get(name, "unmapped")
            norms[block] = math.hypot(norms.get(block, 0.0), float(m.delta().norm()))
            counts[block] = counts.get(block, 0) + 1
        if progress is not None:
            progress(i + 1, total, "ΔW norms")
    order = sorted(norms, key=block_order)
    return BlockNorms({b: norms[b] for b in order}, {b: counts[b] for b in order}, needs_weight)
