"""The planner's output: text and rich tables of a ``Plan``, and the process groups of one rank.

``print_plan`` / ``format_plan`` show one row per rank *role* (pipeline ranks holding the same
kind of stages with the same numbers): what it holds, its memory by kind and its traffic by
group and link, then the EP copies per token and the notes. ``rank_groups`` builds the real
``DeviceMesh`` of one rank under torch's fake process group (no peers needed, so one process
can stand in for any rank of a 2048-GPU world) and ``format_groups`` lists the communicators
that rank joins.
"""
from __future__ import annotations

from typing import Any

from hai_llm.layout.dims import ParallelDims

from .plan import Plan

GIB = 1024 ** 3


def rank_groups(dims: ParallelDims, rank: int) -> dict[str, Any]:
    """Build the real DeviceMesh for ``rank`` under torch's fake process group and return
    ``{group name: sorted global ranks}`` (plus ``"coordinate"``: the mesh coordinate).

    The fake backend needs no peers, so one process can stand in for any rank of a 2048-GPU
    world; ``build_mesh`` itself checks torch's groups against the ParallelDims arithmetic.
    Refuses to run inside an initialized process group (it would replace it).
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < dims.world_size:
        raise ValueError(f"rank {rank} out of range [0, {dims.world_size})")
    if dist.is_initialized():
        raise RuntimeError("rank_groups needs a process without an initialized process group")
    import sys

    hook = sys.excepthook  # init_process_group chains a "[rankN]" prefix onto it
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        mg = dims.build_mesh("cpu")
        out: dict[str, Any] = {name: sorted(dist.get_process_group_ranks(g))
                               for name, g in mg.groups.items()}
        out["coordinate"] = dict(zip(("pp", "dp", "sp"), mg.mesh.get_coordinate()))
        return out
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


def format_rank_list(ranks: list[int], head: int = 4) -> str:
    """Short form of a sorted rank list: whole when short, else first terms and the stride."""
    if len(ranks) <= 2 * head:
        return "[" + ", ".join(map(str, ranks)) + "]"
    steps = {b - a for a, b in zip(ranks, ranks[1:])}
    stride = f", stride {steps.pop()}" if len(steps) == 1 else ""
    return f"[{', '.join(map(str, ranks[:head]))}, ..., {ranks[-1]}] ({len(ranks)} ranks{stride})"


def format_groups(dims: ParallelDims, rank: int, groups: dict[str, Any]) -> str:
    c = dims.coords(rank)
    lines = [f"process groups of rank {rank} (node {c['node']}, local {c['local']}; "
             f"mesh coordinate {groups.get('coordinate')}; built with the fake backend):"]
    for name in ("pp", "dp", "sp", "dp_sp", "ep", "edp"):
        g = groups[name]
        nodes = dims.nodes_of_group(g)
        lines.append(f"  {name:<6} size {len(g):>4}  nodes {len(nodes):>3}  {format_rank_list(g)}")
    return "\n".join(lines)


def _unit(values: list[float], binary: bool) -> tuple[str, float]:
    """The largest unit in which the biggest value is >= 1 (GiB/MiB/KiB or GB/MB/kB)."""
    top = max(values, default=0.0)
    units = (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024.0)) if binary else \
        (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
    for name, size in units:
        if top >= size:
            return name, size
    return ("B", 1.0)


def _count(n: float) -> str:
    for suffix, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(int(n))


def memory_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    vals = [v for ro in plan.roles for v in list(ro.rank.memory.values()) + [ro.rank.total_memory]]
    name, size = _unit(vals, binary=True)
    f = lambda x: f"{x / size:,.1f}"
    hdr = ["role", "ranks", "holds", "experts/layer", "params", "params fp32", "master", "grads",
           "AdamW", "act/mb", "in-flight", "act peak", f"total {name}"]
    rows = []
    for role in plan.roles:
        r = role.rank
        m = r.memory
        rows.append([role.name, str(role.n_ranks), role.layers, str(r.experts_per_moe_layer),
                     _count(r.params), f(m["params_fp32"]), f(m["master_fp32"]),
                     f(m["grads_fp32"]), f(m[f"adamw_{plan.optim_dtype}"]),
                     " / ".join(f(b) for b in r.act_bytes_per_mb), str(r.inflight_chunks),
                     f(m["activations"]), f(r.total_memory)])
    return hdr, rows


def memory_unit(plan: Plan) -> str:
    vals = [v for ro in plan.roles for v in list(ro.rank.memory.values()) + [ro.rank.total_memory]]
    return _unit(vals, binary=True)[0]


def comm_unit(plan: Plan) -> tuple[str, float]:
    return _unit([c.bytes_per_step for ro in plan.roles for c in ro.rank.comm]
                 + [ro.rank.total_comm for ro in plan.roles], binary=False)


COMM_COLUMNS = (
    ("ZeRO dp_sp", lambda c: c.group == "dp_sp"),
    ("ZeRO edp", lambda c: c.group == "edp"),
    ("tied embed", lambda c: c.group == "embed"),
    ("EP IB", lambda c: c.group == "ep" and c.link == "IB"),
    ("EP NVLink", lambda c: c.group == "ep" and c.link == "NVLink"),
    ("PP", lambda c: c.group == "pp"),
    ("SP", lambda c: c.group == "sp"),
)


def comm_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    unit, size = comm_unit(plan)
    f = lambda x: f"{x / size:,.1f}"
    hdr = ["role"] + [name for name, _ in COMM_COLUMNS] + [f"total {unit}"]
    rows = []
    for role in plan.roles:
        r = role.rank
        rows.append([role.name] + [f(sum(c.bytes_per_step for c in r.comm if pick(c)))
                                   for _, pick in COMM_COLUMNS] + [f(r.total_comm)])
    return hdr, rows


def header_lines(plan: Plan) -> list[str]:
    d, mp = plan.dims, plan.model_params
    ok = plan.rank_param_total() == plan.copies_expected() and plan.stage_param_total() == mp["total_with_buffers"]
    where = (f"{d.n_nodes} nodes x {d.gpus_per_node}" if d.world_size >= d.gpus_per_node
             else f"part of one {d.gpus_per_node}-GPU node")
    span = f"spans {d.nodes_per_ep_group} nodes" if d.nodes_per_ep_group > 1 else "inside one node"
    return [
        f"hai-llm dry run: {plan.model} on {d.world_size} GPUs = {where}; "
        f"pp={d.pp} dp={d.dp} sp={d.sp} ep={d.ep} (edp={d.edp}, EP group {span})",
        f"schedule {plan.schedule}, {plan.n_stages} stages, n_micro={plan.n_micro}, micro_batch={plan.micro_batch} "
        f"x seq_len={plan.seq_len} -> T={plan.tokens_per_micro_batch} tokens/micro-batch/rank; global batch "
        f"{plan.global_batch_sequences:,} sequences = {plan.global_batch_sequences * plan.seq_len / 1e6:.1f}M tokens; "
        f"{plan.precision}, AdamW {plan.optim_dtype}, ZeRO-1 {'on' if plan.zero1 else 'off'}, "
        f"recompute {plan.recompute}",
        f"parameters (meta model): main {mp['main']:,} + MTP {mp['mtp']:,} = {mp['total_with_buffers']:,}; "
        f"sum over stages {plan.stage_param_total():,}; over pp ranks x ep "
        f"{plan.rank_param_total():,} = {plan.rank_param_total() / mp['total_with_buffers']:.3f} x model "
        f"{'(consistent)' if ok else '(INCONSISTENT)'}",
    ]


def footer_lines(plan: Plan) -> list[str]:
    e = plan.ep
    worst = max(plan.roles, key=lambda ro: ro.rank.total_memory)
    limit = (f"node-limited to {e['nodes_per_token']:.0f} of {e['nodes']} nodes" if e["nodes"] > 1
             else "EP group inside one node")
    return [
        f"EP traffic per token per dispatch: {e['ib']:.3f} IB copies + {e['nvlink']:.3f} NVLink copies "
        f"({limit}; a per-expert all-to-all would send {e['naive']:.3f} copies, "
        f"{e['naive_cross_node']:.3f} across nodes)",
        f"peak memory per rank: {worst.rank.total_memory / GIB:,.2f} GiB on {worst.name}; memory in "
        f"{memory_unit(plan)}, traffic in {comm_unit(plan)[0]} sent per rank per step",
    ] + [f"note: {n}" for n in plan.notes]


def _plain_table(hdr: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(hdr)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(hdr), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def format_plan(plan: Plan) -> str:
    """The whole report as plain text."""
    h1, r1 = memory_rows(plan)
    h2, r2 = comm_rows(plan)
    return "\n".join(header_lines(plan) + ["", f"memory per rank ({memory_unit(plan)})", _plain_table(h1, r1, (0, 2)), "",
                                           f"traffic per rank per step ({comm_unit(plan)[0]} sent)",
                                           _plain_table(h2, r2), ""]
                     + footer_lines(plan))


def print_plan(plan: Plan, plain: bool = False, file=None) -> None:
    """Print with rich tables when available (and not ``plain``), else plain text."""
    import sys

    file = file or sys.stdout
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_plan(plan), file=file)
        return
    console = Console(file=file, width=200)
    for line in header_lines(plan):
        console.print(line, highlight=False, soft_wrap=True)
    for title, (hdr, rows), left in ((f"memory per rank ({memory_unit(plan)})", memory_rows(plan), (0, 2)),
                                     (f"traffic per rank per step ({comm_unit(plan)[0]} sent)",
                                      comm_rows(plan), (0,))):
        t = Table(title=title, title_justify="left")
        for i, h in enumerate(hdr):
            t.add_column(h, justify="left" if i in left else "right",
                         overflow="fold", max_width=52 if i == 2 else None)
        for r in rows:
            t.add_row(*r)
        console.print(t)
    for line in footer_lines(plan):
        console.print(line, highlight=False, soft_wrap=True)
