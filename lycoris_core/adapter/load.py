"""Turn a tensor file into modules: group keys by module, detect each algorithm.

``load_adapter`` is the one entry point.  It reads only the header up front;
tensors are read when a delta is asked for.  Keys it does not understand are kept
in ``unknown_keys`` with a reason, never dropped silently.  An input with no usable
module is refused with ``AdapterFormatError``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path

from ..algorithms import SUFFIX_ROLES, UNSUPPORTED_SUFFIXES, AdapterModule, detect, split_key
from ..errors import AdapterFormatError
from ..io.reader import DictSource, TensorSource, open_tensor_file

PEFT_CONFIG = "adapter_config.json"
MAX_CONFIG_BYTES = 1_000_000


class Adapter:
    """An adapter file: metadata, modules by name, and what was not understood."""

    def __init__(self, source: TensorSource, modules: dict[str, AdapterModule],
                 unknown: dict[str, str], alpha_source: str | None = None, path: str | None = None):
        self.source = source
        self.name = source.name
        #: the file the adapter was read from (absolute), or None for a dict of tensors
        self.path = path
        self.metadata: dict[str, str] = dict(source.metadata)
        self.modules = modules
        self.unknown_reasons = unknown
        self.alpha_source = alpha_source

    @property
    def unknown_keys(self) -> list[str]:
        return sorted(self.unknown_reasons)

    @property
    def resident_bytes(self) -> int:
        """Bytes of factors kept on accelerators (see ``AdapterModule.resident_bytes``)."""
        return sum(m.resident_bytes for m in self.modules.values())

    def release(self, device=None) -> None:
        """Drop the factors kept on ``device`` (every accelerator when None)."""
        for m in self.modules.values():
            m.release(device)

    def algorithms(self) -> Counter:
        return Counter(m.describe() for m in self.modules.values())

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values() if m.rank is not None)

    def alphas(self) -> Counter:
        return Counter(m.alpha for m in self.modules.values() if m.alpha is not None)

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())

    def close(self) -> None:
        self.source.close()

    def __repr__(self) -> str:
        algos = ", ".join(f"{k} {v}" for k, v in sorted(self.algorithms().items()))
        return f"<Adapter {self.name!r}: {len(self.modules)} modules ({algos}), {len(self.unknown_reasons)} unknown keys>"


def load_adapter(source, *, allow_pickle: bool = False, peft_config: Mapping | None = None) -> Adapter:
    """Read an adapter from a path or a dict of tensors.

    ``allow_pickle`` opts in to .pt/.ckpt/.bin files, read with torch.load(weights_only=True).
    ``peft_config`` supplies PEFT's lora_alpha when the file has no alpha tensors; by
    default an ``adapter_config.json`` beside the file is used.
    """
    path = None
    if isinstance(source, Mapping):
        tensors: TensorSource = DictSource(source)
    elif isinstance(source, TensorSource):
        tensors = source
    elif isinstance(source, (str, os.PathLike)):
        tensors = open_tensor_file(source, allow_pickle=allow_pickle)
        path = os.path.abspath(source)
    else:
        raise TypeError(f"load_adapter takes a path or a dict of tensors, not {type(source).__name__}")

    groups: dict[str, dict[str, str]] = defaultdict(dict)
    unknown: dict[str, str] = {}
    for key in tensors:
        split = split_key(key)
        if split is None:
            unknown[key] = "unrecognised suffix"
            continue
        module, suffix = split
        if suffix in UNSUPPORTED_SUFFIXES:
            unknown[key] = UNSUPPORTED_SUFFIXES[suffix]
            continue
        role = SUFFIX_ROLES[suffix]
        if role in groups[module]:
            raise AdapterFormatError(
                tensors.name, f"module {module!r} has two keys for {role}: {groups[module][role]!r}", key
            )
        groups[module][role] = key

    alpha_for, alpha_source = _alpha_defaults(tensors, groups, source, peft_config)
    modules: dict[str, AdapterModule] = {}
    for module, roles_to_keys in groups.items():
        roles = set(roles_to_keys)
        cls = detect(roles, lambda role, _k=roles_to_keys: tensors.shape(_k[role]))
        if cls is None:
            for key in roles_to_keys.values():
                unknown[key] = "no algorithm uses this combination of keys"
            continue
        used = cls.consumed(roles)
        for role in roles - used:
            unknown[roles_to_keys[role]] = f"not used by {cls.algo}"
        keys = {role: roles_to_keys[role] for role in used}
        modules[module] = cls(module, keys, tensors, default_alpha=alpha_for(module, keys))

    if not modules:
        sample = ", ".join(sorted(unknown)[:3]) or "the file has no tensors"
        raise AdapterFormatError(tensors.name, f"no usable adapter module found (keys: {sample})")
    return Adapter(tensors, modules, unknown, alpha_source, path)


# ---- alpha that lives outside the tensors ------------------------------------------------

def _alpha_defaults(tensors: TensorSource, groups, source, peft_config):
    """A function module -> default alpha, for files whose LoRA modules carry no alpha tensor.

    PEFT keeps lora_alpha in adapter_config.json (or diffusers in the header's
    ``lora_adapter_metadata``); ignoring it applies the adapter at the wrong strength.
    """
    lora_modules = [m for m, roles in groups.items() if "lora_down" in roles]
    if not lora_modules or any("alpha" in groups[m] for m in lora_modules):
        return (lambda module, keys: None), None

    config, origin = _find_peft_config(tensors, source, peft_config)
    if config is None:
        return (lambda module, keys: None), None
    if not isinstance(config, dict):
        raise AdapterFormatError(tensors.name, f"PEFT config from {origin} is not an object", "lora_adapter_metadata")

    def alpha_for(module: str, keys: dict[str, str]) -> float | None:
        if "lora_down" not in keys:
            return None
        part = _config_for(config, module)
        if part is None or "lora_alpha" not in part:
            return None
        patterns = part.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise AdapterFormatError(tensors.name, f"alpha_pattern in the PEFT config from {origin} is not an object")
        alpha = _number(_pattern_value(patterns, module, part["lora_alpha"]), tensors.name, origin)
        if part.get("use_rslora") is True:
            alpha *= math.sqrt(tensors.shape(keys["lora_down"])[0])  # alpha/sqrt(r), written as an alpha over r
        return alpha

    return alpha_for, origin


def _number(value, name: str, origin: str) -> float:
    """A stranger's config value that must be a plain number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterFormatError(name, f"lora_alpha {value!r} in the PEFT config from {origin} is not a number")
    return float(value)


def _find_peft_config(tensors, source, peft_config):
    if peft_config is not None:
        return dict(peft_config), "argument"
    raw = tensors.metadata.get("lora_adapter_metadata")
    if raw:
        return _parse_config(raw, tensors.name, "its lora_adapter_metadata header field"), "metadata"
    if isinstance(source, (str, os.PathLike)):
        sidecar = Path(source).with_name(PEFT_CONFIG)
        if sidecar.is_file():
            if sidecar.stat().st_size > MAX_CONFIG_BYTES:
                raise AdapterFormatError(str(sidecar), f"PEFT config is over {MAX_CONFIG_BYTES} bytes; "
                                         "without it the adapter would apply at the wrong strength")
            try:
                text = sidecar.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise AdapterFormatError(str(sidecar), f"PEFT config is not UTF-8 text: {exc}") from None
            return _parse_config(text, str(sidecar), "it"), str(sidecar)
    return None, None


def _parse_config(text: str, name: str, what: str):
    """PEFT's alpha lives only here: an unreadable config is refused, never ignored (wrong strength)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(name, f"PEFT config in {what} is not valid JSON ({exc}); "
                                 "without lora_alpha the adapter would apply at the wrong strength") from None


def _config_for(config: dict, module: str) -> dict | None:
    """A PEFT config, or diffusers' per-component dict of them.

    diffusers' ``save_lora_weights`` writes the components flat: ``{"transformer.lora_alpha": 8,
    "transformer.r": 4, ...}`` (``_pack_dict_with_prefix``); older writers nest them.
    """
    if "lora_alpha" in config:
        return config
    for component in ("text_encoder_2", "text_encoder", "unet", "transformer"):
        if not module.startswith(component + "."):
            continue
        if isinstance(config.get(component), dict):
            return config[component]
        head = component + "."
        flat = {k[len(head):]: v for k, v in config.items() if isinstance(k, str) and k.startswith(head)}
        if "lora_alpha" in flat:
            return flat
    return None


_PATTERN_CHARS = re.compile(r"[A-Za-z0-9_.*]+")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's alpha_pattern: a key matches the end of the module path.

    Keys are treated as dotted suffixes with ``.*`` (or ``*``) wildcards, never as
    arbitrary regexes: a stranger's regex could backtrack for minutes.
    """
    for pattern, value in patterns.items():
        if not isinstance(pattern, str) or not _PATTERN_CHARS.fullmatch(pattern):
            continue
        glob = pattern.replace(".*", "*")
        if fnmatch.fnmatchcase(module, glob) or fnmatch.fnmatchcase(module, "*." + glob):
            return value
    return default
