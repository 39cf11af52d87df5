"""Pipeline schedules: structure, P2P consistency, and the bubbles of Table 2.

The schedule generators are the single source of truth for both the simulator and the real
executor, so these tests pin down (1) that every program is complete, correctly ordered,
deadlock-free and P2P-consistent, (2) that DualPipe follows the reference's 8-phase structure,
and (3) that the simulated bubble and activation counts equal Table 2 of the DeepSeek-V3
report exactly, under the cost assumptions documented in ``hai_llm/pipeline/simulator.py``.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import re
from pathlib import Path

import pytest

from hai_llm.pipeline.gantt import (Span, chrome_trace, save_gantt, short_label,
                                    spans_from_chrome_trace, write_chrome_trace)
from hai_llm.layout.schedules import (Action, ActionComm, DualPipe, DualPipeV, Message,
                                        OneFOneB, ZB1P, early_posts)
from hai_llm.pipeline.simulator import (Costs, check_schedule, formula_activations,
                                        formula_bubble, peak_activations, simulate)

REPO = Path(__file__).resolve().parents[1]

# The two cost settings of the brief; both satisfy Table 2's hidden assumption W <= F = B - W.
TABLE2_COSTS = [Costs(F=1, B=2, W=1, FB=3), Costs(F=2, B=3, W=1, FB=4)]
# A few more inside the exact region (F = B - W, W <= F), with and without overlap speed-up.
EXTRA_COSTS = [Costs(F=1, B=2, W=1, FB=2.5), Costs(F=2, B=3.5, W=1.5), Costs(F=3, B=4, W=1, FB=4)]


def make(name: str, stages: int, n_micro: int):
    """Schedule ``name`` for ``stages`` pipeline stages (DualPipeV: stages // 2 ranks)."""
    cls = {"1F1B": OneFOneB, "ZB1P": ZB1P, "DualPipe": DualPipe, "DualPipeV": DualPipeV}[name]
    return cls(stages // 2 if name == "DualPipeV" else stages, n_micro)


# --------------------------------------------------------------------------- Action API
def test_action_parts_and_accessors():
    fb = Action("FB", 7, 0, 13, 1)
    assert fb.parts() == (("F", 7, 0), ("B", 13, 1), ("W", 13, 1))
    assert fb.forward == (7, 0) and fb.backward == (13, 1)
    assert str(fb) == "FB(F7.0,B13.1)"
    bw = Action("BW", 3, 1)
    assert bw.parts() == (("B", 3, 1), ("W", 3, 1)) and bw.forward is None
    assert Action("W", 2, 0).backward is None and Action("B", 2, 0).backward == (2, 0)
    assert hash(fb) == hash(Action("FB", 7, 0, 13, 1))  # frozen: usable as dict keys


@pytest.mark.parametrize("bad", [dict(kind="X", mb=0, chunk=0), dict(kind="FB", mb=0, chunk=0),
                                 dict(kind="F", mb=0, chunk=0, b_mb=1, b_chunk=0)])
def test_action_rejects_malformed(bad):
    with pytest.raises(ValueError):
        Action(**bad)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("ctor, args, fragment", [
    (OneFOneB, (0, 4), "pp"), (ZB1P, (4, 0), "n_micro"), (DualPipeV, (-1, 4), "pp"),
    (DualPipe, (5, 20), "even number of pipeline ranks"), (DualPipe, (4, 9), "must be even"),
    (DualPipe, (4, 6), "n_micro >= 2*pp = 8"), (DualPipeV, (4, 7), "n_micro >= 2*pp = 8"),
])
def test_constructors_name_the_fix(ctor, args, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ctor(*args)


def test_costs_validation():
    with pytest.raises(ValueError, match="cannot exceed"):
        Costs(F=1, B=1, W=2)
    with pytest.raises(ValueError):
        Costs(F=-1)
    assert Costs(F=1, B=2, W=1).fb == 3 and Costs(F=1, B=2, W=1, FB=2.5).fb == 2.5


GRID = ([OneFOneB(p, m) for p, m in itertools.product((1, 2, 3, 4, 7), (1, 2, 5, 8, 16))]
        + [ZB1P(p, m) for p, m in itertools.product((1, 2, 3, 4, 7), (1, 2, 5, 8, 16))]
        + [DualPipe(p, m) for p in (2, 4, 6, 8, 16) for m in (2 * p, 2 * p + 2, 4 * p)]
        + [DualPipeV(p, m) for p in (1, 2, 3, 4, 8) for m in (2 * p, 2 * p + 1, 4 * p)])


@pytest.mark.parametrize("sched", GRID, ids=repr)
def test_check_schedule_accepts_all_generated(sched):
    check_schedule(sched)
    simulate(sched, Costs(F=1, B=2, W=1, FB=2.5, comm=0.3), wait_posted=True)


def _custom(programs, base):
    """A schedule with the topology of ``base`` but hand-written programs."""
    class Custom(type(base)):
        def _build(self, rank):
            return [Action(*a) for a in programs[rank]]
    return Custom(base.pp, base.n_micro)


def test_check_schedule_rejects_backward_before_forward():
    bad = _custom([[("F", 0, 0), ("BW", 0, 0)], [("BW", 0, 0), ("F", 0, 0)]], OneFOneB(2, 1))
    with pytest.raises(ValueError, match="after nothing"):
        check_schedule(bad)


def test_check_schedule_rejects_missing_weight_grad():
    bad = _custom([[("F", 0, 0), ("B", 0, 0)], [("F", 0, 0), ("BW", 0, 0)]], OneFOneB(2, 1))
    with pytest.raises(ValueError, match="runs W"):
        check_schedule(bad)


def test_check_schedule_rejects_cross_rank_deadlock():
    # rank 0 waits for mb 0's gradient before forwarding mb 1, rank 1 forwards mb 1 first.
    bad = _custom([[("F", 0, 0), ("BW", 0, 0), ("F", 1, 0), ("BW", 1, 0)],
                   [("F", 0, 0), ("F", 1, 0), ("BW", 0, 0), ("BW", 1, 0)]], OneFOneB(2, 2))
    with pytest.raises(ValueError, match="deadlocks"):
        check_schedule(bad)
    with pytest.raises(ValueError, match="deadlocks"):
        simulate(bad)


def test_lazy_receive_posting_would_mismatch_on_dualpipe():
    """Posting receives in consumption order breaks DualPipe PP=8: the check must catch it."""
    base = DualPipe(8, 20)

    class Lazy(DualPipe):
        def comm_plan(self, rank):
            return tuple(ActionComm(c.recvs, c.recvs, c.sends) for c in super().comm_plan(rank))

    with pytest.raises(ValueError, match="P2P order mismatch on link 0->1"):
        check_schedule(Lazy(base.pp, base.n_micro))


# --------------------------------------------------------------------------- topology & comm
def test_dualpipe_topology():
    s = DualPipe(8, 20)
    assert s.num_stages == 8 and s.chunks_per_rank == 2
    assert [s.stage_of(r, 0) for r in range(8)] == list(range(8))
    assert [s.stage_of(r, 1) for r in range(8)] == list(range(7, -1, -1))
    assert s.holders(2) == ((2, 0), (5, 1))  # two copies: their gradients must be summed
    assert s.next_of(3, 0) == (4, 0) and s.next_of(3, 1) == (2, 1)
    assert s.prev_of(0, 0) is None and s.is_first(0, 0) and s.is_first(7, 1)
    assert s.is_last(7, 0) and s.is_last(0, 1)  # ranks 0 and 7 both hold embedding and head
    assert s.micro_batches(4, 0) == tuple(range(10))
    assert s.micro_batches(4, 1) == tuple(range(10, 20))
    assert s.direction_of(9) == 0 and s.direction_of(10) == 1


def test_dualpipev_topology_turns_on_last_rank():
    s = DualPipeV(4, 8)
    assert s.num_stages == 8
    assert [s.stage_of(r, c) for c in (0, 1) for r in range(4)] == [0, 1, 2, 3, 7, 6, 5, 4]
    assert s.next_of(3, 0) == (3, 1) and s.next_of(0, 1) is None
    assert s.is_first(0, 0) and s.is_last(0, 1)  # embedding and head on rank 0, no copies
    assert s.holders(5) == ((2, 1),)
    # the turn of the V is a local hand-off: rank 3 neither sends nor receives between chunks
    for comm in s.comm_plan(3):
        assert all(m.src != m.dst for m in comm.sends + comm.recvs)


def test_one_f_one_b_comm_plan():
    s = OneFOneB(3, 4)
    plan = s.comm_plan(1)
    assert plan[0].recvs == (Message("act", 0, 0, 0, 1, 0),)
    assert plan[0].sends == (Message("act", 0, 1, 0, 2, 0),)
    bw = [c for a, c in zip(s.actions(1), plan, strict=True) if a.kind == "BW"][0]
    assert bw.recvs == (Message("grad", 0, 2, 0, 1, 0),)
    assert bw.sends == (Message("grad", 0, 1, 0, 0, 0),)
    assert early_posts(s) == []


def test_dualpipe_fb_sends_activation_then_gradient_on_one_link():
    s = DualPipe(4, 8)
    idx, act = next((i, a) for i, a in enumerate(s.actions(1))
                    if a.kind == "FB" and a.chunk == 0)
    sends = s.comm_plan(1)[idx].sends
    assert [(m.kind, m.dst) for m in sends] == [("act", 2), ("grad", 2)]


def test_dualpipe_needs_the_reference_pre_posted_forward_receive():
    # Rank 1 consumes mb 10's gradient before mb 6's activation, but rank 0 sends the
    # activation first: the reference pre-posts that forward receive in its step 2.
    posts = early_posts(DualPipe(8, 20))
    assert (1, 8, Message("act", 6, 0, 0, 1, 0)) in posts
    assert all(m.kind == "act" for _, _, m in posts)


# --------------------------------------------------------------------------- DualPipe phases
def test_dualpipe_rank0_matches_figure5_warmup():
    s = DualPipe(8, 20)
    head = [str(a) for a in s.actions(0)[:10]]
    assert head == ["F0.0", "F1.0", "F2.0", "F3.0", "F4.0", "F5.0", "F6.0", "F10.1",
                    "B10.1", "W10.1"]


@pytest.mark.parametrize("pp, n", [(4, 8), (8, 20), (16, 40)])
def test_dualpipe_is_mirror_symmetric(pp, n):
    s = DualPipe(pp, n)

    def mirror(a: Action) -> Action:
        flip = lambda mb: mb + n // 2 if mb < n // 2 else mb - n // 2  # noqa: E731
        if a.kind == "FB":
            return Action("FB", flip(a.mb), 1 - a.chunk, flip(a.b_mb), 1 - a.b_chunk)
        return Action(a.kind, flip(a.mb), 1 - a.chunk)

    for r in range(pp):
        assert [mirror(a) for a in s.actions(r)] == list(s.actions(pp - 1 - r))


@pytest.mark.parametrize("pp, n", [(4, 8), (8, 20), (8, 32), (16, 32)])
def test_dualpipe_phase_counts(pp, n):
    s = DualPipe(pp, n)
    half = pp // 2
    for r in range(pp):
        h = min(r, pp - 1 - r)
        middle = r in (half - 1, half)
        kinds = [a.kind for a in s.actions(r)]
        assert kinds.count("FB") == n - 2 * pp + half + h + 1 - middle
        # phase 3 splits half-h-1 backwards before the main loop; phases 6-7 split half
        # more, of which phase 8 flushes the last h+1 W steps at the very end
        first_fb = kinds.index("FB")
        assert kinds[:first_fb].count("W") == half - h - 1
        assert kinds[first_fb:].count("W") == half
        assert kinds[-(h + 2):] == [kinds[-(h + 2)]] + ["W"] * (h + 1)
        assert kinds[-(h + 2)] == "B"


# --------------------------------------------------------------------------- Table 2 bubbles
def _bubble_cases(costs_list):
    for costs, name, stages in itertools.product(costs_list, ("1F1B", "ZB1P", "DualPipe",
                                                              "DualPipeV"), (4, 6, 8)):
        yield pytest.param(costs, name, stages, id=f"{name}-PP{stages}-{costs.F:g},"
                                                   f"{costs.B:g},{costs.W:g},{costs.fb:g}")


@pytest.mark.parametrize("costs, name, stages", list(_bubble_cases(TABLE2_COSTS + EXTRA_COSTS)))
def test_simulated_bubble_equals_table2(costs, name, stages):
    for n_micro in (2 * stages, 2 * stages + 4, 4 * stages):  # bubble must not grow with n
        res = simulate(make(name, stages, n_micro), costs)
        assert res.max_bubble == pytest.approx(formula_bubble(name, stages, costs)), n_micro


@pytest.mark.parametrize("name", ["1F1B", "ZB1P", "DualPipe", "DualPipeV"])
def test_every_rank_idles_equally_without_overlap_speedup(name):
    res = simulate(make(name, 8, 24), Costs(F=1, B=2, W=1))
    assert len(set(res.bubble)) == 1
    assert res.total_bubble == pytest.approx(res.schedule.pp * res.max_bubble)


def test_dualpipe_overlap_speedup_makes_middle_ranks_idle_most():
    res = simulate(DualPipe(8, 20), Costs(F=2, B=3, W=1, FB=4))
    assert list(res.bubble) == [10, 11, 12, 12, 12, 12, 11, 10]


@pytest.mark.parametrize("F, B, W", [(1, 2, 1), (2, 1, 0.5), (1, 3, 0.5), (3, 2, 1), (1, 1, 0.9)])
def test_one_f_one_b_bubble_holds_for_any_costs(F, B, W):
    for pp in (2, 5, 8):
        res = simulate(OneFOneB(pp, 3 * pp), Costs(F=F, B=B, W=W))
        assert res.max_bubble == pytest.approx(formula_bubble("1F1B", pp, res.costs))


@pytest.mark.parametrize("F, B, W", [(f, b, w) for f, b, w in itertools.product(
    (0.5, 1, 2, 3), (1, 2, 4), (0.25, 1, 2)) if w <= b])
def test_zb1p_bubble_law(F, B, W):
    """(PP-1)*max(F+B-2W, F, B-W): Table 2 exactly when W <= min(F, B-W)."""
    costs = Costs(F=F, B=B, W=W)
    for pp in (2, 4, 7):
        res = simulate(ZB1P(pp, 2 * pp + 1), costs)
        assert res.max_bubble == pytest.approx((pp - 1) * max(F + B - 2 * W, F, B - W))
        if W <= min(F, B - W):
            assert res.max_bubble == pytest.approx(formula_bubble("ZB1P", pp, costs))


@pytest.mark.parametrize("F, Bi, W, fb_extra", [(1, 0.5, 0.5, 1.0), (2, 1, 0.5, 0.0),
                                                (3, 2, 1, 2.0), (2, 1, 1, 0.5),
                                                (1, 2, 0.5, 0.0), (1, 3, 1, 1.0)])
def test_dualpipe_bubble_away_from_f_equals_input_grad(F, Bi, W, fb_extra):
    """With F != B - W Table 2 is not exact: F >= B-W gives (PP/2-1)(F&B + F - 2W),
    F < B-W stays at or below Table 2."""
    costs = Costs(F=F, B=Bi + W, W=W, FB=max(F, Bi + W) + fb_extra)
    for name, stages in itertools.product(("DualPipe", "DualPipeV"), (4, 8)):
        got = simulate(make(name, stages, 2 * stages + 2), costs).max_bubble
        table = formula_bubble(name, stages, costs)
        if F >= Bi:
            assert got == pytest.approx((stages / 2 - 1) * (costs.fb + F - 2 * W))
        else:
            assert got <= table + 1e-9


def test_table2_mismatch_example():
    """F=1, B=1, W=0.5 (forward twice the input-grad cost): DualPipe PP=4 idles 2, not 1.5."""
    costs = Costs(F=1, B=1, W=0.5)
    assert formula_bubble("DualPipe", 4, costs) == 1.5
    assert simulate(DualPipe(4, 8), costs).max_bubble == 2


# --------------------------------------------------------------------------- activations
@pytest.mark.parametrize("stages", [2, 4, 6, 8, 16])
def test_activation_column(stages):
    n = 3 * stages
    assert peak_activations(OneFOneB(stages, n)) == list(range(stages, 0, -1))
    assert peak_activations(ZB1P(stages, n)) == [stages] * stages  # r deferred W + pp-r warm
    assert peak_activations(DualPipe(stages, 2 * n)) == [stages + 1] * stages
    assert peak_activations(DualPipeV(stages // 2, 2 * n)) == [stages + 1] * (stages // 2)
    for name in ("1F1B", "ZB1P", "DualPipe", "DualPipeV"):
        res = simulate(make(name, stages, 2 * n))
        assert max(res.peak_activations) == formula_activations(name, stages)


# --------------------------------------------------------------------------- simulator model
def test_comm_latency_on_a_single_micro_batch():
    costs = Costs(F=1, B=2, W=1, comm=0.5)
    for pp in (1, 3, 6):
        res = simulate(OneFOneB(pp, 1), costs)
        assert res.makespan == pytest.approx(pp * 3 + 2 * (pp - 1) * 0.5)


def test_timeline_respects_every_dependency():
    s, costs = DualPipeV(4, 10), Costs(F=1, B=2, W=1, FB=2.5, comm=0.25)
    res = simulate(s, costs)
    start, end, span = {}, {}, {}
    for sp, act in zip(res.all_spans(), [a for r in range(s.pp) for a in s.actions(r)], strict=True):
        for kind, mb, chunk in act.parts():
            start[(kind, mb, sp.rank, chunk)] = sp.start
            end[(kind, mb, sp.rank, chunk)] = sp.end
            span[(kind, mb, sp.rank, chunk)] = sp
    for mb in range(s.n_micro):
        hops = s.route(mb)
        for i, (r, c) in enumerate(hops):
            lag = lambda j: costs.comm if hops[j][0] != r else 0.0  # noqa: E731
            if i:
                assert start[("F", mb, r, c)] >= end[("F", mb) + hops[i - 1]] + lag(i - 1)
            if i + 1 < len(hops):
                assert start[("B", mb, r, c)] >= end[("B", mb) + hops[i + 1]] + lag(i + 1)
            if span[("W", mb, r, c)] is not span[("B", mb, r, c)]:  # separate W action
                assert start[("W", mb, r, c)] >= end[("B", mb, r, c)]
    for rank_spans in res.spans:  # no overlap inside a rank
        assert all(a.end <= b.start + 1e-12 for a, b in zip(rank_spans, rank_spans[1:]))


def test_pre_posted_receives_cost_no_time():
    for s in (DualPipe(8, 20), DualPipeV(4, 10)):
        for costs in (Costs(F=1, B=2, W=1), Costs(F=1, B=2, W=1, FB=2.5, comm=1)):
            assert simulate(s, costs).makespan == simulate(s, costs, wait_posted=True).makespan


# --------------------------------------------------------------------------- gantt / traces
def test_chrome_trace_round_trip(tmp_path):
    res = simulate(DualPipe(4, 8), Costs(F=1, B=2, W=1))
    spans = res.all_spans()
    trace = chrome_trace(spans)
    assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(trace["traceEvents"][0])
    path = write_chrome_trace(spans, tmp_path / "t.json")
    back = spans_from_chrome_trace(path)
    assert back == spans


def test_spans_from_plain_profiler_trace():
    trace = {"traceEvents": [
        {"name": "FB(F3.0,B1.1)", "ph": "X", "ts": 10, "dur": 5, "pid": 2, "tid": 7},
        {"name": "W4", "ph": "X", "ts": 15, "dur": 1, "pid": 2, "tid": 7},
        {"name": "meta", "ph": "M", "pid": 2}]}
    spans = spans_from_chrome_trace(json.loads(json.dumps(trace)))
    assert spans == [Span(2, "FB(F3.0,B1.1)", "FB", 10, 15), Span(2, "W4", "W", 15, 16)]
    assert short_label("FB(F3.0,B1.1)") == "3/1" and short_label("W4") == "W4"


def test_save_gantt_writes_png(tmp_path):
    res = simulate(DualPipe(8, 20), Costs(F=1, B=2, W=1))
    out = save_gantt(res.all_spans(), tmp_path / "g" / "dualpipe.png", "DualPipe")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        save_gantt([], tmp_path / "empty.png")


def test_bench_bubbles_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_bubbles",
                                                  REPO / "benchmarks" / "bench_bubbles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.build_rows([4, 8], Costs(F=1, B=2, W=1))
    assert all(r[7] == "yes" for r in rows)
    assert mod.main(["--pp", "4", "--gantt", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists() and "DualPipeV" in capsys.readouterr().out
