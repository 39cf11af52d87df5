"""The data model of a pipeline schedule: actions, messages, and the base class that turns a
schedule's per-rank programs into validated action lists and P2P plans.

``schedules.py`` holds the four schedules (1F1B, ZB1P, DualPipe, DualPipeV) and the registry;
this file holds what they share: ``Action`` (one step of a rank's program), ``Message`` (a P2P
transfer it implies), ``ActionComm`` (the receives to post / consume and the sends of one
action) and ``PipelineSchedule`` (topology, routes, the comm plan and the rule checks). Pure
Python, no torch: the simulator, the planner and the executor all read the same objects.
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
            from .schedules import SCHEDULES  # the registry (defined after the subclasses)

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
