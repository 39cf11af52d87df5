"""Start a new run from another run's checkpoint (``train.init_from``): the workflow of the
context-extension stages (docs/training_recipe.md#long-context-extension), and of any
continued training that must not mix its outputs with the run it starts from.

What is loaded: the fp32 master weights and the persistent buffers (the routing biases), and
with ``train.init_optimizer`` also the AdamW moments and step count. What is not: the step,
the tokens consumed, the data position, the lr schedule's horizon: the new run starts at step 0
of its own config (another ``data.seq_len``, another schedule). RoPE tables are not in
checkpoints (non-persistent buffers): they follow the new run's ``model`` config, so the same
weights run with YaRN switched on. Checkpoints keep every parameter in global coordinates, so
the new run may use another parallel layout than the old one.
"""
from __future__ import annotations

from pathlib import Path

from hai_llm.checkpoint import store as ckpt
from hai_llm.checkpoint.zero_state import after_load, dcp_state


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder named by ``path``: a ``step_*`` folder itself, a ``checkpoints/``
    folder (its ``latest``) or a run folder (its ``checkpoints/latest``)."""
    p = Path(path)
    if ckpt.checkpoint_format(p):
        return p
    for root in (p, p / "checkpoints"):
        found = ckpt.latest_checkpoint(root, quiet=True) if root.is_dir() else None
        if found is not None:
            return found
    raise ValueError(f"train.init_from={path} is not a checkpoint: give a step_* folder, a checkpoints/ "
                     f"folder or a run folder with checkpoints/latest")


def init_from_checkpoint(trainer, path: str | Path, with_optimizer: bool = False) -> Path:
    """Load the weights (and optionally the optimizer state) of checkpoint ``path`` into
    ``trainer``'s live shards, under its own layout; returns the checkpoint folder."""
    src = resolve_checkpoint(path)
    kinds = ("master.", "exp_avg.", "exp_avg_sq.") if with_optimizer else ("master.",)
    weights = {k: v for k, v in dcp_state(trainer.optimizer).items() if k.startswith(kinds)}
    try:
        st = ckpt.load_checkpoint(src, weights=weights, buffers=trainer._buffers())
    except Exception as e:  # DCP's planner errors name tensors, not the cause the user can fix
        raise ValueError(f"train.init_from={path}: cannot load {src} into this model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); the model config must match the run "
                         f"that wrote it except for max_seq_len and the RoPE/YaRN keys") from e
    # weights only: AdamW starts fresh (step 0, the zero moments it was built with)
    after_load(trainer.optimizer, float(st["optim_step"]) if with_optimizer else 0.0, None)
    if trainer.rt.is_main:
        what = "weights and optimizer state" if with_optimizer else "weights"
        print(f"initialised {what} from {src} (train.init_from)")
    return src
