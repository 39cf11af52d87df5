"""A trained run, into one process: its model (rebuilt from the run's saved config, weights from a
checkpoint of any layout) and its tokenizer.

A run folder (``train.out_dir``; the main job's is ``runs/<model>/<time>/``) holds the resolved
``config.yaml`` the launcher saved and ``checkpoints/step_N/``. Checkpoints store every parameter
in global coordinates (``hai_llm.checkpoint.zero_state``), whatever the pipeline, data,
sequence and expert degrees that wrote them, so ``hai_llm.checkpoint.store.load_weights`` reads
them into a plain full model here: no process group, no layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from hai_llm.checkpoint.store import checkpoint_format, latest_checkpoint, load_weights
from hai_llm.data.tokenizer import build_tokenizer
from hai_llm.model.args import ModelArgs
from hai_llm.model.transformer import Transformer, build_model

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"


@dataclass
class LoadedRun:
    run_dir: Path
    checkpoint: Path
    model: Transformer
    tokenizer: object  # hai_llm.data.tokenizer.Tokenizer
    args: ModelArgs


def find_run(path: str | Path) -> Path:
    """``path`` itself when it is a run folder (holds ``config.yaml``); else the newest run folder
    directly inside it that has a checkpoint (timestamped names sort in time order), so
    ``runs/small`` means the main job's latest run."""
    p = Path(path).expanduser()
    if (p / CONFIG_FILE).is_file():
        return p
    if p.is_dir():
        runs = sorted(d for d in p.iterdir() if (d / CONFIG_FILE).is_file() and latest_checkpoint(d / CHECKPOINTS))
        if runs:
            return runs[-1]
    raise FileNotFoundError(f"{p} is neither a run folder (with {CONFIG_FILE}) nor a folder of runs with "
                            f"checkpoints; pass the train.out_dir of a finished run, e.g. runs/small/<time>")


def run_model_args(run_dir: Path) -> ModelArgs:
    conf = OmegaConf.load(run_dir / CONFIG_FILE)
    args = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelArgs), conf.model))
    args.recompute = "none"  # a training memory setting; generation keeps no activations anyway
    return args


def load_run(path: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> LoadedRun:
    """The model of run ``path`` (see :func:`find_run`) with the weights of ``checkpoint`` (a
    ``step_N`` folder; default: the run's latest) on ``device``, in eval mode, and its tokenizer."""
    run = find_run(path)
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run / CHECKPOINTS)
    if ckpt is None or not checkpoint_format(ckpt):
        raise FileNotFoundError(f"no complete checkpoint {'at ' + str(ckpt) if ckpt else 'in ' + str(run / CHECKPOINTS)}; "
                                f"train the run to its first checkpoint (train.ckpt_every, or the end)")
    args = run_model_args(run)
    model = build_model(args, device=device, seed=0)  # every value is overwritten by the checkpoint
    load_weights(ckpt, model)
    if dtype != torch.float32:
        model = model.to(dtype)
        model.reset_buffers()
    tokenizer = build_tokenizer(OmegaConf.load(run / CONFIG_FILE).data.tokenizer)
    return LoadedRun(run, ckpt, model.eval(), tokenizer, args)
