"""Reading the safetensors shards of a Hugging Face checkpoint, with errors that name the file.

Why it exists: a 671B checkpoint is 163 files; when one of them is truncated (an interrupted
download) or damaged, safetensors' own error ("incomplete metadata, file not fully covered") does
not say which. Every failure here names the file, what the index says it should hold, and, for a
truncated file, how many bytes its header needs against how many it has. Tensors are read one at a
time from memory-mapped files, so the reader never holds a second copy of the model.
"""
from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .hf_config import CheckpointMismatchError


class DamagedCheckpointError(CheckpointMismatchError):
    """A checkpoint file that cannot be read: truncated, damaged header or unreadable tensor."""


def _short(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _size_diagnosis(f: Path) -> str:
    """'' or what the file's own header says about its size (8-byte length, JSON, then the data
    whose last offset is the largest ``data_offsets`` end)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"; the file has {size} bytes, not even the 8-byte header length"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"; the file has {size} bytes but its header alone needs {8 + n}"
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            return f"; the file has {size} bytes, its header describes {8 + n + end}"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return ""
    return ""


class SafetensorsReader:
    """Read-only view over the tensors of several memory-mapped .safetensors files; [] reads one
    tensor. ``weight_map`` (the index's key -> file name) lets errors say what a bad file holds."""

    def __init__(self, files: list[Path], stack: ExitStack, weight_map: dict[str, str] | None = None):
        self._where: dict[str, Any] = {}
        self._file: dict[str, Path] = {}
        for f in files:
            try:
                handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
                held = sorted(k for k, v in (weight_map or {}).items() if v == f.name)
                what = f"; per the index it holds {_short(held, 3)}" if held else ""
                raise DamagedCheckpointError(
                    f"checkpoint file {f} cannot be read ({e}){_size_diagnosis(f)}{what}: it is truncated or "
                    "damaged, download it again") from e
            for k in handle.keys():
                if k in self._where:
                    raise CheckpointMismatchError(f"tensor '{k}' is stored in two files ({self._file[k]} and {f})")
                self._where[k] = handle
                self._file[k] = f

    def keys(self):
        return self._where.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        return self._file[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._where[key].get_tensor(key)
        except Exception as e:
            raise DamagedCheckpointError(f"reading tensor '{key}' from {self._file[key]} failed ({e}): the file is "
                                         "damaged, download it again") from e

    def meta(self, key: str) -> tuple[tuple[int, ...], bool]:
        sl = self._where[key].get_slice(key)
        return tuple(sl.get_shape()), sl.get_dtype().startswith("F8")


def checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """(shard files, the index's weight_map or None) of a checkpoint file or folder."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise DamagedCheckpointError(f"{index} is not a safetensors index ({e!r}): download it again") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that do not exist: {_short(absent)}")
        return files, weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files, None


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, +-inf count) of a floating tensor; (0, 0) fast when all values are finite."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return 0, 0
    nan = int(torch.isnan(t).sum())
    return nan, int((~torch.isfinite(t)).sum()) - nan
