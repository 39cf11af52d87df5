"""Running a pipeline schedule on paper: dependency graph, validation, timing.

``hai_llm.layout.schedules`` says what each rank does in which order; this module executes those lists
abstractly.  ``dependencies`` builds the cross-rank data-dependency graph, ``check_schedule``
proves a schedule complete, ordered, deadlock-free and P2P-consistent before anything runs on a
cluster, and ``simulate`` lays out every rank's timeline under per-chunk costs: actions run in
their listed order on their rank, each one starting as soon as the rank is free AND every input
it consumes exists (forward activation from the previous stage, output gradient from the next
stage, its own forward / input-grad for B / W).  A cross-rank input arrives ``comm`` after its
producer finishes; sends never block the sender (the executor contract documented in
``check_schedule``).  This is the "infinite bandwidth, perfectly balanced stages" model behind
Table 2 of the DeepSeek-V3 report, and is how the tests confirm each schedule generator reaches
its bubble formula.

Measurement.  A rank's busy time is the sum of the costs of its own actions (F, B-W for a
split input-grad B, W, B for a full BW, F&B once for an overlapped pair); its bubble is
``makespan - busy``.  The bubble compared with Table 2 is the largest per-rank bubble, i.e.
that of the least busy rank.  With F&B = F + B every rank of every schedule here is equally
busy, so all ranks have that same bubble; with F&B < F + B the ranks running more overlapped
pairs (DualPipe's middle ranks, DualPipeV's last ranks) idle longest.  Activations are counted
in chunk units: one micro-batch's stash for one chunk, alive from its F to the end of its W.

Agreement with Table 2 (comm = 0; verified by tests/test_pipeline_schedules.py):

* 1F1B: ``(PP-1)(F+B)`` for every cost setting.
* ZB1P: ``(PP-1) * max(F+B-2W, F, B-W)`` for every cost setting, so Table 2's
  ``(PP-1)(F+B-2W)`` holds exactly iff ``W <= min(F, B-W)``: a deferred W only fills a gap at
  least W long, and neither the warm-up ``(PP-1)F`` nor the gradient ramp ``(PP-1)(B-W)``
  contains any W to defer.
* DualPipe / DualPipeV (PP = stages, i.e. 2 x ranks for the V): ``(PP/2-1)(F&B+B-3W)`` holds
  exactly when ``F = B-W`` and ``W <= F``, for any F&B between ``max(F, B)`` and ``F+B``.
  With ``W <= min(F, B-W)`` in general, the reference phase structure gives
  ``(PP/2-1)(F&B + F - 2W)`` when ``F >= B-W`` (more than Table 2 if F > B-W) and at most
  Table 2's value when ``F < B-W``: Table 2's ``B - 3W`` is ``(B-W) - 2W`` with the forward
  and input-grad chunk costs taken as equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .gantt import Span
from hai_llm.layout.schedules import Action, Message, PipelineSchedule, RankChunk


def peak_activations(schedule: PipelineSchedule) -> List[int]:
    """Max number of chunk activations alive per rank, from the action order alone.

    One unit is the stashed activation of one micro-batch in one chunk.  It is allocated when
    the forward starts and freed when its weight gradient finishes (W, or the end of a BW /
    the backward half of an FB).  Inside an FB pair the forward allocates before the backward
    frees, since both run concurrently.
    """
    peaks = []
    for rank in range(schedule.pp):
        live = peak = 0
        for act in schedule.actions(rank):
            for kind, _, _ in act.parts():
                if kind == "F":
                    live += 1
                    peak = max(peak, live)
            live -= sum(1 for kind, _, _ in act.parts() if kind == "W")
        peaks.append(peak)
    return peaks


def dependencies(schedule: PipelineSchedule, wait_posted: bool = False
                 ) -> Dict[Tuple[int, int], List[Tuple[int, int, bool]]]:
    """Cross-action dependencies: ``(rank, idx) -> [(rank', idx', remote), ...]``.

    ``remote`` is True when the data crosses ranks (a P2P transfer).  Data rules: the forward
    of hop i waits for the forward of hop i-1; the input-grad backward of hop i waits for the
    backward of hop i+1 and for its own forward; W waits for its own B.  With ``wait_posted``
    an action also waits for every receive posted before it (``comm_plan``), including ones
    pre-posted for later actions: the reference's commit-and-wait discipline.  Order inside a
    rank is implicit (actions run in list order) and is not listed.
    """
    where: Dict[Tuple[str, int, int, int], Tuple[int, int]] = {}
    for rank in range(schedule.pp):
        for idx, act in enumerate(schedule.actions(rank)):
            for kind, mb, chunk in act.parts():
                key = (kind, mb, rank, chunk)
                if key in where:
                    raise ValueError(f"{kind} of micro-batch {mb}, rank {rank} chunk {chunk} "
                                     f"appears twice in {schedule!r}")
                where[key] = (rank, idx)

    def producer(kind: str, mb: int, hop: RankChunk) -> Tuple[int, int]:
        key = (kind, mb, hop[0], hop[1])
        if key not in where:
            raise ValueError(f"{schedule!r}: {kind} of micro-batch {mb} on rank {hop[0]} chunk "
                             f"{hop[1]} is never scheduled")
        return where[key]

    deps: Dict[Tuple[int, int], List[Tuple[int, int, bool]]] = {}
    for rank in range(schedule.pp):
        plan = schedule.comm_plan(rank) if wait_posted else ()
        for idx, act in enumerate(schedule.actions(rank)):
            out = []
            for kind, mb, chunk in act.parts():
                hops, i = schedule.route(mb), schedule.hop(mb, rank, chunk)
                if kind == "F" and i > 0:
                    src = producer("F", mb, hops[i - 1])
                    out.append((src[0], src[1], hops[i - 1][0] != rank))
                elif kind == "B":
                    out.append(producer("F", mb, (rank, chunk)) + (False,))
                    if i + 1 < len(hops):
                        src = producer("B", mb, hops[i + 1])
                        out.append((src[0], src[1], hops[i + 1][0] != rank))
                elif kind == "W":
                    out.append(producer("B", mb, (rank, chunk)) + (False,))
            for msg in plan[idx].posts if wait_posted else ():
                made = "F" if msg.kind == "act" else "B"
                out.append(producer(made, msg.mb, (msg.src, msg.src_chunk)) + (True,))
            deps[(rank, idx)] = [d for d in out if d[:2] != (rank, idx)]
    return deps


def _assert_completes(schedule: PipelineSchedule, wait_posted: bool) -> None:
    """Advance any rank whose next action has its inputs until all finish or none can move."""
    deps = dependencies(schedule, wait_posted)
    pos = [0] * schedule.pp
    lengths = [len(schedule.actions(r)) for r in range(schedule.pp)]
    progressed = True
    while progressed:
        progressed = False
        for rank in range(schedule.pp):
            while pos[rank] < lengths[rank] and all(
                    pos[r] > i for r, i, _ in deps[(rank, pos[rank])]):
                pos[rank] += 1
                progressed = True
    if pos != lengths:
        stuck = {r: str(schedule.actions(r)[pos[r]]) for r in range(schedule.pp)
                 if pos[r] < lengths[r]}
        how = " when waiting on pre-posted receives" if wait_posted else ""
        raise ValueError(f"{schedule!r} deadlocks{how}; ranks stuck at {stuck}")


def check_schedule(schedule: PipelineSchedule) -> None:
    """Raise ``ValueError`` unless ``schedule`` is complete, ordered, deadlock-free and its
    P2P traffic is posted in the same order on both ends of every link.

    * every ``(mb, rank, chunk)`` on a micro-batch's route has exactly one F, one B, one W;
    * on each rank F precedes B precedes W for the same micro-batch and chunk;
    * running all ranks with unlimited resources (each action starts once its inputs exist)
      finishes: no cyclic wait across ranks; it still finishes when every action also waits
      for all receives posted so far (pre-posted ones included);
    * for every directed link src -> dst, the messages dst posts (``comm_plan``) are exactly
      those src sends, in the same order, each posted no later than the action consuming it.
      NCCL matches P2P operations per peer in posting order (no tags), so a mismatch hangs or
      silently swaps tensors on a real cluster.

    The executor contract this certifies: per action, post ``posts`` (irecv), wait for
    ``recvs`` (waiting for all posted receives is also safe), compute, issue ``sends`` (isend)
    and do not wait for send completion before later actions (only at the end of the step).
    With NCCL, where operations to one peer share a stream, use one communicator per
    direction of each rank pair so a pending send never queues behind a receive.  Blocking on
    sends as well (the reference commits sends and receives in one batch and waits for all)
    needs hand-placed send deferrals that the plan does not encode: batching the previous
    action's sends with the next receives and waiting for everything deadlocks DualPipe PP=4.
    """
    # completeness: each op exactly once (duplicates are caught in dependencies()).
    for rank in range(schedule.pp):
        for chunk in range(schedule.chunks_per_rank):
            expect = set(schedule.micro_batches(rank, chunk))
            for want in ("F", "B", "W"):
                got = [mb for a in schedule.actions(rank) for k, mb, c in a.parts()
                       if k == want and c == chunk]
                if sorted(got) != sorted(expect):
                    raise ValueError(f"{schedule!r}: rank {rank} chunk {chunk} runs {want} for "
                                     f"micro-batches {sorted(got)}, expected {sorted(expect)}")
    # order on each rank: F < B < W.
    for rank in range(schedule.pp):
        seen: Dict[Tuple[int, int], str] = {}
        for act in schedule.actions(rank):
            for kind, mb, chunk in act.parts():
                before = seen.get((mb, chunk), "")
                needed = {"F": "", "B": "F", "W": "FB"}[kind]
                if before != needed:
                    raise ValueError(f"{schedule!r}: rank {rank} runs {kind} of micro-batch {mb} "
                                     f"chunk {chunk} after {before or 'nothing'}")
                seen[(mb, chunk)] = before + kind
    # deadlock freedom, with lazy and with commit-and-wait receives.
    _assert_completes(schedule, wait_posted=False)
    _assert_completes(schedule, wait_posted=True)
    # P2P: per directed link the receiver posts in the sender's order, and nothing is
    # consumed before it is posted.
    sent: Dict[Tuple[int, int], List[Message]] = {}
    posted: Dict[Tuple[int, int], List[Message]] = {}
    for rank in range(schedule.pp):
        so_far = set()
        for comm in schedule.comm_plan(rank):
            for msg in comm.sends:
                sent.setdefault((msg.src, msg.dst), []).append(msg)
            for msg in comm.posts:
                posted.setdefault((msg.src, msg.dst), []).append(msg)
                so_far.add(msg)
            missing = [m for m in comm.recvs if m not in so_far]
            if missing:
                raise ValueError(f"{schedule!r}: rank {rank} consumes {missing[0]} before "
                                 f"posting its receive")
    for link in sorted(set(sent) | set(posted)):
        s, r = sent.get(link, []), posted.get(link, [])
        if s != r:
            first = next((i for i, (a, b) in enumerate(zip(s, r)) if a != b), min(len(s), len(r)))
            raise ValueError(
                f"{schedule!r}: P2P order mismatch on link {link[0]}->{link[1]} at message "
                f"{first}: sender posts {s[first] if first < len(s) else None}, receiver posts "
                f"{r[first] if first < len(r) else None}")


@dataclass(frozen=True)
class Costs:
    """Per-chunk execution times.

    ``B`` is the FULL backward of a chunk and ``W`` its weight-gradient part (Table 2's
    convention), so a split input-grad action costs ``B - W`` and a ``BW`` action costs ``B``.
    ``FB`` is an overlapped forward+backward pair (report's "F&B"); ``None`` means ``F + B``,
    i.e. overlap hides communication but gives no compute speed-up.  ``comm`` is the latency
    added to every cross-rank activation / gradient transfer.
    """

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: Optional[float] = None
    comm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("F", "B", "W", "comm"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost {name} must be >= 0, got {getattr(self, name)}")
        if self.W > self.B:
            raise ValueError(f"W (weight-grad part, {self.W}) cannot exceed the full backward "
                             f"B ({self.B})")
        if self.FB is not None and self.FB < 0:
            raise ValueError(f"cost FB must be >= 0, got {self.FB}")

    @property
    def fb(self) -> float:
        """Cost of an overlapped pair (``F + B`` unless given)."""
        return self.F + self.B if self.FB is None else self.FB

    def duration(self, action: Action) -> float:
        return {"F": self.F, "B": self.B - self.W, "W": self.W, "BW": self.B,
                "FB": self.fb}[action.kind]


@dataclass(frozen=True)
class SimResult:
    """Simulated timeline.

    ``spans[r]`` are rank r's actions as ``Span`` (name = ``str(action)``, direction = the
    action's chunk).  ``busy[r]`` sums its action costs; ``bubble[r] = makespan - busy[r]``
    is all its idle time (warm-up, drain and the gaps in between).  ``max_bubble`` is the
    bubble of the least busy rank, ``total_bubble`` the sum over ranks.  With ``FB = F + B``
    every rank of every schedule here has the same busy time, so all per-rank bubbles are
    equal and are what Table 2 calls the bubble.  ``peak_activations[r]`` counts chunk
    activations alive at once (allocated at F, freed when the W of that micro-batch ends).
    """

    schedule: PipelineSchedule
    costs: Costs
    spans: Tuple[Tuple[Span, ...], ...]
    makespan: float
    busy: Tuple[float, ...]
    bubble: Tuple[float, ...]
    peak_activations: Tuple[int, ...]

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    @property
    def min_bubble(self) -> float:
        return min(self.bubble)

    @property
    def total_bubble(self) -> float:
        return sum(self.bubble)

    @property
    def bubble_rate(self) -> float:
        """Idle fraction of all rank-time."""
        return self.total_bubble / (self.makespan * len(self.busy)) if self.makespan else 0.0

    def all_spans(self) -> List[Span]:
        return [sp for rank_spans in self.spans for sp in rank_spans]


def simulate(schedule: PipelineSchedule, costs: Optional[Costs] = None,
             wait_posted: bool = False) -> SimResult:
    """Time every action of ``schedule`` under ``costs``; raise ``ValueError`` on deadlock.

    Actions are placed by repeatedly advancing any rank whose next action has all its inputs
    timed: start = max(rank free, producer end (+ comm if remote)).  Because a rank's order is
    fixed, the result does not depend on which ready rank is advanced first.  ``wait_posted``
    also makes each action wait for receives pre-posted for later actions (the reference's
    commit-and-wait discipline for receives, see ``dependencies``).
    """
    costs = costs or Costs()
    deps = dependencies(schedule, wait_posted)
    programs = schedule.programs
    end: List[List[float]] = [[] for _ in range(schedule.pp)]
    spans: List[List[Span]] = [[] for _ in range(schedule.pp)]
    clock = [0.0] * schedule.pp
    progressed = True
    while progressed:
        progressed = False
        for rank in range(schedule.pp):
            while len(end[rank]) < len(programs[rank]):
                idx = len(end[rank])
                inputs = deps[(rank, idx)]
                if any(i >= len(end[r]) for r, i, _ in inputs):
                    break  # an input is not timed yet: advance the other ranks first
                ready = max([clock[rank]] + [end[r][i] + (costs.comm if remote else 0.0)
                                             for r, i, remote in inputs])
                act = programs[rank][idx]
                finish = ready + costs.duration(act)
                end[rank].append(finish)
                spans[rank].append(Span(rank, str(act), act.kind, ready, finish, act.chunk))
                clock[rank] = finish
                progressed = True
    if any(len(end[r]) < len(programs[r]) for r in range(schedule.pp)):
        stuck = {r: str(programs[r][len(end[r])]) for r in range(schedule.pp)
                 if len(end[r]) < len(programs[r])}
        raise ValueError(f"{schedule!r} deadlocks in simulation; ranks stuck at {stuck}")
    makespan = max(clock)
    busy = tuple(sum(costs.duration(a) for a in programs[r]) for r in range(schedule.pp))
    return SimResult(
        schedule=schedule, costs=costs,
        spans=tuple(tuple(s) for s in spans),
        makespan=makespan, busy=busy,
        bubble=tuple(makespan - b for b in busy),
        peak_activations=tuple(peak_activations(schedule)),
    )


def formula_bubble(name: str, stages: int, costs: Costs) -> float:
    """Table 2's bubble for schedule ``name`` with ``stages`` pipeline stages.

    ``stages`` is the report's PP: the number of ranks for 1F1B / ZB1P / DualPipe, and twice
    the number of ranks for DualPipeV (``stages`` = 2 * pp).
    """
    f, b, w, fb = costs.F, costs.B, costs.W, costs.fb
    if name == "1F1B":
        return (stages - 1) * (f + b)
    if name == "ZB1P":
        return (stages - 1) * (f + b - 2 * w)
    if name in ("DualPipe", "DualPipeV"):
        return (stages / 2 - 1) * (fb + b - 3 * w)
    raise ValueError(f"no Table 2 formula for schedule {name!r}")


def formula_activations(name: str, stages: int) -> int:
    """Table 2's activation column (peak chunk activations): PP or PP+1."""
    if name in ("1F1B", "ZB1P"):
        return stages
    if name in ("DualPipe", "DualPipeV"):
        return stages + 1
    raise ValueError(f"no Table 2 formula for schedule {name!r}")
