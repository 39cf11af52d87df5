"""Running a resolved config on this process, on N simulated ranks, or under torchrun.

* torchrun (``WORLD_SIZE`` > 1 in the environment): this process is one rank of a real
  job; the process group comes from the environment (NCCL on GPUs, gloo on CPU).
* ``parallel.nprocs > 1`` without torchrun: spawn that many CPU processes with gloo on
  this machine (one OpenMP thread each); ``parallel.gpus_per_node`` makes virtual nodes.
* otherwise: train in this process.

The layout is built (and validated) by ``hai_llm.layout.build_layout`` before any process
starts (:func:`check_layout`), so a bad layout fails at once with its message instead of
inside N ranks; every rank then builds the same layout again and hands it to its runtime.
Under torchrun that includes the node size: ``parallel.gpus_per_node`` 0 (auto) becomes
torchrun's ``LOCAL_WORLD_SIZE`` and an explicit other value is refused
(``hai_llm.layout.layout.resolve_gpus_per_node``).

Faults (docs/failures_launch.md): simulated ranks die with the launcher and a dead rank is
named with its signal (``hai_llm.parallel.spawn``); under torchrun each worker dies with its
agent, a restarted attempt continues in the first attempt's run folder from its latest
checkpoint and gets a rendezvous namespace of its own (``hai_llm.launch.elastic``); both
run every collective under ``parallel.collective_timeout_s`` with the flight recorder of
``hai_llm.parallel.watchdog``, which prints a rank's last collectives when one hangs or a
step stops making progress; under NCCL torch's own flight recorder is on too
(``TORCH_NCCL_TRACE_BUFFER_SIZE``, ``TORCH_NCCL_DUMP_ON_TIMEOUT``; docs/failures_launch.md).
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

from hai_llm.checkpoint import store as ckpt
from hai_llm.config.schema import Config
from hai_llm.launch.external import is_external_launch, launcher_name
from hai_llm.layout import build_layout


def _summary(trainer, results) -> dict:
    import resource

    last = [r.loss for r in results[-5:] if not r.skipped]
    steps = [r for r in results if not r.skipped]
    return {"final_loss": statistics.fmean(last) if last else float("nan"), "steps": trainer.step,
            "out_dir": str(trainer.out_dir), "losses": [r.loss for r in results],
            "tokens_per_s": trainer.tokens_per_s, "skipped": len(results) - len(steps),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "optimizer_bytes": trainer.optimizer.state_bytes()}


def world_size_of(cfg: Config) -> int:
    """torchrun's WORLD_SIZE when launched by torchrun, else parallel.nprocs."""
    if is_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if cfg.parallel.nprocs not in (1, world):
            who = launcher_name(os.environ)
            raise ValueError(f"parallel.nprocs={cfg.parallel.nprocs} but {who} started {world} ranks: "
                             f"drop parallel.nprocs ({who} decides) or make them equal")
        return world
    return cfg.parallel.nprocs


def is_torchrun() -> bool:
    """This process was started by torchrun or the deepspeed launcher, which set the same
    variables (``hai_llm.launch.external``), not one of our simulated ranks."""
    return is_external_launch(os.environ)


def check_layout(cfg: Config):
    """The launcher's validation, before anything is written or started: the world size
    (torchrun's or ``parallel.nprocs``) and the layout on it, node size included."""
    return build_layout(cfg, world_size_of(cfg))


def _train_rank(rank: int, world: int, cfg: Config) -> dict:
    """Body of one rank (process group already initialised)."""
    from hai_llm.parallel.gloo_staging import simulated_rank_staging
    from hai_llm.runtime import build_runtime
    from hai_llm.train.trainer import Trainer

    # simulated gloo ranks on CUDA: all share cuda:0, collectives staged through host memory
    # (gloo lacks reduce-scatter / all-to-all / P2P on CUDA tensors); a no-op under torchrun
    with simulated_rank_staging(cfg.train.device):
        runtime = build_runtime(cfg, build_layout(cfg, world))
        trainer = Trainer(cfg, runtime=runtime, out_dir=Path(cfg.train.out_dir))
        results = trainer.fit()
    return _summary(trainer, results)


def _torchrun(cfg: Config, cfg_yaml: str, world: int) -> dict:
    import dataclasses

    import torch
    import torch.distributed as dist

    from hai_llm.launch import elastic
    from hai_llm.parallel.watchdog import CollectiveWatchdog, as_timedelta, die_with_parent, nccl_trace_env

    die_with_parent()  # torchrun's agent: a worker never outlives it
    limit = cfg.parallel.collective_timeout_s
    rank = int(os.environ["RANK"])
    backend = "nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        os.environ.update(nccl_trace_env(os.environ))  # torch's flight recorder, unless the user chose
    store = elastic.agent_store(limit)
    if store is None:  # not torchrun's agent store (a hand-made env://): torch's own rendezvous
        with elastic.setup_step("init_process_group(env://)", limit):
            dist.init_process_group(backend, timeout=as_timedelta(limit))
    else:
        pg_store = elastic.process_group_store(store, world, limit)
        with elastic.setup_step("init_process_group", limit):
            dist.init_process_group(backend, store=pg_store, rank=rank, world_size=world, timeout=as_timedelta(limit))
    try:
        with CollectiveWatchdog(rank, limit) as dog:
            try:
                # each node's Hydra picked its own timestamped folder: everyone uses rank 0's
                box = [cfg.train.out_dir, cfg_yaml]
                with elastic.setup_step("broadcasting the run folder from rank 0", limit):
                    dist.broadcast_object_list(box, src=0)
                if store is not None and rank == 0:  # a restarted attempt continues in it
                    elastic.remember_run_dir(store, box[0])
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=box[0]))
                ckpt.save_resolved_config(cfg.train.out_dir, box[1])
                return _train_rank(rank, world, cfg)
            except Exception as e:
                report = dog.describe_failure(e)
                if report:
                    from hai_llm.parallel.watchdog import print_report

                    print_report(rank, report)
                raise
    finally:
        dist.destroy_process_group()


def launch(cfg: Config, cfg_yaml: str) -> dict:
    world = check_layout(cfg).world_size  # a bad layout fails here, before anything is written or started
    if not is_torchrun() or os.environ.get("RANK", "0") == "0":  # out_dir, resume target, device: one line each
        from hai_llm.checkpoint.preflight import check_run_folder

        check_run_folder(cfg)
    if is_torchrun() and world > 1:
        summary = _torchrun(cfg, cfg_yaml, world)
        if int(os.environ.get("RANK", 0)) != 0:
            return summary
        return _finish(cfg, summary)
    ckpt.save_resolved_config(cfg.train.out_dir, cfg_yaml)
    if world == 1:
        from hai_llm.train.trainer import Trainer

        trainer = Trainer(cfg, out_dir=Path(cfg.train.out_dir))  # builds the layout of one rank
        summary = _summary(trainer, trainer.fit())
    else:
        from hai_llm.parallel.spawn import run_ranks

        summary = run_ranks(_train_rank, world, cfg, timeout=365 * 24 * 3600,
                            collective_timeout_s=cfg.parallel.collective_timeout_s)[0]
    return _finish(cfg, summary)


def _finish(cfg: Config, summary: dict) -> dict:
    done = Path(cfg.train.out_dir) / "summary.json"
    if not summary["losses"] and done.is_file():  # a finished run resumed: nothing trained, keep its summary
        import json

        print(f"done: nothing trained, {done} kept")
        return {**json.loads(done.read_text()), "losses": []}
    ckpt.write_json_atomic(Path(cfg.train.out_dir) / "summary.json",
                           {k: v for k, v in summary.items() if k != "losses"})
    print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
          f"{summary['tokens_per_s']:.0f} tokens/s, outputs in {summary['out_dir']}")
    return summary
