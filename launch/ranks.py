"""Running a resolved config on this process, on N simulated ranks, or under torchrun.

* torchrun (``RANK`` / ``WORLD_SIZE`` set): this process is one rank of a real job; the
  process group comes from the environment (NCCL on GPUs, gloo on CPU).
* ``parallel.nprocs > 1`` without torchrun: spawn that many CPU processes with gloo on
  this machine (one OpenMP thread each), the virtual-node layout given by
  ``parallel.gpus_per_node``. Used to debug whole layouts on a laptop or CI machine.
* otherwise: train in this process.
"""
from __future__ import annotations

from pathlib import Path

from hai_llm.config.schema import Config
from hai_llm.train import checkpoint as ckpt


def _summary(trainer, results) -> dict:
    import statistics

    last = [r.loss for r in results[-5:] if not r.skipped]
    return {"final_loss": statistics.fmean(last) if last else float("nan"), "steps": trainer.step,
            "out_dir": str(trainer.out_dir)}


def launch(cfg: Config, cfg_yaml: str) -> dict:
    from hai_llm.train.trainer import Trainer

    ckpt.save_resolved_config(cfg.train.out_dir, cfg_yaml)
    trainer = Trainer(cfg, out_dir=Path(cfg.train.out_dir))
    results = trainer.fit()
    summary = _summary(trainer, results)
    print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, outputs in {summary['out_dir']}")
    return summary
