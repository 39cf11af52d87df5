"""Pipeline P2P runs on one process group per direction of every linked pair of pipeline ranks.

Why: NCCL runs a communicator's operations in issue order and a large send only completes
once its receive runs, so torch's default (``isend``/``irecv`` on the default group: one
communicator per rank pair, both directions on one stream) deadlocks every schedule, while one
communicator per direction completes (``hai_llm.pipeline.nccl_replay``, certified per schedule by
``tests/test_nccl_replay.py``). This file checks that what RUNS is what the replay certifies:

* the executor's channel mapping IS ``nccl_replay.direction_channel`` and its channels come from
  the schedule's ``comm_plan``;
* on real gloo ranks (pp2: DualPipe, 1F1B, DualPipeV; pp4: DualPipe), every P2P call is
  recorded with the collective tracer, extended to note each call's process-group object (the
  two direction groups of a pair have the same ranks): every message of direction a -> b went
  through the a -> b group, none through the default group, every planned message was sent
  once, and the traces are consistent (``check_consistent``);
* timing: CPU steps are timed with ``perf_counter``; on CUDA the clock records timing events and
  synchronizes once per step (checked on a stand-in of ``torch.cuda``).
"""
from __future__ import annotations

import pytest
import torch

from hai_llm.layout.schedules import DualPipe, DualPipeV, Message, OneFOneB, ZB1P
from hai_llm.parallel.spawn import run_ranks
from helpers import layout_config

MODEL = ["n_layers=4", "n_dense_layers=1"]


def _msg(src: int, dst: int) -> Message:
    return Message(kind="act", mb=0, src=src, src_chunk=0, dst=dst, dst_chunk=0)


# ----------------------------------------------------------------------------- no spawn
@pytest.mark.parametrize("sched", [OneFOneB(2, 4), ZB1P(4, 5), DualPipe(2, 4), DualPipe(4, 8), DualPipeV(2, 5),
                                   DualPipeV(4, 8)], ids=repr)
def test_executor_channels_are_the_replayed_ones(sched):
    from hai_llm.pipeline import executor, nccl_replay

    assert executor.CHANNEL is nccl_replay.direction_channel  # the mapping the replay certifies
    msgs = {m for r in range(sched.pp) for c in sched.comm_plan(r) for m in tuple(c.posts) + tuple(c.sends)}
    chans = executor.p2p_channels(sched)
    # one channel per direction of every linked pair (pairs from the comm_plan), in (src, dst) order
    assert [link for _, link in chans] == sorted({(m.src, m.dst) for m in msgs})
    assert all(ch == nccl_replay.direction_channel(_msg(*link)) for ch, link in chans)
    assert {executor.CHANNEL(m) for m in msgs} == {ch for ch, _ in chans}
    assert nccl_replay.replay(sched, executor.CHANNEL).completed
    # the pipelines here only talk to neighbours, in both directions
    assert {link for _, link in chans} == {(r, r + d) for r in range(sched.pp) for d in (-1, 1)
                                           if 0 <= r + d < sched.pp}


def test_executor_refuses_messages_without_a_group(tiny_args):
    from dataclasses import replace

    from hai_llm.model.transformer import build_model
    from hai_llm.pipeline.executor import PipelineExecutor
    from hai_llm.pipeline.stage import build_pipeline_model

    args = replace(tiny_args, n_layers=2, n_dense_layers=1)
    sched = OneFOneB(2, 2)
    pm = build_pipeline_model(build_model(args, device="cpu", seed=7), sched, 0)
    with pytest.raises(ValueError, match="without a process group"):
        PipelineExecutor(pm, sched, 0, [0, 1])


def test_step_timing_on_cpu_and_off(tiny_args):
    """One rank (DualPipeV's V turn, no messages): CPU steps are timed by default, traced spans
    lie inside the step; ``timing=False`` measures nothing."""
    from dataclasses import replace

    from hai_llm.model.transformer import build_model
    from hai_llm.pipeline.executor import PipelineExecutor
    from hai_llm.pipeline.stage import build_pipeline_model

    args = replace(tiny_args, n_layers=2, n_dense_layers=1)
    sched = DualPipeV(1, 2)
    tokens = torch.randint(0, args.vocab_size, (2, 8 + 2), generator=torch.Generator().manual_seed(0))
    pm = build_pipeline_model(build_model(args, device="cpu", seed=7), sched, 0)
    ex = PipelineExecutor(pm, sched, 0, [0], trace=True)
    st = ex.run(list(tokens.chunk(2)), None)
    assert st.step_s > 0 and ex.spans and ex.details
    lo, hi = min(s.start for s in ex.spans), max(s.end for s in ex.spans)
    assert hi - lo <= st.step_s + 1e-3 and all(a <= b for _, _, a, b in ex.details)
    st = PipelineExecutor(pm, sched, 0, [0], timing=False).run(list(tokens.chunk(2)), None)
    assert st.step_s == 0.0 and st.comm_wait_s == 0.0


def test_cuda_clock_records_events_and_syncs_once(monkeypatch):
    """The CUDA clock takes timing events (no host sync when marking) and resolves them with one
    device synchronize; offsets are the events' elapsed times from the step's start event."""
    from hai_llm.pipeline import executor

    syncs = []

    class FakeEvent:
        n = 0

        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            FakeEvent.n += 1
            self.t = FakeEvent.n * 2.0  # ms on the "device"

        def elapsed_time(self, other):
            assert syncs, "events read before the step's synchronize"
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    clock = executor._Clock(torch.device("cuda", 0))
    a, b = clock.mark(), clock.mark()
    assert not syncs
    clock.resolve()
    assert syncs == [torch.device("cuda", 0)]
    assert clock.seconds(a, b) == pytest.approx(2e-3)
    # wall-clock placement: abs 1e-6, as a float64 time.time() (~1.8e9 s) resolves ~2.4e-7 s
    assert clock.at(b) - clock.wall0 == pytest.approx(4e-3, abs=1e-6)


# ----------------------------------------------------------------------------- spawned
def p2p_rank(rank: int, world: int, cases: list) -> list:
    """Per case: this rank's trace of one training step (runtime set-up included), the process
    group name of every record, {group name: channel} of the runtime's P2P groups, the pp
    peers, and the name of the default group."""
    import torch.distributed as dist

    from hai_llm.layout import build_layout
    from hai_llm.parallel.collective_trace import CollectiveRecorder
    from hai_llm.runtime.pipeline import PipelineRuntime
    from hai_llm.train.trainer import Trainer

    class GroupRecorder(CollectiveRecorder):
        """The collective tracer, also noting the process-group object of every record."""

        def __init__(self):
            super().__init__()
            self.group_names: list = []

        def _record(self, name, spec, a, batched=False):
            trace = self.traces.get(dist.get_rank(), [])
            before = len(trace)
            super()._record(name, spec, a, batched)
            if len(self.traces.get(dist.get_rank(), [])) > before:
                self.group_names.append((a.get("group") or dist.group.WORLD).group_name)

    out = []
    for cfg in cases:
        with GroupRecorder() as rec:
            rt = PipelineRuntime(cfg, build_layout(cfg, world))
            Trainer(cfg, runtime=rt).train_step()
        out.append({"rank": rank, "trace": rec.traces.get(rank, []), "names": rec.group_names,
                    "channels": {g.group_name: ch for ch, g in rt.p2p_groups.items()},
                    "peers": rt.peers, "default": dist.group.WORLD.group_name})
    return out


def _check_p2p(per_rank: list, sched) -> None:
    from hai_llm.parallel.collective_trace import check_consistent
    from hai_llm.pipeline.executor import CHANNEL, p2p_channels

    planned: dict = {}
    for r in range(sched.pp):
        for c in sched.comm_plan(r):
            for m in c.sends:
                planned[(m.src, m.dst)] = planned.get((m.src, m.dst), 0) + 1
    for res in per_rank:
        pp_of = {g: q for q, g in enumerate(res["peers"])}
        me_pp = pp_of[res["rank"]]
        # one distinct group (by name) for each channel of this rank: a -> b is not b -> a
        assert sorted(res["channels"].values()) == sorted(ch for ch, link in p2p_channels(sched) if me_pp in link)
        sent: dict = {}
        for rec, name in zip(res["trace"], res["names"], strict=True):
            if not rec.is_p2p:
                continue
            assert name != res["default"], f"P2P on the default group: {rec.describe()}"
            me, peer = pp_of[rec.rank], pp_of[rec.peer]
            src, dst = (me, peer) if rec.kind == "send" else (peer, me)
            assert res["channels"][name] == CHANNEL(_msg(src, dst)), \
                f"{rec.describe()} of direction {src}->{dst} went through channel {res['channels'][name]}"
            assert rec.group == tuple(sorted((res["peers"][src], res["peers"][dst])))
            if rec.op == "isend":
                sent[(src, dst)] = sent.get((src, dst), 0) + 1
            else:  # the blocking warm-up of PipelineExecutor.connect: one per channel, or a receive
                assert rec.op in ("send", "recv", "irecv"), rec.op
        # every planned message of this rank's outgoing links, sent exactly once
        assert sent == {link: n for link, n in planned.items() if link[0] == me_pp}, (sent, planned)
    check_consistent({res["rank"]: res["trace"] for res in per_rank})


def _cfg(data, out, global_batch, **parallel):
    return layout_config(str(data), str(out), steps=1, model_overrides=MODEL, global_batch=global_batch,
                       parallel=parallel)


@pytest.mark.dist
def test_pp2_messages_travel_on_their_direction_group(corpus_dir, tmp_path):
    from hai_llm.layout import build_layout

    cases = [_cfg(corpus_dir, tmp_path / s, 4, nprocs=2, pp=2, schedule=s) for s in ("dualpipe", "1f1b", "dualpipev")]
    per_rank = run_ranks(p2p_rank, 2, cases, timeout=300)
    for i, cfg in enumerate(cases):
        _check_p2p([r[i] for r in per_rank], build_layout(cfg, 2).schedule)


@pytest.mark.dist
def test_pp4_dualpipe_messages_travel_on_their_direction_group(corpus_dir, tmp_path):
    from hai_llm.layout import build_layout

    cfg = _cfg(corpus_dir, tmp_path / "pp4", 8, nprocs=4, pp=4, schedule="dualpipe")
    per_rank = run_ranks(p2p_rank, 4, [cfg], timeout=300)
    _check_p2p([r[0] for r in per_rank], build_layout(cfg, 4).schedule)
