"""Pipeline bubbles: simulated schedules against Table 2 of the DeepSeek-V3 report.

Builds 1F1B, ZB1P, DualPipe and DualPipeV for PP = 4, 8, 16 stages, times them with the
discrete-event simulator and prints the measured bubble and peak activation count next to the
report's formulas, so anyone changing a schedule generator sees at once whether it still
reaches the paper's numbers.  Runs in a couple of seconds on a laptop CPU.

Conventions (see ``hai_llm.pipeline.simulator``): PP is the number of pipeline STAGES; 1F1B,
ZB1P and DualPipe put one stage (per direction) on each of PP ranks, DualPipeV folds PP stages
onto PP/2 ranks.  Costs are per chunk: F forward, B full backward, W its weight-grad part,
FB an overlapped forward+backward pair (the report's F&B).  The default FB = F + B is the
upper bound (overlap hides communication but saves no compute).  "bubble" is the idle time of
the least busy rank, makespan minus the sum of its own action costs.

    python benchmarks/bench_bubbles.py [--F 1 --B 2 --W 1 --FB 3 --comm 0]
                                       [--gantt out.png] [--trace out.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Sequence

from hai_llm.pipeline.gantt import save_gantt, write_chrome_trace
from hai_llm.layout.schedules import DualPipe, DualPipeV, OneFOneB, ZB1P
from hai_llm.pipeline.simulator import (Costs, check_schedule, formula_activations, formula_bubble,
                                        simulate)

HEADERS = ("schedule", "PP", "ranks", "micro", "makespan", "bubble", "Table 2", "match",
           "bubble %", "act", "Table 2 act")


def build_rows(pps: Sequence[int], costs: Costs, micro_per_stage: int = 2) -> List[tuple]:
    """One row per (schedule, PP); every schedule gets ``micro_per_stage * PP`` micro-batches."""
    rows = []
    for pp in pps:
        n_micro = micro_per_stage * pp
        for name, sched in (("1F1B", OneFOneB(pp, n_micro)), ("ZB1P", ZB1P(pp, n_micro)),
                            ("DualPipe", DualPipe(pp, n_micro)),
                            ("DualPipeV", DualPipeV(pp // 2, n_micro))):
            check_schedule(sched)
            res = simulate(sched, costs)
            want = formula_bubble(name, pp, costs)
            act, want_act = max(res.peak_activations), formula_activations(name, pp)
            rows.append((name, pp, sched.pp, n_micro, f"{res.makespan:g}", f"{res.max_bubble:g}",
                         f"{want:g}", "yes" if abs(res.max_bubble - want) < 1e-9 else "NO",
                         f"{100 * res.bubble_rate:.1f}", act,
                         f"{want_act}" + ("" if act == want_act else " (NO)")))
    return rows


def render(rows: Sequence[tuple], title: str) -> None:
    """Print with rich when installed, else as aligned plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(HEADERS, *rows)]
        print(title)
        for line in (HEADERS, *rows):
            print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
        return
    table = Table(title=title)
    for i, head in enumerate(HEADERS):
        table.add_column(head, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(x) for x in row))
    Console(width=140).print(table)


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--F", type=float, default=1.0, help="forward chunk cost")
    ap.add_argument("--B", type=float, default=2.0, help="full backward chunk cost")
    ap.add_argument("--W", type=float, default=1.0, help="weight-grad part of B")
    ap.add_argument("--FB", type=float, default=None,
                    help="overlapped F&B pair cost (default F+B, no compute speed-up)")
    ap.add_argument("--comm", type=float, default=0.0, help="P2P latency per transfer")
    ap.add_argument("--pp", type=int, nargs="+", default=[4, 8, 16], help="stage counts")
    ap.add_argument("--gantt", help="write a Gantt PNG of DualPipe PP=8, 20 micro-batches")
    ap.add_argument("--trace", help="write the same timeline as Chrome-trace JSON")
    args = ap.parse_args(list(argv) or None)

    costs = Costs(F=args.F, B=args.B, W=args.W, FB=args.FB, comm=args.comm)
    t0 = time.perf_counter()
    rows = build_rows(args.pp, costs)
    fb_note = ("F&B = F + B, the no-speed-up upper bound" if args.FB is None
               else f"F&B = {args.FB:g}")
    render(rows, f"Pipeline bubbles, F={costs.F:g} B={costs.B:g} W={costs.W:g} "
                 f"({fb_note}), comm={costs.comm:g}")
    print("bubble = makespan - busy time of the least busy rank; act = peak chunk "
          "activations alive on one rank.")
    print("Table 2 is exact when W <= F = B - W and comm = 0 (ZB1P needs only "
          "W <= min(F, B - W)); see hai_llm/pipeline/simulator.py.")
    if args.gantt or args.trace:
        res = simulate(DualPipe(8, 20), costs)
        if args.gantt:
            save_gantt(res.all_spans(), args.gantt,
                       f"DualPipe, 8 ranks, 20 micro-batches (F={costs.F:g}, B={costs.B:g}, "
                       f"W={costs.W:g}, F&B={costs.fb:g})")
            print(f"wrote {args.gantt}")
        if args.trace:
            write_chrome_trace(res.all_spans(), args.trace)
            print(f"wrote {args.trace}")
    print(f"done in {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
