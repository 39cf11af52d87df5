"""Checks of the run folder and of the checkpoint a run would resume, before any rank starts.

Each failure here would otherwise surface inside N ranks, after minutes of start-up, as a
traceback per rank (a missing write permission, a damaged checkpoint, a checkpoint of another
model shape) or, worse, not at all (``train.resume=false`` on a folder that holds a run: the
new run's metrics and checkpoints would be mixed with the old ones). The launcher calls
:func:`check_run_folder` once, in the launching process; every message is one line naming the
config key or the checkpoint, and the fix.

The corpus (``data.path``, when set: without it the trainer's main rank prepares one) is opened
and checked against ``model.vocab_size`` here too, which scans ``tokens.bin`` once and caches
its largest id beside it (hai_llm/data/token_scan.py): the ranks then read the cached value
instead of each scanning the file after the process group is up.

The model-shape check reads only headers: ``trainer.json`` (the model config the checkpoint was
saved with) and the safetensors headers (global tensor sizes), or a legacy ``.metadata`` through
the allow-list unpickler; both models are built on the meta device, which allocates nothing.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from hai_llm.checkpoint import store
from hai_llm.config.schema import Config


def check_run_folder(cfg: Config) -> Path | None:
    """Raise ``ValueError`` (one line) unless ``cfg`` can run in ``cfg.train.out_dir``; returns
    the checkpoint the run will resume from (None: a fresh run)."""
    _check_device(cfg.train.device)
    _check_corpus(cfg)
    out = Path(cfg.train.out_dir)
    _check_writable(out)
    root = out / "checkpoints"
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, but train.out_dir={out} needs it to be the checkpoint folder: "
                         f"move it away or choose another train.out_dir")
    if not cfg.train.resume:
        _refuse_mixing(out, root)
        return None
    path = store.latest_checkpoint(root, quiet=True)
    if path is not None:
        check_checkpoint(path, cfg)
    return path


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but this machine has no usable CUDA device (torch.cuda.is_available() "
                         "is False): use train.device=cpu, or auto")


def _check_corpus(cfg: Config) -> None:
    """A corpus at ``data.path`` exists, is intact and fits ``model.vocab_size`` (the one scan of
    its tokens.bin, cached for the ranks); FileNotFoundError / ValueError, one line each."""
    if not cfg.data.path:
        return
    from hai_llm.data import TokenDataset

    TokenDataset(cfg.data.path).check_vocab(cfg.model.vocab_size)


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"train.out_dir={out} is a file, not a folder: set train.out_dir to a folder "
                         f"(a new one, or a run folder to resume)")
    try:  # the only reliable test (root ignores permission bits, a read-only mount does not)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test."):
            pass
    except OSError as e:
        raise ValueError(f"train.out_dir={out} is not writable ({e.strerror or e}): set train.out_dir to a "
                         f"folder you can write to") from e


def _refuse_mixing(out: Path, root: Path) -> None:
    held = [p.name for p in store.complete_checkpoints(root)]
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        held.append(metrics.name)
    if held:
        raise ValueError(f"train.resume=false but train.out_dir={out} already holds a run ({', '.join(held)}): "
                         f"drop train.resume=false to resume it, or set a new train.out_dir to start afresh "
                         f"(the old run is never overwritten)")


def check_checkpoint(path: Path, cfg: Config) -> None:
    """The checkpoint at ``path`` is readable and fits ``cfg``'s model (one-line errors)."""
    current = dataclasses.asdict(cfg.model)
    have = store.checkpoint_sizes(path, cfg.train.trust_checkpoint)  # refuses a damaged or unsafe one
    saved = None
    if store.checkpoint_format(path) == "safetensors":
        saved = store.read_trainer_file(path).get("model")
    if cfg.train.ema_decay > 0 and not any(k.startswith("weights.ema.") for k in have):
        raise store.CheckpointError(f"checkpoint {path} holds no EMA weights (it was saved with train.ema_decay=0): "
                                    f"resume with train.ema_decay=0, or start a new run (another train.out_dir)")
    ours = {k: v for k, v in have.items() if k.startswith("weights.master.")}
    wanted = store.master_sizes(current)
    if saved is None:  # a legacy checkpoint records no config: compare the tensors by name, both ways
        bad = sorted(set(ours) ^ set(wanted)) + sorted(k for k in wanted if k in ours and ours[k] != wanted[k])
        if bad:
            raise store.CheckpointError(
                f"checkpoint {path} was saved by a different model shape ({len(bad)} master tensors differ, e.g. "
                f"{bad[0]}): resume with the run's model settings (its config.yaml), or start a new run "
                f"(another train.out_dir)")
        return
    store.check_shapes(path, wanted, ours, saved, current)
