"""`hai-llm-dryrun`: memory and traffic of every rank role of a parallel layout, in seconds.

    hai-llm-dryrun                                   # DeepSeek-V3 on 2048 GPUs (docs/deepseek_v3.md)
    hai-llm-dryrun --schedule 1f1b --precision bf16  # the same mesh, another schedule
    hai-llm-dryrun --world 4096 --pp 16 --ep 64      # dp follows: world / (pp * sp)
    hai-llm-dryrun --show-groups 130 --json plan.json
    hai-llm-dryrun --check-collectives               # simulate one step's collective order

Defaults are the production layout: 256 nodes x 8 GPUs, PP16 x DP128 (ZeRO-1), EP64 over 8
nodes, DualPipe, FP8, 4K sequences, micro-batch 1 and n_micro = 15360 sequences / dp = 120 (the
paper's global batch after the ramp-up; even and >= 2 pp as DualPipe requires). The layout is
built by ``hai_llm.layout.build_layout``, exactly as the trainer builds it (same stage split,
schedule and micro-batches): a bad one exits with status 2 and the message naming the fix.
No weights are allocated; the model is built on the meta device (``hai_llm.planner``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from hai_llm.layout.schedules import SCHEDULES


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hai-llm-dryrun", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--model", default="deepseek_v3_671b",
                    help="model config name in configs/model/ or a YAML path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="model config override, repeatable (e.g. --set n_layers=8)")
    g = ap.add_argument_group("layout")
    g.add_argument("--world", type=int, default=None, help="GPUs (default pp*dp*sp, or 2048)")
    g.add_argument("--pp", type=int, default=16)
    g.add_argument("--dp", type=int, default=None, help="default world / (pp * sp)")
    g.add_argument("--sp", type=int, default=1)
    g.add_argument("--ep", type=int, default=64)
    g.add_argument("--gpus-per-node", type=int, default=8)
    t = ap.add_argument_group("training")
    t.add_argument("--seq-len", type=int, default=4096)
    t.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    t.add_argument("--n-micro", type=int, default=None,
                   help="micro-batches per step (default: the paper's 15360-sequence batch / dp, "
                        "rounded up to what the schedule needs)")
    t.add_argument("--schedule", default="dualpipe", choices=sorted(SCHEDULES))
    t.add_argument("--stage-layers", type=int, nargs="+", default=None, metavar="N",
                   help="layers per pipeline stage (parallel.stage_layers; default balanced by cost)")
    t.add_argument("--precision", default="fp8", choices=("fp8", "bf16"))
    t.add_argument("--optim-dtype", default="bf16", choices=("bf16", "fp32"),
                   help="AdamW moment dtype (the paper: bf16)")
    t.add_argument("--no-zero1", dest="zero1", action="store_false",
                   help="replicate master weights and optimizer state (no ZeRO-1)")
    t.add_argument("--recompute", default="selective", choices=("selective", "none", "full"))
    t.add_argument("--unfused-ce", dest="fused_ce", action="store_false",
                   help="count fp32 log-probabilities over the vocabulary as saved activations")
    o = ap.add_argument_group("output")
    o.add_argument("--show-groups", type=int, default=None, metavar="RANK",
                   help="build the DeviceMesh for RANK under torch's fake process group and list "
                        "the groups it joins")
    o.add_argument("--check-collectives", action="store_true",
                   help="simulate one step's collectives (real sizes, meta tensors, fake process "
                        "group) for a sample of ranks (rank 0's pp column + one peer per group) "
                        "and check every group sees them in the same order; ~0.5-2 s per rank")
    o.add_argument("--json", default=None, metavar="PATH", help="write the whole plan as JSON")
    o.add_argument("--plain", action="store_true", help="plain-text tables even if rich is installed")
    o.add_argument("--formulas", action="store_true", help="print the formulas behind the numbers")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    start, cpu0 = time.perf_counter(), time.process_time()
    from hai_llm.config.load import load_model_args
    from hai_llm.layout import ParallelDims
    from hai_llm.planner import plan as P
    from hai_llm.planner import report as R

    try:
        if a.dp is None:
            world = a.world if a.world is not None else 2048
            if world % (a.pp * a.sp):
                raise ValueError(f"world={world} is not divisible by pp x sp = {a.pp * a.sp}: "
                                 f"choose world as a multiple of {a.pp * a.sp} or give --dp")
            dp = world // (a.pp * a.sp)
        else:
            dp = a.dp
            world = a.world if a.world is not None else a.pp * dp * a.sp
        dims = ParallelDims(world_size=world, pp=a.pp, dp=dp, sp=a.sp, ep=a.ep,
                            gpus_per_node=a.gpus_per_node)
        args = load_model_args(a.model, a.overrides)
        plan = P.plan_layout(args, dims, seq_len=a.seq_len, micro_batch=a.micro_batch,
                             n_micro=a.n_micro, schedule=a.schedule, precision=a.precision,
                             zero1=a.zero1, optim_dtype=a.optim_dtype, recompute=a.recompute,
                             fused_ce=a.fused_ce, stage_layers=a.stage_layers)
    except (ValueError, FileNotFoundError) as e:
        print(f"hai-llm-dryrun: invalid layout: {e}", file=sys.stderr)
        return 2
    R.print_plan(plan, plain=a.plain)
    if a.formulas:
        print("\nformulas:")
        for k, v in plan.formulas.items():
            print(f"  {k}: {v}")
    out = plan.to_dict()
    if a.show_groups is not None:
        try:
            groups = R.rank_groups(dims, a.show_groups)
        except (ValueError, RuntimeError) as e:
            print(f"hai-llm-dryrun: --show-groups: {e}", file=sys.stderr)
            return 2
        print()
        print(R.format_groups(dims, a.show_groups, groups))
        out["groups_of_rank"] = {"rank": a.show_groups, **groups}
    if a.check_collectives:
        from hai_llm.planner.collectives import sample_ranks, validate_plan_collectives

        ranks = sample_ranks(dims)
        t0 = time.perf_counter()
        report = validate_plan_collectives(plan, ranks)
        print(f"\ncollective order, ranks {ranks[:6]}{'...' if len(ranks) > 6 else ''} "
              f"({len(ranks)} simulated, {time.perf_counter() - t0:.1f} s): {report}")
        out["collectives"] = {"ranks": ranks, "ok": report.ok, "report": str(report)}
        if not report.ok:
            return 1
    elapsed = time.perf_counter() - start
    out["elapsed_s"] = elapsed
    out["cpu_s"] = time.process_time() - cpu0
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"plan written to {a.json}")
    print(f"dry run finished in {elapsed:.1f} s ({out['cpu_s']:.1f} s CPU; no weights allocated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
