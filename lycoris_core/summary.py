"""Human-readable summaries of an adapter: algorithms, ranks, alpha, metadata, unknown keys."""

from __future__ import annotations

from collections import Counter

from .adapter import Adapter

# metadata fields worth a line of their own; the rest are counted
HEADLINE_METADATA = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_sd_model_name", "ss_output_name", "modelspec.architecture", "modelspec.title",
    "modelspec.trigger_phrase", "sshs_model_hash",
)


def _counter_line(counter: Counter) -> str:
    return ", ".join(f"{key} x{count}" for key, count in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))


def summary_lines(adapter: Adapter, all_metadata: bool = False) -> list[str]:
    modules = adapter.modules.values()
    params = adapter.num_params
    dense = sum(m.dense_params for m in modules)
    lines = [
        f"file: {adapter.name}",
        f"modules: {len(adapter.modules)}  parameters: {params:,}  dense equivalent: {dense:,}"
        + (f" ({params / dense:.1%})" if dense else ""),
        f"algorithms: {_counter_line(adapter.algorithms())}",
        f"ranks: {_counter_line(adapter.ranks()) or '-'}",
        f"alpha: {_counter_line(adapter.alphas()) or '-'}"
        + (f" (from {adapter.alpha_source})" if adapter.alpha_source else ""),
    ]
    shown = {k: v for k, v in adapter.metadata.items() if all_metadata or k in HEADLINE_METADATA}
    hidden = len(adapter.metadata) - len(shown)
    lines.append(f"metadata: {len(adapter.metadata)} fields" + (f" ({hidden} not shown; --all-metadata)" if hidden else ""))
    for key in sorted(shown):
        value = shown[key]
        lines.append(f"  {key}: {value if len(value) <= 200 else value[:197] + '...'}")
    reasons = adapter.unknown_reasons
    lines.append(f"unknown keys: {len(reasons)}")
    for key in adapter.unknown_keys[:50]:
        lines.append(f"  {key}: {reasons[key]}")
    if len(reasons) > 50:
        lines.append(f"  ... and {len(reasons) - 50} more")
    return lines
