"""Atomic, reshardable training checkpoints through torch.distributed.checkpoint (DCP).

DCP stores every tensor by its fully-qualified name with its global shape, so a run saved
under one parallel layout can be loaded under another (parameters and optimizer state
alike; the ZeRO-1 optimizer describes its shards in global coordinates). Atomicity: every
rank writes into ``step_<N>.tmp``; once all have finished, rank 0 renames the folder to
``step_<N>`` and then replaces the ``latest`` pointer file (write temp + os.replace). A
crash at any moment leaves either the previous or the new checkpoint, never a
half-written one that resume would pick up.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

LATEST = "latest"


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


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder named by ``root/latest`` if it exists and is complete, else None."""
    ptr = Path(root) / LATEST
    if not ptr.is_file():
        return None
    target = Path(root) / ptr.read_text().strip()
    if not (target / ".metadata").is_file():
        raise RuntimeError(f"checkpoint pointer {ptr} names {target}, which is missing or incomplete; "
                           f"delete {ptr} to start fresh or point it at a complete step_* folder")
    return target


def save_checkpoint(root: str | Path, step: int, weights: dict, buffers: dict | None = None,
                    trainer_state: dict | None = None, keep: int = 2) -> Path:
    """Save checkpoint ``step``: ``weights`` (the ZeRO-1 layout-independent weights and
    optimizer state, see hai_llm.checkpoint.zero_state), replicated ``buffers`` and the
    picklable ``trainer_state`` (step, data position, counters)."""
    root = Path(root)
    final, tmp = step_dir(root, step), Path(str(step_dir(root, step)) + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    state = {"weights": weights, "buffers": buffers or {}, "trainer": trainer_state or {}}
    _quiet(dcp.save, state, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr_tmp = root / (LATEST + ".tmp")
        ptr_tmp.write_text(final.name)
        os.replace(ptr_tmp, root / LATEST)
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, weights: dict, buffers: dict | None = None,
                    trainer_state: dict | None = None) -> dict:
    """Load in place into the tensors of ``weights`` / ``buffers`` (views of the live
    shards and buffers); ``trainer_state`` is a template with the same keys, returned
    filled."""
    state = {"weights": weights, "buffers": buffers or {}, "trainer": trainer_state or {}}
    _quiet(dcp.load, state, checkpoint_id=str(path))
    return state["trainer"]


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load the fp32 master weights and buffers of a training checkpoint into a full,
    unsharded model (evaluation, export to Hugging Face format), in one process."""
    weights = {f"master.{n}": p.detach().view(-1) for n, p in model.named_parameters()}
    keep = set(model.state_dict().keys())
    buffers = {n: b for n, b in model.named_buffers() if n in keep}
    with torch.no_grad():
        _quiet(dcp.load, {"weights": weights, "buffers": buffers}, checkpoint_id=str(path))


def save_resolved_config(out_dir: str | Path, cfg_yaml: str) -> None:
    if _rank() == 0:
        p = Path(out_dir)
        p.mkdir(parents=True, exist_ok=True)
        tmp = p / "config.yaml.tmp"
        tmp.write_text(cfg_yaml)
        os.replace(tmp, p / "config.yaml")


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
