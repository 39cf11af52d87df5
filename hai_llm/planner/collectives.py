"""The collective program of a planned layout, for the hang detector.

``layout_step(rank, world, spec)`` issues one training step's collectives in the order the
layout issues them, with real sizes: the schedule's P2P plan, per MoE layer the EP count
exchange, dispatch and combine all-to-alls, the SP latent all-gathers, then ZeRO-1
reduce-scatter / DualPipe pair all-reduce / all-gather, the global grad-norm and loss
all-reduces. ``validate_plan_collectives(plan, ranks)`` runs it under torch's fake process
group on meta tensors (``hai_llm.parallel.collective_trace.simulate_ranks``) for a sample of
ranks chosen so that every group kind has several members present (``sample_ranks``), and
checks the traces with ``check_consistent``: the 2048-GPU DeepSeek-V3 layout is validated in
one process. Each simulated rank costs about the time of ``ParallelDims.build_mesh`` (~0.1 s
at 2048 ranks) plus its program. Members that were not simulated are simply not compared.
``traced_layout_step`` runs the same program under a recorder on a real process group, so a
test can compare the simulation with a real gloo run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from hai_llm.layout.dims import ParallelDims
from hai_llm.layout.schedules import make_schedule
from hai_llm.parallel.collective_trace import (CollectiveRecorder, ConsistencyReport, Record,
                                               check_consistent, simulate_ranks)
from hai_llm.parallel.comm import all_gather_single, reduce_scatter_single


@dataclass(frozen=True)
class StepSpec:
    """The collectives-relevant facts of a layout (picklable, so spawned ranks can get it).

    ``blocks[p][c]``: per pp rank p and local chunk c, one bool per attention block (True if its
    FFN is MoE). ``dense_params`` / ``expert_params``: per pp rank, what it holds (experts
    already / ep). ``device="meta"`` uses real sizes without memory (fake backend only).
    """

    world_size: int
    pp: int
    dp: int
    sp: int
    ep: int
    gpus_per_node: int
    schedule: str
    n_micro: int
    blocks: tuple[tuple[tuple[bool, ...], ...], ...]
    dense_params: tuple[int, ...]
    expert_params: tuple[int, ...]
    tokens: int
    dim: int
    latent: int
    top_k: int
    n_experts: int
    device: str = "cpu"

    @classmethod
    def from_plan(cls, plan, device: str = "meta") -> "StepSpec":
        """The step of a ``hai_llm.planner.plan.Plan`` with its real sizes."""
        d = plan.dims
        blocks = tuple(tuple(tuple(plan.stages[i].moe_flags) for i in rp.stages) for rp in plan.ranks)
        info = plan.shape_info
        return cls(world_size=d.world_size, pp=d.pp, dp=d.dp, sp=d.sp, ep=d.ep,
                   gpus_per_node=d.gpus_per_node, n_micro=plan.n_micro,
                   schedule=plan.schedule if d.pp > 1 else "1f1b",  # no pipeline: one rank, F then B
                   blocks=blocks, dense_params=tuple(r.dense_params for r in plan.ranks),
                   expert_params=tuple(r.expert_params for r in plan.ranks),
                   tokens=plan.tokens_per_micro_batch, dim=info["dim"], latent=info["latent"],
                   top_k=info["top_k"], n_experts=info["n_experts"], device=device)


_SCHEDULES: dict = {}


def _schedule(name: str, pp: int, n_micro: int):
    """The pipeline schedule (with its P2P plan) from the one registry, built once per process."""
    key = (name, pp, n_micro)
    if key not in _SCHEDULES:
        _SCHEDULES[key] = make_schedule(name, pp, n_micro)
    return _SCHEDULES[key]


def _split(src: int, dst: int, mb: int, layer: int, base: int) -> int:
    """Deterministic uneven all-to-all row counts every rank can compute (real routing exchanges
    them first: the count all-to-all that precedes every dispatch)."""
    return max(0, base + (src * 7 + dst * 3 + mb * 5 + layer * 11) % 5 - 2)


def layout_step(rank: int, world: int, spec: StepSpec) -> None:
    """Issue one training step's collectives of ``spec`` as rank ``rank`` (see module doc)."""
    dims = ParallelDims(world_size=spec.world_size, pp=spec.pp, dp=spec.dp, sp=spec.sp, ep=spec.ep,
                        gpus_per_node=spec.gpus_per_node)
    if world != dims.world_size:
        raise ValueError(f"spec is for {dims.world_size} ranks, got world={world}")
    mg = dims.build_mesh("cpu")
    c = dims.coords(rank)
    p = c["pp"]
    sched = _schedule(spec.schedule, spec.pp, spec.n_micro)
    pair_group = None
    if spec.schedule == "dualpipe" and spec.pp > 1:  # ranks r and pp-1-r hold the same stages
        S = dims.stage_size
        pairs = [[q * S + f, (spec.pp - 1 - q) * S + f] for q in range(spec.pp // 2) for f in range(S)]
        pair_group, _ = dist.new_subgroups_by_enumeration(pairs)
    meta = spec.device == "meta"
    dev = torch.device(spec.device)
    f_disp = torch.float8_e4m3fn if meta else torch.float32  # FP8 dispatch on the wire
    f_act = torch.bfloat16 if meta else torch.float32
    T, D, ep, sp = spec.tokens, spec.dim, dims.ep, dims.sp
    pp_ranks = dims.group_of("pp", rank)
    g_pp, g_ep, g_sp = mg.group("pp"), mg.group("ep"), mg.group("sp")
    g_dense, g_edp = mg.group("dp_sp"), mg.group("edp")
    me = c["ep"]
    base = max(1, T * spec.top_k // max(ep, 1))

    def empty(*shape, dtype=f_act):
        return torch.zeros(*shape, dtype=dtype, device=dev) if not meta else \
            torch.empty(*shape, dtype=dtype, device=dev)

    def moe(mb: int, layer: int, backward: bool) -> None:
        if ep == 1:
            return
        send = [_split(me, j, mb, layer, base) for j in range(ep)]
        recv = [_split(j, me, mb, layer, base) for j in range(ep)]
        if not backward:  # routing counts first, as a real dispatch does
            dist.all_to_all_single(empty(ep, dtype=torch.int64), empty(ep, dtype=torch.int64), group=g_ep)
            dist.all_to_all_single(empty(sum(recv), D, dtype=f_disp), empty(sum(send), D, dtype=f_disp),
                                   recv, send, group=g_ep)  # dispatch (FP8)
            dist.all_to_all_single(empty(sum(send), D), empty(sum(recv), D), send, recv, group=g_ep)  # combine
        else:
            dist.all_to_all_single(empty(sum(recv), D, dtype=f_disp), empty(sum(send), D, dtype=f_disp),
                                   recv, send, group=g_ep)  # combine-grad toward the experts
            dist.all_to_all_single(empty(sum(send), D), empty(sum(recv), D), send, recv, group=g_ep)  # dispatch-grad

    def chunk_pass(chunk: int, mb: int, backward: bool) -> None:
        flags = spec.blocks[p][chunk]
        order = range(len(flags) - 1, -1, -1) if backward else range(len(flags))
        for i in order:
            layer = chunk * 1000 + i
            if backward and flags[i]:
                moe(mb, layer, True)
            if sp > 1:
                if backward:  # gradient of the gathered latents back to their owners
                    reduce_scatter_single(empty(T, spec.latent), empty(sp * T, spec.latent), group=g_sp)
                else:
                    all_gather_single(empty(sp * T, spec.latent), empty(T, spec.latent), group=g_sp)
            if not backward and flags[i]:
                moe(mb, layer, False)

    plan = sched.comm_plan(p)
    posted: dict = {}
    pending = []
    for idx, act in enumerate(sched.actions(p)):
        comm = plan[idx]
        for msg in comm.posts:
            buf = empty(T, D)
            posted[msg] = dist.irecv(buf, src=pp_ranks[msg.src], group=g_pp)
        for msg in comm.recvs:
            posted.pop(msg).wait()
        for kind, mb, chunk in act.parts():
            if kind in ("F", "B"):
                chunk_pass(chunk, mb, backward=kind == "B")
        for msg in comm.sends:
            pending.append(dist.isend(empty(T, D), dst=pp_ranks[msg.dst], group=g_pp))
    for w in pending:
        w.wait()
    # loss bookkeeping over the pipeline: one tensor, the same size on every stage
    if spec.pp > 1:
        dist.all_reduce(empty(1, dtype=torch.float32), group=g_pp)
    # ZeRO-1: reduce-scatter grads, DualPipe pair sum of the shard, global norm, all-gather
    n_d, n_e = dims.stage_size, dims.edp
    sh_d = -(-spec.dense_params[p] // n_d)
    sh_e = -(-spec.expert_params[p] // n_e) if spec.expert_params[p] else 0
    steps = []
    if n_d > 1:
        steps.append(lambda: reduce_scatter_single(empty(sh_d, dtype=torch.float32),
                                                        empty(sh_d * n_d, dtype=torch.float32), group=g_dense))
    if sh_e and n_e > 1:
        steps.append(lambda: reduce_scatter_single(empty(sh_e, dtype=torch.float32),
                                                        empty(sh_e * n_e, dtype=torch.float32), group=g_edp))
    if pair_group is not None:
        steps.append(lambda: dist.all_reduce(empty(sh_d + sh_e, dtype=torch.float32), group=pair_group))
    steps.append(lambda: dist.all_reduce(empty(1, dtype=torch.float32)))  # global grad norm
    gathers = []
    if n_d > 1:
        gathers.append(lambda: all_gather_single(empty(sh_d * n_d), empty(sh_d), group=g_dense))
    if sh_e and n_e > 1:
        gathers.append(lambda: all_gather_single(empty(sh_e * n_e), empty(sh_e), group=g_edp))
    for step in steps + gathers:
        step()


def sample_ranks(dims, rank: int = 0, full_groups: bool = False) -> list[int]:
    """Ranks to simulate for ``validate_plan_collectives``.

    Default (quick): ``rank``'s whole pp column (every stage, so every P2P link and the
    DualPipe pairs are present) plus one more member of each of its other groups (ep, edp,
    dp, sp), so that every group kind is compared between at least two ranks: 18 ranks for
    the 2048-GPU layout. ``full_groups=True`` takes every member of rank's pp, ep and edp
    groups (81 ranks there).
    """
    out = set(dims.group_of("pp", rank))
    for name in ("ep", "edp", "dp", "sp"):
        g = dims.group_of(name, rank)
        if full_groups and name in ("ep", "edp"):
            out.update(g)
        else:
            out.update([x for x in g if x != rank][:1])
    return sorted(out)


def validate_plan_collectives(plan, ranks: Iterable[int] | None = None) -> ConsistencyReport:
    """Simulate ``layout_step`` of ``plan`` (real sizes, meta tensors, fake backend) for
    ``ranks`` (default ``sample_ranks(plan.dims)``) and check the traces."""
    spec = StepSpec.from_plan(plan, device="meta")
    ranks = sample_ranks(plan.dims) if ranks is None else list(ranks)
    traces = simulate_ranks(layout_step, plan.dims.world_size, spec, ranks=ranks)
    return check_consistent(traces, raise_on_error=False)


def traced_layout_step(rank: int, world: int, spec: StepSpec) -> list[Record]:
    """``run_ranks`` target: ``layout_step`` under a ``CollectiveRecorder`` on a real process
    group; returns this rank's trace (compare with ``simulate_ranks`` of the same spec)."""
    with CollectiveRecorder() as rec:
        layout_step(rank, world, spec)
    return rec.traces.get(rank, [])
