"""Reading checkpoints without executing code stored in them.

Python's ``pickle`` runs whatever callable a file names: a checkpoint folder crafted by someone
else (a downloaded run, a shared file system) would run code the moment it is resumed.
torch.distributed.checkpoint's default file format pickles twice: the ``.metadata`` index is a
pickled ``Metadata`` object, and every non-tensor value is ``torch.save``'d bytes that its default
planner reads with ``torch.load(weights_only=False)``.

hai-llm therefore writes (``hai_llm.checkpoint.store``) tensors through DCP's safetensors storage
(``HuggingFaceStorageWriter``: one ``.safetensors`` file per rank, whose JSON header carries each
shard's global offsets) and the trainer state as JSON. Neither format can hold code, and the
safetensors reader (``HuggingFaceStorageReader``) rebuilds DCP's index from those headers: no
pickle is read at all.

Checkpoints written before that change (``.metadata`` + ``__<rank>_0.distcp``) still load, safely:

* ``.metadata`` goes through :class:`MetadataUnpickler`, which resolves only the classes DCP's
  index is made of (:data:`ALLOWED`) and refuses anything else, naming it, before anything is
  called;
* non-tensor values go through ``torch.load(weights_only=True)`` (:class:`SafeLoadPlanner`), which
  only rebuilds containers and primitive values; tensors were already read that way by DCP.

A legacy checkpoint whose ``.metadata`` names a class outside the allow-list (another torch
version's DCP, say) is loaded with plain pickle only when the user says they trust it
(``train.trust_checkpoint=true``); the refusal message says so.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# (module, name) pairs a DCP ``.metadata`` pickle may resolve: the dataclasses of its index,
# torch.Size, the enum of memory formats, the layout look-up torch registers for pickling
# torch.layout, and the Path a checkpoint id is stored as. Every one of them only stores data:
# reconstructing it runs no user-chosen code. torch dtypes are accepted by type (below).
ALLOWED = frozenset({
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
})


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle in a checkpoint names something outside the allow-list: nothing was run."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` resolving only :data:`ALLOWED` names and torch dtypes.

    ``find_class`` is the only way a pickle reaches a callable (``GLOBAL`` / ``STACK_GLOBAL``
    opcodes, and so ``REDUCE`` / ``NEWOBJ`` / ``INST`` of it), so refusing there stops any code
    before it runs."""

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"it names {module}.{name}, which is not part of a checkpoint index")


def read_legacy_metadata(path: str | Path, trust: bool = False) -> Metadata:
    """The ``Metadata`` index of a legacy DCP folder, read without running code (unless
    ``trust``: plain pickle, for a checkpoint the user vouches for)."""
    data = (Path(path) / ".metadata").read_bytes()
    if trust:
        return pickle.loads(data)  # the user's explicit choice (train.trust_checkpoint=true)
    return MetadataUnpickler(io.BytesIO(data)).load()


class LegacyReader(FileSystemReader):
    """DCP's file-system reader with the ``.metadata`` pickle replaced by the allow-list
    unpickler; tensors are read by DCP itself with ``torch.load(weights_only=True)``."""

    def __init__(self, path: str | Path, trust: bool = False) -> None:
        super().__init__(str(path))
        self._trust = trust

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files are not a format we write
            raise FileNotFoundError(f"no per-rank metadata in {self.path}")
        md = read_legacy_metadata(self.path, self._trust)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor values are rebuilt with
    ``torch.load(weights_only=True)`` (ints, floats, strings, containers) instead of full pickle."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:  # torch names the refused global on a line of its message
            why = next((ln.strip().rstrip(".") for ln in str(e).splitlines() if "GLOBAL" in ln.upper()
                        and "unsupported" in ln.lower()), "it holds more than plain data")
            raise UnsafeCheckpointError(f"its value {read_item.dest_index.fqn} is a pickle that torch.load("
                                        f"weights_only=True) refuses ({why})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def legacy_trainer_template(md: Metadata) -> dict:
    """A nested dict with a placeholder for every ``trainer.*`` value a legacy checkpoint holds
    (DCP loads non-tensor values only for keys the request names)."""
    out: dict = {}
    mappings = md.planner_data or {}
    for fqn in md.state_dict_metadata:
        if not fqn.startswith("trainer."):
            continue
        path = mappings.get(fqn, tuple(fqn.split(".")))
        node = out
        for key in path[1:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = None
    return out


def safetensors_sizes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Global size of every tensor in a safetensors-format checkpoint folder, from the files'
    JSON headers alone (each shard's offset + shape, maximised over shards). Raises
    ``ValueError`` naming the file for a truncated or damaged one."""
    import json

    from safetensors import safe_open

    sizes: dict[str, list[int]] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError("it holds no .safetensors file")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                extra = json.loads((h.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
                for key in h.keys():
                    shape = h.get_slice(key).get_shape()
                    off = extra.get(key, {}).get("saved_offsets", [0] * len(shape))
                    end = [o + s for o, s in zip(off, shape)]
                    old = sizes.setdefault(key, end)
                    sizes[key] = [max(a, b) for a, b in zip(old, end)]
        except Exception as e:  # safetensors raises its own error types (SafetensorError, OSError)
            reason = " ".join(str(e).split())
            raise ValueError(f"{f.name} is truncated or damaged ({reason})") from None  # the reason says it
    return {k: tuple(v) for k, v in sizes.items()}
