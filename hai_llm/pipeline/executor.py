"""Runs a pipeline schedule's actions on real ranks with point-to-point transfers.

One :class:`PipelineExecutor` per pipeline rank owns ALL the state of a step (nothing lives
at module level): the stashed forward tapes per ``(micro-batch, chunk)``, the queue of
deferred weight-gradient closures per ``(micro-batch, chunk)``, the local mailboxes of the
V-turn (DualPipeV's two chunks on one rank), the posted receives and the sends in flight.

P2P contract (certified per schedule by ``simulator.check_schedule``): for every action, post
the ``comm_plan`` receives listed in ``posts`` (``irecv``; some are for LATER actions:
DualPipe's pre-posted forward receives), wait only the ``recvs`` the action consumes, compute,
``isend`` the ``sends`` and never wait on a send before the end of the step.  Receive buffers
are allocated per message on the model's device: ``[micro-batch rows, local sequence, dim]`` in
the activation dtype, both activations and gradients.  All messages of a link use one tag, so
matching relies on the posting order exactly as NCCL would; a plan error would surface as wrong
numbers in the equivalence tests rather than be hidden by tags.

Channels: every message travels on the process group of its DIRECTION, ``groups[CHANNEL(msg)]``
with ``CHANNEL = nccl_replay.direction_channel`` (one 2-rank group per ordered pair of pipeline
ranks that exchange messages, listed by :func:`p2p_channels` from the ``comm_plan``).  NCCL runs
a communicator's operations in issue order and a large send waits for its receive, so one
communicator shared by both directions of a pair (torch's default for ``isend`` on the default
group) deadlocks every schedule; one per direction completes: ``nccl_replay.replay`` certifies
exactly this mapping.  :meth:`PipelineExecutor.connect` opens the communicators once, in one
global order, so that NCCL's lazy, blocking communicator set-up cannot cross-wait either.

Actions: ``F`` builds the stage's pieces for the micro-batch (``overlap.build_stage_pieces``)
and runs them; ``B`` runs the pieces' backwards, collecting weight-gradient closures for the
later ``W``; ``BW`` is B then W; ``FB`` runs a forward and a full backward either overlapped
piece by piece (``overlap.run_overlapped``) or one after the other (``overlap=False``).  A last
stage adds its losses to its backward; every stage adds the balance losses of its own MoE
layers to its backward (``autograd.backward([outputs..., balance], [grads..., 1/n_micro])``).

Tracing: with ``trace=True`` every action, every piece and every receive wait is recorded as a
:class:`~hai_llm.pipeline.gantt.Span` (``spans``), ready for a Chrome trace per rank or a Gantt
chart of all ranks (``PipelineRuntime.write_trace``).  Times come from :class:`_Clock`:
``time.perf_counter`` on CPU; on CUDA ``torch.cuda.Event(enable_timing=True)`` marks on the
current stream, resolved with ONE synchronize at the end of the step, and only when timing is
on (``trace`` or ``timing``; on CUDA both default off, so a plain step never syncs the host).
Spans are placed on the wall clock (``time.time()`` at the step start + the measured offset)
so that the ranks' traces line up in one Gantt chart; pieces keep ``overlap.Tape``'s own
``time.time()`` stamps (host launch times on CUDA).

Collective order across ranks is checked with the one tracer,
:mod:`hai_llm.parallel.collective_trace` (``CollectiveRecorder`` + ``check_consistent``).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .gantt import Span
from .nccl_replay import direction_channel
from .overlap import Tape, run_overlapped, run_sequential
from .stage_pieces import build_stage_pieces
from .wgrad_split import WeightGradStore, run_closures
from hai_llm.layout.schedules import Action, Message, PipelineSchedule

P2P_TAG = 0
# The communicator a message travels on: one per direction of each pair of pipeline ranks.
# tests/test_pipeline_p2p.py asserts it IS the mapping tests/test_nccl_replay.py certifies.
CHANNEL: Callable[[Message], Hashable] = direction_channel


def p2p_channels(schedule: PipelineSchedule) -> List[Tuple[Hashable, Tuple[int, int]]]:
    """``[(channel, (src, dst))]``: every channel that some message of the schedule's
    ``comm_plan`` travels on, with the direction of its messages (the lowest one if a channel
    carried both), sorted by ``(src, dst)``.  This is the order in which every rank creates the
    channels' 2-rank groups (``dist.new_group`` must be called in one order everywhere) and in
    which :meth:`PipelineExecutor.connect` opens them."""
    links: Dict[Hashable, set] = {}
    for rank in range(schedule.pp):
        for comm in schedule.comm_plan(rank):
            for msg in tuple(comm.posts) + tuple(comm.sends):
                links.setdefault(CHANNEL(msg), set()).add((msg.src, msg.dst))
    return sorted(((ch, min(pairs)) for ch, pairs in links.items()), key=lambda x: (x[1], repr(x[0])))


class _Clock:
    """Timestamps of one step.  CPU: a mark is a ``time.perf_counter()`` float.  CUDA: a mark
    is a timing event recorded on the current stream (taking it never syncs the host);
    :meth:`resolve` synchronizes the device ONCE per step, after which durations and times can
    be read.  :meth:`at` places a mark on the wall clock (``time.time()`` at the step start plus
    the mark's offset from the start), so that the ranks' spans line up in one chart."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.wall0 = time.time()
        self.start = self.mark()

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def resolve(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the one host sync of a timed step

    def seconds(self, a, b) -> float:
        """Seconds from mark ``a`` to mark ``b``."""
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def at(self, mark) -> float:
        return self.wall0 + self.seconds(self.start, mark)


class _Tracer:
    """Spans of one rank: actions (Gantt rows) and pieces / waits (trace detail).

    ``piece(name, kind, t0, t1)`` is ``overlap.Tape``'s protocol and takes ``time.time()``
    stamps (host launch times on CUDA); the executor's own actions and waits are clock marks
    (:meth:`action`, :meth:`span`), turned into wall-clock floats once, after the step's
    ``resolve``."""

    def __init__(self, rank: int, clock: _Clock):
        self.rank = rank
        self.clock = clock
        self._actions: List[Tuple[Action, object, object]] = []
        self._details: List[Tuple[str, str, object, object, bool]] = []  # (..., times are marks)

    def piece(self, name: str, kind: str, t0: float, t1: float) -> None:
        self._details.append((name, kind, t0, t1, False))

    def span(self, name: str, kind: str, m0, m1) -> None:
        self._details.append((name, kind, m0, m1, True))

    def action(self, act: Action, m0, m1) -> None:
        self._actions.append((act, m0, m1))

    def spans(self) -> Tuple[List[Span], List[Tuple[str, str, float, float]]]:
        at = self.clock.at
        acts = [Span(self.rank, str(a), a.kind, at(m0), at(m1), a.chunk) for a, m0, m1 in self._actions]
        details = [(n, k, at(t0), at(t1)) if marks else (n, k, t0, t1) for n, k, t0, t1, marks in self._details]
        return acts, details


@dataclass
class StepStats:
    """What one step produced on this rank (before any reduction).

    ``ce``/``mtp``: {mb: value} for micro-batches whose loss this rank computed; ``balance``:
    {(mb, global MoE index): value}; ``counts``: [n own MoE layers, E] summed over the step
    (None without MoE layers); ``comm_wait_s``: time blocked in receive waits.
    """

    ce: Dict[int, torch.Tensor] = field(default_factory=dict)
    mtp: Dict[int, torch.Tensor] = field(default_factory=dict)
    balance: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict)
    counts: Optional[torch.Tensor] = None
    comm_wait_s: float = 0.0
    step_s: float = 0.0


class PipelineExecutor:
    """Executes ``schedule.actions(pp_rank)`` for the stages of ``model`` (a PipelineModel).

    ``peers[q]``: global rank of pipeline rank ``q`` in this rank's pp group.  ``groups``:
    ``{CHANNEL(msg): process group}`` for every channel this rank's messages use (built by
    ``PipelineRuntime`` from :func:`p2p_channels`; not needed when the rank exchanges no
    message, e.g. one pipeline rank).  ``act_dtype``: dtype of the hidden states crossing
    stages.  ``overlap``: run FB pairs piece-interleaved.  ``timing``: measure ``step_s`` and
    ``comm_wait_s`` (default: on for CPU models, off on CUDA, where it costs one device sync
    per step; ``trace`` turns it on).  Every tensor the executor creates lives on the model's
    device (``device``, from its parameters).
    """

    def __init__(self, model, schedule: PipelineSchedule, pp_rank: int, peers: Sequence[int],
                 act_dtype: torch.dtype = torch.float32, overlap: bool = True, trace: bool = False,
                 store: Optional[WeightGradStore] = None, groups: Optional[Mapping[Hashable, object]] = None,
                 timing: Optional[bool] = None):
        self.model = model
        self.schedule = schedule
        self.rank = pp_rank
        self.peers = list(peers)
        self.act_dtype = act_dtype
        self.overlap = overlap
        self.trace = trace
        self.store = store or WeightGradStore()
        self.actions = schedule.actions(pp_rank)
        self.plan = schedule.comm_plan(pp_rank)
        self.n_micro = schedule.n_micro
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.timing = trace or (timing if timing is not None else self.device.type != "cuda")
        self.groups: Dict[Hashable, object] = dict(groups or {})
        missing = sorted({repr(CHANNEL(m)) for c in self.plan for m in tuple(c.posts) + tuple(c.sends)
                          if CHANNEL(m) not in self.groups})
        if missing:
            raise ValueError(f"pipeline rank {pp_rank} exchanges messages on channels {missing} without "
                             f"a process group: pass groups={{channel: group}} built from p2p_channels "
                             f"(PipelineRuntime does)")
        self.spans: List[Span] = []
        self.details: List[Tuple[str, str, float, float]] = []

    def connect(self) -> None:
        """Open this rank's P2P communicators: one 1-element message per channel, in the global
        :func:`p2p_channels` order, blocking.  NCCL creates a communicator lazily at its first
        operation and that set-up blocks the host until the peer joins; without this, DualPipe's
        pre-posted receives would make rank r set up (r+1 -> r) while rank r+1 sets up (r -> r+1)
        and both wait forever.  Ranks open their channels in the same order, so each set-up
        finds its peer.  Collective over the ranks of this pp group (every one must call it)."""
        for ch, (src, dst) in p2p_channels(self.schedule):
            if self.rank not in (src, dst) or ch not in self.groups:
                continue
            buf = torch.zeros(1, dtype=self.act_dtype, device=self.device)
            if self.rank == src:
                dist.send(buf, dst=self.peers[dst], group=self.groups[ch], tag=P2P_TAG)
            else:
                dist.recv(buf, src=self.peers[src], group=self.groups[ch], tag=P2P_TAG)

    # ------------------------------------------------------------------ one step
    def run(self, micro_batches: Sequence[torch.Tensor], pos_S: Optional[torch.Tensor],
            autocast: Optional[Callable] = None, forward_only: bool = False) -> StepStats:
        """One step of the schedule.  ``forward_only`` (validation, under ``torch.no_grad``):
        only the forward of every ``F`` and ``FB`` action, in schedule order, and only the
        activation messages of the comm plan.  Why that cannot deadlock or mismatch: dropping
        every gradient message from both ends of each channel keeps the activation messages in
        the same relative order on both sides (they are matched by posting order), and every
        wait of a kept forward depended, in the full schedule, only on earlier forwards."""
        if len(micro_batches) != self.n_micro:
            raise ValueError(f"the schedule was built for {self.n_micro} micro-batches, got "
                             f"{len(micro_batches)}")
        wrong = {str(mb.device) for mb in micro_batches if mb.device != self.device}
        if wrong:
            raise ValueError(f"micro-batches on {sorted(wrong)} but the model is on {self.device}: "
                             f"move the batch to the model's device (train.device)")
        args = self.model.args
        T = micro_batches[0].shape[1]
        S = T - 1 - args.n_mtp_layers
        if S < 1:
            raise ValueError(f"need windows of seq_len + 1 + n_mtp_layers tokens; got {T}")
        if pos_S is None:
            pos_S = torch.arange(S, device=self.device)
        st = _StepState(self, micro_batches, pos_S, autocast, forward_only)
        try:
            for idx, act in enumerate(self.actions):
                st.run_action(idx, act)
            st.finish()
        finally:
            st.release()
        stats = st.stats
        clock = st.clock
        if clock is not None:
            end = clock.mark()
            clock.resolve()
            stats.step_s = clock.seconds(clock.start, end)
            stats.comm_wait_s = sum(clock.seconds(a, b) for a, b in st.waits)
        if self.trace:
            self.spans, self.details = st.tracer.spans()
        return stats

    def chrome_trace(self, path) -> Path:
        """Chrome-trace JSON of the last traced step: actions on tid 0, pieces and receive
        waits on tid 1 (microseconds since the step started)."""
        if not self.spans:
            raise RuntimeError("no traced step: construct the executor with trace=True and run a step")
        t0 = min(s.start for s in self.spans)
        ev = []
        for s in self.spans:
            ev.append({"name": s.name, "ph": "X", "pid": s.rank, "tid": 0, "ts": (s.start - t0) * 1e6,
                       "dur": s.duration * 1e6, "args": {"kind": s.kind, "direction": s.direction}})
        for name, kind, a, b in self.details:
            ev.append({"name": name, "ph": "X", "pid": self.rank, "tid": 1, "ts": (a - t0) * 1e6,
                       "dur": (b - a) * 1e6, "args": {"kind": kind}})
        ev.append({"name": "process_name", "ph": "M", "pid": self.rank,
                   "args": {"name": f"pp rank {self.rank}"}})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"traceEvents": ev, "displayTimeUnit": "ms"}))
        return path


class _StepState:
    """Everything of one step on one rank; dropped at the end of the step."""

    def __init__(self, ex: PipelineExecutor, mbs, pos_S, autocast, forward_only: bool = False):
        self.ex = ex
        self.forward_only = forward_only
        self.sched = ex.schedule
        self.rank = ex.rank
        self.mbs = mbs
        self.pos = pos_S
        self.autocast = autocast
        self.model = ex.model
        self.scale = torch.ones((), dtype=torch.float32, device=ex.device) / ex.n_micro
        self.tapes: Dict[Tuple[int, int], Tape] = {}
        self.wqueue: Dict[Tuple[int, int], list] = {}
        self.local_act: Dict[Tuple[int, int], torch.Tensor] = {}
        self.local_grad: Dict[Tuple[int, int], torch.Tensor] = {}
        self.posted: Dict[Message, Tuple[object, torch.Tensor]] = {}
        self.sends: List[Tuple[object, torch.Tensor]] = []
        self.outbox: Dict[Message, torch.Tensor] = {}
        self.stats = StepStats()
        self.clock = _Clock(ex.device) if ex.timing else None
        self.tracer = _Tracer(self.rank, self.clock) if ex.trace else None
        self.waits: List[Tuple[object, object]] = []  # clock marks around each receive wait
        self.dim = self.model.args.dim
        self.cur_comm = None

    # -- p2p -----------------------------------------------------------------------------
    def _shape(self, mb: int):
        return (self.mbs[mb].shape[0], self.pos.numel(), self.dim)

    def _group(self, msg: Message):
        return self.ex.groups[CHANNEL(msg)]

    def _post(self, msg: Message) -> None:
        buf = torch.empty(self._shape(msg.mb), dtype=self.ex.act_dtype, device=self.ex.device)
        work = dist.irecv(buf, src=self.ex.peers[msg.src], group=self._group(msg), tag=P2P_TAG)
        self.posted[msg] = (work, buf)

    def _wait(self, msg: Message) -> torch.Tensor:
        work, buf = self.posted.pop(msg)
        if self.clock is None:
            work.wait()
            return buf
        t0 = self.clock.mark()
        work.wait()
        t1 = self.clock.mark()
        self.waits.append((t0, t1))
        if self.tracer is not None:
            self.tracer.span(f"wait {msg.kind}{msg.mb}", "wait", t0, t1)
        return buf

    def _send(self, msg: Message, t: torch.Tensor) -> None:
        t = t.detach()
        if t.dtype != self.ex.act_dtype:
            raise RuntimeError(f"stage output dtype {t.dtype} differs from the P2P dtype "
                               f"{self.ex.act_dtype}")
        t = t.contiguous()
        work = dist.isend(t, dst=self.ex.peers[msg.dst], group=self._group(msg), tag=P2P_TAG)
        self.sends.append((work, t))

    def _find(self, msgs, kind: str, mb: int, chunk: int, local_side: str) -> Optional[Message]:
        for m in msgs:
            c = m.dst_chunk if local_side == "dst" else m.src_chunk
            if m.kind == kind and m.mb == mb and c == chunk:
                return m
        return None

    # -- inputs / outputs of a stage -------------------------------------------------------
    def _forward_input(self, mb: int, chunk: int) -> Optional[torch.Tensor]:
        if self.sched.is_first(self.rank, chunk):
            return None
        prev = self.sched.prev_of(self.rank, chunk)
        if prev[0] == self.rank:  # V turn: same rank, other chunk
            x = self.local_act.pop((mb, chunk))
        else:
            msg = self._find(self.cur_comm.recvs, "act", mb, chunk, "dst")
            if msg is None:
                raise RuntimeError(f"rank {self.rank}: F{mb}.{chunk} has no planned receive")
            x = self._wait(msg)
        return x.detach().requires_grad_()

    def _emit_output(self, mb: int, chunk: int, tape: Tape) -> None:
        if self.sched.is_last(self.rank, chunk):
            return
        nxt = self.sched.next_of(self.rank, chunk)
        out = tape.output.detach()
        if nxt[0] == self.rank:
            self.local_act[(mb, nxt[1])] = out
        else:
            msg = self._find(self.cur_comm.sends, "act", mb, chunk, "src")
            self._send(msg, out)

    def _grad_input(self, mb: int, chunk: int) -> Optional[torch.Tensor]:
        if self.sched.is_last(self.rank, chunk):
            return None
        nxt = self.sched.next_of(self.rank, chunk)
        if nxt[0] == self.rank:
            return self.local_grad.pop((mb, chunk))
        msg = self._find(self.cur_comm.recvs, "grad", mb, chunk, "dst")
        if msg is None:
            raise RuntimeError(f"rank {self.rank}: B{mb}.{chunk} has no planned receive")
        return self._wait(msg)

    def _emit_grad(self, mb: int, chunk: int, tape: Tape) -> None:
        if self.sched.is_first(self.rank, chunk):
            return
        prev = self.sched.prev_of(self.rank, chunk)
        g = tape.input_grad()
        if prev[0] == self.rank:
            self.local_grad[(mb, prev[1])] = g.detach()
        else:
            msg = self._find(self.cur_comm.sends, "grad", mb, chunk, "src")
            self._send(msg, g)

    # -- computations ----------------------------------------------------------------------
    def _make_tape(self, mb: int, chunk: int) -> Tape:
        stage = self.model.stages[chunk]
        x = self._forward_input(mb, chunk)
        env = {} if x is None else {"h": x}
        pieces = build_stage_pieces(stage, self.model, self.mbs[mb], self.pos, self.scale)
        tape = Tape(pieces, env, tracer=self.tracer, label=f"{mb}.{chunk}")
        self.tapes[(mb, chunk)] = tape
        return tape

    def _collect(self, mb: int, tape: Tape) -> None:
        if "ce" in tape.metrics:
            self.stats.ce[mb] = tape.metrics["ce"]
            self.stats.mtp[mb] = tape.metrics["mtp"]
        for gi, v in tape.balance.items():
            self.stats.balance[(mb, gi)] = v
        if tape.counts:
            n = len(self.model.moe_global_index)
            if self.stats.counts is None:
                E = next(iter(tape.counts.values())).numel()
                self.stats.counts = torch.zeros(n, E, dtype=torch.long, device=self.ex.device)
            for li, c in tape.counts.items():
                self.stats.counts[li] += c.to(torch.long)

    def _ctx(self):
        return self.autocast() if self.autocast is not None else _null()

    def forward(self, mb: int, chunk: int) -> None:
        tape = self._make_tape(mb, chunk)
        with self._ctx():
            tape.run_forward()
        self._collect(mb, tape)
        self._emit_output(mb, chunk, tape)

    def backward(self, mb: int, chunk: int, weights_now: bool) -> None:
        tape = self.tapes.pop((mb, chunk))
        grad = self._grad_input(mb, chunk)
        closures: list = []
        for _, sink in tape.backward_steps(grad, self.ex.store):
            closures.extend(sink)
        self._emit_grad(mb, chunk, tape)
        if weights_now:
            run_closures(closures)
        else:
            self.wqueue[(mb, chunk)] = closures

    def weights(self, mb: int, chunk: int) -> None:
        run_closures(self.wqueue.pop((mb, chunk)))

    def fb(self, act: Action) -> None:
        f_mb, f_chunk, b_mb, b_chunk = act.mb, act.chunk, act.b_mb, act.b_chunk
        b_tape = self.tapes.pop((b_mb, b_chunk))
        f_tape = self._make_tape(f_mb, f_chunk)
        fn = run_overlapped if self.ex.overlap else run_sequential
        fn(f_tape, b_tape, lambda: self._grad_input(b_mb, b_chunk), self.ex.store,
           lambda: self._emit_output(f_mb, f_chunk, f_tape), tracer=self.tracer, fwd_ctx=self._ctx)
        self._collect(f_mb, f_tape)
        self._emit_grad(b_mb, b_chunk, b_tape)

    def run_action(self, idx: int, act: Action) -> None:
        comm = self.ex.plan[idx]
        self.cur_comm = comm
        for msg in comm.posts:
            if not (self.forward_only and msg.kind != "act"):
                self._post(msg)
        t0 = self.clock.mark() if self.tracer is not None else None
        if self.forward_only:
            if act.kind in ("F", "FB"):  # an FB's forward half is F(act.mb, act.chunk)
                self.forward(act.mb, act.chunk)
                self.tapes.pop((act.mb, act.chunk))  # no backward will read it
        elif act.kind == "F":
            self.forward(act.mb, act.chunk)
        elif act.kind == "B":
            self.backward(act.mb, act.chunk, weights_now=False)
        elif act.kind == "BW":
            self.backward(act.mb, act.chunk, weights_now=True)
        elif act.kind == "W":
            self.weights(act.mb, act.chunk)
        elif act.kind == "FB":
            self.fb(act)
        else:  # pragma: no cover - Action validates kinds
            raise ValueError(act.kind)
        if self.tracer is not None:
            self.tracer.action(act, t0, self.clock.mark())

    def finish(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()
        left = [k for k in (self.tapes, self.wqueue, self.local_act, self.local_grad, self.posted) if k]
        if left:
            raise RuntimeError(f"rank {self.rank}: step ended with unconsumed state {left}")

    def release(self) -> None:
        self.tapes.clear()
        self.wqueue.clear()
        self.outbox.clear()


@contextmanager
def _null():
    yield
