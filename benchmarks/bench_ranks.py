"""Tokens/s, peak memory and ZeRO-1 optimizer bytes per rank of the simulated-rank
default (small model, stdlib corpus) on 1, 2, 4 and 8 CPU ranks.

This machine is CPU-bound with 2 cores, so the numbers are a regression baseline for
the runtime's overheads, not a speed claim: N ranks share the same 2 cores. What must
hold is the memory column: optimizer state per rank falls as 1/(dp*sp).

    python benchmarks/bench_ranks.py [--steps 8] [--ranks 1,2,4,8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

from hai_llm.config.load import load_model_args
from hai_llm.config.schema import Config, DataConfig, LoggingConfig, ParallelConfig, TrainConfig

LAYOUTS = {1: dict(nprocs=1), 2: dict(nprocs=2, dp=2), 4: dict(nprocs=4, dp=2, sp=2, gpus_per_node=2),
           8: dict(nprocs=8, dp=4, sp=2, gpus_per_node=4)}


def bench_rank(rank: int, world: int, cfg: Config) -> dict:
    import resource

    from hai_llm.layout import build_layout
    from hai_llm.runtime import build_runtime
    from hai_llm.train.trainer import Trainer

    rt = build_runtime(cfg, build_layout(cfg, world)) if world > 1 else None
    t = Trainer(cfg, runtime=rt)
    import time

    times = []
    for _ in range(cfg.train.steps):
        t0 = time.perf_counter()
        t.train_step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[2:]) if len(times) > 2 else times[-1],
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "opt_mb": t.optimizer.state_bytes() / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ranks", default="1,2,4,8")
    a = ap.parse_args(argv)
    from hai_llm.data import ensure_prepared
    from hai_llm.parallel.spawn import run_ranks

    data = ensure_prepared(None, "data_cache/stdlib_byte_4000000", max_bytes=4_000_000)
    print("command:", "python benchmarks/bench_ranks.py " + " ".join(argv or sys.argv[1:]))
    print(f"| ranks | layout | tokens/s (all ranks) | step s | peak RSS / rank MB | optimizer state / rank MB |")
    print("|---|---|---|---|---|---|")
    for n in [int(x) for x in a.ranks.split(",")]:
        out = tempfile.mkdtemp()
        cfg = Config(model=load_model_args("small"), data=DataConfig(path=str(data), seq_len=128),
                     train=TrainConfig(steps=a.steps, global_batch=16, micro_batch=2, device="cpu",
                                       out_dir=out, resume=False),
                     parallel=ParallelConfig(**LAYOUTS[n]),
                     logging=LoggingConfig(wandb="disabled", progress=False, plot=False))
        res = run_ranks(bench_rank, n, cfg, timeout=1800) if n > 1 else [bench_rank(0, 1, cfg)]
        step = max(r["step_s"] for r in res)
        lay = " x ".join(f"{k}{v}" for k, v in LAYOUTS[n].items() if k in ("dp", "sp")) or "single"
        print(f"| {n} | {lay} | {16 * 128 / step:.0f} | {step:.3f} | {max(r['rss_mb'] for r in res):.0f} "
              f"| {max(r['opt_mb'] for r in res):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
