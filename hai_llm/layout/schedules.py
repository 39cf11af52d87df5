"""Pipeline-parallel schedules as plain data: who computes what, in which order.

A schedule answers, for every pipeline rank, "which forward / backward / weight-gradient
computation do I run next, for which micro-batch and which of my model chunks?".  It is the
single source of truth shared by the simulator / validator (``simulator.py``), the Gantt charts
(``gantt.py``) and the real runtime executor, so it contains no torch code and no timing: just
immutable ``Action`` lists plus the static topology (which global stage each ``(rank, chunk)``
holds, where activations come from and go to, the P2P messages every action implies).

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

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

KINDS = ("F", "B", "W", "BW", "FB")

RankChunk = Tuple[int, int]


@dataclass(frozen=True)
class Action:
    """One step of a rank's program.

    ``kind``: ``"F"`` forward, ``"B"`` input-gradient backward (its ``W`` comes later),
    ``"W"`` weight-gradient backward, ``"BW"`` full backward (``B`` immediately followed by its
    ``W``), ``"FB"`` overlapped pair: forward of ``(mb, chunk)`` with the full backward of
    ``(b_mb, b_chunk)``.  ``chunk`` is the local model chunk (0 or 1) on the rank running it.
    """

    kind: str
    mb: int
    chunk: int
    b_mb: Optional[int] = None
    b_chunk: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Action kind must be one of {KINDS}, got {self.kind!r}")
        paired = self.kind == "FB"
        if paired != (self.b_mb is not None and self.b_chunk is not None):
            raise ValueError(
                "an 'FB' action needs b_mb and b_chunk (the overlapped backward); "
                f"other kinds must not set them: {self!r}"
            )

    @property
    def forward(self) -> Optional[Tuple[int, int]]:
        """``(mb, chunk)`` of the forward this action runs, or ``None``."""
        return (self.mb, self.chunk) if self.kind in ("F", "FB") else None

    @property
    def backward(self) -> Optional[Tuple[int, int]]:
        """``(mb, chunk)`` of the input-gradient backward this action runs, or ``None``."""
        if self.kind == "FB":
            return (self.b_mb, self.b_chunk)  # type: ignore[return-value]
        return (self.mb, self.chunk) if self.kind in ("B", "BW") else None

    def parts(self) -> Tuple[Tuple[str, int, int], ...]:
        """Primitive ``(kind, mb, chunk)`` computations, kind in F/B/W, in execution order."""
        if self.kind == "FB":
            return (("F", self.mb, self.chunk), ("B", self.b_mb, self.b_chunk),
                    ("W", self.b_mb, self.b_chunk))  # type: ignore[return-value]
        if self.kind == "BW":
            return (("B", self.mb, self.chunk), ("W", self.mb, self.chunk))
        return ((self.kind, self.mb, self.chunk),)

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"FB(F{self.mb}.{self.chunk},B{self.b_mb}.{self.b_chunk})"
        return f"{self.kind}{self.mb}.{self.chunk}"


@dataclass(frozen=True)
class Message:
    """A point-to-point transfer implied by the schedule.

    ``kind`` is ``"act"`` (forward activation, from stage s to s+1) or ``"grad"`` (gradient of an
    activation, from stage s+1 to s).  ``src_chunk`` / ``dst_chunk`` are the local chunks on the
    sending / receiving rank.
    """

    kind: str
    mb: int
    src: int
    src_chunk: int
    dst: int
    dst_chunk: int


@dataclass(frozen=True)
class ActionComm:
    """P2P work attached to one action of a rank.

    ``posts``: receives to post just before the action, ordered so that on every link the
    receiver posts in exactly the order the sender sends (a message consumed later may have to
    be posted early, e.g. a forward activation that the sender emits before a gradient the
    receiver needs first).  ``recvs``: the messages the action consumes (all posted by now).
    ``sends``: what the action produces, in order, to send right after it.
    """

    posts: Tuple[Message, ...]
    recvs: Tuple[Message, ...]
    sends: Tuple[Message, ...]


class _Program:
    """Builds one rank's action list, handing out micro-batches in FIFO order per chunk.

    Forwards and backwards of a chunk visit its micro-batches in the same order (first in,
    first out), and deferred weight-gradient steps are served from one FIFO queue per rank,
    just as the reference's WeightGradStore does.
    """

    def __init__(self, mbs_by_chunk: Dict[int, Sequence[int]]):
        self._mbs = mbs_by_chunk
        self._next_f = {c: 0 for c in mbs_by_chunk}
        self._next_b = {c: 0 for c in mbs_by_chunk}
        self._pending_w: deque = deque()
        self.actions: List[Action] = []

    def _take_f(self, chunk: int) -> int:
        mb = self._mbs[chunk][self._next_f[chunk]]
        self._next_f[chunk] += 1
        return mb

    def _take_b(self, chunk: int) -> int:
        mb = self._mbs[chunk][self._next_b[chunk]]
        self._next_b[chunk] += 1
        return mb

    @property
    def pending_w(self) -> int:
        return len(self._pending_w)

    def f(self, chunk: int) -> None:
        self.actions.append(Action("F", self._take_f(chunk), chunk))

    def b(self, chunk: int, split: bool) -> None:
        """Backward of ``chunk``: split into B now + queued W, or a full BW."""
        mb = self._take_b(chunk)
        if split:
            self.actions.append(Action("B", mb, chunk))
            self._pending_w.append((mb, chunk))
        else:
            self.actions.append(Action("BW", mb, chunk))

    def w(self) -> None:
        mb, chunk = self._pending_w.popleft()
        self.actions.append(Action("W", mb, chunk))

    def fb(self, f_chunk: int, b_chunk: int) -> None:
        f_mb = self._take_f(f_chunk)
        b_mb = self._take_b(b_chunk)
        self.actions.append(Action("FB", f_mb, f_chunk, b_mb, b_chunk))


def _check_positive(pp: int, n_micro: int) -> None:
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pp (pipeline ranks) must be an integer >= 1, got {pp!r}")
    if not isinstance(n_micro, int) or n_micro < 1:
        raise ValueError(f"n_micro (micro-batches per step) must be an integer >= 1, "
                         f"got {n_micro!r}")


_N_MICRO_HOW = "(parallel.n_micro, or train.global_batch / parallel.dp / train.micro_batch)"


class PipelineSchedule(ABC):
    """Common topology and bookkeeping; subclasses define the stage layout and the programs.

    Subclasses set ``pp``, ``n_micro``, ``chunks_per_rank``, ``num_stages`` and implement
    ``stage_of`` / ``route`` and ``_build(rank)``.

    Rules, stated once per class and checked by ``check(pp, n_micro)`` (``build_layout``
    checks all of them; every constructor checks those its program needs, so a schedule object is
    always runnable):

    * ``key``: the config name (``parallel.schedule``); ``name``: the display name;
    * ``stages_per_rank``: model stages per pipeline rank (``num_stages = stages_per_rank*pp``;
      DualPipe's two chunks are two copies of one stage, DualPipeV's are two stages);
    * ``min_micro_per_rank``: ``n_micro >= min_micro_per_rank * pp`` for training;
      ``min_micro_structural``: the program generator itself needs it (DualPipe / DualPipeV
      fill both pipelines); when False (1F1B / ZB1P) programs exist for any ``n_micro >= 1``
      (the simulator and the bubble tables use them), and only a training layout requires it;
    * ``even_micro`` / ``even_micro_reason``: ``n_micro`` must be even, and why;
    * ``even_pp``: ``pp`` must be even (rank r pairs with rank pp-1-r).
    """

    name = "schedule"
    key = "schedule"
    stages_per_rank = 1
    min_micro_per_rank = 1
    min_micro_structural = False
    even_micro = False
    even_micro_reason = ""
    even_pp = False
    pp: int
    n_micro: int
    chunks_per_rank: int
    num_stages: int

    # ----- rules -------------------------------------------------------------------------
    @classmethod
    def num_stages_for(cls, pp: int) -> int:
        """Model stages (contiguous layer groups) of this schedule on ``pp`` ranks."""
        return cls.stages_per_rank * pp

    @classmethod
    def fit_n_micro(cls, pp: int, n_micro: int) -> int:
        """The smallest valid micro-batch count >= ``n_micro`` on ``pp`` ranks."""
        n = max(n_micro, cls.min_micro_per_rank * pp)
        return n + n % 2 if cls.even_micro else n

    @classmethod
    def check(cls, pp: int, n_micro: int, *, for_training: bool = True) -> None:
        """Raise ``ValueError`` naming the fix unless ``pp`` ranks and ``n_micro``
        micro-batches satisfy this schedule's rules (``for_training=False``: only those the
        program generator needs; the constructors check that)."""
        _check_positive(pp, n_micro)
        if cls.even_pp and pp % 2:
            others = sorted(k for k, c in SCHEDULES.items() if not c.even_pp
                            and c.chunks_per_rank == cls.chunks_per_rank)
            raise ValueError(
                f"{cls.key} needs an even pp (an even number of pipeline ranks: rank r pairs with "
                f"rank pp-1-r) but pp={pp}: use pp={pp + 1}{f' or {pp - 1}' if pp > 1 else ''}"
                f"{', or schedule ' + ' / '.join(repr(k) for k in others) if others else ''}")
        need, fix = cls.min_micro_per_rank * pp, cls.fit_n_micro(pp, n_micro)
        if n_micro < need and (for_training or cls.min_micro_structural):
            expr = "pp" if cls.min_micro_per_rank == 1 else f"{cls.min_micro_per_rank}*pp"
            raise ValueError(
                f"{cls.key} with pp={pp} needs n_micro >= {expr} = {need} micro-batches"
                f"{' (an even number)' if cls.even_micro else ''}, got n_micro={n_micro}: use "
                f"n_micro={fix} {_N_MICRO_HOW}")
        if cls.even_micro and n_micro % 2:
            raise ValueError(
                f"{cls.key} {cls.even_micro_reason}, so n_micro must be even (an even number of "
                f"micro-batches), got n_micro={n_micro}: use n_micro={fix} {_N_MICRO_HOW}")

    def _finish(self) -> None:
        # Routes and hop positions are looked up constantly by the checks and the simulator.
        self._routes = tuple(self._route(mb) for mb in range(self.n_micro))
        self._hops = tuple({hop: i for i, hop in enumerate(r)} for r in self._routes)
        self._programs = tuple(tuple(self._build(r)) for r in range(self.pp))
        self._plans = self._plan_comm()

    @abstractmethod
    def _build(self, rank: int) -> List[Action]:
        """The ordered program of ``rank`` (called once per rank at construction)."""

    @abstractmethod
    def stage_of(self, rank: int, chunk: int) -> int:
        """Global stage index (position in the data flow) held by ``(rank, chunk)``."""

    @abstractmethod
    def _route(self, mb: int) -> Tuple[RankChunk, ...]:
        """The ``(rank, chunk)`` hops micro-batch ``mb`` visits in forward order."""

    def route(self, mb: int) -> Tuple[RankChunk, ...]:
        """The ``(rank, chunk)`` hops micro-batch ``mb`` visits in forward order."""
        if not 0 <= mb < self.n_micro:
            raise ValueError(f"micro-batch {mb} out of range 0..{self.n_micro - 1}")
        return self._routes[mb]

    def hop(self, mb: int, rank: int, chunk: int) -> int:
        """Position of ``(rank, chunk)`` on ``mb``'s route; ValueError if it is not on it."""
        pos = self._hops[mb].get((rank, chunk))
        if pos is None:
            raise ValueError(f"{self!r}: micro-batch {mb} never visits rank {rank} chunk {chunk}")
        return pos

    # ----- derived topology -------------------------------------------------------------
    def actions(self, rank: int) -> Tuple[Action, ...]:
        """Ordered program of ``rank``."""
        return self._programs[rank]

    @property
    def programs(self) -> Tuple[Tuple[Action, ...], ...]:
        return self._programs

    def micro_batches(self, rank: int, chunk: int) -> Tuple[int, ...]:
        """Micro-batches flowing through ``(rank, chunk)``, in the order they are forwarded."""
        return tuple(m for m in range(self.n_micro) if (rank, chunk) in self._hops[m])

    def next_of(self, rank: int, chunk: int) -> Optional[RankChunk]:
        """Where the forward output of ``(rank, chunk)`` goes (``None`` on a last stage).

        The layouts here are static: every micro-batch through a ``(rank, chunk)`` has the
        same neighbours, so the first one's route answers for all.
        """
        mb = self.micro_batches(rank, chunk)[0]
        hops, i = self.route(mb), self.hop(mb, rank, chunk)
        return hops[i + 1] if i + 1 < len(hops) else None

    def prev_of(self, rank: int, chunk: int) -> Optional[RankChunk]:
        """Where the forward input of ``(rank, chunk)`` comes from (``None`` on a first stage)."""
        mb = self.micro_batches(rank, chunk)[0]
        hops, i = self.route(mb), self.hop(mb, rank, chunk)
        return hops[i - 1] if i > 0 else None

    def is_first(self, rank: int, chunk: int) -> bool:
        """True where micro-batches enter (this chunk owns the embedding / data loading)."""
        return self.prev_of(rank, chunk) is None

    def is_last(self, rank: int, chunk: int) -> bool:
        """True where the loss is computed (this chunk owns the output head)."""
        return self.next_of(rank, chunk) is None

    def holders(self, stage: int) -> Tuple[RankChunk, ...]:
        """All ``(rank, chunk)`` holding a copy of ``stage`` (two for DualPipe: sum their grads)."""
        return tuple((r, c) for r in range(self.pp) for c in range(self.chunks_per_rank)
                     if self.stage_of(r, c) == stage)

    def _messages(self, rank: int, act: Action) -> Tuple[List[Message], List[Message]]:
        """(consumed, produced) messages of one action, activation before gradient."""
        recvs, sends = [], []
        for kind, mb, chunk in act.parts():
            hops, i = self.route(mb), self.hop(mb, rank, chunk)
            if kind == "F":
                if i > 0 and hops[i - 1][0] != rank:
                    src = hops[i - 1]
                    recvs.append(Message("act", mb, src[0], src[1], rank, chunk))
                if i + 1 < len(hops) and hops[i + 1][0] != rank:
                    dst = hops[i + 1]
                    sends.append(Message("act", mb, rank, chunk, dst[0], dst[1]))
            elif kind == "B":
                if i + 1 < len(hops) and hops[i + 1][0] != rank:
                    src = hops[i + 1]
                    recvs.append(Message("grad", mb, src[0], src[1], rank, chunk))
                if i > 0 and hops[i - 1][0] != rank:
                    dst = hops[i - 1]
                    sends.append(Message("grad", mb, rank, chunk, dst[0], dst[1]))
        return recvs, sends

    def comm_plan(self, rank: int) -> Tuple[ActionComm, ...]:
        """Per action of ``rank``: receives to post, receives consumed, sends produced.

        Transfers between two chunks of the same rank (the turn of the V) are local and not
        listed.  Posting order follows the sender's order on every link, so an executor that
        posts ``posts`` before an action and ``sends`` after it never mismatches a peer
        (``simulator.check_schedule`` verifies this and deadlock freedom).
        """
        return self._plans[rank]

    def _plan_comm(self) -> Tuple[Tuple[ActionComm, ...], ...]:
        msgs = [[self._messages(r, a) for a in self._programs[r]] for r in range(self.pp)]
        # Each directed link carries messages in the order its sender produces them.
        link_order: Dict[Tuple[int, int], List[Message]] = {}
        position: Dict[Message, int] = {}
        for r in range(self.pp):
            for _, produced in msgs[r]:
                for msg in produced:
                    order = link_order.setdefault((msg.src, msg.dst), [])
                    position[msg] = len(order)
                    order.append(msg)
        plans = []
        for r in range(self.pp):
            next_post: Dict[Tuple[int, int], int] = {}
            plan = []
            for consumed, produced in msgs[r]:
                posts: List[Message] = []
                for msg in consumed:
                    if msg not in position:
                        raise ValueError(f"{self!r}: rank {r} waits for {msg}, which its peer "
                                         f"never sends")
                    link, want = (msg.src, msg.dst), position[msg]
                    start = next_post.get(link, 0)
                    if want >= start:  # not posted yet: post everything up to it, in order
                        posts.extend(link_order[link][start:want + 1])
                        next_post[link] = want + 1
                plan.append(ActionComm(tuple(posts), tuple(consumed), tuple(produced)))
            plans.append(tuple(plan))
        return tuple(plans)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pp={self.pp}, n_micro={self.n_micro})"


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
