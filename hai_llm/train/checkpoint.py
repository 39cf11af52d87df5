"""Atomic, reshardable training checkpoints through torch.distributed.checkpoint (DCP).

DCP stores every tensor by its fully-qualified name with its global shape, so a run saved
under one parallel layout can be loaded under another (parameters and optimizer state
alike). Atomicity: every rank writes into ``step_XXXXXXXX.tmp``; once all have finished,
rank 0 renames the folder to ``step_XXXXXXXX`` and then replaces the ``latest`` pointer
file (write temp + os.replace). A crash at any moment leaves either the previous or the
new checkpoint, never a half-written one that resume would pick up.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

LATEST = "latest"


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


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra_tensors: dict | None = None, trainer_state: dict | None = None, keep: int = 2,
                    model_state: dict | None = None, optim_state: dict | None = None) -> Path:
    """Save model + optimizer + extras as checkpoint ``step``. ``model_state`` /
    ``optim_state`` let parallel wrappers pass state dicts they built themselves (e.g.
    sharded optimizer state as DTensors)."""
    root = Path(root)
    final, tmp = step_dir(root, step), Path(str(step_dir(root, step)) + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    opts = StateDictOptions(full_state_dict=False)
    state = {
        "model": model_state if model_state is not None else get_model_state_dict(model, options=opts),
        "optim": optim_state if optim_state is not None else get_optimizer_state_dict(model, optimizer, options=opts),
        "extra": extra_tensors or {},
        "trainer": trainer_state or {},
    }
    dcp.save(state, checkpoint_id=str(tmp))
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


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    extra_tensors: dict | None = None, trainer_state: dict | None = None,
                    model_state: dict | None = None, optim_state: dict | None = None) -> dict:
    """Load in place. ``extra_tensors`` / ``trainer_state`` are templates (same keys) that
    are filled and returned as ``{"extra": ..., "trainer": ...}``."""
    opts = StateDictOptions(full_state_dict=False)
    msd = model_state if model_state is not None else get_model_state_dict(model, options=opts)
    state = {"model": msd, "extra": extra_tensors or {}, "trainer": trainer_state or {}}
    if optimizer is not None:
        state["optim"] = optim_state if optim_state is not None else get_optimizer_state_dict(model, optimizer, options=opts)
    dcp.load(state, checkpoint_id=str(path))
    if model_state is None:
        set_model_state_dict(model, state["model"], options=opts)
    if optimizer is not None and optim_state is None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=opts)
    return {"extra": state["extra"], "trainer": state["trainer"], "optim": state.get("optim")}


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
