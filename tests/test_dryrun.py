"""The full-scale dry run (hai_llm.planner, hai-llm-dryrun) and the collective-order
validator (hai_llm.parallel.collective_trace, with the layout's program from
hai_llm.planner.collectives).

Dry run: the 2048-GPU DeepSeek-V3 layout is planned in one process in seconds, its per-rank
parameter counts come from the real meta model and add back up to the model (nothing lost or
double counted, DualPipe's 2x made explicit), ZeRO-1 state falls as 1/dp, bad layouts fail
before anything is built. Validator: synthetic traces with a mismatch are caught; one real
gloo run of a layout's step is consistent and identical to its fake-backend simulation; the
classic ordering bugs are reported (not hung on) under the fake backend.
"""
from __future__ import annotations

import json
import time

import pytest
import torch.distributed as dist

from hai_llm.layout.dims import ParallelDims
from hai_llm.parallel.collective_trace import (
    CollectiveMismatch,
    CollectiveRecorder,
    Record,
    check_consistent,
    simulate_ranks,
)
from hai_llm.planner.collectives import StepSpec, layout_step, traced_layout_step

MAIN_PARAMS = 671_026_419_200  # docs/deepseek_v3.md#parameter-counts (weights + routing bias, by formula)


def v3_dims(dp: int = 128) -> ParallelDims:
    return ParallelDims(world_size=16 * dp, pp=16, dp=dp, sp=1, ep=64, gpus_per_node=8)


@pytest.fixture(scope="module")
def v3_args():
    from hai_llm.config.load import load_model_args

    return load_model_args("deepseek_v3_671b")


def cpu_seconds() -> float:
    """CPU time of this process: the two cores are shared with other jobs, so wall-clock time
    measures their load more than our work."""
    return time.process_time()


@pytest.fixture(scope="module")
def v3_plan(v3_args):
    """The production plan, timed cold (the meta model is built inside)."""
    from hai_llm.planner import plan_layout, units

    units._units_of.cache_clear()
    start = cpu_seconds()
    plan = plan_layout(v3_args, v3_dims())
    return plan, cpu_seconds() - start


# ----------------------------------------------------------------------------- dry run
def test_production_layout_plans_fast_and_counts_every_parameter(v3_args, v3_plan):
    from hai_llm.model.params import parameter_table

    plan, elapsed = v3_plan
    print(f"planning 2048 ranks took {elapsed:.1f} s of CPU")  # information: timings belong in benchmarks
    table = parameter_table(v3_args)  # the model's own accounting (hai-llm-params)
    total = MAIN_PARAMS + table["mtp"]["total"]
    assert plan.model_params["main"] == MAIN_PARAMS
    assert plan.model_params["total_with_buffers"] == total
    # one copy of every stage, experts summed over the 64 EP ranks
    assert plan.stage_param_total() == total
    # every pp rank as held: DualPipe keeps every stage twice (ranks r and pp-1-r)
    assert plan.rank_param_total() == 2 * total == plan.copies_expected()
    # per rank: the expert slice is 1/64 of the stage's experts, 4 experts per MoE layer
    for rp in plan.ranks:
        stage_experts = sum(plan.stages[s].expert_params for s in rp.stages)
        assert rp.expert_params * 64 == stage_experts
        assert rp.experts_per_moe_layer == 4
        assert rp.inflight_chunks == 17  # DualPipe: PP + 1 (Table 2)
    assert sorted(s for rp in plan.ranks for s in rp.stages) == sorted(list(range(16)) * 2)
    # the trainer's cost-balanced split (hai_llm.layout.partition): 4 layers per stage, the
    # last stage 1 layer + head + MTP, so ranks 1-14 all hold two 4-MoE-layer stages
    assert [len(s) for s in plan.layout.stages] == [4] * 15 + [1]
    assert [r.name for r in plan.roles] == ["pp0,15", "pp1-14"]
    assert sum(r.n_ranks for r in plan.roles) == 2048
    # the layers really are all placed once per copy
    layers = sorted(u for s in plan.stages for u in s.units if u.startswith("L"))
    assert layers == sorted(f"L{i}" for i in range(61))
    # the production layout fits an 80 GB H800 under these assumptions
    assert plan.peak_memory < 80e9


@pytest.mark.parametrize("schedule, extra", [("1f1b", "embed"), ("dualpipev", None)])
def test_other_schedules_account_copies_explicitly(v3_args, v3_plan, schedule, extra):
    from hai_llm.planner import plan_layout

    plan = plan_layout(v3_args, v3_dims(), schedule=schedule)
    total = v3_plan[0].model_params["total_with_buffers"]
    assert plan.stage_param_total() == total
    shared = plan.unit_params["embed"] if extra else 0  # 1f1b: MTP stage keeps an embedding copy
    assert plan.rank_param_total() == total + shared == plan.copies_expected()
    if schedule == "1f1b":
        assert [r.inflight_chunks for r in plan.ranks] == list(range(16, 0, -1))  # pp on rank 0
        assert plan.ranks[-1].shared == ["embed"]
    else:
        assert plan.n_stages == 32 and plan.ranks[0].stages == [0, 31]


def test_zero1_state_falls_as_one_over_dp(v3_args, v3_plan):
    from hai_llm.planner import plan_layout

    small = v3_plan[0]
    big = plan_layout(v3_args, v3_dims(dp=256), n_micro=small.n_micro)
    assert big.dims.edp == 2 * small.dims.edp
    for a, b in zip(small.ranks, big.ranks, strict=True):
        assert b.params == a.params
        assert b.memory["adamw_bf16"] == pytest.approx(a.memory["adamw_bf16"] / 2, rel=1e-6)
        assert b.memory["master_fp32"] == pytest.approx(a.memory["master_fp32"] / 2, rel=1e-6)
        assert b.memory["grads_fp32"] == a.memory["grads_fp32"]  # ZeRO-1 does not shard grads
    off = plan_layout(v3_args, v3_dims(), zero1=False, n_micro=small.n_micro)
    assert off.ranks[2].memory["adamw_bf16"] == 4 * off.ranks[2].params


def test_bad_layouts_fail_fast_with_the_fix(v3_args, capsys):
    from hai_llm.launch.dryrun import main
    from hai_llm.planner import plan_layout

    with pytest.raises(ValueError, match="use n_micro=32"):
        plan_layout(v3_args, v3_dims(), n_micro=30)
    with pytest.raises(ValueError, match="expert groups do not line up with nodes"):
        plan_layout(v3_args, ParallelDims(world_size=2048, pp=16, dp=128, ep=32))
    with pytest.raises(ValueError, match="even pp"):
        plan_layout(v3_args, ParallelDims(world_size=1920, pp=15, dp=128, ep=64))
    assert main(["--pp", "15"]) == 2
    assert main(["--ep", "48"]) == 2
    err = capsys.readouterr().err
    assert "invalid layout" in err and "ep=48" in err


def test_cli_defaults_table_groups_and_json(v3_plan, tmp_path, capsys):
    from hai_llm.launch.dryrun import main

    out = tmp_path / "plan.json"
    assert main(["--plain", "--show-groups", "130", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2048 GPUs = 256 nodes x 8" in text and "schedule dualpipe" in text
    assert "(consistent)" in text
    for role in ("pp0,15", "pp1-14"):
        assert role in text
    assert "[130, 194]" in text  # rank 130's edp group, built by torch under the fake pg
    data = json.loads(out.read_text())
    assert data["n_micro"] == 120 and data["global_batch_sequences"] == 15360
    assert data["groups_of_rank"]["ep"] == list(range(128, 192))
    assert data["consistency"]["rank_param_total"] == data["consistency"]["copies_expected"]
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- validator
def _rec(rank, index, op, group, shapes=((4,),), dtype="torch.float32", **kw):
    return Record(rank=rank, index=index, op=op, group=tuple(group), shapes=tuple(shapes),
                  dtype=dtype, **kw)


def test_synthetic_traces_mismatch_is_named():
    g = (0, 1)
    good = {0: [_rec(0, 0, "all_reduce", g, reduce_op="SUM"),
                _rec(0, 1, "all_to_all_single", g, shapes=((5, 8), (3, 8)), splits=2),
                _rec(0, 2, "isend", (0, 1), peer=1)],
            1: [_rec(1, 0, "all_reduce", g, reduce_op="SUM"),
                _rec(1, 1, "all_to_all_single", g, shapes=((3, 8), (5, 8)), splits=2),
                _rec(1, 2, "irecv", (0, 1), peer=0)]}
    assert check_consistent(good).ok  # a2a row counts may differ per rank
    bad = dict(good)
    bad[1] = [_rec(1, 0, "all_reduce", g, shapes=((8,),), reduce_op="SUM")] + good[1][1:]
    with pytest.raises(CollectiveMismatch) as e:
        check_consistent(bad)
    first = e.value.report.first
    assert (first.group, first.position, first.rank_a, first.rank_b) == (g, 0, 0, 1)
    assert "rank 0 issued all_reduce((4,)" in str(e.value) and "rank 1 issued all_reduce((8,)" in str(e.value)
    # a2a with a different split count or row width is a mismatch
    a2a = dict(good)
    a2a[1] = [good[1][0], _rec(1, 1, "all_to_all_single", g, shapes=((3, 9), (5, 9)), splits=2), good[1][2]]
    assert not check_consistent(a2a, raise_on_error=False).ok
    # a send nobody receives
    p2p = {0: good[0], 1: good[1][:2]}
    rep = check_consistent(p2p, raise_on_error=False)
    assert rep.first.kind == "p2p" and "link 0 -> 1" in str(rep.first)


def _fake_program(rank, world):
    import torch

    g = dist.new_group([0, 1])
    x = torch.zeros(4)
    dist.reduce_scatter_tensor(torch.zeros(2), torch.zeros(4), group=g)  # calls *_single inside
    dist.all_gather_into_tensor(torch.zeros(4), torch.zeros(2), group=g)
    peer = 1 - rank
    for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, x, peer)]):
        w.wait()
    dist.broadcast(x, src=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the deprecated aliases on purpose
def test_recorder_records_each_call_once_and_restores_torch():
    before = dist.all_reduce
    traces = simulate_ranks(_fake_program, 2)
    assert dist.all_reduce is before and not dist.is_initialized()
    ops = [r.op for r in traces[0]]
    assert ops == ["reduce_scatter_tensor", "all_gather_into_tensor", "isend", "irecv", "broadcast"]
    assert traces[0][2].batched and traces[0][2].peer == 1 and traces[1][2].peer == 0
    assert traces[0][4].peer == 0 and traces[0][4].group == (0, 1)
    assert check_consistent(traces).ok
    with CollectiveRecorder():
        with pytest.raises(RuntimeError, match="already active"):
            CollectiveRecorder().__enter__()


SMALL = StepSpec(world_size=4, pp=2, dp=2, sp=1, ep=2, gpus_per_node=8, schedule="dualpipe",
                 n_micro=4, blocks=(((False, True), (True, True)), ((True, True), (False, True))),
                 dense_params=(100, 100), expert_params=(40, 40), tokens=4, dim=8, latent=6,
                 top_k=2, n_experts=4)


@pytest.mark.dist
def test_real_gloo_step_is_consistent_and_matches_the_fake_simulation():
    """ONE spawn: 4 gloo ranks (pp2 x dp2, ep2, DualPipe) run the layout's step for real."""
    from hai_llm.parallel.spawn import run_ranks

    real = dict(enumerate(run_ranks(traced_layout_step, 4, SMALL, timeout=240)))
    report = check_consistent(real)
    assert report.ok and report.n_links == 4  # both directions between the two stages, x2 columns
    kinds = {r.kind for t in real.values() for r in t}
    assert {"all_to_all_single", "send", "recv", "reduce_scatter_single", "all_gather_single",
            "all_reduce"} <= kinds
    assert simulate_ranks(layout_step, 4, SMALL) == real  # fake simulation == the real run


def buggy_layout_step(rank: int, world: int, spec: StepSpec, bug: str) -> None:
    """``layout_step`` with one known class of ordering bug injected from outside: while it
    runs, one ``torch.distributed`` function is wrapped so that some ranks' calls go wrong.

    * ``stage_sized_allreduce``: the loss all-reduce over pp uses a tensor sized by the
      stage's MoE layers (a per-stage size hangs);
    * ``swap_zero``: dp_sp index 1 all-gathers its dense shard before it reduce-scatters;
    * ``p2p_shape``: pp rank 0 (dp_sp 0) sends a short activation for micro-batch 1;
    * ``skip_a2a``: EP index 1 skips one routing-count exchange.
    """
    import torch

    dims = ParallelDims(world_size=spec.world_size, pp=spec.pp, dp=spec.dp, sp=spec.sp, ep=spec.ep,
                        gpus_per_node=spec.gpus_per_node)
    c = dims.coords(rank)
    saved, state = {}, {"sends": 0, "skipped": False, "deferred": None}

    def ranks_of(group):
        return sorted(dist.get_process_group_ranks(group)) if group is not None else list(range(world))

    def patch(name, fn):
        saved[name] = getattr(dist, name)
        setattr(dist, name, fn)

    if bug == "stage_sized_allreduce":
        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if group is not None and tensor.ndim == 2 and ranks_of(group) == dims.group_of("pp", rank):
                # sized by this stage's MoE layers instead of the global count
                tensor = tensor.new_empty(tensor.shape[0], 2 + sum(sum(fl) for fl in spec.blocks[c["pp"]]))
            return saved["all_reduce"](tensor, op=op, group=group, async_op=async_op)

        patch("all_reduce", all_reduce)
    elif bug == "swap_zero":
        rs_name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
        ag_name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        dense = dims.group_of("dp_sp", rank)

        def reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if c["dp_sp"] == 1 and state["deferred"] is None and ranks_of(group) == dense:
                state["deferred"] = (output, input, op, group)  # issued after the all-gather
                return None
            return saved[rs_name](output, input, op=op, group=group, async_op=async_op)

        def all_gather(output_tensor, input_tensor, group=None, async_op=False):
            work = saved[ag_name](output_tensor, input_tensor, group=group, async_op=async_op)
            if isinstance(state["deferred"], tuple) and ranks_of(group) == dense:
                out, inp, op, g = state["deferred"]
                state["deferred"] = "done"
                saved[rs_name](out, inp, op=op, group=g)
            return work

        patch(rs_name, reduce_scatter)
        patch(ag_name, all_gather)
    elif bug == "p2p_shape":
        def isend(tensor, *args, **kwargs):
            if c["pp"] == 0 and c["dp_sp"] == 0:
                state["sends"] += 1  # the first stage sends activations of mb 0, 1, ... in order
                if state["sends"] == 2:
                    tensor = tensor[:-1]
            return saved["isend"](tensor, *args, **kwargs)

        patch("isend", isend)
    elif bug == "skip_a2a":
        def all_to_all_single(output, input, *args, **kwargs):
            if c["ep"] == 1 and not state["skipped"] and input.dtype == torch.int64:
                state["skipped"] = True
                return None
            return saved["all_to_all_single"](output, input, *args, **kwargs)

        patch("all_to_all_single", all_to_all_single)
    else:
        raise ValueError(f"unknown bug {bug!r}")
    try:
        layout_step(rank, world, spec)
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


SP_SPEC = StepSpec(world_size=8, pp=2, dp=2, sp=2, ep=2, gpus_per_node=8, schedule="1f1b",
                   n_micro=4, blocks=(((False, True),), ((True, True, True),)),
                   dense_params=(100, 90), expert_params=(40, 60), tokens=4, dim=8, latent=6,
                   top_k=2, n_experts=4)


@pytest.mark.parametrize("bug, kind, needle", [
    ("stage_sized_allreduce", "collective", "all_reduce((4, 3)"),
    ("swap_zero", "collective", "all_gather_single"),
    ("p2p_shape", "p2p", "isend((0, 4, 8)"),
    ("skip_a2a", "collective", "all_to_all_single"),
])
def test_inconsistent_programs_are_reported_not_hung(bug, kind, needle):
    assert check_consistent(simulate_ranks(layout_step, 8, SP_SPEC)).ok
    # returning at all is the check: under the fake backend nothing waits for a peer
    report = check_consistent(simulate_ranks(buggy_layout_step, 8, SP_SPEC, bug), raise_on_error=False)
    assert not report.ok and report.first.kind == kind
    assert needle in str(report.first)


# ----------------------------------------------------------- prediction vs a real train_step
def _named_trace(fn, *args):
    """Run ``fn(*args)`` under the collective tracer, also noting each record's process-group
    OBJECT (its name): two groups over the same ranks (ep payload / ep counts / dp_sp, the two
    directions of a P2P pair) are told apart as tests/test_pipeline_p2p.py does."""
    from hai_llm.parallel.collective_trace import CollectiveRecorder

    class GroupRecorder(CollectiveRecorder):
        def __init__(self):
            super().__init__()
            self.names: list = []

        def _record(self, name, spec, a, batched=False):
            before = len(self.traces.get(dist.get_rank(), []))
            super()._record(name, spec, a, batched)
            if len(self.traces.get(dist.get_rank(), [])) > before:
                self.names.append((a.get("group") or dist.group.WORLD).group_name)

    with GroupRecorder() as rec:
        fn(*args)
    return list(zip(rec.traces.get(dist.get_rank(), []), rec.names))


def _per_group(named) -> list:
    """Sorted [(group ranks, per-group sequence)]: each group object's ops in issue order, as
    (op kind, signature, peer); a2a row counts are routing-dependent (``Record.signature``)."""
    seqs: dict = {}
    for rec, name in named:
        if rec.kind in ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"):
            continue  # object collectives: not part of the modeled step (documented)
        seqs.setdefault(name, (rec.group, []))[1].append((rec.kind, rec.signature(), rec.peer))
    return sorted((g, tuple(seq)) for g, seq in seqs.values())


def trainer_step_rank(rank: int, world: int, cfg) -> list:
    """One real ``Trainer.train_step`` (set-up outside the recording: the one-time P2P connect)."""
    from hai_llm.layout import build_layout
    from hai_llm.runtime.pipeline import PipelineRuntime
    from hai_llm.train.trainer import Trainer

    tr = Trainer(cfg, runtime=PipelineRuntime(cfg, build_layout(cfg, world)))
    return _per_group(_named_trace(tr.train_step))


def _predicted(spec: StepSpec, world: int) -> dict:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    out = {}
    for r in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=world)
        try:
            out[r] = _per_group(_named_trace(layout_step, r, world, spec))
        finally:
            dist.destroy_process_group()
    return out


@pytest.mark.dist
def test_prediction_matches_a_real_trainer_step(corpus_dir, tmp_path):
    """pp2 DualPipe x dp2, ep2 on 4 gloo ranks: the planner's program equals a recorded
    ``Trainer.train_step`` group by group (same ops, order, shapes, dtypes). Documented
    difference: overlapped F&B pairs interleave MoE pieces on the EP group, so the trainer runs
    ``overlap=False`` here (layout_step models that order)."""
    from helpers import layout_config

    from hai_llm.parallel.spawn import run_ranks
    from hai_llm.planner.plan import plan_config

    cfg = layout_config(str(corpus_dir), str(tmp_path), steps=1, global_batch=8,
                        model_overrides=["n_layers=4", "n_dense_layers=1"],
                        parallel=dict(nprocs=4, pp=2, dp=2, ep=2, schedule="dualpipe", overlap=False))
    real = dict(enumerate(run_ranks(trainer_step_rank, 4, cfg, timeout=240)))
    spec = StepSpec.from_plan(plan_config(cfg, 4), device="cpu", elem_bytes=4)  # fp32 run: fp32 wire
    pred = _predicted(spec, 4)
    for r in range(4):
        assert pred[r] == real[r], f"rank {r}: predicted {pred[r]} != recorded {real[r]}"
    groups = {g for r in range(4) for g, _ in real[r]}
    assert (0, 1, 2, 3) in groups  # the DualPipe union group of the ZeRO buckets
