"""`hai-llm-cost`: time and money of a training run, simulated from the layout the trainer runs.

    hai-llm-cost                                     # DeepSeek-V3 671B on 2048 H800 (paper layout)
    hai-llm-cost --balance-ranks --paper             # rank-balanced stage split, next to the paper
    hai-llm-cost --what-if --timeline step.png       # DualPipe vs 1F1B vs ZB1P, FP8 vs BF16, ...
    hai-llm-cost --hardware h200 --tokens 1e12 --price 3.5
    hai-llm-cost --model small --world 8 --pp 2 --ep 2 --n-micro 8 --seq-len 256 --hardware cpu_measured \
        --precision bf16 --gemm-dtype fp32

Defaults are the dry run's (``hai-llm-dryrun``): 256 nodes x 8 GPUs, PP16 x DP128 (ZeRO-1),
EP64 over 8 nodes, DualPipe, FP8, 4K sequences, micro-batch 1, n_micro 120 (15360 sequences per
step), hierarchical dispatch, H800 (``configs/hardware/h800.yaml``), 14.8T tokens at $2 per
GPU-hour. The layout comes from ``build_layout`` exactly as the trainer builds it; the step is
simulated by ``hai_llm.planner.step_sim`` (docs/cost.md). Runs in seconds, allocates nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from hai_llm.layout.layout import TRANSPORTS
from hai_llm.layout.schedules import SCHEDULES


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hai-llm-cost", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--model", default="deepseek_v3_671b", help="model config name or YAML path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="model config override, repeatable")
    ap.add_argument("--hardware", default="h800", help="profile in configs/hardware/ or a YAML path")
    g = ap.add_argument_group("layout (as hai-llm-dryrun)")
    g.add_argument("--world", type=int, default=None)
    g.add_argument("--pp", type=int, default=16)
    g.add_argument("--dp", type=int, default=None)
    g.add_argument("--sp", type=int, default=1)
    g.add_argument("--ep", type=int, default=64)
    g.add_argument("--gpus-per-node", type=int, default=None, help="default: the profile's")
    g.add_argument("--seq-len", type=int, default=4096)
    g.add_argument("--micro-batch", type=int, default=1)
    g.add_argument("--n-micro", type=int, default=None)
    g.add_argument("--schedule", default="dualpipe", choices=sorted(SCHEDULES))
    g.add_argument("--precision", default="fp8", choices=("fp8", "bf16"))
    g.add_argument("--gemm-dtype", default=None, choices=("fp8", "bf16", "fp32"),
                   help="datatype the GEMMs run in (default from --precision; fp32 for CPU runs)")
    g.add_argument("--transport", default="hierarchical", choices=TRANSPORTS,
                   help="expert all-to-all (parallel.transport); symmetric is priced as hierarchical: "
                        "it moves the same bytes over the same links")
    g.add_argument("--recompute", default="selective", choices=("selective", "none", "full"))
    g.add_argument("--stage-layers", type=int, nargs="+", default=None, metavar="N")
    g.add_argument("--balance-ranks", action="store_true",
                   help="use the stage split that balances simulated time per pipeline rank "
                        "(printed as a parallel.stage_layers override)")
    c = ap.add_argument_group("cost")
    c.add_argument("--tokens", type=float, default=14.8e12, help="training tokens (default 14.8T)")
    c.add_argument("--price", type=float, default=2.0, help="$ per GPU-hour")
    o = ap.add_argument_group("output")
    o.add_argument("--paper", action="store_true", help="print DeepSeek-V3's reported cost alongside")
    o.add_argument("--what-if", action="store_true",
                   help="table: schedules, FP8 vs BF16, flat vs hierarchical, EP 32/64/128, micro-batches")
    o.add_argument("--timeline", default=None, metavar="PNG", help="draw the simulated step")
    o.add_argument("--json", default=None, metavar="PATH")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    start = time.perf_counter()
    from hai_llm.config.load import load_model_args
    from hai_llm.layout import ParallelDims
    from hai_llm.planner.cost import Setting, cost_report, format_report, format_what_if, plan_setting, \
        timeline_png, what_if
    from hai_llm.planner.hardware import load_profile
    from hai_llm.planner.step_sim import simulate_step

    try:
        hw = load_profile(a.hardware)
        gpn = a.gpus_per_node or hw.gpus_per_node
        if a.dp is None:
            world = a.world if a.world is not None else 2048
            if world % (a.pp * a.sp):
                raise ValueError(f"world={world} is not divisible by pp x sp = {a.pp * a.sp}: give --dp")
            dp = world // (a.pp * a.sp)
        else:
            dp, world = a.dp, a.world if a.world is not None else a.pp * a.dp * a.sp
        dims = ParallelDims(world_size=world, pp=a.pp, dp=dp, sp=a.sp, ep=a.ep, gpus_per_node=gpn)
        args = load_model_args(a.model, a.overrides)
        base = Setting(dims=dims, seq_len=a.seq_len, micro_batch=a.micro_batch, n_micro=a.n_micro,
                       schedule=a.schedule, precision=a.precision, transport=a.transport,
                       recompute=a.recompute, stage_layers=a.stage_layers, balance_ranks=a.balance_ranks)
        plan = plan_setting(args, base, hw)
        act = 4.0 if a.gemm_dtype == "fp32" else None
        sim = simulate_step(plan, args, hw, transport=a.transport, gemm_dtype=a.gemm_dtype, act_bytes=act,
                            keep_spans=a.timeline is not None)
        rep = cost_report(plan, args, hw, transport=a.transport, tokens=a.tokens, price=a.price,
                          gemm_dtype=a.gemm_dtype, sim=sim)
    except (ValueError, FileNotFoundError) as e:
        print(f"hai-llm-cost: {e}", file=sys.stderr)
        return 2
    print(format_report(rep, paper=a.paper))
    if a.balance_ranks:
        print(f"stage split used: parallel.stage_layers=[{','.join(map(str, rep.stage_layers))}]")
    out = {"report": rep.to_dict()}
    if a.what_if:
        rows = what_if(args, base, hw, tokens=a.tokens, price=a.price)
        print("\nwhat-if (one knob at a time):")
        print(format_what_if(rows))
        out["what_if"] = [{"variant": r["variant"], "error": r["error"],
                           **(r["report"].to_dict() if r["report"] else {})} for r in rows]
    if a.timeline:
        timeline_png(sim, a.timeline, title=rep.layout)
        print(f"timeline written to {a.timeline}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"report written to {a.json}")
    print(f"planned in {time.perf_counter() - start:.1f} s (no weights allocated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
