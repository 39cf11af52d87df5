"""The collective program of a planned layout, for the hang detector.

``layout_step(rank, world, spec)`` issues one ``Trainer.train_step``'s collectives in the order
the trainer issues them, with real sizes, on the SAME process groups, built by the runtime's
own code rather than re-stated here:

* the mesh (``ParallelDims.build_mesh``), the pipeline groups
  (``pipeline.groups.build_pipeline_groups``, as ``PipelineRuntime`` builds them: the union
  groups of parameters held on two pipeline ranks, one 2-rank P2P group per direction, every
  message on ``groups[executor.CHANNEL(msg)]``) and the EP count communicators
  (``transport.count_communicator`` per EP group: a second group over the ranks of each
  payload group);
* per schedule action (``schedule.comm_plan``): post receives, wait, compute, send; per MoE
  layer the flat transport's count exchange, dispatch and combine (uint8 wire rows,
  ``a2a_wire._pack``: payload + fp32 routing-weight column), their backward (combine-grad, then
  dispatch-grad with the weight-gradient column); SP latent all-gathers / reduce-scatters;
* after the schedule: the pp all-reduce of the ``[n_micro, 2 + n_global_moe]`` float64 loss
  terms, ``reduce_metrics`` (terms over dp x sp, loads over the copy group), then ZeRO-1: one
  reduce-scatter per bucket (keyed as ``ZeroOptimizer`` keys them: reduce group, ndim >= 2,
  expert; in first-appearance order), the float64 grad-norm all-reduce over the world, one
  all-gather per bucket.

Documented differences from a recorded ``train_step`` (tests/test_dryrun.py checks the rest
group by group): MoE pieces of an OVERLAPPED F&B pair (``parallel.overlap``) interleave on the
EP group, here they run forward then backward (the ``overlap=False`` order); the hierarchical
transport's stage exchanges are not modeled (flat wire only); the one-time channel connect of
``PipelineExecutor.connect`` happens at set-up, outside the step.

``validate_plan_collectives(plan, ranks)`` runs it under torch's fake process group on meta
tensors (``hai_llm.parallel.collective_trace.simulate_ranks``) for a sample of ranks chosen so
that every group kind has several members present (``sample_ranks``), and checks the traces
with ``check_consistent``: the 2048-GPU DeepSeek-V3 layout is validated in one process.
``traced_layout_step`` runs the same program under a recorder on a real process group.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import torch
import torch.distributed as dist

from hai_llm.layout.dims import ParallelDims
from hai_llm.layout.schedules import make_schedule
from hai_llm.parallel.collective_trace import (CollectiveRecorder, ConsistencyReport, Record,
                                               check_consistent, simulate_ranks)
from hai_llm.parallel.comm import all_gather_single, reduce_scatter_single
from hai_llm.parallel.transport import count_communicator
from hai_llm.pipeline.executor import CHANNEL
from hai_llm.pipeline.groups import PipelineGroups, build_pipeline_groups
from hai_llm.runtime.base import TERMS


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
    micro_batch: int = 1  # sequences per micro-batch (P2P buffers are [micro_batch, T/mb, dim])
    n_mtp_layers: int = 0
    # per pp rank: ZeRO-1 buckets in order, (group kind, elements on this rank); kinds "dense"
    # (dp x sp or the copy union), "expert" (edp or the copy union), "tied" (the embedding
    # shared by pp ranks 0 and pp-1). None: one dense and one expert bucket.
    buckets: tuple[tuple[tuple[str, int], ...], ...] | None = None
    elem_bytes: int = 4  # bytes of a payload element on the EP wire (the autocast dtype)
    fp8_dispatch: bool = False  # dispatch payload as FP8 + one fp32 scale per 128 columns

    @classmethod
    def from_plan(cls, plan, device: str = "meta", elem_bytes: int | None = None) -> "StepSpec":
        """The step of a ``hai_llm.planner.plan.Plan`` with its real sizes (``elem_bytes``:
        the EP payload element; default 2 for the bf16 / fp8 accounting, 4 for fp32 runs)."""
        d = plan.dims
        blocks = tuple(tuple(tuple(plan.stages[i].moe_flags) for i in rp.stages) for rp in plan.ranks)
        info = plan.shape_info
        return cls(world_size=d.world_size, pp=d.pp, dp=d.dp, sp=d.sp, ep=d.ep,
                   gpus_per_node=d.gpus_per_node, n_micro=plan.n_micro,
                   schedule=plan.schedule if d.pp > 1 else "1f1b",  # no pipeline: one rank, F then B
                   blocks=blocks, dense_params=tuple(r.dense_params for r in plan.ranks),
                   expert_params=tuple(r.expert_params for r in plan.ranks),
                   tokens=plan.tokens_per_micro_batch, dim=info["dim"], latent=info["latent"],
                   top_k=info["top_k"], n_experts=info["n_experts"], device=device,
                   micro_batch=plan.micro_batch, n_mtp_layers=info.get("n_mtp_layers", 0),
                   buckets=tuple(tuple(r.buckets) for r in plan.ranks),
                   elem_bytes=elem_bytes or (2 if plan.precision in ("bf16", "fp8") else 4),
                   fp8_dispatch=plan.precision == "fp8")


@lru_cache(maxsize=16)
def _schedule(name: str, pp: int, n_micro: int):
    """The pipeline schedule (with its P2P plan) from the one registry, built once per process."""
    return make_schedule(name, pp, n_micro)


def _runtime_groups(dims: ParallelDims, spec: StepSpec, rank: int, sched) -> PipelineGroups:
    """The pipeline groups exactly as ``PipelineRuntime`` builds them (``build_pipeline_groups``;
    collective: every rank creates every group)."""
    if spec.pp == 1:
        return PipelineGroups()
    return build_pipeline_groups(dims, sched, rank, spec.n_mtp_layers)


def _count_group(dims: ParallelDims, rank: int):
    """The flat transport's count communicator of ``rank``: ``count_communicator`` over every
    EP group of the world in mesh order (``build_transport``'s ``all_ep_ranks``)."""
    mine = None
    for g in dims.group_ranks("ep"):
        pg = count_communicator(list(g))
        if rank in g:
            mine = pg
    return mine


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
    rt = _runtime_groups(dims, spec, rank, sched)
    g_count = _count_group(dims, rank) if spec.ep > 1 else None
    meta = spec.device == "meta"
    dev = torch.device(spec.device)
    T, D, ep, sp = spec.tokens, spec.dim, dims.ep, dims.sp
    f32 = torch.float32
    g_ep, g_sp = mg.group("ep"), mg.group("sp")
    me = c["ep"]
    El = max(spec.n_experts // max(ep, 1), 1)
    base = max(1, T * spec.top_k // max(ep, 1))
    # EP wire rows (uint8, ``a2a_wire._pack``): payload [+ FP8 scales] [+ fp32 weight column]
    b_x = spec.elem_bytes
    disp = (D + 4 * -(-D // 128)) if spec.fp8_dispatch else D * b_x
    row = {"fwd_dispatch": disp + 4, "fwd_combine": D * b_x, "bwd_scatter": D * b_x, "bwd_gather": D * b_x + 4}

    def empty(*shape, dtype=f32):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return torch.zeros(shape, dtype=dtype, device=dev) if not meta else \
            torch.empty(shape, dtype=dtype, device=dev)

    def a2a(rows_out: int, rows_in: int, width: int, recv, send) -> None:
        dist.all_to_all_single(empty(rows_out, width, dtype=torch.uint8), empty(rows_in, width, dtype=torch.uint8),
                               recv, send, group=g_ep)

    def moe(mb: int, layer: int, backward: bool) -> None:
        if ep == 1:
            return
        send = [_split(me, j, mb, layer, base) for j in range(ep)]
        recv = [_split(j, me, mb, layer, base) for j in range(ep)]
        if not backward:  # routing counts first (count communicator), then dispatch, combine
            dist.all_to_all_single(empty(ep, El, dtype=torch.int64), empty(ep, El, dtype=torch.int64),
                                   [1] * ep, [1] * ep, group=g_count)
            a2a(sum(recv), sum(send), row["fwd_dispatch"], recv, send)
            a2a(sum(send), sum(recv), row["fwd_combine"], send, recv)
        else:  # combine-grad toward the experts, dispatch-grad (+ weight grads) back
            a2a(sum(recv), sum(send), row["bwd_scatter"], recv, send)
            a2a(sum(send), sum(recv), row["bwd_gather"], send, recv)

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

    # P2P: [micro_batch, T / micro_batch, dim] in the parameters' dtype (fp32: the trainer's
    # model), each message on the group of its direction
    peers = dims.group_of("pp", rank)
    msg_shape = (spec.micro_batch, T // spec.micro_batch, D)
    if spec.pp > 1:
        plan = sched.comm_plan(p)
        posted: dict = {}
        pending = []
        for idx, act in enumerate(sched.actions(p)):
            comm = plan[idx]
            for msg in comm.posts:
                posted[msg] = dist.irecv(empty(*msg_shape), src=peers[msg.src], group=rt.p2p_groups[CHANNEL(msg)])
            for msg in comm.recvs:
                posted.pop(msg).wait()
            for kind, mb, chunk in act.parts():
                if kind in ("F", "B"):
                    chunk_pass(chunk, mb, backward=kind == "B")
            for msg in comm.sends:
                pending.append(dist.isend(empty(*msg_shape), dst=peers[msg.dst], group=rt.p2p_groups[CHANNEL(msg)]))
        for w in pending:
            w.wait()
    else:  # gradient accumulation on one rank: F then B per micro-batch
        for mb in range(spec.n_micro):
            chunk_pass(0, mb, False)
            chunk_pass(0, mb, True)
    # loss terms over the pipeline: [n_micro, 2 + n_global_moe] float64, the same on every stage
    n_global_moe = sum(sum(fl) for fl in _stage_flags(spec, sched))
    if spec.pp > 1:
        dist.all_reduce(empty(spec.n_micro, 2 + n_global_moe, dtype=torch.float64), group=mg.group("pp"))
    # reduce_metrics: terms over dp x sp, expert loads [own MoE layers, E] over the copy group
    n_dp_sp = dims.dp * dims.sp
    dp_sp = mg.group("dp_sp") if n_dp_sp > 1 else None
    counts_group = rt.copy_dense[0] if rt.copy_dense is not None else dp_sp
    n_local_moe = sum(sum(fl) for fl in spec.blocks[p])
    if dp_sp is not None:
        dist.all_reduce(empty(len(TERMS), dtype=torch.float64), group=dp_sp)
    if n_local_moe and counts_group is not None:
        dist.all_reduce(empty(n_local_moe, spec.n_experts, dtype=torch.int64), group=counts_group)
    # ZeRO-1: reduce-scatter per bucket, grad norm over the world, all-gather per bucket
    zero = []
    for kind, numel in _buckets(spec, p):
        g, n = _bucket_group(kind, rt, mg, dims, c["ep"])
        if g is not None and n > 1 and numel:
            zero.append((g, n, -(-numel // n)))
    for g, n, sh in zero:
        reduce_scatter_single(empty(sh), empty(sh * n), group=g)
    dist.all_reduce(empty((), dtype=torch.float64))  # global grad norm (squared), world group
    for g, n, sh in zero:
        all_gather_single(empty(sh * n), empty(sh), group=g)


def _stage_flags(spec: StepSpec, sched) -> list[tuple[bool, ...]]:
    """MoE flags of every stage once (a DualPipe stage is held twice)."""
    seen = {}
    for r in range(spec.pp):
        for ch, fl in enumerate(spec.blocks[r]):
            seen.setdefault(sched.stage_of(r, ch), fl)
    return list(seen.values())


def _buckets(spec: StepSpec, p: int) -> tuple[tuple[str, int], ...]:
    if spec.buckets is not None:
        return spec.buckets[p]
    return (("dense", spec.dense_params[p]), ("expert", spec.expert_params[p]))


def _bucket_group(kind: str, rt, mg, dims: ParallelDims, ep_coord: int):
    """(process group, size) of a bucket kind, by ``PipelineRuntime.spec_of``'s rules (the
    groups themselves are the runtime's, see ``_runtime_groups``) or ``MeshRuntime.spec_of``'s."""
    if rt.copy_dense is not None:  # DualPipe: every parameter over the union of both copies
        g, ranks = rt.copy_edp[ep_coord] if kind == "expert" and dims.ep > 1 else rt.copy_dense
        return g, len(ranks)
    if kind == "tied" and rt.tied_embed is not None:
        return rt.tied_embed[0], len(rt.tied_embed[1])
    if kind == "expert" and dims.ep > 1:
        return mg.group("edp"), dims.edp
    return mg.group("dp_sp"), dims.dp * dims.sp


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
