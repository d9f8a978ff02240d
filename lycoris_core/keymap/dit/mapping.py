"""Map an adapter onto a DiT model's keys: targets, row slices, row pieces, refusals.

Owns the per-module decision for DiT models. An address (native row segments) is laid
over the model's key space: a whole key, a row slice of a fused key (`to_q` on `qkv`), or
several pieces (a fused kohya `qkv` on a diffusers model, the swapped halves of
`norm_out.linear`). Also detects kohya split_qkv files (sd-scripts#2204) and gives those
modules their trained scale, and refuses an adapter of another family, or of a variant
with layers the model lacks (a Wan 2.1 I2V LoRA on a T2V model), naming both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from ..layout import ModelLayout
from ..report import MatchReport, Shape, Target
from .detect import Guess
from .families import FAMILIES, table
from .names import TEXT, resolve
from .spaces import SPACES, Placement, placement
from .tables import DIFFUSION, Address, Table
from .text import text_shapes


def map_dit(modules: Mapping, shapes: Mapping[str, Shape], layout: ModelLayout, guess: Guess | None) -> MatchReport:
    """The MatchReport of `modules` on a DiT model (or, for an unknown model, on the adapter's own family).

    `guess` is detect.guess_adapter's answer for these modules on this model.
    """
    report = MatchReport(guess.name if guess else "unknown", layout)
    if layout.family is not None:
        family, cfg, spaces, parts = layout.family, layout.config, (layout.space,), layout.parts
    elif guess is not None:  # unrecognised model: the adapter's own table, in every space
        family, cfg, spaces = guess.family, guess.config, SPACES
        parts = frozenset((DIFFUSION, *FAMILIES[guess.family].text)) if shapes else frozenset()
    else:
        report.unmatched.extend(modules)
        report.part_of.update(dict.fromkeys(modules, "other"))
        return report
    t = table(family, cfg)
    places = [placement(family, cfg, s) for s in spaces]
    for name, module in modules.items():
        found, declared = resolve(name, family, cfg)
        if not found:
            if not (set(declared) & parts) and not (declared == (TEXT,) and len(parts - {DIFFUSION})):
                report.not_applicable.append(name)
            else:
                report.unmatched.append(name)
                report.part_of[name] = declared[0]
            continue
        hit = found[0]
        if hit.part not in parts:
            report.not_applicable.append(name)
            continue
        report.part_of[name] = hit.part
        for place in places:
            if hit.part == DIFFUSION:
                outcome = _diffusion(name, module, hit.address, t, place, shapes)
            else:
                outcome = _text(name, module, hit.part, hit.name, FAMILIES[family].text[hit.part], place, shapes)
            if outcome is not None:
                break
        _record(report, name, outcome)
    if layout.family is not None and DIFFUSION in layout.parts:
        _kohya_split_qkv(report, modules, t)
        report.conflict = _conflict(report, modules, layout, guess)
        if report.conflict and guess is not None and guess.family == family:
            report.adapter_arch = _conflicting_variant(report, modules, layout) or report.adapter_arch
    return report


def _record(report: MatchReport, name: str, outcome) -> None:
    if outcome is None:
        report.unmatched.append(name)
    elif isinstance(outcome, tuple) and isinstance(outcome[0], str):
        report.mismatched.append(outcome)
    elif isinstance(outcome, Target):
        report.targets[name] = outcome
    else:
        report.pieces[name] = tuple(outcome)


def _diffusion(name: str, module, address: Address, t: Table, place: Placement, shapes: Mapping):
    """A Target, a list of piece Targets, a mismatch tuple, or None (not in this space)."""
    want = t.shape_of(address)
    stored_shapes = place.keys[DIFFUSION]
    pieces = []
    for native, n_start, s_start, rows in address.segments:
        covered = 0
        for p in place.pieces.get(native, ()):
            lo, hi = max(n_start, p.native_start), min(n_start + rows, p.native_start + p.rows)
            if lo < hi:
                pieces.append((p, p.key_start + lo - p.native_start, s_start + lo - n_start, hi - lo, native))
                covered += hi - lo
        if covered != rows:
            return None
    pieces = _merged(pieces)
    first = pieces[0][0].weight_key
    if any(p.weight_key not in shapes for p, *_ in pieces):
        return None
    for p, *_ in pieces:
        if tuple(shapes[p.weight_key]) != stored_shapes[p.weight_key]:
            return (name, p.weight_key, tuple(module.shape), tuple(shapes[p.weight_key]))
    if not module.fits(want):
        return (name, first, tuple(module.shape), want)
    targets = []
    for p, key_start, src_start, rows, native in pieces:
        stored = stored_shapes[p.weight_key]
        whole_key = key_start == 0 and rows == stored[0]
        shape = stored if whole_key else (rows, *stored[1:])
        bias = p.bias_key if module.has_bias and p.bias_key in shapes else None
        source = None if (src_start == 0 and rows == want[0]) else (src_start, rows)
        targets.append(Target(p.weight_key, bias, None if whole_key else (key_start, rows), shape,
                              t.natives[native].block, DIFFUSION, source_rows=source))
    if len(targets) == 1 and targets[0].source_rows is None:
        return targets[0]
    return targets


def _merged(pieces: list) -> list:
    """Adjacent pieces that continue each other on one key become one (a swap read back through a swap)."""
    out: list = []
    for piece in sorted(pieces, key=lambda x: x[2]):
        if out:
            p, key_start, src_start, rows, native = out[-1]
            q, q_key, q_src, q_rows, _ = piece
            if q.weight_key == p.weight_key and q_key == key_start + rows and q_src == src_start + rows:
                out[-1] = (p, key_start, src_start, rows + q_rows, native)
                continue
        out.append(piece)
    return out


def _text(name: str, module, part: str, hf_name: str, tcfg, place: Placement, shapes: Mapping):
    keys = place.text.get((part, hf_name))
    if keys is None or keys[0] not in shapes:
        return None
    weight_key, bias_key = keys
    stored = tuple(shapes[weight_key])
    if stored != text_shapes(tcfg)[hf_name] or not module.fits(stored):
        return (name, weight_key, tuple(module.shape), stored)
    bias = bias_key if module.has_bias and bias_key in shapes else None
    return Target(weight_key, bias, None, stored, part, part)


# ---- kohya split_qkv ------------------------------------------------------------------------

def _kohya_split_qkv(report: MatchReport, modules: Mapping, t: Table) -> None:
    """Give re-fused kohya split_qkv LoRAs their trained scale; record them in the report.

    The file keeps the split LoRAs' alpha while lora_down has n times their rank, so the
    usual alpha/rank applies them at 1/n. A module already rescaled by a converter
    (alpha = n x the file's common alpha) is left alone.
    """
    fused = {}
    for name in list(report.targets) + list(report.pieces):
        module = modules[name]
        found, _ = resolve(name, t.family, t.config)
        address = found[0].address if found and found[0].address else None
        if address is None or len(address.segments) != 1 or not hasattr(module, "kohya_split"):
            continue
        native, start, _src, rows = address.segments[0]
        splits = t.splits.get(native)
        if splits and start == 0 and rows == t.natives[native].rows and module.alpha:
            fused[name] = splits
    if not fused:
        return
    common = Counter((m.alpha, m.rank) for n, m in modules.items()
                     if n not in fused and getattr(m, "algo", None) == "lora" and m.alpha)
    common_alpha = common.most_common(1)[0][0][0] if common else None
    for name, splits in fused.items():
        module = modules[name]
        n = module.kohya_split(splits)
        if not n:
            continue
        if common_alpha and module.alpha == n * common_alpha != common_alpha:
            continue  # a converter already multiplied alpha by n
        module.use_split_scale(n)
        report.split_qkv[name] = n


# ---- refusing other families and variants ---------------------------------------------------

def _conflict(report: MatchReport, modules: Mapping, layout: ModelLayout, guess: Guess | None) -> str | None:
    if guess is None:
        return None
    if guess.family != layout.family:
        if guess.metadata_says:
            return f"its metadata says {guess.metadata_says!r}, not this {layout.arch} model"
        return (f"its modules fit {guess.name} ({guess.score} of {len(modules)}) better than this "
                f"{layout.arch} model")
    others = _other_variant_modules(report, modules, layout)
    if others:
        variant, names = others
        return (f"{len(names)} modules exist only in {variant}, not in this {layout.arch} model "
                f"(e.g. {names[0]})")
    return None


def _other_variant_modules(report: MatchReport, modules: Mapping, layout: ModelLayout):
    """(variant, module names) of unmatched diffusion modules another published variant has."""
    unmatched = [n for n in report.unmatched if report.part_of.get(n) == DIFFUSION]
    if not unmatched:
        return None
    family = FAMILIES[layout.family]
    for vname, cfg in family.variants.items():
        alt = family.at_depth(cfg, layout.config)
        if alt == layout.config:
            continue
        t = table(layout.family, alt)
        names = []
        for n in unmatched:
            found, _ = resolve(n, layout.family, alt)
            if found and found[0].address and modules[n].fits(t.shape_of(found[0].address)):
                names.append(n)
        if names:
            return vname, names
    return None


def _conflicting_variant(report: MatchReport, modules: Mapping, layout: ModelLayout) -> str | None:
    found = _other_variant_modules(report, modules, layout)
    return found[0] if found else None
