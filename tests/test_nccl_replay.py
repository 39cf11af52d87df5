"""Every schedule's P2P plan, replayed under NCCL's in-order, rendezvous execution, must finish
with the executor's channels (one communicator per direction of each neighbour pair); the
replay itself is checked on hand-made plans and on the known failure of a shared channel."""
from __future__ import annotations

import pytest

from hai_llm.layout.schedules import DualPipe, DualPipeV, OneFOneB, ZB1P
from hai_llm.pipeline.nccl_replay import check_nccl_safe, direction_channel, pair_channel, replay

class _without_first_send:
    """``sched`` as the replay sees it, except that rank 0 never sends its first message."""

    def __init__(self, sched):
        self.sched, self.pp = sched, sched.pp

    def comm_plan(self, rank):
        plan = self.sched.comm_plan(rank)
        if rank != 0:
            return plan
        first = plan[0]
        return (type(first)(first.posts, first.recvs, ()),) + tuple(plan[1:])


CASES = [(OneFOneB, pp, n) for pp in (2, 4) for n in (pp, pp + 1, 2 * pp + 3)] + \
        [(ZB1P, pp, n) for pp in (2, 4) for n in (pp, pp + 1, 2 * pp + 3)] + \
        [(DualPipe, pp, n) for pp in (2, 4, 8) for n in (2 * pp, 2 * pp + 2, 4 * pp)] + \
        [(DualPipeV, pp, n) for pp in (2, 4, 8) for n in (2 * pp, 2 * pp + 1, 4 * pp)]


@pytest.mark.parametrize("cls,pp,n", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("host_blocks", [False, True], ids=["async-host", "host-reads"])
def test_every_schedule_completes_with_one_channel_per_direction(cls, pp, n, host_blocks):
    """Also with the host blocking inside every action until its compute has run (the
    expert-parallel layers' one host read per dispatch, at its worst place)."""
    sched = cls(pp, n)
    result = replay(sched, direction_channel, host_blocks=host_blocks)
    assert result.completed, str(result)
    # every planned message was transferred exactly once
    planned = sum(len(c.sends) for r in range(pp) for c in sched.comm_plan(r))
    assert result.steps == planned
    check_nccl_safe(sched)


def test_a_blocking_host_is_modelled():
    """A host that blocks on compute which can never run stops issuing: with rank 1's first
    input never sent, rank 1's host stays blocked in action 0 and issues none of its sends."""
    result = replay(_without_first_send(OneFOneB(2, 2)), direction_channel, host_blocks=True)
    assert not result.completed
    assert "host blocked in action 0" in " ".join(result.stuck[1])


@pytest.mark.parametrize("cls,pp,n", [(OneFOneB, 2, 4), (ZB1P, 4, 8), (DualPipe, 2, 4),
                                      (DualPipe, 8, 16), (DualPipeV, 4, 8)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_one_channel_per_pair_deadlocks(cls, pp, n):
    """torch's default P2P (one NCCL communicator per rank pair, both directions on one stream)
    hangs these plans: a send queued behind a receive of the other direction waits for a peer
    that is itself queued behind its own send."""
    result = replay(cls(pp, n), pair_channel)
    assert not result.completed
    assert result.stuck and "deadlock" in str(result)


def test_replay_follows_nccl_rules_on_a_two_rank_exchange():
    """1F1B on two ranks: rank 0 sends act1 then waits for grad0; rank 1 sends grad0 then
    waits for act1. Sharing one stream, each send sits at the head of its FIFO, in front of the
    receive the peer's send needs: exactly the rendezvous deadlock."""
    sched = OneFOneB(2, 4)
    stuck = replay(sched, pair_channel)
    assert stuck.steps == 1  # act0 goes through before any gradient exists
    assert "send act1 0->1 at head" in " ".join(stuck.stuck[0])
    assert "send grad0 1->0 at head" in " ".join(stuck.stuck[1])


def test_a_send_waits_for_its_compute():
    """A send cannot leave before the compute that produced it: with rank 1's compute of F0
    blocked forever (its input never arrives), nothing downstream is transferred."""
    result = replay(_without_first_send(OneFOneB(2, 2)), direction_channel)
    assert not result.completed
    assert "compute waits for act0 0->1" in " ".join(result.stuck[1])
