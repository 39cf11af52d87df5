"""The pipeline runtime against a single-process run of the same micro-batches.

Every layout trains the tiny model (4 layers, 1 dense, MTP on) for 2 optimizer steps on
simulated gloo ranks and must reproduce the single-process run: per-step losses (relative
error < 1e-6, i.e. a few fp32 ulps: the per-micro-batch terms are gathered and combined as
``Transformer.loss`` does, but per-rank GEMM shapes differ, so BLAS may round differently),
the global gradient norm, the
gradient of every parameter after step 1 (relative squared difference < 1e-10; gradients of
duplicated copies summed through the ZeRO union groups) and the aux-loss-free expert biases.

Spawns are few and carry several layouts each (a spawn of N ranks costs 5-20 s here):

* 2 ranks: 1F1B, ZB1P, DualPipe (overlapped F&B, and sequential F then B), DualPipeV (also
  with an odd number of micro-batches);
* 4 ranks: DualPipe pp=4, 1F1B pp=4, DualPipeV pp=2 x sp=2 (sequence parallel stages) and
  DualPipe pp=2 x dp=2 with expert parallelism (ep=2) whose dispatch / combine all-to-alls run
  asynchronously inside the overlapped F&B pairs; every collective of that run (EP, ZeRO, P2P)
  is recorded by ``hai_llm.parallel.collective_trace`` and compared across the members of
  each group.

Invalid settings are rejected before any process group exists.
"""
from __future__ import annotations

import pytest
import torch

from hai_llm.parallel.spawn import run_ranks
from helpers import layout_config, rel_err, run_steps, single_process, stitch

OVERRIDES = ["n_layers=4", "n_dense_layers=1"]
STEPS = 2


def _cfg(data, out, global_batch=4, **parallel):
    return layout_config(str(data), str(out), steps=STEPS, model_overrides=OVERRIDES, parallel=parallel,
                       global_batch=global_batch)


def pipeline_rank_body(rank: int, world: int, cases: list) -> list[dict]:
    """Run each ``(cfg, runtime kwargs, record collectives)`` case on this rank; with
    recording, ``log`` is this rank's trace of every collective and P2P call
    (``hai_llm.parallel.collective_trace``)."""
    from hai_llm.layout import build_layout
    from hai_llm.parallel.collective_trace import CollectiveRecorder
    from hai_llm.runtime.pipeline import PipelineRuntime
    from hai_llm.train.trainer import Trainer

    out = []
    for cfg, kw, record in cases:
        log: list = []
        layout = build_layout(cfg, world)
        if record:
            with CollectiveRecorder() as rec:
                rt = PipelineRuntime(cfg, layout, **kw)
                res = run_steps(Trainer(cfg, runtime=rt), cfg.train.steps)
            log = rec.traces.get(rank, [])
        else:
            rt = PipelineRuntime(cfg, layout, **kw)
            res = run_steps(Trainer(cfg, runtime=rt), cfg.train.steps)
        res["log"] = log
        res["step_s"] = rt.last_stats.step_s
        out.append(res)
    return out


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory):
    """Single process, global batch 4 = 4 micro-batches of 1 sequence."""
    return single_process(_cfg(corpus_dir, tmp_path_factory.mktemp("single")))


@pytest.fixture(scope="module")
def reference5(corpus_dir, tmp_path_factory):
    """Single process, global batch 5 = 5 micro-batches of 1 sequence (odd: DualPipeV)."""
    return single_process(_cfg(corpus_dir, tmp_path_factory.mktemp("single5"), global_batch=5))


@pytest.fixture(scope="module")
def reference8(corpus_dir, tmp_path_factory):
    """Single process, global batch 8 = 8 micro-batches of 1 sequence."""
    return single_process(_cfg(corpus_dir, tmp_path_factory.mktemp("single8"), global_batch=8))


def _check(name, results, ref):
    """Losses on every rank, norms, biases, and every parameter's gradient."""
    for r in results:
        # Not bit-exact: another layout runs other per-rank shapes (stage splits, dp/ep token
        # splits, sp halves), and BLAS/oneDNN pick shape- and CPU-dependent kernels. Step 1 (same
        # weights) differs only by forward rounding, a few fp32 ulps (eps 1.2e-7) per logit
        # averaged over the batch; later steps add last-bit update differences. Measured on an
        # AMD EPYC: 8e-9 (dp2-ep2, step 1), <= 9e-8 over all layouts, steps and the ATEN / MKL /
        # thread variants. rtol 1e-6 (8-16 fp32 ulps of the loss) leaves >10x margin, while a
        # wrong scale, a dropped micro-batch or an ep-x gradient moves losses by 1e-3..1.
        assert len(r["losses"]) == len(ref["losses"]) == STEPS, (name, r["losses"], ref["losses"])
        for a, b in zip(r["losses"], ref["losses"], strict=True):
            assert abs(a - b) <= 1e-6 * abs(b), (name, r["losses"], ref["losses"])
        # norms: step 1 rtol 1e-5 (rounding only); step 2 rtol 1e-4, as Adam's first update
        # lr * g / (|g| + eps) amplifies last-bit differences of gradient entries near eps
        for s, (a, b) in enumerate(zip(r["norms"], ref["norms"], strict=True)):
            assert abs(a - b) <= (1e-5 if s == 0 else 1e-4) * b, (name, s, r["norms"], ref["norms"])
        for n, b in r["bias"].items():
            assert (r["bias"][n] - ref["bias"][n]).abs().max() < 1e-9, (name, n)
    grads = stitch(results)
    for r in results[1:]:  # stitch takes dense grads from rank 0: add the other stages'
        for n, g in r["grads"].items():
            if n not in results[0]["grads"] and n not in r["offsets"]:
                grads[n] = g
    assert set(grads) == set(ref["grads"]), (name, set(ref["grads"]) ^ set(grads))
    worst, which = max((rel_err(grads[n], g) ** 2, n) for n, g in ref["grads"].items())
    assert worst < 1e-10, (name, which, worst)
    return f"{worst:.1e} ({which}, |g|={float(ref['grads'][which].norm()):.1e})"


@pytest.mark.dist
def test_pp2_schedules_match_single_process(reference, reference5, corpus_dir, tmp_path):
    layouts = {
        "1f1b": (dict(schedule="1f1b"), {}),
        "zb1p": (dict(schedule="zb1p"), {}),
        "dualpipe-overlap": (dict(schedule="dualpipe"), {"overlap": True}),
        "dualpipe-sequential": (dict(schedule="dualpipe"), {"overlap": False}),
        "dualpipev": (dict(schedule="dualpipev"), {}),
    }
    layouts["dualpipe-overlap"][1]["trace_dir"] = str(tmp_path / "trace")
    cases = [(_cfg(corpus_dir, tmp_path / name, nprocs=2, pp=2, **par), kw, False)
             for name, (par, kw) in layouts.items()]
    # DualPipeV with an odd number of micro-batches (5 >= 2*pp), against its own reference
    cases.append((_cfg(corpus_dir, tmp_path / "dualpipev-n5", global_batch=5, nprocs=2, pp=2,
                       schedule="dualpipev"), {}, False))
    per_rank = run_ranks(pipeline_rank_body, 2, cases, timeout=600)
    # tracing of real runs: a Chrome trace per rank and a Gantt chart of the pipeline
    import json

    for r in range(2):
        trace = json.loads((tmp_path / "trace" / f"trace_pp{r}_dpsp0.json").read_text())
        names = {e["name"] for e in trace["traceEvents"]}
        assert any(n.startswith("FB(") for n in names) and any(n.startswith("wait") for n in names)
    assert (tmp_path / "trace" / "gantt_dpsp0.png").stat().st_size > 0
    worst = {}
    for i, name in enumerate(layouts):
        worst[name] = _check(name, [r[i] for r in per_rank], reference)
    worst["dualpipev-n5"] = _check("dualpipev-n5", [r[len(layouts)] for r in per_rank], reference5)
    print("worst relative squared gradient difference:", worst)
    print("step seconds (rank 0):", {n: round(per_rank[0][i]["step_s"], 3) for i, n in enumerate(layouts)})
    # legitimately bit-exact: overlapped F&B and sequential F then B of the same layout run the
    # same ops on the same shapes and accumulate in the same order: identical grads
    i, j = list(layouts).index("dualpipe-overlap"), list(layouts).index("dualpipe-sequential")
    for r in per_rank:
        for n, g in r[i]["grads"].items():
            assert torch.equal(g, r[j]["grads"][n]), n


@pytest.mark.dist
def test_pp4_and_expert_parallel_match_single_process(reference8, corpus_dir, tmp_path):
    from hai_llm.parallel.collective_trace import check_consistent

    layouts = {
        "dualpipe-pp2-dp2-ep2": (dict(pp=2, dp=2, ep=2, schedule="dualpipe"), True),
        "dualpipe-pp4": (dict(pp=4, schedule="dualpipe"), False),
        "1f1b-pp4": (dict(pp=4, schedule="1f1b"), False),
        "dualpipev-pp2-sp2": (dict(pp=2, sp=2, schedule="dualpipev"), False),
    }
    cases = [(_cfg(corpus_dir, tmp_path / name, global_batch=8, nprocs=4, **par), {}, rec)
             for name, (par, rec) in layouts.items()]
    per_rank = run_ranks(pipeline_rank_body, 4, cases, timeout=900)
    worst = {}
    for i, name in enumerate(layouts):
        # (under sp each rank's loss is a mean over its own positions: the logged loss is the
        # mean of those means, equal to the single-process mean up to rounding only)
        worst[name] = _check(name, [r[i] for r in per_rank], reference8)
    print("worst relative squared gradient difference:", worst)
    # every member of every group issued the same collectives in the same order, and every
    # P2P link carried matching sends and receives
    logs = {rank: r[0]["log"] for rank, r in enumerate(per_rank)}
    kinds = {rec.kind for rec in logs[0]}
    # EP all-to-alls, ZeRO reduce-scatter / all-gather and the pipeline's P2P are all seen
    assert {"all_to_all_single", "reduce_scatter_single", "all_gather_single", "send", "recv"} <= kinds, kinds
    report = check_consistent(logs)  # raises CollectiveMismatch naming the first mismatch
    assert report.n_links > 0


# ----------------------------------------------------------------------------- no spawn
def _single_rank_grads(sched, overlap, tokens, args):
    from hai_llm.model.transformer import build_model
    from hai_llm.pipeline.executor import PipelineExecutor
    from hai_llm.pipeline.wgrad_split import WeightGradStore, split_weight_grads
    from hai_llm.pipeline.stage import build_pipeline_model

    pm = build_pipeline_model(build_model(args, device="cpu", seed=7), sched, 0)
    store = WeightGradStore()
    split_weight_grads(pm, store)
    st = PipelineExecutor(pm, sched, 0, [0], overlap=overlap, store=store).run(
        list(tokens.chunk(sched.n_micro)), None)
    return st, {n: p.grad for n, p in pm.named_parameters()}


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_one_rank_v_turn_and_weight_split_match_plain_backward(tiny_args, recompute):
    """DualPipeV on one rank: both chunks local (the V turn through the local mailbox), FB
    pairs overlapped piece by piece, deferred W; against Transformer.loss + backward."""
    from dataclasses import replace

    from hai_llm.model.transformer import build_model
    from hai_llm.layout.schedules import DualPipeV, ZB1P

    args = replace(tiny_args, n_layers=4, n_dense_layers=1, recompute=recompute)
    torch.manual_seed(0)
    n = 4
    tokens = torch.randint(0, args.vocab_size, (n, 16 + 2))
    ref = build_model(args, device="cpu", seed=7)
    outs = []
    for mb in tokens.chunk(n):
        out = ref.loss(mb)
        (out.loss / n).backward()
        outs.append(out)
    for sched in (DualPipeV(1, n), ZB1P(1, n)):
        assert any(a.kind in ("FB", "W") for a in sched.actions(0))
        st, grads = _single_rank_grads(sched, True, tokens, args)
        # bit-exact: one process, the same micro-batch shapes and weights, the same forward ops
        assert all(torch.equal(st.ce[i], outs[i].ce) and torch.equal(st.mtp[i], outs[i].mtp) for i in range(n))
        bits = 0
        for name, p in ref.named_parameters():
            assert rel_err(grads[name], p.grad) ** 2 < 1e-12, (sched, name)
            bits += torch.equal(grads[name], p.grad)
        # without recompute all but the embedding and the head (each used twice per
        # micro-batch: main model and MTP, accumulated in another order) are bit-identical
        assert recompute != "none" or bits >= len(grads) - 2, bits
    _, seq = _single_rank_grads(DualPipeV(1, n), False, tokens, args)
    _, ovl = _single_rank_grads(DualPipeV(1, n), True, tokens, args)
    # bit-exact: sequential vs overlapped F&B of one layout, same shapes, same accumulation order
    assert seq.keys() == ovl.keys() and all(torch.equal(seq[k], ovl[k]) for k in seq)


def test_stage_partition_and_global_names(tiny_args):
    from dataclasses import replace

    from hai_llm.model.transformer import build_model
    from hai_llm.layout.schedules import DualPipe, DualPipeV, OneFOneB
    from hai_llm.layout.partition import layer_cost, partition_layers
    from hai_llm.pipeline.stage import build_pipeline_model

    args = replace(tiny_args, n_layers=6, n_dense_layers=1)
    assert partition_layers(args, 3, [1, 2, 3]) == [[0], [1, 2], [3, 4, 5]]
    parts = partition_layers(args, 2)
    assert [len(p) for p in parts] == [4, 2]  # the last stage also carries head + MTP
    assert layer_cost(args, 1) != layer_cost(args, 0)  # MoE blocks costed by activated experts
    for bad in ([1, 2], [0, 6], [2, 2, 1]):
        with pytest.raises(ValueError, match="stage_layers"):
            partition_layers(args, 3 if len(bad) == 3 else 2, bad)
    full = build_model(args, device="meta")
    names = dict(full.named_parameters())
    # DualPipe: ranks r and PP-1-r hold the same stages, listed in the same order
    d = DualPipe(4, 8)
    n0 = [n for n, _ in build_pipeline_model(full, d, 0).named_parameters()]
    n3 = [n for n, _ in build_pipeline_model(full, d, 3).named_parameters()]
    assert n0 == n3 and set(n0) <= set(names) and "embed.weight" in n0 and "mtp.0.eh_proj.weight" in n0
    # MTP shares the physical embedding with the first stage on DualPipeV's rank 0
    pm = build_pipeline_model(full, DualPipeV(2, 4), 0)
    assert pm.stages[0].embed is pm.stages[1].embed is pm.embed
    # 1F1B: the last rank keeps a copy of the embedding for MTP, the middle rank none
    o = OneFOneB(3, 3)
    assert "embed.weight" in dict(build_pipeline_model(full, o, 2).named_parameters())
    assert "embed.weight" not in dict(build_pipeline_model(full, o, 1).named_parameters())
    pm = build_pipeline_model(full, o, 1)
    ids = pm.stages[0].layer_ids
    assert [n for n, _ in pm.named_parameters()] == \
        [n for n in names if n.startswith(tuple(f"layers.{i}." for i in ids))]


@pytest.mark.parametrize("gb,par,match", [
    (8, dict(pp=3, schedule="dualpipe"), "even pp"),
    (8, dict(pp=2, schedule="dualpipe", n_micro=2), "n_micro >= 2\\*pp"),
    (5, dict(pp=2, schedule="dualpipe", n_micro=5), "even number of micro-batches"),
    (8, dict(pp=4, schedule="dualpipev"), "fewer than the 8 pipeline stages"),
    (8, dict(pp=4, schedule="1f1b", n_micro=2), "n_micro >= pp"),
    (8, dict(pp=2, schedule="gpipe"), "unknown"),
    (8, dict(pp=2, schedule="1f1b", n_micro=3), "equal micro-batches"),
])
def test_invalid_settings_fail_fast(gb, par, match, tmp_path):
    """Rejected before any process group exists, with the fix in the message."""
    from hai_llm.layout import build_layout

    with pytest.raises(ValueError, match=match):
        build_layout(_cfg(tmp_path, tmp_path, global_batch=gb, **par), par["pp"])


def test_dualpipev_accepts_odd_micro_batches(tmp_path):
    """DualPipeV only needs n_micro >= 2*pp (one stream through the V, no directions to
    balance); DualPipe needs an even count. The odd schedules are certified complete,
    ordered, deadlock-free and P2P-consistent."""
    from hai_llm.layout import build_layout
    from hai_llm.layout.schedules import DualPipe, DualPipeV
    from hai_llm.pipeline.simulator import check_schedule

    layout = build_layout(_cfg(tmp_path, tmp_path, global_batch=5, pp=2, schedule="dualpipev"), 2)
    assert layout.n_micro == 5 and isinstance(layout.schedule, DualPipeV)
    for pp in (1, 2, 3, 4):
        for n in (2 * pp + 1, 2 * pp + 3):
            check_schedule(DualPipeV(pp, n))
    with pytest.raises(ValueError, match="must be even"):
        DualPipe(2, 5)


def test_stage_layers_validated(tmp_path):
    from dataclasses import replace

    from hai_llm.layout import build_layout

    cfg = _cfg(tmp_path, tmp_path, global_batch=8, pp=2, schedule="1f1b")
    bad = replace(cfg, parallel=replace(cfg.parallel, stage_layers=[3, 2]))
    with pytest.raises(ValueError, match="stage_layers"):
        build_layout(bad, 2)
    good = replace(cfg, parallel=replace(cfg.parallel, stage_layers=[3, 1]))
    assert build_layout(good, 2).stages == [[0, 1, 2], [3]]


def test_deferred_weight_grads_are_plain_tensors(tiny_args):
    """W closures run outside autograd: no gradient may hold a graph (memory leak)."""
    from dataclasses import replace

    from hai_llm.layout.schedules import ZB1P

    args = replace(tiny_args, n_layers=2, n_dense_layers=1)
    tokens = torch.randint(0, args.vocab_size, (2, 8 + 2))
    _, grads = _single_rank_grads(ZB1P(1, 2), True, tokens, args)
    assert all(g is not None and not g.requires_grad and g.grad_fn is None for g in grads.values())
