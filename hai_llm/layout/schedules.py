"""Pipeline-parallel schedules as plain data: who computes what, in which order.

A schedule answers, for every pipeline rank, "which forward / backward / weight-gradient
computation do I run next, for which micro-batch and which of my model chunks?".  It is the
single source of truth shared by the simulator / validator (``simulator.py``), the Gantt charts
(``gantt.py``) and the real runtime executor, so it contains no torch code and no timing: just
immutable ``Action`` lists plus the static topology (which global stage each ``(rank, chunk)``
holds, where activations come from and go to, the P2P messages every action implies). The data
model and the base class live in ``schedule_base.py``; the schedules and the registry here.

Four schedules are provided (Table 2 of the DeepSeek-V3 report):

* ``OneFOneB``  classic 1F1B with full backward passes;
* ``ZB1P``      1F1B with the backward split into input-grad ``B`` and weight-grad ``W``, ``W``
                deferred into the cool-down bubble (ZeroBubble ZB-H1);
* ``DualPipe``  DeepSeek's bidirectional schedule: rank ``r`` holds stage ``r`` of the
                forward-direction pipeline (chunk 0) and stage ``PP-1-r`` of the reverse-direction
                pipeline (chunk 1); half the micro-batches enter at each end;
* ``DualPipeV`` the "cut-in-half" DualPipe: ``pp`` ranks hold ``2*pp`` stages folded in a V,
                rank ``r`` holds stages ``r`` (chunk 0) and ``2*pp-1-r`` (chunk 1).

Cost conventions (used by the simulator and the docs): ``F`` is a chunk forward, ``B`` the FULL
chunk backward (input grad + weight grad, as in the report's Table 2), ``W`` its weight-grad
part, so a split input-grad action costs ``B - W``.  ``FB`` is an overlapped forward+backward pair
("F&B" in the report); its backward half is a full backward (weights included), exactly like the
reference, where the pair runs MLP(B) MLP(W) MLP(F) ATTN(B) ATTN(W) ATTN(F).

The registry: ``SCHEDULES`` maps the config names (``parallel.schedule``) to the classes, and
each class states its rules once, as class attributes (pipeline ranks per pair, minimum
micro-batches per pipeline rank, parity, model stages per rank); ``check`` turns them into
the error messages and ``fit_n_micro`` into the smallest valid micro-batch count.  Everything
that needs a schedule (``hai_llm.layout.build_layout``, the planner, the collective checker)
goes through ``make_schedule``.

Micro-batch numbering is global: ``0 .. n_micro-1``.  For ``DualPipe`` micro-batches
``0 .. n/2-1`` travel in direction 0 (enter at rank 0, loss on rank PP-1) and ``n/2 .. n-1`` in
direction 1 (enter at rank PP-1, loss on rank 0).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

# re-exported: the data model is imported from here by the simulator, executor and planner
from .schedule_base import KINDS, Action, ActionComm, Message, PipelineSchedule, RankChunk, _Program  # noqa: F401


class _SingleChunk(PipelineSchedule):
    """Layout shared by 1F1B and ZB1P: rank r holds stage r, one chunk per rank."""

    chunks_per_rank = 1

    def __init__(self, pp: int, n_micro: int):
        self.check(pp, n_micro, for_training=False)
        self.pp, self.n_micro, self.num_stages = pp, n_micro, self.num_stages_for(pp)
        self._finish()

    def stage_of(self, rank: int, chunk: int) -> int:
        if chunk != 0:
            raise ValueError(f"{self.name} has one chunk per rank, got chunk={chunk}")
        return rank

    def _route(self, mb: int) -> Tuple[RankChunk, ...]:
        return tuple((r, 0) for r in range(self.pp))


class OneFOneB(_SingleChunk):
    """Classic 1F1B: ``pp-1-r`` warm-up forwards, then alternate F / full backward.

    Rank r keeps at most ``pp - r`` micro-batches in flight (``pp`` on rank 0).
    """

    name = "1F1B"
    key = "1f1b"

    def _build(self, rank: int) -> List[Action]:
        prog = _Program({0: range(self.n_micro)})
        warmup = min(self.pp - 1 - rank, self.n_micro)
        for _ in range(warmup):
            prog.f(0)
        for _ in range(self.n_micro - warmup):  # steady state: one F, one full backward
            prog.f(0)
            prog.b(0, split=False)
        for _ in range(warmup):  # cool-down: drain the backwards still owed
            prog.b(0, split=False)
        return prog.actions


class ZB1P(_SingleChunk):
    """ZeroBubble ZB-H1: 1F1B order for F and B, weight gradients W deferred.

    F and the input-gradient B follow 1F1B exactly, so B now leaves a rank ``W`` earlier than
    in 1F1B and the whole backward wave runs faster.  Rank ``r`` holds back up to ``r`` W steps
    (rank 0 none, the last rank ``pp-1``): ``pp-1-r`` warm-up forwards plus ``r`` deferred W
    keep at most ``pp`` micro-batch activations alive, the same peak as 1F1B on rank 0.  In
    the cool-down the held-back W fill the gaps while a rank waits for gradients, and the
    remaining ones run at the very end.
    """

    name = "ZB1P"
    key = "zb1p"

    def _build(self, rank: int) -> List[Action]:
        prog = _Program({0: range(self.n_micro)})
        warmup = min(self.pp - 1 - rank, self.n_micro)
        hold = rank  # W steps this rank may keep pending during the steady state
        for _ in range(warmup):
            prog.f(0)
        for _ in range(self.n_micro - warmup):
            prog.f(0)
            prog.b(0, split=True)
            if prog.pending_w > hold:
                prog.w()
        for _ in range(warmup):  # cool-down: each B is followed by one held-back W
            prog.b(0, split=True)
            prog.w()
        while prog.pending_w:
            prog.w()
        return prog.actions


def _dual_program(prog: _Program, near: int, far: int, h: int, n_half_ranks: int,
                  n_steady: int, middle: bool) -> List[Action]:
    """The 8-phase program shared by DualPipe and DualPipeV.

    ``near`` is the chunk whose pipeline reaches this rank first (it is an early stage there),
    ``far`` the chunk that is a late stage.  ``h`` is the distance of the rank from the end its
    ``near`` pipeline starts at, ``n_half_ranks`` the number of such distances (PP/2 for
    DualPipe, PP for DualPipeV), ``n_steady`` the length of the main overlapped loop and
    ``middle`` marks the rank(s) where the two pipelines meet.
    """
    # 1. nF0: warm-up forwards of the near pipeline, two per rank of distance still to fill.
    for _ in range(2 * (n_half_ranks - h - 1)):
        prog.f(near)
    # 2. nF0F1: the far pipeline's first micro-batches arrive; alternate near / far forwards.
    for _ in range(h + 1):
        prog.f(near)
        prog.f(far)
    # 3. nB1W1F1: first backwards of the far pipeline (its loss end is close); split B/W so
    #    the gradient leaves early, W runs at once while the next far activation arrives.
    for _ in range(n_half_ranks - h - 1):
        prog.b(far, split=True)
        prog.w()
        prog.f(far)
    # 4. main loop nF0B1F1B0: two overlapped pairs per iteration.  Where the pipelines meet
    #    the very first pair is not overlapped, so the forward output leaves before the
    #    backward runs (the reference does this "to further reduce bubble size"; in the
    #    simulator it shortens the step once P2P latency is non-zero).
    for i in range(n_steady):
        if i == 0 and middle:
            prog.f(near)
            prog.b(far, split=False)
        else:
            prog.fb(near, far)
        prog.fb(far, near)
    # 5. nB1F1B0: the near pipeline has run out of forwards; far backward + overlapped pair.
    for _ in range(n_half_ranks - h - 1):
        prog.b(far, split=False)
        prog.fb(far, near)
    # 6. nB1B0: remaining backwards of both pipelines; from the middle of this phase on they
    #    are split so their W can be pushed to the end, where gradients no longer arrive.
    split = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        prog.b(far, split=split)
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        prog.b(near, split=split)
    # 7. nWB0: each remaining near backward is preceded by one deferred W filling the wait.
    for _ in range(n_half_ranks - h - 1):
        prog.w()
        prog.b(near, split=True)
    # 8. nW: flush the queued weight gradients.
    while prog.pending_w:
        prog.w()
    return prog.actions


class DualPipe(PipelineSchedule):
    """DeepSeek DualPipe on ``pp`` (even) ranks with ``n_micro`` (even, >= 2*pp) micro-batches.

    Two copies of a ``pp``-stage model run in opposite directions: chunk 0 of rank r is stage r
    of direction 0 (data enters at rank 0), chunk 1 is stage ``pp-1-r`` of direction 1 (data
    enters at rank ``pp-1``).  Each stage therefore lives on two ranks (``holders``), whose
    gradients must be summed before the optimizer step.
    """

    name = "DualPipe"
    key = "dualpipe"
    chunks_per_rank = 2
    stages_per_rank = 1  # the two chunks are two copies of one stage
    min_micro_per_rank = 2
    min_micro_structural = True
    even_micro = True
    even_micro_reason = "splits the micro-batches evenly over its two directions"
    even_pp = True

    def __init__(self, pp: int, n_micro: int):
        self.check(pp, n_micro, for_training=False)
        self.pp, self.n_micro, self.num_stages = pp, n_micro, self.num_stages_for(pp)
        self._finish()

    def direction_of(self, mb: int) -> int:
        """0 if ``mb`` enters at rank 0, 1 if it enters at rank ``pp-1``."""
        if not 0 <= mb < self.n_micro:
            raise ValueError(f"micro-batch {mb} out of range 0..{self.n_micro - 1}")
        return 0 if mb < self.n_micro // 2 else 1

    def stage_of(self, rank: int, chunk: int) -> int:
        if chunk not in (0, 1):
            raise ValueError(f"DualPipe has chunks 0 and 1, got chunk={chunk}")
        return rank if chunk == 0 else self.pp - 1 - rank

    def _route(self, mb: int) -> Tuple[RankChunk, ...]:
        if self.direction_of(mb) == 0:
            return tuple((r, 0) for r in range(self.pp))
        return tuple((r, 1) for r in reversed(range(self.pp)))

    def _build(self, rank: int) -> List[Action]:
        n, half = self.pp, self.n_micro // 2
        second_half = rank >= n // 2
        # The "near" pipeline of a rank in the first half is direction 0 (chunk 0); for the
        # second half it is direction 1 (chunk 1): the reference's "phase ^= is_in_second_half".
        near, far = (1, 0) if second_half else (0, 1)
        h = min(rank, n - 1 - rank)
        prog = _Program({0: range(half), 1: range(half, self.n_micro)})
        return _dual_program(prog, near, far, h, n // 2, half - n + h + 1,
                             middle=rank in (n // 2 - 1, n // 2))


class DualPipeV(PipelineSchedule):
    """DualPipe cut in half: ``pp`` ranks, ``2*pp`` stages in a V, ``n_micro >= 2*pp`` (odd
    counts too: every micro-batch takes the same route, there are no directions to balance).

    Chunk 0 of rank r is stage r (the descending arm), chunk 1 is stage ``2*pp-1-r`` (the
    ascending arm); the turn of the V (stage pp-1 -> pp) stays on rank ``pp-1``.  Rank 0 holds
    both the first and the last stage, so embedding and head (and MTP) sit on one rank without
    duplicated weights.
    """

    name = "DualPipeV"
    key = "dualpipev"
    chunks_per_rank = 2
    stages_per_rank = 2  # a V over 2*pp stages
    min_micro_per_rank = 2  # any count >= 2*pp, odd included (one stream, no directions)
    min_micro_structural = True

    def __init__(self, pp: int, n_micro: int):
        self.check(pp, n_micro, for_training=False)
        self.pp, self.n_micro, self.num_stages = pp, n_micro, self.num_stages_for(pp)
        self._finish()

    def stage_of(self, rank: int, chunk: int) -> int:
        if chunk not in (0, 1):
            raise ValueError(f"DualPipeV has chunks 0 and 1, got chunk={chunk}")
        return rank if chunk == 0 else 2 * self.pp - 1 - rank

    def _route(self, mb: int) -> Tuple[RankChunk, ...]:
        down = tuple((r, 0) for r in range(self.pp))
        return down + tuple((r, 1) for r in reversed(range(self.pp)))

    def _build(self, rank: int) -> List[Action]:
        n, m = self.pp, self.n_micro
        prog = _Program({0: range(m), 1: range(m)})
        # Every rank sees the descending arm (chunk 0) first; "h" is simply the rank.
        return _dual_program(prog, 0, 1, rank, n, m - 2 * n + rank + 1, middle=rank == n - 1)


def early_posts(schedule: PipelineSchedule) -> List[Tuple[int, int, Message]]:
    """``(rank, action index, message)`` for receives posted before the action that needs them.

    These are the places where a receiver consumes messages of one link in a different order
    than the sender emits them (DualPipe's step 2 pre-posts the next forward receive for this
    reason); an executor that posted receives lazily in consumption order would mismatch there.
    """
    out = []
    for rank in range(schedule.pp):
        for idx, comm in enumerate(schedule.comm_plan(rank)):
            out.extend((rank, idx, m) for m in comm.posts if m not in comm.recvs)
    return out


# ------------------------------------------------------------------------------ registry
SCHEDULES: Dict[str, type] = {c.key: c for c in (OneFOneB, ZB1P, DualPipe, DualPipeV)}


def schedule_class(name: str) -> type:
    """The schedule class registered as ``name`` (``parallel.schedule``); ValueError naming the
    choices otherwise."""
    cls = SCHEDULES.get(str(name).lower())
    if cls is None:
        raise ValueError(f"parallel.schedule={name!r} is unknown: use one of {sorted(SCHEDULES)}")
    return cls


def make_schedule(name: str, pp: int, n_micro: int) -> PipelineSchedule:
    """The schedule ``name`` for ``pp`` ranks and ``n_micro`` micro-batches (rules checked)."""
    return schedule_class(name)(pp, n_micro)
