"""Shared machinery of the parallel-equivalence tests: build a small training config,
run it single-process or on spawned ranks, and collect per-step losses, the global
gradient norm and per-parameter gradients after the first step (experts stitched across
expert-parallel ranks) for comparison."""
from __future__ import annotations

import torch

from hai_llm.config.load import load_model_args
from hai_llm.config.schema import Config, DataConfig, LoggingConfig, OptimConfig, ParallelConfig, TrainConfig


def make_config(data_dir: str, out_dir: str, steps: int = 3, model_overrides: list[str] | None = None,
                parallel: dict | None = None, precision: str = "fp32", global_batch: int = 8,
                micro_batch: int = 1, seq_len: int = 32) -> Config:
    return Config(
        model=load_model_args("tiny", model_overrides or []),
        data=DataConfig(path=data_dir, seq_len=seq_len),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, grad_clip=0.0),
        train=TrainConfig(steps=steps, global_batch=global_batch, micro_batch=micro_batch, seed=7, device="cpu",
                          precision=precision, out_dir=out_dir, resume=False),
        parallel=ParallelConfig(**(parallel or {})),
        logging=LoggingConfig(wandb="disabled", progress=False, plot=False),
    )


def run_steps(trainer, steps: int) -> dict:
    """Losses and grad norms of ``steps`` optimizer steps; full gradients of step 1."""
    losses, norms, grads, offsets = [], [], None, {}
    for s in range(steps):
        r = trainer.train_step()
        losses.append(r.loss)
        norms.append(r.grad_norm)
        if s == 0:
            grads = trainer.optimizer.gather_full_grads()
            offsets = trainer.optimizer.expert_row_offsets()
    return {"losses": losses, "norms": norms, "grads": grads, "offsets": offsets,
            "bias": {n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("gate.bias")}}


def single_process(cfg: Config) -> dict:
    from hai_llm.train.trainer import Trainer

    return run_steps(Trainer(cfg), cfg.train.steps)


def rank_body(rank: int, world: int, cfgs: list) -> list[dict]:
    """Run every config on this rank (one spawn, several layouts)."""
    from hai_llm.layout import build_layout
    from hai_llm.runtime.mesh import MeshRuntime
    from hai_llm.train.trainer import Trainer

    out = []
    for cfg in cfgs:
        layout = build_layout(cfg, world)
        out.append(run_steps(Trainer(cfg, runtime=MeshRuntime(cfg, layout)), cfg.train.steps))
    return out


def stitch(results: list[dict]) -> dict[str, torch.Tensor]:
    """Per-parameter gradients of a layout: dense from rank 0, experts assembled from
    the slices of every rank by their global row offsets."""
    grads = dict(results[0]["grads"])
    for r in results:
        for name, (off, rows) in r["offsets"].items():
            g = r["grads"][name]
            if grads.get(name) is None or grads[name].shape[0] != rows:
                grads[name] = torch.zeros((rows,) + tuple(g.shape[1:]))
            grads[name][off:off + g.shape[0]] = g
    return grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def fit_rank(rank: int, world: int, cfg) -> list[float]:
    """Train ``cfg`` with its layout (resuming if out_dir has a checkpoint); losses."""
    from hai_llm.layout import build_layout
    from hai_llm.runtime.mesh import MeshRuntime
    from hai_llm.train.trainer import Trainer

    t = Trainer(cfg, runtime=MeshRuntime(cfg, build_layout(cfg, world)))
    return [r.loss for r in t.fit()]
