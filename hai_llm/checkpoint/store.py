"""Atomic, reshardable training checkpoints that execute no code when loaded.

Format (``step_<N>/``): the tensors go through torch.distributed.checkpoint (DCP) with its
safetensors storage (``HuggingFaceStorageWriter``, ``save_distributed``): every rank writes one
``shard-<k>-model-00001-of-00001.safetensors`` holding the ranges it owns, each tensor under its
fully-qualified name with its global offsets in the file's JSON header. A run saved under one
parallel layout therefore loads under another (the ZeRO-1 optimizer describes its shards in
global coordinates, ``hai_llm.checkpoint.zero_state``). The trainer state (step, data position,
counters) and the model config are ``trainer.json``. Neither file type can hold code, and loading
reads no pickle (``hai_llm.checkpoint.safe_load``, which also reads the older pickle-based
``.metadata`` + ``.distcp`` folders safely).

Atomicity: every rank writes into ``step_<N>.tmp``; once all have finished, rank 0 writes
``trainer.json`` (the folder's completeness mark), renames the folder to ``step_<N>`` and then
replaces the ``latest`` pointer file (write temp + os.replace). A crash at any moment leaves the
previous checkpoint and at most a stale ``.tmp`` folder, which start-up removes
(:func:`remove_stale`); a failed save (a full disk) removes its ``.tmp`` and says so, keeping the
previous checkpoint.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

LATEST = "latest"
TRAINER_FILE = "trainer.json"
FORMAT = "hai-llm-checkpoint/2"  # 2: safetensors + JSON (1 was DCP's pickle-based default format)
_STEP = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, said in one line naming the checkpoint and
    the fix (a ValueError so that the launcher prints it as one line)."""


def _quiet(fn, *args, **kwargs):
    # DCP warns on every call without a process group that it assumes a single process:
    # that is exactly the intent of a one-rank run
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, **kwargs)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _one_line(e: BaseException) -> str:
    """The innermost meaningful message of ``e`` on one line (DCP wraps rank failures in a
    CheckpointException whose text is a multi-rank traceback)."""
    inner = _root_cause(e)
    text = " ".join(str(inner).split()) or type(inner).__name__
    return text if len(text) < 300 else text[:297] + "..."


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]
        elif e.__cause__ is not None:
            e = e.__cause__
        else:
            break
    return e


def _no_space(e: BaseException) -> bool:
    return isinstance(_root_cause(e), OSError) and _root_cause(e).errno == errno.ENOSPC


# -- finding checkpoints ---------------------------------------------------------------------
def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def checkpoint_format(folder: str | Path) -> str | None:
    """``"safetensors"`` (this format), ``"legacy"`` (DCP's pickle-based one) or None when the
    folder is not a complete checkpoint."""
    folder = Path(folder)
    if (folder / TRAINER_FILE).is_file():
        return "safetensors"
    if (folder / ".metadata").is_file():
        return "legacy"
    return None


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete ``step_N`` folders of ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if checkpoint_format(p)]


def latest_checkpoint(root: str | Path, quiet: bool = False) -> Path | None:
    """The checkpoint to resume from: the folder named by ``root/latest``, which must be a
    complete ``step_N`` folder directly inside ``root``; without a pointer the newest complete
    ``step_N`` (a crash between the rename and the pointer update, or a lost pointer); None
    when there is none."""
    root = Path(root)
    ptr = root / LATEST
    if not ptr.is_file():
        done = complete_checkpoints(root)
        if done and _rank() == 0 and not quiet:
            print(f"no {ptr} pointer: resuming from the newest complete checkpoint {done[-1].name}")
        return done[-1] if done else None
    name = ptr.read_text().strip()
    if not _STEP.match(name):
        raise CheckpointError(f"checkpoint pointer {ptr} names {name!r}, not a step_N folder inside {root}; "
                              f"write the name of one of its step_N folders into it, or delete it to resume "
                              f"from the newest complete checkpoint")
    target = root / name
    if not checkpoint_format(target):
        done = complete_checkpoints(root)
        newest = f" (the newest complete one is {done[-1].name})" if done else ""
        raise CheckpointError(f"checkpoint pointer {ptr} names {target}, which is missing or incomplete; "
                              f"delete {ptr} to resume from the newest complete step_* folder{newest}, "
                              f"or point it at a complete step_* folder")
    return target


def previous_hint(path: str | Path) -> str:
    """What to do when checkpoint ``path`` cannot be read: resume from the one before it."""
    path = Path(path)
    older = [p for p in complete_checkpoints(path.parent) if p.name < path.name]
    if older:
        return (f"to resume from the previous checkpoint {older[-1].name}, move {path.name} away and write "
                f"{older[-1].name} into {path.parent / LATEST}")
    return f"there is no earlier checkpoint: move {path.parent} away to start afresh"


def remove_stale(root: str | Path) -> list[Path]:
    """Delete what interrupted saves left in ``root`` (``step_N.tmp`` folders, ``latest.tmp``);
    called on rank 0 at start-up, before any rank looks for a checkpoint."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.endswith(".tmp")]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if stale:
        print(f"removed {len(stale)} stale folder(s) of interrupted saves in {root}: "
              + ", ".join(p.name for p in stale))
    return stale


# -- saving ----------------------------------------------------------------------------------
def _json_default(o):
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable trainer state")


def save_checkpoint(root: str | Path, step: int, weights: dict, buffers: dict | None = None,
                    trainer_state: dict | None = None, keep: int = 2, model_config: dict | None = None) -> Path:
    """Save checkpoint ``step``: ``weights`` (the ZeRO-1 layout-independent weights and
    optimizer state, see hai_llm.checkpoint.zero_state), replicated ``buffers``, the JSON-able
    ``trainer_state`` (step, data position, counters) and ``model_config`` (to name the key
    when a later run resumes with another model shape). ``keep`` <= 0 keeps every checkpoint.

    Collective. On failure (a full disk, an unwritable folder) every rank raises
    :class:`CheckpointError`, the ``.tmp`` folder is removed and the previous checkpoint stays."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    root = Path(root)
    final = step_dir(root, step)
    tmp = Path(str(final) + ".tmp")
    err: BaseException | None = None
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        except OSError as e:
            err = e
    if not _agree(err):
        tensors = {"weights": weights, "buffers": buffers or {}}
        try:
            _quiet(dcp.save, tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
        except (Exception, CheckpointException) as e:  # DCP raises the same failure on every rank
            err = e
        if err is None and _rank() == 0:
            try:
                _finalize(root, tmp, final, step, trainer_state or {}, model_config, keep)
            except OSError as e:
                err = e
    msg = _agree(err and _save_message(err, root, step, tmp))
    if msg:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(msg) from err
    return final


def _agree(msg) -> str | None:
    """Rank 0's failure (message or exception), known to every rank. Every rank of a failed
    DCP save holds the same failure, and rank 0 alone does the file-system work around it."""
    if not dist.is_initialized():
        return str(msg) if msg else None
    box = [str(msg) if msg else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _save_message(e: BaseException, root: Path, step: int, tmp: Path) -> str:
    done = [p for p in complete_checkpoints(root) if p.name != f"step_{step:08d}"]
    kept = f"the previous checkpoint {done[-1]} is kept" if done else "no earlier checkpoint exists"
    if _no_space(e):
        return (f"no space left on device while writing checkpoint step {step} into {tmp}; {kept}; free disk "
                f"space (or lower train.keep_ckpts) and run the same command again to resume")
    return f"writing checkpoint step {step} into {tmp} failed: {_one_line(e)}; {kept}"


def _finalize(root: Path, tmp: Path, final: Path, step: int, trainer_state: dict, model_config: dict | None,
              keep: int) -> None:
    """Rank 0, after every rank's tensors are written: the JSON state (the completeness mark),
    the rename, the pointer, pruning."""
    body = json.dumps({"format": FORMAT, "step": step, "trainer": trainer_state, "model": model_config},
                      indent=1, default=_json_default)
    write_text_atomic(tmp / TRAINER_FILE, body)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, final.name)
    _prune(root, keep)


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- loading ---------------------------------------------------------------------------------
def read_trainer_file(path: str | Path) -> dict:
    """``trainer.json`` of a checkpoint: ``{"format", "step", "trainer", "model"}``."""
    f = Path(path) / TRAINER_FILE
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {f.name} cannot be read ({_one_line(e)}); "
                              f"{previous_hint(path)}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {f.name} is not a {FORMAT} file (format "
                              f"{data.get('format') if isinstance(data, dict) else None!r}); {previous_hint(path)}")
    return data


def checkpoint_sizes(path: str | Path, trust: bool = False) -> dict[str, tuple[int, ...]]:
    """Global size of every tensor in checkpoint ``path`` (flattened names such as
    ``weights.master.embed.weight``), from headers and index only: no tensor data is read."""
    from hai_llm.checkpoint.safe_load import UnsafeCheckpointError, read_legacy_metadata, safetensors_sizes

    try:
        if checkpoint_format(path) == "safetensors":
            return safetensors_sizes(path)
        md = read_legacy_metadata(path, trust)
    except UnsafeCheckpointError as e:
        raise CheckpointError(_unsafe_message(path, e)) from e
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {_one_line(e)}; {previous_hint(path)}") from e
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}


def _unsafe_message(path, e: BaseException) -> str:
    if str(e).startswith("its value"):  # a non-tensor value: never loaded with full pickle
        return f"checkpoint {path} refused: {e}, so loading it could run code; nothing was run"
    return (f"checkpoint {path} refused: its .metadata is a pickle and {e}, so loading it could run code; nothing "
            f"was run. Only if you trust where this folder came from, train.trust_checkpoint=true loads its "
            f".metadata with full pickle")


def _requested_sizes(state: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for k, v in state.items():
        out[f"{prefix}.{k}"] = tuple(v.size())  # a ShardedTensor's size() is its global size
    return out


def check_shapes(path: str | Path, wanted: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]],
                 saved_model: dict | None, model_config: dict | None) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint holds every wanted tensor with its
    global size, and, when it recorded its model config, unless that config builds the same
    parameters as ``model_config`` (which also catches a checkpoint with MORE parameters: a
    rank's request covers only the ranges it owns, so extra tensors say nothing locally). The
    message names the ``model.*`` keys that differ when it can."""
    missing = sorted(k for k in wanted if k not in have)
    differ = sorted(k for k in wanted if k in have and have[k] != wanted[k])
    extra = []
    if saved_model and model_config and _plain(saved_model) != _plain(model_config):
        theirs, ours = master_sizes(saved_model), master_sizes(model_config)
        if theirs != ours:  # keys that change no shape (recompute, routing speeds) may differ freely
            differ += sorted(k for k in ours if k in theirs and theirs[k] != ours[k])
            extra = sorted(k for k in theirs if k not in ours)
            missing += sorted(k for k in ours if k not in theirs and k not in missing)
            have = {**have, **theirs}
    if not (missing or differ or extra):
        return
    if missing and not differ and not extra and all(k.startswith("weights.ema.") for k in missing):
        raise CheckpointError(f"checkpoint {path} holds no EMA weights (it was saved with train.ema_decay=0): "
                              f"resume with train.ema_decay=0, or start a new run (another train.out_dir)")
    keys = model_diff(saved_model, model_config)
    if keys:
        what = "; ".join(keys)
    else:
        parts = [f"{k} {list(have[k])} there, {list(wanted.get(k, ()))} now" for k in differ[:2]]
        parts += [f"{k} missing" for k in missing[:2]] + [f"{k} not in this model" for k in extra[:2]]
        what = "; ".join(parts)
    raise CheckpointError(f"checkpoint {path} was saved by a different model shape ({what}): resume with the "
                          f"run's model settings (its config.yaml), or start a new run (another train.out_dir)")


def model_diff(saved: dict | None, current: dict | None) -> list[str]:
    """``model.<key>=<saved> in the checkpoint, <current> now`` for every model config key that
    differs."""
    if not saved or not current:
        return []
    saved, current = _plain(saved), _plain(current)
    return [f"model.{k}={saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def _plain(d: dict) -> dict:
    """JSON round trip: the form a config takes in trainer.json (tuples become lists)."""
    return json.loads(json.dumps(d, default=_json_default))


def master_sizes(model_config: dict) -> dict[str, tuple[int, ...]]:
    """``weights.master.<param>`` -> (numel,) for the model ``model_config`` builds on the meta
    device (allocates nothing): the keys and global sizes of a checkpoint's fp32 master weights."""
    from hai_llm.model.args import ModelArgs
    from hai_llm.model.transformer import build_model

    names = {f.name for f in dataclasses.fields(ModelArgs)}
    args = ModelArgs(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in model_config.items() if k in names})
    return {f"weights.master.{n}": (p.numel(),) for n, p in build_model(args, device="meta").named_parameters()}


def load_checkpoint(path: str | Path, weights: dict, buffers: dict | None = None, trainer_state: dict | None = None,
                    model_config: dict | None = None, trust: bool = False) -> dict:
    """Load in place into the tensors of ``weights`` / ``buffers`` (views of the live shards and
    buffers) and return the trainer state saved with them. Refuses, in one line naming the
    checkpoint, a checkpoint of another model shape (naming the differing ``model.*`` keys when
    it recorded its config), a damaged one (suggesting the previous checkpoint), and a legacy
    one whose pickle names anything but DCP's index classes. ``trainer_state`` is unused (kept
    for callers of the former template-based API)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from hai_llm.checkpoint.safe_load import LegacyReader, SafeLoadPlanner, UnsafeCheckpointError, \
        legacy_trainer_template, read_legacy_metadata

    path = Path(path)
    fmt = checkpoint_format(path)
    if fmt is None:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {TRAINER_FILE}); {previous_hint(path)}")
    buffers = buffers or {}
    wanted = {**_requested_sizes(weights, "weights"), **_requested_sizes(buffers, "buffers")}
    have = checkpoint_sizes(path, trust)
    meta = read_trainer_file(path) if fmt == "safetensors" else {}
    check_shapes(path, wanted, have, meta.get("model"), model_config)
    state: dict = {"weights": weights, "buffers": buffers}
    if fmt == "safetensors":
        # SafeLoadPlanner on both paths: DCP's default planner would full-unpickle any bytes
        # item a (tampered) checkpoint declares; ours refuses anything but plain data
        reader, planner = HuggingFaceStorageReader(str(path)), SafeLoadPlanner()
    else:
        state["trainer"] = legacy_trainer_template(read_legacy_metadata(path, trust))
        reader, planner = LegacyReader(path, trust), SafeLoadPlanner()
    try:
        # the readers build host tensors (safetensors slices, legacy byte buffers) with torch's
        # default device and copy them into the targets; pin those staging tensors to the host
        # so a caller's default device (meta, cuda) never leaks into them
        with torch.device("cpu"):
            _quiet(dcp.load, state, storage_reader=reader, planner=planner)
    except (Exception, CheckpointException) as e:
        if isinstance(_root_cause(e), UnsafeCheckpointError):
            raise CheckpointError(_unsafe_message(path, _root_cause(e))) from e
        raise CheckpointError(f"checkpoint {path} cannot be read: {_one_line(e)}; {previous_hint(path)}") from e
    return meta["trainer"] if fmt == "safetensors" else state["trainer"]


def load_weights(path: str | Path, model: torch.nn.Module, trust: bool = False) -> None:
    """Load the fp32 master weights and buffers of a training checkpoint into a full,
    unsharded model (evaluation, export to Hugging Face format), in one process."""
    weights = {f"master.{n}": p.detach().view(-1) for n, p in model.named_parameters()}
    keep = set(model.state_dict().keys())
    buffers = {n: b for n, b in model.named_buffers() if n in keep}
    with torch.no_grad():
        load_checkpoint(path, weights, buffers, trust=trust)


# -- small files -----------------------------------------------------------------------------
def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_resolved_config(out_dir: str | Path, cfg_yaml: str) -> None:
    if _rank() == 0:
        p = Path(out_dir)
        p.mkdir(parents=True, exist_ok=True)
        write_text_atomic(p / "config.yaml", cfg_yaml)


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))
