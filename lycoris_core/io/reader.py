"""Safe, lazy access to tensor files: the only place that touches adapter bytes.

Safetensors headers are validated by hand before anything else reads them, so a
hostile file fails with ``AdapterFormatError`` (naming file and key) instead of a
crash, a hang or an allocation larger than the file.  Tensors are then read on
demand through ``safetensors.safe_open``.  Pickle files are refused unless the
caller opts in, and even then only ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import AdapterFormatError, PickleRefusedError
from ..numerics.checks import is_finite

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pt2")

# safetensors dtype name -> (torch dtype, bytes per element)
_NAMED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPES: dict[str, tuple[torch.dtype, int]] = {name: (dtype, dtype.itemsize) for name, dtype in _NAMED.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_DIMS = 8


class TensorSource(Mapping[str, torch.Tensor]):
    """Read-only mapping of tensor name -> tensor; shapes known without reading data."""

    name: str
    metadata: dict[str, str]

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def stored(self, key: str) -> torch.Tensor:
        """The tensor as stored, for reading repeatedly (a file's tensor without a copy where it can).

        Refuses NaN/Inf like ``[]``; read-only: never write into it.
        """
        return self[key]

    def close(self) -> None:
        """Release file handles; reading again reopens them."""


class DictSource(TensorSource):
    """Tensors already in memory (a state dict handed over by a caller)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "<dict>",
                 metadata: Mapping[str, str] | None = None):
        self.name = name
        self.metadata = dict(metadata or {})
        for key, value in tensors.items():
            if not isinstance(key, str):
                raise AdapterFormatError(name, f"key {key!r} is not a string")
            if not isinstance(value, torch.Tensor):
                raise AdapterFormatError(name, f"value is {type(value).__name__}, not a tensor", key)
        self._tensors = dict(tensors)
        self._finite: set[str] = set()

    def stored(self, key: str) -> torch.Tensor:
        """The caller's tensor itself, checked for NaN/Inf on first use."""
        if key not in self._finite:
            _checked(self.name, key, self._tensors[key])
            self._finite.add(key)
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        return _checked(self.name, key, self._tensors[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class SafetensorsSource(TensorSource):
    """A validated safetensors file; tensors are read lazily, one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(path)
        header, self.metadata, self.data_start = read_safetensors_header(self.path)
        self._entries = header
        self._handle = None
        self._mmap = None
        self._finite: set[str] = set()  # keys whose stored values were checked for NaN/Inf

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._entries[key]["dtype"]][0]

    def _open(self):
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as exc:  # validated already; anything left is still a format error
                raise AdapterFormatError(self.name, f"safetensors could not open it: {exc}") from exc
        return self._handle

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._entries:
            raise KeyError(key)
        try:
            tensor = self._open().get_tensor(key)
        except Exception as exc:
            raise AdapterFormatError(self.name, f"tensor could not be read: {exc}", key) from exc
        return _checked(self.name, key, tensor)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def mmap_tensor(self, key: str) -> torch.Tensor:
        """A read-only tensor viewing the file's bytes: no copy, no NaN check (for restoring originals)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = self._entries[key]["data_offsets"]
        raw = self._mmap[self.data_start + begin : self.data_start + end]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only is what we want
            flat = torch.from_numpy(raw)
        return flat.view(self.dtype(key)).reshape(self.shape(key))

    def stored(self, key: str) -> torch.Tensor:
        """A view of the file's bytes (checked for NaN/Inf on first use): repeated reads cost no copy."""
        if key not in self._entries:
            raise KeyError(key)
        tensor = self.mmap_tensor(key)
        if key not in self._finite:
            _checked(self.name, key, tensor)
            self._finite.add(key)
        return tensor

    def close(self) -> None:
        self._handle = None
        self._mmap = None


def _checked(source: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Refuse NaN/Inf: a delta built from them would silently poison the model."""
    if not is_finite(tensor):
        raise AdapterFormatError(source, "tensor contains NaN or Inf values", key)
    return tensor


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in header")
        seen[key] = value
    return seen


def read_safetensors_header(path: str | os.PathLike):
    """Validate a safetensors header against the file's real size.

    Returns (entries, metadata, data_start).  Every declared tensor must have a
    known dtype, a sane shape whose byte size equals its offset span, and lie
    inside the file without overlapping another tensor.
    """
    name = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise AdapterFormatError(name, f"file is {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise AdapterFormatError(
                    name, f"header declares {header_len} bytes but the file has {size - 8} after the length"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise AdapterFormatError(name, f"cannot read file: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterFormatError(name, f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise AdapterFormatError(name, "header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterFormatError(name, "__metadata__ must map strings to strings", "__metadata__")

    data_start = 8 + header_len
    data_len = size - data_start
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise AdapterFormatError(name, "tensor entry is not an object", key)
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise AdapterFormatError(name, f"unknown dtype {dtype!r}", key)
        shape = entry.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise AdapterFormatError(name, f"invalid shape {shape!r}", key)
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise AdapterFormatError(name, f"invalid data_offsets {offsets!r}", key)
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise AdapterFormatError(
                name, f"data_offsets {offsets} fall outside the {data_len} data bytes of the file", key
            )
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * DTYPES[dtype][1]
        if expected != end - begin:
            raise AdapterFormatError(
                name, f"shape {shape} of {dtype} needs {expected} bytes but offsets span {end - begin}", key
            )
        spans.append((begin, end, key))
    spans.sort()
    for (_b1, e1, k1), (b2, _e2, k2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise AdapterFormatError(name, f"tensor data overlaps {k1!r}", k2)
    return header, {str(k): str(v) for k, v in metadata.items()}, data_start


def looks_like_pickle(path: str | os.PathLike) -> bool:
    """Zip-based torch saves start with PK; legacy pickles with the PROTO opcode (0x80)."""
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if head.startswith(b"PK\x03\x04"):
        return True
    # A safetensors header length of 128 mod 256 also starts with 0x80, but its JSON
    # header then opens with "{" at byte 8 (a pickle's byte 8 is never that).
    return head[:1] == b"\x80" and head[8:9] != b"{"


def load_pickle_tensors(path: str | os.PathLike, allow_pickle: bool) -> DictSource:
    """Read a pickle-based file only with explicit consent, and only as plain tensors."""
    name = str(path)
    if not allow_pickle:
        raise PickleRefusedError(
            name,
            "pickle-based files can run code when loaded; convert it to .safetensors, "
            "or pass allow_pickle=True to read it with torch.load(weights_only=True)",
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFormatError(name, f"torch.load(weights_only=True) refused it: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise AdapterFormatError(name, f"expected a dict of tensors, found {type(obj).__name__}")
    return DictSource(obj, name=name)


def open_tensor_file(path: str | os.PathLike, allow_pickle: bool = False) -> TensorSource:
    """Open any tensor file the project accepts, choosing the safe reader."""
    if not os.path.isfile(path):
        raise AdapterFormatError(str(path), "no such file")
    if looks_like_pickle(path):
        return load_pickle_tensors(path, allow_pickle)
    return SafetensorsSource(path)
