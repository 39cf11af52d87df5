"""Replaying a schedule's P2P plan under NCCL's execution rules, to find deadlocks before a GPU does.

Gloo (our CPU backend) buffers messages, so a P2P plan that works on simulated ranks can still
hang on GPUs. NCCL runs the operations a rank issues on one communicator in issue order on
that communicator's stream, and a send of a large message only completes once the matching
receive is running on the peer (rendezvous). torch's ProcessGroupNCCL gives each pair of ranks
that exchange point-to-point messages one communicator, used in both directions. An early
posted receive (DualPipe pre-posts forward activations) therefore sits at the head of its
stream and blocks every later send to the same peer; if the peer is blocked the same way, both
wait forever.

:func:`replay` models one step exactly that way. Per rank the host issues, for every action
of the schedule's ``comm_plan``: the receives to post (appended to their communicator's FIFO),
a stream wait for every receive the action consumes, the action's compute, then its sends
(appended to their FIFOs; a send cannot start before the compute that produced it). The host
never blocks (``Work.wait`` on NCCL makes the compute stream wait, not the CPU), unless
``host_blocks``: then it also waits for each action's compute before issuing its sends, the
worst case of the expert-parallel layers' one host read per dispatch. The replay
advances whatever can move: a compute-stream item once its receive has completed, and a
send/receive pair once both sit at the head of their FIFOs on the same communicator and the
send's data is ready. It reports a deadlock when something is left and nothing can move.

``channel(msg)`` names the communicator a message travels on:

* :func:`pair_channel`: one per unordered rank pair (torch's default for ``isend``/``irecv``);
* :func:`direction_channel`: one per ordered (src, dst) pair, i.e. two process groups per
  neighbour pair, one for each direction (what the executor uses): a rank's receives from a
  peer and its sends to that peer never share a stream.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Hashable, List, Tuple

from hai_llm.layout.schedules import Message, PipelineSchedule


def pair_channel(msg: Message) -> Hashable:
    """One communicator per unordered pair of ranks, shared by both directions."""
    return ("pair", min(msg.src, msg.dst), max(msg.src, msg.dst))


def direction_channel(msg: Message) -> Hashable:
    """One communicator per direction of each pair of ranks."""
    return ("dir", msg.src, msg.dst)


@dataclass
class ReplayResult:
    """``completed``: every operation ran. Otherwise ``stuck`` says, per rank, what its compute
    stream waits for and what sits at the head of each of its communicators' FIFOs."""

    completed: bool
    steps: int
    stuck: Dict[int, List[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.completed:
            return f"completed in {self.steps} transfers"
        lines = [f"deadlock after {self.steps} transfers:"]
        for rank, what in sorted(self.stuck.items()):
            lines.append(f"  rank {rank}: " + "; ".join(what))
        return "\n".join(lines)


def _label(msg: Message) -> str:
    return f"{msg.kind}{msg.mb} {msg.src}->{msg.dst}"


def replay(schedule: PipelineSchedule, channel: Callable[[Message], Hashable] = direction_channel,
           host_blocks: bool = False) -> ReplayResult:
    """Run one step of ``schedule``'s P2P plan under NCCL's in-order, rendezvous semantics.

    ``host_blocks``: the host also waits, inside every action, until that action's compute has
    run before it issues the action's sends. That is what an expert-parallel layer's one host
    read per dispatch does (its sizes need the routing, which needs the action's input); a plan
    that completes this way stays deadlock-free with such reads anywhere inside an action."""
    pp = schedule.pp
    # what each rank's host issues, in order: ("post", msg) | ("wait", msg) | ("compute", idx)
    # | ("sync", idx) | ("send", msg, idx)
    host: List[Deque[tuple]] = [deque() for _ in range(pp)]
    for rank in range(pp):
        for idx, comm in enumerate(schedule.comm_plan(rank)):
            host[rank].extend(("post", m) for m in comm.posts)
            host[rank].extend(("wait", m) for m in comm.recvs)
            host[rank].append(("compute", idx))
            if host_blocks:
                host[rank].append(("sync", idx))
            host[rank].extend(("send", m, idx) for m in comm.sends)
    # compute stream of each rank: ("wait", msg) | ("compute", action index)
    compute: List[Deque[Tuple[str, object]]] = [deque() for _ in range(pp)]
    # FIFOs of each (rank, communicator): ("recv" | "send", msg, action index of the producer)
    fifos: Dict[Tuple[int, Hashable], Deque[Tuple[str, Message, int]]] = {}
    done_compute = [-1] * pp  # highest action index whose compute has run, per rank
    received: set = set()
    steps = 0
    moved = True
    while moved:
        moved = False
        for rank in range(pp):  # hosts issue until a blocking read waits for unfinished compute
            q = host[rank]
            while q:
                item = q[0]
                if item[0] == "sync":
                    if done_compute[rank] < item[1]:
                        break
                elif item[0] == "post":
                    fifos.setdefault((rank, channel(item[1])), deque()).append(("recv", item[1], -1))
                elif item[0] == "send":
                    fifos.setdefault((rank, channel(item[1])), deque()).append(("send", item[1], item[2]))
                else:
                    compute[rank].append(item)
                q.popleft()
                moved = True
        for rank in range(pp):  # compute streams run until a receive they wait on is missing
            q = compute[rank]
            while q:
                kind, what = q[0]
                if kind == "wait" and what not in received:
                    break
                if kind == "compute":
                    done_compute[rank] = what
                q.popleft()
                moved = True
        for (rank, ch), q in list(fifos.items()):  # transfers whose both ends are ready
            if not q or q[0][0] != "send":
                continue
            _, msg, idx = q[0]
            peer = fifos.get((msg.dst, ch))
            if done_compute[rank] < idx or not peer or peer[0][0] != "recv" or peer[0][1] != msg:
                continue
            q.popleft()
            peer.popleft()
            received.add(msg)
            steps += 1
            moved = True
    left = any(host) or any(compute) or any(fifos.values())
    if not left:
        return ReplayResult(True, steps)
    stuck: Dict[int, List[str]] = {}
    for rank in range(pp):
        what = []
        if host[rank] and host[rank][0][0] == "sync":
            what.append(f"host blocked in action {host[rank][0][1]}")
        if compute[rank]:
            kind, item = compute[rank][0]
            what.append(f"compute waits for {_label(item)}" if kind == "wait" else f"compute at {item}")
        for (r, ch), q in fifos.items():
            if r == rank and q:
                op, msg, _ = q[0]
                what.append(f"{ch}: {op} {_label(msg)} at head")
        if what:
            stuck[rank] = what
    return ReplayResult(False, steps, stuck)


def check_nccl_safe(schedule: PipelineSchedule) -> None:
    """Raise ``ValueError`` if ``schedule`` can deadlock on NCCL with the executor's channels."""
    for host_blocks in (False, True):
        result = replay(schedule, direction_channel, host_blocks)
        if not result.completed:
            raise ValueError(f"{schedule!r} deadlocks under NCCL ordering with one communicator per "
                             f"direction (host_blocks={host_blocks}):\n{result}")
