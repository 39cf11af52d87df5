"""Our ZeRO-1 next to DeepSpeed's ZeRO stage 1: optimizer-state bytes per rank and step time.

Both optimizers train the same dense model in the same processes (gloo ranks on this machine),
from the same weights on the same batches (hai_llm/parallel/deepspeed_zero1.py). Each step runs
ours, then DeepSpeed's, so background load hits both alike; a step's time is the slowest rank's,
and the table shows the median over the steps after the first two (allocations, DeepSpeed's
lazy set-up). Optimizer state is what each keeps per rank: fp32 master shard + two fp32 AdamW
moments. With ``--check`` the full parameters and moments are gathered and compared after
every step as well (the test's comparison, tests/test_deepspeed_zero1.py) and the largest
relative difference is printed.

CPU ranks share this machine's cores, so times are a regression baseline for the overheads
of the two implementations (ours: one reduce-scatter and one all-gather per bucket;
DeepSpeed's: its gradient hooks and buckets), not a speed claim. Re-run on a quiet machine:

    python benchmarks/bench_deepspeed_zero1.py [--world 2,4] [--steps 10] [--model small] [--check]
"""
from __future__ import annotations

import argparse
import statistics
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="2,4", help="comma-separated rank counts")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="small", help="a configs/model name; made dense (every layer, no MTP)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step")
    ap.add_argument("--check", action="store_true", help="also gather and compare the full state every step")
    args = ap.parse_args(argv)
    try:
        import deepspeed  # noqa: F401
    except Exception as e:
        print(f"bench_deepspeed_zero1: deepspeed cannot be imported ({e}); pip install -e .[test]", file=sys.stderr)
        return 2

    from hai_llm.config.load import load_model_args
    from hai_llm.parallel.deepspeed_zero1 import STATE_KEYS, Zero1Case, compare_rank
    from hai_llm.parallel.spawn import run_ranks

    n_layers = load_model_args(args.model).n_layers
    case = Zero1Case(model=args.model, model_overrides=(f"n_dense_layers={n_layers}", "n_mtp_layers=0"),
                     steps=args.steps, micro_batch=args.micro_batch, seq_len=args.seq_len, compare=args.check)
    print(f"model {args.model} (dense, {n_layers} layers), {args.micro_batch} x {args.seq_len} tokens per rank, "
          f"{args.steps} steps, fp32, AdamW + clip {case.optim.grad_clip}")
    head = "| ranks | params | state bytes/rank ours | DeepSpeed | step ms ours | DeepSpeed | ours/DS |"
    if args.check:
        head += " max rel. diff (param, m, v) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for world in (int(w) for w in args.world.split(",")):
        res = run_ranks(compare_rank, world, case, timeout=3600)
        skip = 2 if args.steps > 3 else 0
        steps = range(skip, args.steps)
        t_ours = statistics.median(max(r["rows"][s]["time_ours"] for r in res) for s in steps) * 1e3
        t_ds = statistics.median(max(r["rows"][s]["time_ds"] for r in res) for s in steps) * 1e3
        b_ours, b_ds = max(r["bytes_ours"] for r in res), max(r["bytes_ds"] for r in res)
        line = (f"| {world} | {res[0]['n_params']:,} | {b_ours:,} | {b_ds:,} | {t_ours:.1f} | {t_ds:.1f} | "
                f"{t_ours / t_ds:.2f} |")
        if args.check:
            worst = [max(row[k] for r in res for row in r["rows"]) for k in STATE_KEYS]
            line += " " + ", ".join(f"{w:.1e}" for w in worst) + " |"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
