"""A stage split balanced by simulated time per pipeline RANK, as ``parallel.stage_layers``.

The layout's partitioner (``hai_llm.layout.partition``) balances the forward FLOPs of each
STAGE. Two things it does not see matter for the step time: (1) under DualPipe rank r holds
stages r and pp-1-r, so rank 0 carries the embedding stage AND the head + MTP stage; (2) the
output head (and MTP's pass through it) runs in BF16 under the FP8 recipe, at half the FP8
rate, so FLOPs undercount its time. ``rank_balanced_split`` tries every number of layers on the
first and on the last stage, spreads the others as evenly as possible over the middle stages
(each extra layer on the middle stage whose rank is least loaded) and keeps the split with the
lowest busiest-rank compute time per micro-batch (forward + backward + weight gradient of its
chunks, priced on the hardware profile exactly as ``step_sim`` prices them), then the lowest
busiest-stage time (micro-batches flow through the stages in turn: uneven stages idle the
pipeline even when the ranks are balanced), then the most even stages (sum of squares); the
partitioner's own split is a candidate too and wins ties.
The result is a list of layer counts to pass as ``parallel.stage_layers`` (the trainer runs
it as given; ``hai-llm-cost --balance-ranks`` prints the override).
"""
from __future__ import annotations

from hai_llm.layout import Layout
from hai_llm.model.args import ModelArgs

from .flops import unit_flops
from .hardware import HardwareProfile
from .step_sim import _Pricer


def unit_seconds(args: ModelArgs, kind: str, pricer: _Pricer, T: int, seq_len: int, recompute: str) -> float:
    """F + B + W compute seconds of one unit for one micro-batch of T tokens."""
    total = 0.0
    for name, p in unit_flops(args, kind, seq_len, recompute=recompute).items():
        total += sum(pricer.piece(p, T, head=name == "head"))
    return total


def rank_balanced_split(layout: Layout, args: ModelArgs, hw: HardwareProfile, *, seq_len: int, T: int,
                        precision: str, recompute: str = "selective", gemm_dtype: str | None = None,
                        ) -> list[int]:
    """Layers per stage minimising the busiest pipeline rank's compute time per micro-batch."""
    if layout.schedule is None:
        return [args.n_layers]
    fp8 = precision == "fp8"
    pricer = _Pricer(hw, gemm_dtype or ("fp8" if fp8 else "bf16"), 1, fp8 and hw.gemm_dtype("fp8") == "fp8")
    layer = [unit_seconds(args, "moe" if args.is_moe_layer(i) else "dense", pricer, T, seq_len, recompute)
             for i in range(args.n_layers)]
    tail = unit_seconds(args, "head", pricer, T, seq_len, recompute) + \
        args.n_mtp_layers * unit_seconds(args, "mtp", pricer, T, seq_len, recompute)
    prefix = [0.0]
    for c in layer:
        prefix.append(prefix[-1] + c)
    S = layout.num_stages
    ranks = [layout.stages_of(r) for r in range(layout.pp)]

    def score(counts: list[int]) -> tuple[float, float, float]:
        bounds, stage = [0], []
        for c in counts:
            bounds.append(bounds[-1] + c)
        for s in range(S):
            stage.append(prefix[bounds[s + 1]] - prefix[bounds[s]] + (tail if s == S - 1 else 0.0))
        loads = [sum(stage[s] for s in rs) for rs in ranks]
        return max(loads), max(stage), sum(x * x for x in stage)

    rank_of = {st: r for r, rs in enumerate(ranks) for st in rs}

    def fill(a: int, b: int) -> list[int] | None:
        """a layers on the first stage, b on the last, the rest as even as possible over the
        middle stages, each extra layer on the middle stage whose rank is least loaded."""
        mid = args.n_layers - a - b
        if S == 1 or mid < S - 2 or (S == 2 and mid != 0):
            return None
        counts = [a] + [mid // (S - 2) if S > 2 else 0] * (S - 2) + [b]
        for _ in range(mid - sum(counts[1:-1])):
            bounds = [0]
            for c in counts:
                bounds.append(bounds[-1] + c)
            load = [0.0] * len(ranks)
            for st in range(S):
                load[rank_of[st]] += prefix[bounds[st + 1]] - prefix[bounds[st]] + (tail if st == S - 1 else 0.0)
            st = min(range(1, S - 1), key=lambda x: (load[rank_of[x]], x))
            counts[st] += 1
        return counts

    def key(counts: list[int]) -> tuple[float, ...]:
        return tuple(round(x, 12) for x in score(counts))

    best = [len(s) for s in layout.stages]  # the partitioner's split is a candidate too
    for a in range(1, args.n_layers):
        for b in range(1, args.n_layers - a + 1):
            counts = fill(a, b)
            if counts is not None and key(counts) < key(best):
                best = counts
    counts = best
    return counts
