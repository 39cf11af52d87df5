"""What a layout costs: step time, MFU, tokens/s per GPU, GPU-hours and dollars, a what-if
table and a timeline picture, from ``step_sim`` on a hardware profile.

``cost_report(plan, args, hw, ...)`` simulates one step (``step_sim.simulate_step``) and turns it
into the numbers a cluster budget needs::

    tokens/s per GPU      = global_batch * seq_len / step_s / world
    GPU-hours per 1e12    = 1e12 / (tokens/s per GPU) / 3600
    run GPU-hours         = tokens * GPU-hours per token;  cost = run GPU-hours * $/GPU-hour
    MFU                   = model FLOPs/token (fwd + bwd, no recompute) * tokens/s per GPU / peak

(peak of the GEMM datatype: FP8 for an FP8 run; the BF16 MFU is printed too). ``what_if``
re-plans the same model with one knob changed at a time (schedule, precision, transport, EP
degree, micro-batches) and ``timeline_png`` draws each pipeline rank's compute and
communication lanes. ``PAPER`` holds DeepSeek-V3's reported cost (docs/deepseek_v3.md
#cluster-and-layout) for side-by-side printing; nothing in the model reads it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping, Optional

from hai_llm.model.args import ModelArgs

from .balance import rank_balanced_split
from .flops import flops_summary
from .hardware import HardwareProfile
from .plan import Plan, plan_layout
from .step_sim import StepSim, simulate_step

# DeepSeek-V3 report [R] section 1 / Table 1 (docs/deepseek_v3.md#cluster-and-layout): printed
# next to the planner's numbers, never used to compute them
PAPER: Mapping[str, float] = MappingProxyType({
    "gpu_hours_per_trillion": 180e3, "pretrain_tokens": 14.8e12, "pretrain_gpu_hours": 2664e3,
    "context_extension_gpu_hours": 119e3, "post_training_gpu_hours": 5e3,
    "total_gpu_hours": 2788e3, "price_per_gpu_hour": 2.0, "total_cost": 5.576e6, "gpus": 2048})  # read-only


@dataclass
class CostReport:
    hardware: str
    layout: str
    gemm_dtype: str
    flops: dict[str, float]  # per token (flops.flops_summary)
    step_s: float
    pipeline_s: float
    zero_s: float
    optim_s: float
    bubble: float  # fractions of the step
    exposed_inside: float
    exposed_outside: float
    zero_fraction: float
    tokens_per_step: int
    world: int
    tokens_per_s_per_gpu: float
    gpu_hours_per_trillion: float
    mfu: float  # against the GEMM datatype's peak
    mfu_bf16: float
    tokens: float
    price_per_gpu_hour: float
    stage_layers: list[int] = field(default_factory=list)
    dispatch_ms: float = 0.0
    combine_ms: float = 0.0

    @property
    def run_gpu_hours(self) -> float:
        return self.tokens / 1e12 * self.gpu_hours_per_trillion

    @property
    def run_cost(self) -> float:
        return self.run_gpu_hours * self.price_per_gpu_hour

    @property
    def run_days(self) -> float:
        return self.run_gpu_hours / self.world / 24.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "run_gpu_hours": self.run_gpu_hours, "run_cost": self.run_cost,
                "run_days": self.run_days}


def describe(plan: Plan, transport: str) -> str:
    d = plan.dims
    return (f"{plan.model} on {d.world_size} ranks: pp{d.pp} x dp{d.dp} x sp{d.sp}, ep{d.ep} "
            f"({plan.schedule}, {plan.precision}, {transport} dispatch), {plan.n_micro} micro-batches x "
            f"{plan.micro_batch} x {plan.seq_len} tokens")


def cost_report(plan: Plan, args: ModelArgs, hw: HardwareProfile, *, transport: str = "hierarchical",
                tokens: float = PAPER["pretrain_tokens"], price: float = PAPER["price_per_gpu_hour"],
                gemm_dtype: Optional[str] = None, act_bytes: Optional[float] = None,
                sim: Optional[StepSim] = None) -> CostReport:
    """Simulate a step of ``plan`` (unless ``sim`` is given) and price a run of ``tokens``."""
    sim = sim or simulate_step(plan, args, hw, transport=transport, gemm_dtype=gemm_dtype, act_bytes=act_bytes)
    g = hw.gemm_dtype(gemm_dtype or ("fp8" if plan.precision == "fp8" else "bf16"))
    fl = flops_summary(args, plan.seq_len, recompute=plan.recompute)
    tps = sim.tokens_per_step / sim.step_s / sim.world
    peak = hw.peak_tflops[g] * 1e12
    bf16 = hw.peak_tflops.get("bf16", hw.peak_tflops[g]) * 1e12
    return CostReport(
        hardware=hw.name, layout=describe(plan, transport), gemm_dtype=g, flops=fl, step_s=sim.step_s,
        pipeline_s=sim.pipeline_s, zero_s=sim.zero_s, optim_s=sim.optim_s, bubble=sim.bubble_fraction,
        exposed_inside=sim.fraction("comm_inside"), exposed_outside=sim.fraction("comm_outside"),
        zero_fraction=(sim.zero_s + sim.optim_s) / sim.step_s, tokens_per_step=sim.tokens_per_step,
        world=sim.world, tokens_per_s_per_gpu=tps, gpu_hours_per_trillion=1e12 / tps / 3600.0,
        mfu=fl["model"] * tps / peak, mfu_bf16=fl["model"] * tps / bf16, tokens=tokens,
        price_per_gpu_hour=price, stage_layers=[len(s) for s in plan.layout.stages],
        dispatch_ms=sim.dispatch_s * 1e3, combine_ms=sim.combine_s * 1e3)


def _g(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:,.1f} {unit}"
    return f"{x:,.0f} "


def format_report(r: CostReport, paper: bool = False) -> str:
    f = r.flops
    lines = [
        f"{r.layout}", f"hardware: {r.hardware} (GEMMs in {r.gemm_dtype}); stage layers {r.stage_layers}",
        "",
        f"FLOPs per token: {_g(f['model'])} (forward {_g(f['forward'])} + backward {_g(f['backward'])}; "
        f"attention core {_g(f['attention_core'])}, MTP {_g(f['mtp'])}); recomputation +{_g(f['recompute'])} "
        f"(not in MFU)",
        f"step: {r.step_s:.3f} s = pipeline {r.pipeline_s:.3f} s + ZeRO-1 collectives {r.zero_s:.3f} s + "
        f"AdamW {r.optim_s:.4f} s; one dispatch {r.dispatch_ms:.2f} ms, one combine {r.combine_ms:.2f} ms",
        f"mean over pipeline ranks, share of the step: bubble {100 * r.bubble:.1f}%, exposed all-to-all "
        f"inside F&B pairs {100 * r.exposed_inside:.1f}%, outside {100 * r.exposed_outside:.1f}%, "
        f"ZeRO-1 + optimizer {100 * r.zero_fraction:.1f}%",
        f"MFU {100 * r.mfu:.1f}% of {r.gemm_dtype} peak"
        + (f" ({100 * r.mfu_bf16:.1f}% of BF16 peak)" if r.gemm_dtype == "fp8" else "") + "; "
        f"{r.tokens_per_s_per_gpu:,.0f} tokens/s per GPU",
        f"GPU-hours per trillion tokens: {r.gpu_hours_per_trillion / 1e3:,.1f}K",
        f"run of {r.tokens / 1e12:g}T tokens: {r.run_gpu_hours / 1e6:,.3f}M GPU-hours = {r.run_days:,.1f} days "
        f"on {r.world} GPUs = ${r.run_cost / 1e6:,.3f}M at ${r.price_per_gpu_hour:g}/GPU-hour",
    ]
    if paper:
        P = PAPER
        ratio = r.gpu_hours_per_trillion / P["gpu_hours_per_trillion"]
        lines += ["", "DeepSeek-V3 report ([R] Table 1; docs/deepseek_v3.md#cluster-and-layout) vs this planner:",
                  f"  GPU-hours per trillion tokens: paper {P['gpu_hours_per_trillion'] / 1e3:.0f}K, "
                  f"planner {r.gpu_hours_per_trillion / 1e3:.1f}K ({100 * (ratio - 1):+.1f}%)",
                  f"  pre-training {P['pretrain_tokens'] / 1e12:g}T tokens: paper {P['pretrain_gpu_hours'] / 1e6:.3f}M, "
                  f"planner {r.gpu_hours_per_trillion * P['pretrain_tokens'] / 1e12 / 1e6:.3f}M GPU-hours",
                  f"  + context extension {P['context_extension_gpu_hours'] / 1e3:.0f}K + post-training "
                  f"{P['post_training_gpu_hours'] / 1e3:.0f}K (paper's, not modelled): paper total "
                  f"{P['total_gpu_hours'] / 1e6:.3f}M = ${P['total_cost'] / 1e6:.3f}M; planner total "
                  f"{(r.gpu_hours_per_trillion * P['pretrain_tokens'] / 1e12 + P['context_extension_gpu_hours'] + P['post_training_gpu_hours']) / 1e6:.3f}M"
                  f" = ${(r.gpu_hours_per_trillion * P['pretrain_tokens'] / 1e12 + P['context_extension_gpu_hours'] + P['post_training_gpu_hours']) * P['price_per_gpu_hour'] / 1e6:.3f}M"]
    return "\n".join(lines)


# ====================================================================== what-if
@dataclass
class Setting:
    """The knobs of one planner run (``plan_layout`` arguments + transport)."""

    dims: Any  # ParallelDims
    seq_len: int = 4096
    micro_batch: int = 1
    n_micro: Optional[int] = None
    schedule: str = "dualpipe"
    precision: str = "fp8"
    transport: str = "hierarchical"
    recompute: str = "selective"
    stage_layers: Optional[list[int]] = None
    balance_ranks: bool = False

    def replace(self, **kw) -> "Setting":
        d = dict(self.__dict__)
        d.update(kw)
        return Setting(**d)


def plan_setting(args: ModelArgs, s: Setting, hw: HardwareProfile) -> Plan:
    """``plan_layout`` for a setting; with ``balance_ranks`` the split of ``rank_balanced_split``."""
    kw = dict(seq_len=s.seq_len, micro_batch=s.micro_batch, n_micro=s.n_micro, schedule=s.schedule,
              precision=s.precision, recompute=s.recompute)
    plan = plan_layout(args, s.dims, stage_layers=s.stage_layers, **kw)
    if s.balance_ranks and s.stage_layers is None and plan.layout.schedule is not None:
        split = rank_balanced_split(plan.layout, args, hw, seq_len=s.seq_len, T=plan.tokens_per_micro_batch,
                                    precision=s.precision, recompute=s.recompute)
        if split != [len(x) for x in plan.layout.stages]:
            plan = plan_layout(args, s.dims, stage_layers=split, **kw)
    return plan


def what_if(args: ModelArgs, base: Setting, hw: HardwareProfile, *, tokens: float, price: float
            ) -> list[dict[str, Any]]:
    """One row per variant of ``base``: a knob changed, everything else equal. A variant the
    layout rejects gets its one-line reason instead of numbers."""
    from hai_llm.layout import ParallelDims, schedule_class

    d = base.dims
    variants: list[tuple[str, Setting]] = [("base", base)]
    for sch in ("dualpipe", "1f1b", "zb1p", "dualpipev"):
        if sch != base.schedule:
            variants.append((f"schedule {sch}", base.replace(schedule=sch)))
    other = "bf16" if base.precision == "fp8" else "fp8"
    variants.append((f"precision {other}", base.replace(precision=other)))
    flip = "hierarchical" if base.transport == "flat" else "flat"  # symmetric is priced as hierarchical
    variants.append((f"{flip} dispatch", base.replace(transport=flip)))
    model = {label: args for label, _ in variants}
    rejected: list[dict[str, Any]] = []
    for ep in (32, 64, 128):
        if ep == d.ep:
            continue
        label, m_args = f"ep {ep}", args
        try:
            dims = ParallelDims(world_size=d.world_size, pp=d.pp, dp=d.dp, sp=d.sp, ep=ep,
                                gpus_per_node=d.gpus_per_node)
        except ValueError as e:
            rejected.append({"variant": label, "report": None, "error": str(e).splitlines()[0]})
            continue
        nodes = ep // d.gpus_per_node if ep > d.gpus_per_node else 1
        if args.n_moe_layers and nodes > 1 and args.n_expert_groups != nodes \
                and args.n_routed_experts % nodes == 0:
            # node-limited routing needs one expert group per node: regroup the router
            m_args = replace(args, n_expert_groups=nodes, n_limited_groups=min(args.n_limited_groups, nodes))
            label += f" ({nodes} groups, top-{m_args.n_limited_groups})"
        variants.append((label, base.replace(dims=dims)))
        model[label] = m_args
    rows = []

    def run(label: str, s: Setting, m_args: ModelArgs) -> Optional[Plan]:
        try:
            plan = plan_setting(m_args, s, hw)
            r = cost_report(plan, m_args, hw, transport=s.transport, tokens=tokens, price=price)
            rows.append({"variant": label, "report": r, "error": ""})
            return plan
        except ValueError as e:
            rows.append({"variant": label, "report": None, "error": str(e).splitlines()[0]})
            return None

    base_plan = None
    for label, s in variants:
        plan = run(label, s, model[label])
        base_plan = plan if label == "base" else base_plan
    rows += rejected
    if base_plan is not None:
        n, pp = base_plan.n_micro, base.dims.pp
        fit = (lambda m: schedule_class(base.schedule).fit_n_micro(pp, m)) if pp > 1 else (lambda m: m)
        for m in sorted({fit(max(1, n // 4)), fit(max(1, n // 2)), fit(2 * n)} - {n}):
            run(f"n_micro {m}", base.replace(n_micro=m), args)
    return rows


def format_what_if(rows: list[dict[str, Any]]) -> str:
    base = next(r["report"] for r in rows if r["variant"] == "base")
    hdr = ["variant", "step s", "tok/s/GPU", "GPU-h/1e12", "vs base", "MFU", "bubble", "a2a in", "a2a out",
           "ZeRO", "run $M"]
    out = []
    for row in rows:
        r = row["report"]
        if r is None:
            out.append([row["variant"], "-", row["error"]])
            continue
        out.append([row["variant"], f"{r.step_s:.2f}", f"{r.tokens_per_s_per_gpu:,.0f}",
                    f"{r.gpu_hours_per_trillion / 1e3:,.1f}K",
                    f"{100 * (r.gpu_hours_per_trillion / base.gpu_hours_per_trillion - 1):+.1f}%",
                    f"{100 * r.mfu:.1f}%", f"{100 * r.bubble:.1f}%", f"{100 * r.exposed_inside:.1f}%",
                    f"{100 * r.exposed_outside:.1f}%", f"{100 * r.zero_fraction:.1f}%", f"{r.run_cost / 1e6:,.2f}"])
    ok = [row for row in out if row[1] != "-"]
    widths = [max([len(h)] + [len(row[i]) for row in (out if i == 0 else ok)]) for i, h in enumerate(hdr)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(hdr), "  ".join("-" * w for w in widths)]
    for row in out:
        lines.append(fmt(row) if row[1] != "-" else f"{row[0].ljust(widths[0])}  rejected: {row[2]}")
    return "\n".join(lines)


# ====================================================================== timeline
def timeline_png(sim: StepSim, path: str, title: str = "", max_ranks: int = 16) -> str:
    """Each pipeline rank's compute lane (F blue, B orange, W green) and communication lane
    (all-to-alls, grey) over one step, then the ZeRO-1 + optimizer tail (red). Needs a
    simulation run with ``keep_spans=True``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not sim.spans:
        raise ValueError("timeline_png needs simulate_step(..., keep_spans=True)")
    ranks = sorted({s.rank for s in sim.spans})[:max_ranks]
    colors = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868", "A2A": "#8C8C8C"}
    fig, ax = plt.subplots(figsize=(16, 0.7 * len(ranks) + 1.5))
    for row, r in enumerate(ranks):
        y = 2 * (len(ranks) - 1 - row)
        for lane, dy, h in (("compute", 1.0, 0.8), ("comm", 0.15, 0.6)):
            for kind, c in colors.items():
                bars = [(s.t0, s.t1 - s.t0) for s in sim.spans if s.rank == r and s.lane == lane and s.kind == kind]
                if bars:
                    ax.broken_barh(bars, (y + dy, h), facecolors=c, linewidth=0)
        ax.broken_barh([(sim.pipeline_s, sim.zero_s + sim.optim_s)], (y + 0.15, 1.65), facecolors="#C44E52")
    ax.set_yticks([2 * (len(ranks) - 1 - i) + 1.0 for i in range(len(ranks))])
    ax.set_yticklabels([f"pp{r}" for r in ranks])
    ax.set_xlabel("seconds")
    ax.set_xlim(0, sim.step_s)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in list(colors.values()) + ["#C44E52"]]
    ax.legend(handles, ["forward", "input grad", "weight grad", "all-to-all (lower lane)", "ZeRO-1 + AdamW"],
              loc="upper right", ncol=5, fontsize=8)
    ax.set_title(title or "simulated step: compute (upper) and communication (lower) lane per pipeline rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
