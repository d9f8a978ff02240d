"""Merge adapters of any algorithm into one LoRA/LoCon by per-module truncated SVD.

For every model weight the inputs touch, the exact strength-scaled sum Σ sᵢ·ΔWᵢ is
rebuilt in float32 (so a strength is applied once, never squared), then factored at
the requested rank (``lycoris_core.svd``).  Modules that name the same layer in
different ways are aligned through the key map: every adapter is mapped onto the
ComfyUI key space of its architecture (``keymap.canonical``) and the deltas are summed
per weight key.  Output modules use the family's kohya names (``lora_unet_…``,
``lora_te_…``/``lora_te1_``/``lora_te2_``; for a DiT ``lora_unet_<ComfyUI name>`` and
``lora_te1_``/``lora_te2_``/``text_encoders.<part>.transformer.…`` for its text encoders)
and store ``alpha = rank`` (scale 1), so the factors carry the whole delta.

A DiT output module is ComfyUI's *fused* weight, as kohya names it (``img_attn.qkv``,
``single_blocks.N.linear1``, SD3 ``attn.qkv``): split-trained modules (diffusers ``to_q``,
``to_k``, ``to_v``, ``proj_mlp``) are summed into their rows of it, zero elsewhere, and the
whole fused delta is factored, so one rank covers all its rows (a rank-r to_q/to_k/to_v
triple needs rank 3r to be kept exactly; ``--mode energy`` picks it).

``convert`` (one adapter, e.g. LoHa/LoKr → LoRA) and ``resize`` (shrink a rank) are
merges of a single input.  Algorithms whose delta depends on the base weight (IA³,
GLoRA, OFT/BOFT, DoRA) need ``base``; without it they are skipped with that reason.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..adapter import load_adapter
from ..algorithms.piece import RowPiece
from ..errors import ArchitectureMismatchError, WeightRangeError
from ..io.reader import SafetensorsSource
from ..io.writer import save_tensors
from ..keymap import detect_model
from ..keymap.canonical import CanonicalWeight, canonical_weights, comfy_layout, comfy_shapes, stored_in
from ..keymap.detect import identify_adapter
from ..keymap.layout import ModelLayout
from ..numerics.checks import is_finite
from ..patch import AdapterSpec, accumulate, build_plan
from .common import (
    SAVE_DTYPES,
    MergeError,
    MergeInput,
    Progress,
    ProgressFn,
    check_files,
    check_rank,
    check_write,
    footer,
    match_rows,
    skip_row,
)
from .svd import truncate, tucker2

__all__ = ["MergeError", "MergeInput", "MergeReport", "merge_adapters", "save_lora"]


# ---- reports --------------------------------------------------------------------------------

@dataclass
class MergeReport:
    rows: list[dict] = field(default_factory=list)
    total_error: float = 0.0  # relative Frobenius error over every merged module
    total_kept_energy: float = 1.0
    path: str | None = None
    size_bytes: int = 0
    dry_run: bool = False
    match_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0
    title: str = "merge"

    @property
    def merged(self) -> list[dict]:
        return [r for r in self.rows if not r["skipped"]]

    @property
    def skipped(self) -> list[dict]:
        return [r for r in self.rows if r["skipped"]]

    def to_text(self) -> str:
        lines = [f"{self.title}: {len(self.merged)} modules written, {len(self.skipped)} skipped"]
        lines += self.match_lines
        width = max((len(r["module"]) for r in self.rows), default=10)
        lines.append(f"{'module':<{width}}  rank  kept_energy  rel_error  method")
        for r in self.rows:
            if r["skipped"]:
                lines.append(f"{r['module']:<{width}}  skipped: {r['skipped']}")
            else:
                lines.append(f"{r['module']:<{width}}  {r['rank']:>4}  {r['kept_energy']:>11.6f}  "
                             f"{r['rel_error']:>9.3e}  {r.get('method', '')}")
        lines.append(f"total: kept energy {self.total_kept_energy:.6f}, relative error {self.total_error:.3e}")
        return "\n".join(lines + footer(self))


class ErrorTotals:
    def __init__(self):
        self.err_sq = 0.0
        self.total_sq = 0.0
        self.kept_sq = 0.0

    def add(self, total_sq: float, rel_error: float, kept: float) -> None:
        self.total_sq += total_sq
        self.err_sq += total_sq * rel_error ** 2
        self.kept_sq += total_sq * kept

    def fill(self, report) -> None:
        report.total_error = math.sqrt(self.err_sq / self.total_sq) if self.total_sq else 0.0
        report.total_kept_energy = self.kept_sq / self.total_sq if self.total_sq else 1.0


def record(report, totals: ErrorTotals, tensors: dict, name: str, factorized, dry_run: bool) -> dict:
    """One factorized module (``factorize``'s result) into the report, the error totals and,
    unless this is a dry run, the output tensors; returns its report row."""
    module_tensors, row, total_sq = factorized
    row["module"] = name
    report.rows.append(row)
    totals.add(total_sq, row["rel_error"], row["kept_energy"])
    if not dry_run:
        tensors.update({f"{name}.{suffix}": t for suffix, t in module_tensors.items()})
    return row


# ---- names and block weights ---------------------------------------------------------------

# ---- gathering deltas ------------------------------------------------------------------------

@dataclass
class Summand:
    """One module's share of one merged weight: the adapter it came from and its strength."""

    adapter_index: int
    module_name: str
    module: object
    strength: float
    target: object  # keymap Target
    patch: object = None  # the patch engine's Contribution, when the architecture is known


def load_inputs(inputs: list[MergeInput]):
    if not inputs:
        raise MergeError("no adapters given")
    return [load_adapter(i.path) for i in inputs]


def merge_model(adapters, base_shapes=None) -> ModelLayout | None:
    """The model a merge sums on: the base checkpoint's, or the adapters' architecture (None: unknown).

    Adapters of one DiT family agree when at most one published variant is named among them
    (a Flux LoRA that could be dev or schnell goes with a flux-dev one).
    """
    if base_shapes is not None:
        layout = detect_model(base_shapes)
        if layout.arch == "unknown":
            raise ArchitectureMismatchError("the base checkpoint is not a model the key map knows "
                                            "(SD1/SD2/SDXL, or a DiT diffusion model or checkpoint)")
        return layout
    found = {a.name: identify_adapter(a.modules, metadata=a.metadata) for a in adapters}
    known = {name: (arch, guess) for name, (arch, guess) in found.items() if arch != "unknown"}
    if not known:
        return None  # merged by module name, as the files spell them
    families = {(guess.family if guess is not None and arch == guess.name else arch) for arch, guess in known.values()}
    named = {arch for arch, guess in known.values()
             if guess is None or arch != guess.name or arch in _published(guess.family)}
    if len(families) > 1 or len(named) > 1:
        raise ArchitectureMismatchError(
            "adapters are for different architectures: "
            + ", ".join(f"{os.path.basename(k)}: {v[0]}" for k, v in found.items()))
    arch = named.pop() if named else next(iter(known.values()))[0]
    return comfy_layout(arch)


def _published(family: str) -> tuple[str, ...]:
    from ..keymap import FAMILIES

    return tuple(FAMILIES[family].variants)


def gather(adapters, inputs: list[MergeInput], shapes, rows: list[dict],
           match_lines: list[str]) -> dict[str, list[Summand]]:
    """weight key -> contributions, mapping every adapter onto ``shapes`` with the patch engine's
    rules (``patch.build_plan``: UNet strength x block weight, CLIP strength x BASE weight)."""
    specs = [AdapterSpec(a, i.strength_unet, i.strength_clip, i.blocks) for a, i in zip(adapters, inputs)]
    plan = build_plan(specs, shapes)
    index_of = {id(a): n for n, a in enumerate(adapters)}
    owner = {id(m): a for a in adapters for m in a.modules.values()}
    name_of = {id(m): name for a in adapters for name, m in a.modules.items()}
    for adapter, spec, report in zip(adapters, inputs, plan.reports):
        match_lines.append(f"{os.path.basename(spec.path)}: {report.summary()}")
        rows += match_rows(adapter, report)
    groups: dict[str, list[Summand]] = {}
    for key, contribs in plan.contributions.items():
        for c in contribs:
            whole = c.module.module if isinstance(c.module, RowPiece) else c.module  # a piece: its module's file
            adapter = owner[id(whole)]
            name = name_of[id(whole)]
            if c.bias:
                rows.append(skip_row(name + " (bias)", "bias delta dropped: LoRA has no bias", adapter))
                continue
            groups.setdefault(key, []).append(Summand(index_of[id(adapter)], name, c.module, c.strength,
                                                      c.target, c))
    return groups


@dataclass(frozen=True)
class NameTarget:
    """Stand-in for a keymap Target when no architecture is known: the module is its own key."""

    weight_key: str
    shape: tuple
    part: str
    block: str | None = None
    bias_key: str | None = None
    rows: tuple | None = None
    transposed: bool = False


def gather_by_name(adapters, inputs, rows, match_lines) -> dict[str, list[Summand]]:
    """Unknown architecture: modules are summed when they have the same name and shape."""
    groups: dict[str, list[Summand]] = {}
    for index, (adapter, spec) in enumerate(zip(adapters, inputs)):
        if spec.blocks:
            raise MergeError("block weights need a known architecture (SD1/SD2/SDXL or a DiT family)")
        match_lines.append(f"{os.path.basename(spec.path)}: unknown architecture, "
                           f"{len(adapter.modules)} modules kept under their own names")
        for key, reason in adapter.unknown_reasons.items():
            rows.append(skip_row(key, f"unknown key: {reason}", adapter))
        for name, module in adapter.modules.items():
            is_te = name.startswith(("lora_te", "text_encoder", "te_", "te1", "te2"))
            strength = spec.strength_clip if is_te else spec.strength_unet
            shape = tuple(module.shape)
            if module.algo == "ia3" or not shape:
                rows.append(skip_row(name, f"{module.describe()} needs a known architecture", adapter))
                continue
            have = groups.get(name)
            if have and tuple(have[0].target.shape) != shape:
                rows.append(skip_row(name, f"shape {shape} differs from another input's {have[0].target.shape}",
                                  adapter))
                continue
            target = NameTarget(name, shape, "te" if is_te else "unet")
            groups.setdefault(name, []).append(Summand(index, name, module, strength, target))
    return groups


def summed_delta(contribs: list[Summand], weight: torch.Tensor | None, shape) -> torch.Tensor:
    """Σ sᵢ·ΔWᵢ in float32 for one weight (``weight`` is the base weight, when known)."""
    total = torch.zeros(shape, dtype=torch.float32)
    if contribs and contribs[0].patch is not None:  # through the patch kernel, as the patcher adds it
        base = weight if weight is not None else torch.zeros(shape, dtype=torch.float32)
        return accumulate(total, base, [c.patch for c in contribs])
    for c in contribs:
        if c.strength == 0:
            continue
        d = c.module.strength_delta(weight, c.strength)
        total += d.reshape(shape)
    if not is_finite(total):  # finite deltas whose sum overflows float32
        raise WeightRangeError(f"{contribs[0].module_name}: the summed delta is not finite")
    return total


def summed_factors(contribs: list[Summand], shape) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U, V) with U @ V == Σ sᵢ·ΔWᵢ flattened to (out, in·k·k), strengths folded into U,
    or None when some contribution has no low-rank factors (Tucker, DoRA, full, weight-dependent)."""
    us, vs = [], []
    for c in contribs:
        if c.strength == 0:
            continue
        target = c.patch.target if c.patch is not None else c.target
        if c.module.uses_weight or not c.module.linear_in_strength:
            return None
        factors = c.module.low_rank_factors()
        if factors is None:
            return None
        u, v = factors
        if getattr(target, "transposed", False):
            u, v = v.mT, u.mT
        rows = getattr(target, "rows", None)
        if rows is not None:  # a slice of a fused weight: U is zero outside its rows
            if u.shape[0] != rows[1]:
                return None
            full = torch.zeros((shape[0], u.shape[1]), dtype=u.dtype)
            full[rows[0]:rows[0] + rows[1]] = u
            u = full
        if u.shape[0] != shape[0] or v.shape[1] != math.prod(shape[1:]):
            return None
        us.append(u * float(c.strength))
        vs.append(v)
    if not us:
        return None
    return torch.cat(us, 1), torch.cat(vs, 0)


# ---- factoring -------------------------------------------------------------------------------

def factorize(delta: torch.Tensor, rank_mode: str, rank_param: float, conv_tucker: bool, svd: str,
              save_dtype: torch.dtype = torch.float32, factors: tuple[torch.Tensor, torch.Tensor] | None = None):
    """LoRA/LoCon tensors (suffix -> tensor) for one delta, and its stats row.

    Errors are measured after rounding the factors to ``save_dtype``, so they are the
    errors of the file as written.  ``factors`` (U, V with U @ V == delta flattened) let
    ``svd="auto"`` use the exact factored solver (not for Tucker-2 output).
    """
    shape = tuple(delta.shape)
    total_sq = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
    out_ch = shape[0]
    kernel = shape[2:]
    conv = len(shape) > 2
    big_kernel = conv and math.prod(kernel) > 1
    if big_kernel and conv_tucker:
        t = tucker2(delta, rank_mode, rank_param, svd)
        up = t.up.reshape(out_ch, -1, 1, 1).to(save_dtype)
        down = t.down.reshape(t.rank, shape[1], 1, 1).to(save_dtype)
        mid = t.mid.to(save_dtype)
        tensors = {"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down}
        rebuilt = torch.einsum("ab...,oa,bi->oi...", mid.float(), up.float().flatten(1), down.float().flatten(1))
        rank, method, fallback = t.rank, t.method, t.fallback
    else:
        m = delta.reshape(out_ch, -1)
        t = truncate(m, rank_mode, rank_param, svd, factors=factors)
        up, down = t.up.to(save_dtype), t.down.to(save_dtype)
        rebuilt = up.float() @ down.float()
        if conv:
            up = up.reshape(out_ch, t.rank, *([1] * len(kernel)))
            down = down.reshape(t.rank, *shape[1:])
        tensors = {"lora_up.weight": up.contiguous(), "lora_down.weight": down.contiguous()}
        rank, method, fallback = t.rank, t.method, t.fallback
    tensors["alpha"] = torch.tensor(float(rank), dtype=save_dtype)
    err_sq = float(torch.linalg.vector_norm(delta - rebuilt.reshape(shape), dtype=torch.float64) ** 2)
    rel = math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0
    kept = max(0.0, 1.0 - rel * rel) if total_sq > 0 else 1.0
    row = {"rank": rank, "kept_energy": kept, "rel_error": rel, "skipped": "",
           "method": method + (" (fallback)" if fallback else ""), "shape": shape}
    return tensors, row, total_sq


# ---- the merge --------------------------------------------------------------------------------

def _base_reader(base: str):
    check_files(base, what="base checkpoint")
    return SafetensorsSource(base)


@dataclass
class _Layout:
    """Which weight keys a merge writes, in output order, and each one's canonical weight."""

    groups: dict[str, list[Summand]]
    keys: list[str]
    weights: dict[str, CanonicalWeight | None]  # None: unknown architecture, the module is its own key
    base: ModelLayout | None = None  # the base checkpoint's own layout, when there is a base


def _layout(adapters, inputs, model: ModelLayout | None, base_layout, report: MergeReport) -> _Layout:
    if model is None:
        groups = gather_by_name(adapters, inputs, report.rows, report.match_lines)
        return _Layout(groups, list(groups), dict.fromkeys(groups))
    # every adapter is summed in the ComfyUI key space: one weight per module (fused where ComfyUI fuses)
    weights = canonical_weights(model)
    groups = gather(adapters, inputs, comfy_shapes(model), report.rows, report.match_lines)
    order = {key: i for i, key in enumerate(weights)}
    return _Layout(groups, sorted(groups, key=lambda k: order.get(k, 1 << 30)),
                   {k: weights.get(k) for k in groups}, base_layout)


def _usable(summands: list[Summand], weight: CanonicalWeight | None, shape, adapters, has_base: bool,
            rows: list[dict]) -> list[Summand]:
    """The summands a LoRA can carry; the others become report rows with the reason."""
    usable = []
    for c in summands:
        adapter = adapters[c.adapter_index]
        if c.module.uses_weight and not has_base:
            rows.append(skip_row(c.module_name, f"{c.module.describe()} needs the base weight (pass --base)", adapter))
        elif len(shape) < 2:
            rows.append(skip_row(c.module_name, f"{c.module.describe()} on a 1-D weight (norm) cannot be a LoRA",
                                 adapter))
        elif weight is not None and weight.skip and weight.skip.startswith("raw"):
            rows.append(skip_row(c.module_name, f"{c.module.describe()} on a {weight.skip}", adapter))
        else:
            if c.module.has_bias and c.patch is None:
                rows.append(skip_row(c.module_name + " (bias)", "bias delta dropped: LoRA has no bias", adapter))
            usable.append(c)
    return usable


def merge_adapters(inputs: list[MergeInput], out_path: str | None, *, rank_mode: str = "fixed",
                   rank_param: float = 16, conv_tucker: bool = False, svd: str = "auto",
                   base: str | None = None, dry_run: bool = False, overwrite: bool = False,
                   progress: ProgressFn | None = None, save_dtype: str = "fp32",
                   title: str = "merge") -> MergeReport:
    """Merge ``inputs`` into one LoRA/LoCon adapter at ``out_path`` (see the module docstring)."""
    started = time.perf_counter()
    check_rank(rank_mode, [rank_param], save_dtype, svd)
    check_write(out_path, dry_run, overwrite, [i.path for i in inputs] + ([base] if base else []))

    adapters = load_inputs(inputs)
    base_src = _base_reader(base) if base else None
    base_shapes = {k: base_src.shape(k) for k in base_src} if base_src else None
    model = merge_model(adapters, base_shapes)
    report = MergeReport(dry_run=dry_run, title=title)
    layout = _layout(adapters, inputs, None if model is None else comfy_layout(model),
                     model if base_shapes is not None else None, report)
    totals = ErrorTotals()
    tensors: dict[str, torch.Tensor] = {}
    bar = Progress(len(layout.keys), f"{title}: factoring", progress, unit="module")
    try:
        for key in layout.keys:
            canonical = layout.weights[key]
            out_name = key if canonical is None else canonical.name
            shape = tuple(layout.groups[key][0].target.shape) if canonical is None else canonical.shape
            usable = _usable(layout.groups[key], canonical, shape, adapters, base_src is not None, report.rows)
            if usable:
                weight = None
                if base_src is not None and any(c.module.uses_weight for c in usable):
                    weight = read_weight(base_src, layout.base, canonical)
                row = _merge_one(usable, weight, shape, out_name, rank_mode, rank_param, conv_tucker, svd,
                                 save_dtype, report, totals, tensors, dry_run)
                if row is not None:
                    report.rows.append(row)
            bar.update()
    finally:
        bar.close()
        for a in adapters:
            a.close()
    totals.fill(report)
    if not report.merged:
        raise MergeError("nothing to merge: every module was skipped\n" + report.to_text())
    if not dry_run:
        save_lora(report, tensors, out_path, overwrite, {
            "command": title, "inputs": [i.recipe() for i in inputs], "rank_mode": rank_mode,
            "rank_param": rank_param, "conv_tucker": conv_tucker, "svd": svd,
            "base": os.path.basename(base) if base else None, "save_dtype": save_dtype,
        })
    report.seconds = time.perf_counter() - started
    return report


def _merge_one(usable, weight, shape, out_name, rank_mode, rank_param, conv_tucker, svd, save_dtype,
               report, totals, tensors, dry_run) -> dict | None:
    """Sum and factor one weight's summands into ``tensors``; a skip row when there is nothing to factor."""
    try:
        delta = summed_delta(usable, weight, shape)
    except WeightRangeError:
        return skip_row(out_name, "delta is not finite")
    if float(delta.abs().max()) == 0:
        return skip_row(out_name, "delta is zero (strength 0 or cancelled)")
    factors = summed_factors(usable, shape) if svd == "auto" else None
    factorized = factorize(delta, rank_mode, rank_param, conv_tucker, svd, SAVE_DTYPES[save_dtype], factors)
    record(report, totals, tensors, out_name, factorized, dry_run)["sources"] = len(usable)
    return None


def save_lora(report: MergeReport, tensors: dict[str, torch.Tensor], out_path: str, overwrite: bool,
              recipe: dict) -> None:
    """Write a merged or extracted LoRA (temp file, rename, read back) with kohya's network
    metadata and the recipe; put the path and size in ``report``."""
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(r["rank"] for r in report.merged)),
        "ss_network_alpha": "rank (scale 1)",
        "lycoris_core_recipe": json.dumps({"tool": f"lycoris_core {__version__}", **recipe,
                                           "alpha": "alpha = rank, scale 1"}),
    }
    written = save_tensors(tensors, out_path, meta, overwrite=overwrite)
    report.path = str(written)
    report.size_bytes = os.path.getsize(written)


def read_weight(source, model: ModelLayout, weight: CanonicalWeight, cache: dict | None = None) -> torch.Tensor:
    """One canonical weight, float32, read from a file in ``model``'s key space: a whole tensor, a row
    slice of a fused one, a transposed one, or assembled from several (a diffusers folder's q/k/v).

    ``cache`` keeps the last fused tensor read (q, k and v of one fused weight come in a row).
    """
    found = stored_in(model, weight)
    if found is None or any(p.key not in source for p in found[0]):
        raise MergeError(f"{model.describe()} has no weight for {weight.part} {weight.local}")
    pieces, transposed = found

    def tensor(key):
        if cache is None:
            return source[key]
        if key not in cache:
            cache.clear()
            cache[key] = source[key]
        return cache[key]

    if len(pieces) == 1 and pieces[0].start == 0:
        p = pieces[0]
        w = tensor(p.key)
        if transposed:
            w = w.T
        elif p.key_start or p.rows != w.shape[0]:
            w = w[p.key_start:p.key_start + p.rows]
        return w.to(torch.float32).contiguous()
    out = torch.empty(weight.shape, dtype=torch.float32)
    for p in pieces:
        out[p.start:p.start + p.rows].copy_(tensor(p.key)[p.key_start:p.key_start + p.rows])
    return out


def convert_adapter(path: str, out_path: str | None, **kwargs) -> MergeReport:
    """One adapter of any algorithm → LoRA/LoCon (a merge of a single input)."""
    kwargs.setdefault("title", "convert")
    return merge_adapters([MergeInput(path)], out_path, **kwargs)


def resize_adapter(path: str, out_path: str | None, **kwargs) -> MergeReport:
    """Shrink an adapter's rank (a merge of a single input at a lower rank)."""
    kwargs.setdefault("title", "resize")
    return merge_adapters([MergeInput(path)], out_path, **kwargs)
