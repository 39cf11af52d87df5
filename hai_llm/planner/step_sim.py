"""One training step on paper: every pipeline rank's compute stream and its links, timed.

Driven by the objects the trainer runs: the ``Plan`` (``plan_from_layout``) carries the
``Layout`` from ``build_layout``, so the stages are ``Layout.stages`` and the action lists are
``Layout.schedule.actions(rank)`` (for pp = 1, gradient accumulation as ``make_schedule("1f1b",
1, n_micro)``, like the planner's memory walk). Inside an action the pieces run in the order of
``hai_llm.pipeline.overlap``:

* a chunk's forward is its pieces (``stage_pieces``): per block an ``attn`` piece (attention
  half + router; a MoE block ends by issuing the DISPATCH) and an ``mlp`` piece (waits for the
  dispatch, runs the experts, issues the COMBINE, waited by the next piece); the embedding
  joins the first ``attn`` piece, the head, MTP heads and the stage output are ``other``
  pieces;
* a backward runs the pieces in reverse; piece i+1's backward issues the gradient of edge
  i -> i+1 (combine-backward: dispatch-shaped; dispatch-backward: combine-shaped), piece i's
  backward waits for it; ``B`` defers the weight gradients (``W`` runs them later), ``BW`` runs
  them after all backward pieces, once the input gradient has been sent (``executor.backward``);
* an overlapped ``FB`` pair interleaves the forward pieces of one micro-batch with the backward
  pieces (B then W) of another exactly as ``run_overlapped`` does (slot-aligned: ``MLP(B)
  MLP(W) MLP(F) ATTN(B) ATTN(W) ATTN(F)``), so each all-to-all is in flight while the other
  micro-batch computes.

Two lanes per rank: compute (pieces in that order, one at a time) and communication (the
all-to-alls in issue order, one at a time, priced by ``EpLink.stage_seconds`` on the bytes the
transport moves: flat = one stage to every distinct target GPU, hierarchical = one copy per
target node over IB then the NVLink forward, the copies of ``traffic.ep_traffic``). A piece
that waits for a transfer not yet done leaves the compute lane idle: that is EXPOSED
communication, counted inside ``FB`` pairs or outside them. Pipeline sends arrive
``net.seconds(T*D*bytes)`` after the producing half finishes (a pair's forward output leaves
when its forward half ends, as ``on_forward_done``; its input gradient when the pair ends, as
``executor.fb``). After the last action: the ZeRO-1
reduce-scatter and all-gather of every bucket (bytes from ``traffic.rank_comm``, ring steps
over the reduce group), then the AdamW step over the shard (memory-bound, ``hbm_gbps``).

Step time = the latest pipeline end over ranks + the slowest rank's ZeRO-1 collectives and
optimizer step (every rank meets in them). Simulated CPU ranks (``hw.shared_cores``) also
time-share cores: the pipeline part is then at least every rank's compute seconds over the
cores (``critical_s`` is the walk's end, ``pipeline_s`` the larger of the two); each expert
dispatch/combine costs its issuing rank ``net.a2a_cpu_us`` of compute, each pipeline send or
receive ``net.p2p_cpu_us``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hai_llm.layout import make_schedule
from hai_llm.layout.layout import TRANSPORTS
from hai_llm.model.args import ModelArgs

from .activations import FP8_TILE, SCALE_BYTES
from .flops import PieceFlops, unit_flops
from .hardware import HardwareProfile
from .plan import Plan, StagePlan
from .traffic import _distinct_targets


# ====================================================================== pieces of a chunk
@dataclass
class SimPiece:
    """One piece of a chunk for one micro-batch: compute seconds of its forward, input-grad
    and weight-grad parts; ``edge_f`` / ``edge_b``: the transfer it issues towards the next
    piece (forward) and the gradient of that transfer (issued by the next piece's backward)."""

    name: str
    slot: str  # attn | mlp | other
    f: float
    b: float
    w: float
    edge_f: float = 0.0
    edge_b: float = 0.0


@dataclass
class Span:
    rank: int
    lane: str  # compute | comm
    kind: str  # F B W (compute) or A2A (comm)
    t0: float
    t1: float


def ep_copies(args: ModelArgs, plan: Plan, transport: str) -> dict[str, float]:
    """Copies of a token's hidden state one dispatch moves per link class (balanced routing).

    Hierarchical: ``traffic.ep_traffic`` (IB: one copy per selected remote node, NVLink: the
    forward to the distinct target GPUs). Flat: every distinct target GPU directly, so a remote
    node's d targets each cost an IB copy: ib = M (1-1/N) d, nvlink = (M/N) d (1 - 1/g)."""
    dims, ep = plan.dims, plan.dims.ep
    ept = dict(plan.ep)
    if ep == 1 or args.n_moe_layers == 0:
        return {"ib": 0.0, "nvlink": 0.0, "stages": 0}
    # symmetric = hierarchical's copies: the same inter-node stage, and inside the node the same
    # rows written into peers' buffers instead of sent (identical CommStats, tests/test_symm_a2a.py)
    if ept["nodes"] == 1 or transport in ("hierarchical", "symmetric"):
        return {"ib": ept["ib"], "nvlink": ept["nvlink"], "stages": 2 if ept["nodes"] > 1 else 1}
    N, M, g = ept["nodes"], ept["nodes_per_token"], dims.gpus_per_node
    d = _distinct_targets(g, args.n_routed_experts // ep, args.n_activated_experts / M)
    return {"ib": M * (1 - 1 / N) * d, "nvlink": (M / N) * d * (1 - 1 / g), "stages": 1}


class _Pricer:
    """Seconds of FLOPs and bytes on a profile, for one layout."""

    def __init__(self, hw: HardwareProfile, gemm_dtype: str, world: int, fp8: bool):
        self.hw = hw
        # ranks sharing CPU cores run at ``core_share`` of their solo rate (contention for caches
        # and memory, measured); time-sharing of the cores is the step's CPU bound, applied after
        # the schedule walk (``simulate_step``). Devices of their own do not slow each other.
        slow = 1.0 / hw.core_share if hw.shared_cores and world > 1 else 1.0
        self.k = slow / (1.0 - hw.nongemm_fraction)
        self.a2a_cpu = hw.net.a2a_cpu_us * 1e-6 * slow  # one dispatch/combine on the issuing core
        self.p2p_cpu = hw.net.p2p_cpu_us * 1e-6 * slow  # one pipeline send or receive
        self.g = hw.gemm_flops_per_s(gemm_dtype)
        self.g_head = hw.gemm_flops_per_s("bf16" if fp8 else gemm_dtype)  # head + router stay BF16
        self.af, self.ab = hw.attn_flops_per_s(False), hw.attn_flops_per_s(True)

    def piece(self, p: PieceFlops, T: int, head: bool = False) -> tuple[float, float, float]:
        g = self.g_head if head else self.g
        f = T * (p.gemm_f / g + p.attn_f / self.af)
        b = T * (p.gemm_b / g + p.attn_b / self.ab + p.recompute_gemm / g + p.recompute_attn / self.af)
        w = T * p.gemm_w / g
        return f * self.k, b * self.k, w * self.k


def chunk_pieces(args: ModelArgs, stage: StagePlan, *, T: int, seq_len: int, pricer: _Pricer,
                 recompute: str, dispatch_s: float, combine_s: float, is_last: bool,
                 is_first: bool = True, p2p_cpu_s: float = 0.0) -> list[SimPiece]:
    """The pieces of one stage for one micro-batch of ``T`` tokens, in forward order.

    ``dispatch_s`` / ``combine_s``: one dispatch-shaped / combine-shaped all-to-all (0 without
    expert parallelism). Edge ``attn -> mlp`` is the dispatch (its gradient: combine-shaped),
    edge ``mlp -> next`` the combine (its gradient: dispatch-shaped)."""
    out: list[SimPiece] = []
    for name in stage.units:
        kind = "embed" if name == "embed" else "head" if name == "head" else \
            "mtp" if name.startswith("MTP") else ("moe" if args.is_moe_layer(int(name[1:])) else "dense")
        parts = unit_flops(args, kind, seq_len, recompute=recompute)
        if kind == "embed":
            continue
        if kind == "head":
            out.append(SimPiece("head", "other", *pricer.piece(parts["head"], T, head=True)))
            continue
        moe = bool(parts["mlp"].terms.get("router"))
        attn = SimPiece(f"attn.{name}", "attn", *pricer.piece(parts["attn"], T))
        if "eh_proj" in parts:  # MTP input projection: merged into its block's attn piece
            f, b, w = pricer.piece(parts["eh_proj"], T)
            attn.f, attn.b, attn.w = attn.f + f, attn.b + b, attn.w + w
        mlp = SimPiece(f"mlp.{name}", "mlp", *pricer.piece(parts["mlp"], T, head=False))
        if moe and dispatch_s:
            attn.edge_f, attn.edge_b = dispatch_s, combine_s
            mlp.edge_f, mlp.edge_b = combine_s, dispatch_s
            # the CPU an issue costs its core (0 on GPUs): the dispatch (with its routing plan)
            # from attn's forward, the combine from mlp's; backward: mlp's issues the dispatch's
            # gradient, the combine's gradient is issued next to attn's backward (same block)
            c = pricer.a2a_cpu
            attn.f, mlp.f, mlp.b, attn.b = attn.f + c, mlp.f + c, mlp.b + c, attn.b + c
        out += [attn, mlp]
        if "head" in parts:
            out.append(SimPiece(f"head.{name}", "other", *pricer.piece(parts["head"], T, head=True)))
    if not is_last:  # the stage output (waits for the last block's combine, then the PP send)
        out.append(SimPiece("out", "other", 0.0, 0.0, 0.0))
    if p2p_cpu_s and out:  # CPU of the pipeline messages (0 on GPUs): one per hop and direction
        if not is_first:  # receive the input, send its gradient back
            out[0].f += p2p_cpu_s
            out[0].b += p2p_cpu_s
        if not is_last:  # send the output, receive its gradient
            out[-1].f += p2p_cpu_s
            out[-1].b += p2p_cpu_s
    return out


# ====================================================================== one action
@dataclass
class ActionTiming:
    end: float
    f_done: float
    b_done: float
    busy: float
    comm_wait: float
    input_wait: float
    spans: list[Span] = field(default_factory=list)


def compute_order(kind: str, fwd: Optional[list[SimPiece]], bwd: Optional[list[SimPiece]]) -> list[tuple[str, int]]:
    """(part, piece index) in the order the executor runs them (``overlap.run_overlapped`` for
    FB; forward pieces in order; backward pieces in reverse, W after each for BW)."""
    if kind == "F":
        return [("F", i) for i in range(len(fwd))]
    rb = list(range(len(bwd) - 1, -1, -1))
    if kind == "B":
        return [("B", i) for i in rb]
    if kind == "W":
        return [("W", i) for i in rb]
    if kind == "BW":  # executor.backward: every backward piece, the gradient send, then the W closures
        return [("B", i) for i in rb] + [("W", i) for i in rb]
    ops, fi, k = [("F", 0)], 1, 0  # FB: run_overlapped's slot alignment
    while fi < len(fwd) or k < len(rb):
        nxt = fwd[fi].slot if fi < len(fwd) else None
        while k < len(rb):
            p = rb[k]
            ops += [("B", p), ("W", p)]
            k += 1
            if nxt is None or nxt == "other" or bwd[p].slot == nxt:
                break
        if fi < len(fwd):
            ops.append(("F", fi))
            fi += 1
    return ops


def time_action(rank: int, kind: str, fwd, bwd, start: float, f_ready: float, b_ready: float,
                keep_spans: bool) -> ActionTiming:
    """Two-lane list schedule of one action starting no earlier than ``start``."""
    ops = compute_order(kind, fwd, bwd)
    t, comm_free = start, start
    cf: dict[int, float] = {}  # forward edge i -> i+1 arrival
    cb: dict[int, float] = {}  # backward edge i -> i+1 gradient arrival (waited by B of i)
    busy = comm_wait = input_wait = 0.0
    f_done = b_done = start
    first_b = True
    spans: list[Span] = []

    def send(dur: float, at: float) -> float:
        nonlocal comm_free
        s = max(at, comm_free)
        comm_free = s + dur
        if keep_spans and dur:
            spans.append(Span(rank, "comm", "A2A", s, comm_free))
        return comm_free

    for part, i in ops:
        if part == "F":
            p = fwd[i]
            ext = f_ready if i == 0 else 0.0
            dep = cf.get(i - 1, 0.0)
            dur = p.f
        else:
            p = bwd[i]
            ext = b_ready if (part == "B" and first_b) else 0.0
            dep = cb.get(i, 0.0) if part == "B" else 0.0
            dur = p.b if part == "B" else p.w
        ready = max(t, ext)
        input_wait += ready - t
        s = max(ready, dep)
        comm_wait += s - ready
        t = s + dur
        busy += dur
        if keep_spans and dur:
            spans.append(Span(rank, "compute", part, s, t))
        if part == "F":
            if p.edge_f:
                cf[i] = send(p.edge_f, t)
            if i == len(fwd) - 1:
                f_done = t
        elif part == "B":
            first_b = False
            if i > 0 and bwd[i - 1].edge_b:
                cb[i - 1] = send(bwd[i - 1].edge_b, t)
            if i == 0:
                b_done = t
    if kind == "FB":  # executor.fb emits the backward's input gradient after the whole pair
        b_done = t
    return ActionTiming(t, f_done, b_done, busy, comm_wait, input_wait, spans)


# ====================================================================== the step
@dataclass
class RankTiming:
    pp_rank: int
    pipeline_end: float = 0.0
    busy: float = 0.0
    comm_inside: float = 0.0  # exposed all-to-all waits inside FB pairs
    comm_outside: float = 0.0  # exposed all-to-all waits in lone F / B / BW actions
    input_wait: float = 0.0  # waiting for a pipeline neighbour (bubble)
    zero_s: float = 0.0  # ZeRO-1 reduce-scatter + all-gather
    optim_s: float = 0.0
    a2a_s: float = 0.0  # all-to-all time issued (hidden or not)


@dataclass
class StepSim:
    step_s: float
    pipeline_s: float  # max(critical_s, the shared cores' CPU bound)
    critical_s: float  # the schedule walk's end (dependencies only)
    zero_s: float
    optim_s: float
    ranks: list[RankTiming]
    tokens_per_step: int
    world: int
    spans: list[Span]
    piece_table: dict[str, list[SimPiece]]
    dispatch_s: float
    combine_s: float
    pp_send_s: float

    def fraction(self, attr: str) -> float:
        """Mean over pipeline ranks of ``attr`` / step time."""
        return sum(getattr(r, attr) for r in self.ranks) / len(self.ranks) / self.step_s

    @property
    def bubble_fraction(self) -> float:
        """Idle compute lane outside all-to-all waits: pipeline bubbles and the end-of-step
        wait for the slowest rank, before the optimizer (ZeRO and AdamW are counted apart)."""
        idle = sum(self.critical_s - r.busy - r.comm_inside - r.comm_outside for r in self.ranks)
        return max(0.0, idle / len(self.ranks) / self.step_s)  # float sums: -1e-15 means 0


def walk_schedule(sched, chunk_of, pp_send_s: float, keep_spans: bool = False
                  ) -> tuple[list[RankTiming], list[float], list[Span]]:
    """Time every rank's action list (``sched.programs``): an action starts once its rank is
    free and its inputs exist (a forward input ``pp_send_s`` after the producing forward half
    ends on another rank, an output gradient likewise); ``chunk_of(rank, chunk)`` gives the
    pieces of a local chunk. Returns per-rank timings, end times and (optionally) spans."""
    f_out: dict[tuple[int, int, int], float] = {}  # (mb, rank, chunk) -> forward output ready
    b_out: dict[tuple[int, int, int], float] = {}  # (mb, rank, chunk) -> input gradient ready
    programs = sched.programs
    pos, clock = [0] * sched.pp, [0.0] * sched.pp
    timings = [RankTiming(r) for r in range(sched.pp)]
    spans: list[Span] = []
    progressed = True
    while progressed:
        progressed = False
        for r in range(sched.pp):
            while pos[r] < len(programs[r]):
                act = programs[r][pos[r]]
                f_ready = b_ready = 0.0
                blocked = False
                for part, mb, chunk in act.parts():
                    hops, i = sched.route(mb), sched.hop(mb, r, chunk)
                    if part == "F" and i > 0:
                        src = (mb,) + hops[i - 1]
                        if src not in f_out:
                            blocked = True
                            break
                        f_ready = f_out[src] + (pp_send_s if hops[i - 1][0] != r else 0.0)
                    elif part == "B" and i + 1 < len(hops):
                        src = (mb,) + hops[i + 1]
                        if src not in b_out:
                            blocked = True
                            break
                        b_ready = b_out[src] + (pp_send_s if hops[i + 1][0] != r else 0.0)
                if blocked:
                    break
                fwd = chunk_of(r, act.chunk) if act.kind in ("F", "FB") else None
                bchunk = act.b_chunk if act.kind == "FB" else act.chunk
                bwd = chunk_of(r, bchunk) if act.kind in ("B", "W", "BW", "FB") else None
                tm = time_action(r, act.kind, fwd, bwd, clock[r], f_ready, b_ready, keep_spans)
                for part, mb, chunk in act.parts():
                    if part == "F":
                        f_out[(mb, r, chunk)] = tm.f_done
                    elif part == "B":
                        b_out[(mb, r, chunk)] = tm.b_done
                rt = timings[r]
                rt.busy += tm.busy
                rt.input_wait += tm.input_wait
                if act.kind == "FB":
                    rt.comm_inside += tm.comm_wait
                else:
                    rt.comm_outside += tm.comm_wait
                if act.kind != "W":
                    rt.a2a_s += sum(p.edge_f for p in fwd or []) + sum(p.edge_b for p in bwd or [])
                spans += tm.spans
                clock[r] = tm.end
                pos[r] += 1
                progressed = True
    if any(pos[r] < len(programs[r]) for r in range(sched.pp)):
        raise ValueError(f"{sched!r} cannot complete in the step simulation (a dependency is never produced)")
    for r, rt in enumerate(timings):
        rt.pipeline_end = clock[r]
    return timings, clock, spans


def _zero_seconds(plan: Plan, r: int, hw: HardwareProfile) -> float:
    """ZeRO-1 collectives of pipeline rank r: ring steps (n-1) per collective over its group."""
    dims = plan.dims
    pair = plan.schedule == "dualpipe" and dims.pp > 1
    copies = 2 if pair else 1
    sizes = {"dp_sp": copies * dims.stage_size, "edp": copies * dims.edp, "embed": 2 * dims.stage_size}
    total = 0.0
    for c in plan.ranks[r].comm:
        if c.group not in sizes or c.bytes_per_step == 0:
            continue
        n = sizes[c.group]
        cross = n > dims.gpus_per_node or pair or c.group == "embed"
        cross = cross and dims.world_size > dims.gpus_per_node
        n_coll = 2 if "+" in c.op or "all_reduce" in c.op else 1
        total += hw.net.seconds(c.bytes_per_step, n_coll * (n - 1), cross)
    return total


def simulate_step(plan: Plan, args: ModelArgs, hw: HardwareProfile, *, transport: str = "hierarchical",
                  gemm_dtype: Optional[str] = None, act_bytes: Optional[float] = None,
                  keep_spans: bool = False) -> StepSim:
    """Time one optimizer step of ``plan`` (from ``plan_from_layout``) on ``hw``.

    ``gemm_dtype``: the GEMM datatype (default: ``fp8`` for an FP8 plan, else ``bf16``; fp32
    for CPU runs); ``act_bytes``: bytes per activation element on the wire (default 2, bf16;
    4 for fp32 CPU runs); ``transport``: ``flat``, ``hierarchical`` or ``symmetric`` (priced as
    hierarchical: it moves the same bytes over the same links) expert all-to-all."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    layout = plan.layout
    dims = plan.dims
    fp8 = plan.precision == "fp8"
    gemm_dtype = gemm_dtype or ("fp8" if fp8 else "bf16")
    ab = act_bytes if act_bytes is not None else 2.0
    T, D = plan.tokens_per_micro_batch, args.dim
    pricer = _Pricer(hw, gemm_dtype, dims.world_size, fp8 and hw.gemm_dtype("fp8") == "fp8")
    sched = layout.schedule if layout.schedule is not None else make_schedule("1f1b", 1, layout.n_micro)

    # -- all-to-all seconds per micro-batch per MoE block (balanced routing)
    cp = ep_copies(args, plan, transport)
    b_disp = 1.0 + SCALE_BYTES / FP8_TILE if fp8 else ab

    def a2a(bytes_per_copy: float) -> float:
        if not cp["stages"]:
            return 0.0
        ib, nvl = T * D * cp["ib"] * bytes_per_copy, T * D * cp["nvlink"] * bytes_per_copy
        real = hw.net.seconds(ib, 1, True) if ib else hw.net.seconds(nvl, 1, False)
        real += cp["stages"] * hw.net.a2a_latency_us * 1e-6  # count + payload exchange, per stage
        if cp["stages"] == 2:
            emu = hw.ep_link.stage_seconds(0.0, ib) + hw.ep_link.stage_seconds(nvl, 0.0)
        else:
            emu = hw.ep_link.stage_seconds(nvl, ib)
        return max(emu, real)  # a CommHandle returns at the later of the transfer and the emulation

    dispatch_s, combine_s = a2a(b_disp), a2a(ab)
    cross_pp = dims.stage_size >= dims.gpus_per_node and dims.world_size > dims.gpus_per_node
    pp_send_s = hw.net.seconds(T * D * ab, 1, cross_pp)

    pieces: dict[int, list[SimPiece]] = {}
    for s in plan.stages:
        pieces[s.index] = chunk_pieces(args, s, T=T, seq_len=plan.seq_len, pricer=pricer,
                                       recompute=plan.recompute, dispatch_s=dispatch_s,
                                       combine_s=combine_s, is_last=s.index == len(plan.stages) - 1,
                                       is_first=s.index == 0, p2p_cpu_s=pricer.p2p_cpu)

    def chunk_of(rank: int, chunk: int) -> list[SimPiece]:
        return pieces[layout.stages_of(rank)[chunk]] if layout.schedule is not None else pieces[0]

    timings, clock, spans = walk_schedule(sched, chunk_of, pp_send_s, keep_spans)
    critical_s = max(clock)
    # ranks time-sharing ``shared_cores`` CPU cores: every rank's compute seconds (world / pp
    # copies of each pipeline rank's) must fit on the cores, whatever the schedule; a rank
    # waiting for a neighbour, a collective or the link emulation's sleep leaves its core to
    # others, so the step is the longer of the walk (dependencies) and this bound (capacity)
    cores = min(hw.shared_cores, dims.world_size) if hw.shared_cores else 0
    cpu_bound_s = dims.world_size / dims.pp * sum(rt.busy for rt in timings) / cores if cores else 0.0
    pipeline_s = max(critical_s, cpu_bound_s)
    b_m = 2 if plan.optim_dtype == "bf16" else 4
    for r, rt in enumerate(timings):
        rt.zero_s = _zero_seconds(plan, r, hw) if plan.zero1 or dims.stage_size > 1 else 0.0
        shard = plan.ranks[r].memory["master_fp32"] / 4.0
        rt.optim_s = shard * (16.0 + 4 * b_m) / (hw.hbm_gbps * 1e9)
    zero_s = max(rt.zero_s for rt in timings)
    optim_s = max(rt.optim_s for rt in timings)
    tokens = plan.global_batch_sequences * plan.seq_len
    return StepSim(step_s=pipeline_s + zero_s + optim_s, pipeline_s=pipeline_s, critical_s=critical_s,
                   zero_s=zero_s,
                   optim_s=optim_s, ranks=timings, tokens_per_step=tokens, world=dims.world_size,
                   spans=spans, piece_table={str(k): v for k, v in pieces.items()},
                   dispatch_s=dispatch_s, combine_s=combine_s, pp_send_s=pp_send_s)


__all__ = ["SimPiece", "Span", "StepSim", "RankTiming", "simulate_step", "chunk_pieces", "compute_order",
           "time_action", "walk_schedule", "ep_copies"]
