"""The layout authority (hai_llm.layout): one ``build_layout`` decides the degrees, the schedule,
the stage partition and the micro-batches, and everyone reads it.

The key property: the planner's dry run reports memory and traffic for exactly the split the
trainer runs (``Layout.stages``, which ``parallelize`` hands to the pipeline model builder),
for several configs, the 671B one at pp=16 included. No processes, no weights (meta models).
"""
from __future__ import annotations

import pytest

from hai_llm.config.load import load_model_args
from hai_llm.config.schema import Config, DataConfig, ParallelConfig, TrainConfig
from hai_llm.layout import MeshGroups, build_layout


def config(model: str, overrides=(), *, seq_len=64, global_batch=None, n_micro=8, **parallel) -> Config:
    p = dict(pp=1, dp=1, sp=1, ep=1, gpus_per_node=8)
    p.update(parallel)
    return Config(model=load_model_args(model, list(overrides)), data=DataConfig(seq_len=seq_len),
                  train=TrainConfig(global_batch=global_batch or n_micro * p["dp"], micro_batch=1),
                  parallel=ParallelConfig(n_micro=n_micro, **p))


V3 = dict(model="deepseek_v3_671b", seq_len=4096, n_micro=32, pp=16, dp=128, ep=64)
CASES = {
    "671b-dualpipe-pp16": dict(V3, schedule="dualpipe"),
    "671b-1f1b-pp16": dict(V3, schedule="1f1b"),
    "671b-dualpipev-pp16": dict(V3, schedule="dualpipev"),
    "small-dualpipev-pp2": dict(model="small", pp=2, n_micro=5, schedule="dualpipev"),
    "small-zb1p-pp4": dict(model="small", pp=4, dp=2, n_micro=4, schedule="zb1p"),
    "tiny6-dualpipe-pp2-user-split": dict(model="tiny", overrides=["n_layers=6"], pp=2, n_micro=4,
                                          schedule="dualpipe", stage_layers=[2, 4]),
    "small-no-pipeline-dp2-sp2": dict(model="small", dp=2, sp=2, ep=4, gpus_per_node=4, n_micro=2),
}


def _world(p: dict) -> int:
    return p.get("pp", 1) * p.get("dp", 1) * p.get("sp", 1)


@pytest.mark.parametrize("name", list(CASES))
def test_dryrun_stage_split_is_the_trainers(name):
    from hai_llm.model.transformer import build_model
    from hai_llm.pipeline.stage import build_pipeline_model
    from hai_llm.planner import plan_config

    kw = dict(CASES[name])
    cfg = config(kw.pop("model"), kw.pop("overrides", ()), **kw)
    world = _world(kw)
    layout = build_layout(cfg, world)
    plan = plan_config(cfg, world)
    # the dry run's stages are the layout's
    assert [list(range(s.first_layer, s.first_layer + s.n_layers)) for s in plan.stages] == layout.stages
    assert plan.n_micro == layout.n_micro and plan.n_stages == layout.num_stages
    assert [rp.stages for rp in plan.ranks] == [layout.stages_of(r) for r in range(layout.pp)]
    if layout.schedule is None:
        assert layout.stages == [list(range(cfg.model.n_layers))]
        return
    # ... and so are the trainer's: the stage modules parallelize builds hold these layers
    full = build_model(cfg.model, device="meta")
    for r in range(layout.pp):
        pm = build_pipeline_model(full, layout.schedule, r, layout.stages)
        assert [st.layer_ids for st in pm.stages] == layout.stage_layers_of(r), (name, r)


def test_parallelize_builds_the_layout_stages():
    """``parallelize`` (what every runtime's prepare_model calls) cuts the model by
    ``Layout.stages``; a user split (``parallel.stage_layers``) goes through the same path."""
    from hai_llm.model.transformer import build_model
    from hai_llm.runtime import parallelize

    cfg = config("tiny", ["n_layers=6"], pp=2, n_micro=4, schedule="dualpipev", stage_layers=[1, 2, 2, 1])
    layout = build_layout(cfg, 2)
    assert layout.stages == [[0], [1, 2], [3, 4], [5]]
    for r in range(2):
        mesh = MeshGroups(dims=layout.dims, mesh=None, dp_sp_mesh=None, global_rank=layout.dims.rank_of(r, 0, 0))
        done = parallelize(build_model(cfg.model, device="meta"), layout, cfg, mesh)
        assert [st.layer_ids for st in done.model.stages] == layout.stage_layers_of(r)
        assert done.store is not None and done.transport is None  # B/W split on, no EP


def test_the_671b_split_balances_cost():
    """61 layers over 16 stages: the head + MTP make the last stage heavy, so it keeps 1 layer
    (the cost model of hai_llm.layout.partition); the planner used to report [3, 4 x 12, 3, 3]."""
    layout = build_layout(config(**dict(V3, schedule="dualpipe")), 2048)
    assert [len(s) for s in layout.stages] == [4] * 15 + [1]
    assert layout.stage_layers_of(0) == [layout.stages[0], layout.stages[15]]  # DualPipe: r and pp-1-r
    assert layout.stage_layers_of(15) == [layout.stages[15], layout.stages[0]]


def test_layout_accessors_and_batch_split():
    cfg = config("small", pp=2, dp=2, sp=2, ep=2, gpus_per_node=4, global_batch=16, n_micro=0,
                 schedule="dualpipev")
    layout = build_layout(cfg, 8)
    assert (layout.local_batch, layout.n_micro, layout.micro_batch) == (8, 8, 1)
    assert layout.global_batch == 16 and layout.num_stages == 4 and layout.chunks_per_rank == 2
    assert layout.coords(5) == layout.dims.coords(5) and layout.coords(5)["pp"] == 1
    assert layout.stages_of(0) == [0, 3] and layout.stages_of(1) == [1, 2]
    assert "dualpipev" in layout.describe()
    single = build_layout(config("small", n_micro=0, global_batch=4), 1)
    assert single.schedule is None and single.stages_of(0) == [0] and single.n_micro == 4
    with pytest.raises(ValueError, match="pp_rank 2 out of range"):
        layout.stages_of(2)
