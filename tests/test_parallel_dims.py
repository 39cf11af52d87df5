"""Tests for ParallelDims and the layout rules: the rank arithmetic of the production 2048-GPU
layout, the error messages that name the fix (``ParallelDims``, the schedule registry and
``build_layout``), and the real torch groups built from the same arithmetic (a one-process
gloo world and a 2048-rank fake world)."""
import os
import time
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from hai_llm.layout import build_layout, schedule_class
from hai_llm.layout.dims import GROUP_NAMES, ParallelDims


def v3_dims() -> ParallelDims:
    # docs/deepseek_v3.md#cluster-and-layout: 256 nodes x 8 GPUs, PP16, DP128, EP64 over 8 nodes
    return ParallelDims(world_size=2048, pp=16, dp=128, sp=1, ep=64, gpus_per_node=8)


# ----------------------------------------------------------------------- production layout
def test_v3_layout_sizes():
    d = v3_dims()
    assert d.n_nodes == 256
    assert d.stage_size == 128
    assert d.edp == 2  # each expert is replicated on 2 ranks of a stage
    assert d.nodes_per_ep_group == 8
    assert len(d.group_ranks("pp")) == 128
    assert len(d.group_ranks("ep")) == 16 * 2
    assert len(d.group_ranks("edp")) == 16 * 64
    assert all(len(g) == 2 for g in d.group_ranks("edp"))


def test_v3_every_rank_in_exactly_one_group_of_each_kind():
    d = v3_dims()
    for name in GROUP_NAMES:
        groups = d.group_ranks(name)
        counts = Counter(r for g in groups for r in g)
        assert sorted(counts) == list(range(2048)), name
        assert set(counts.values()) == {1}, name
        assert all(g == sorted(g) and len(g) == d.group_size(name) for g in groups), name


def test_v3_ep_groups_span_eight_whole_nodes_inside_one_stage():
    d = v3_dims()
    for g in d.group_ranks("ep"):
        nodes = d.nodes_of_group(g)
        assert len(nodes) == 8
        assert g[0] % 8 == 0 and g == list(range(g[0], g[0] + 64))  # starts at a node boundary
        assert len({d.coords(r)["pp"] for r in g}) == 1  # never straddles stages
        per_node = Counter(r // 8 for r in g)
        assert set(per_node.values()) == {8}  # whole nodes


def test_v3_pp_group_stride_and_coords():
    d = v3_dims()
    g = d.group_of("pp", 5)
    assert g == [5 + 128 * i for i in range(16)]
    assert d.coords(2047) == {"pp": 15, "dp": 127, "sp": 0, "dp_sp": 127, "ep": 63,
                              "edp": 1, "node": 255, "local": 7}
    assert d.coords(130) == {"pp": 1, "dp": 2, "sp": 0, "dp_sp": 2, "ep": 2, "edp": 0,
                             "node": 16, "local": 2}
    assert d.group_of("edp", 130) == [130, 194]
    assert d.group_of("dp_sp", 130) == list(range(128, 256))


def layout_of(model="deepseek_v3_671b", n_layers=None, seq_len=4096, n_micro=32, **parallel):
    """``build_layout`` of a config with these degrees (default the production layout)."""
    from hai_llm.config.load import load_model_args
    from hai_llm.config.schema import Config, DataConfig, ParallelConfig, TrainConfig

    p = dict(pp=16, dp=128, ep=64, gpus_per_node=8, schedule="dualpipe")
    p.update(parallel)
    args = load_model_args(model, [f"n_layers={n_layers}"] if n_layers else [])
    cfg = Config(model=args, data=DataConfig(seq_len=seq_len),
                 train=TrainConfig(global_batch=p["dp"] * n_micro, micro_batch=1),
                 parallel=ParallelConfig(n_micro=n_micro, **p))
    return build_layout(cfg, p["pp"] * p["dp"] * p.get("sp", 1))


def test_v3_layout_passes():
    layout = layout_of()
    assert layout.dims == v3_dims() and layout.n_micro == 32 and layout.schedule.num_stages == 16
    assert sorted(i for s in layout.stages for i in s) == list(range(61))


def test_describe_mentions_every_group():
    text = v3_dims().describe()
    for name in GROUP_NAMES:
        assert f"\n  {name} " in text
    assert "nodes=256" in text


# ----------------------------------------------------------------------- arithmetic, general
@pytest.mark.parametrize("pp,dp,sp,ep,gpn", [
    (2, 2, 2, 4, 8), (1, 3, 2, 3, 8), (2, 4, 2, 2, 4), (4, 4, 4, 16, 8), (1, 1, 1, 1, 8),
])
def test_coords_groups_and_rank_of_agree(pp, dp, sp, ep, gpn):
    d = ParallelDims(world_size=pp * dp * sp, pp=pp, dp=dp, sp=sp, ep=ep, gpus_per_node=gpn)
    for rank in range(d.world_size):
        c = d.coords(rank)
        assert d.rank_of(c["pp"], c["dp"], c["sp"]) == rank
        assert rank == c["pp"] * dp * sp + c["dp"] * sp + c["sp"]
        assert c["dp_sp"] == c["dp"] * sp + c["sp"]
        assert (c["ep"], c["edp"]) == (c["dp_sp"] % ep, c["dp_sp"] // ep)
        for name in GROUP_NAMES:
            g = d.group_of(name, rank)
            assert g in d.group_ranks(name)
            assert g.index(rank) == c[name]  # coordinate == index inside the group
    for name in GROUP_NAMES:
        assert sorted(r for g in d.group_ranks(name) for r in g) == list(range(d.world_size))


def test_sp_is_innermost():
    d = ParallelDims(world_size=16, pp=2, dp=2, sp=4, ep=8)
    assert d.group_of("sp", 5) == [4, 5, 6, 7]
    assert d.group_of("dp", 5) == [1, 5]
    assert d.group_of("ep", 9) == list(range(8, 16))
    assert d.group_of("edp", 9) == [9]


def test_out_of_range_arguments():
    d = ParallelDims(world_size=8, dp=8)
    with pytest.raises(ValueError, match="out of range"):
        d.coords(8)
    with pytest.raises(ValueError, match="dp coordinate 8"):
        d.rank_of(0, 8, 0)
    with pytest.raises(ValueError, match="unknown group"):
        d.group_ranks("tp")


# ----------------------------------------------------------------------- construction errors
def test_product_mismatch_names_the_fix():
    with pytest.raises(ValueError, match=r"pp=16 x dp=128 x sp=1 = 2048 but world_size=1024: "
                                         r"change dp to 64"):
        ParallelDims(world_size=1024, pp=16, dp=128, ep=64)


def test_bad_degrees():
    with pytest.raises(ValueError, match="pp=0 must be an integer >= 1"):
        ParallelDims(world_size=8, pp=0, dp=8)
    with pytest.raises(ValueError, match=r"ep=3 must divide dp x sp = 8"):
        ParallelDims(world_size=8, dp=8, ep=3)


def test_node_rules():
    ParallelDims(world_size=6, dp=6, ep=6)  # single partial node: anything goes
    with pytest.raises(ValueError, match="whole number of nodes"):
        ParallelDims(world_size=12, dp=12)
    with pytest.raises(ValueError, match="straddle two nodes"):
        ParallelDims(world_size=24, dp=24, ep=3)
    with pytest.raises(ValueError, match="must cover whole nodes, change ep to 8 or 16"):
        ParallelDims(world_size=48, dp=48, ep=12)
    ParallelDims(world_size=32, dp=32, ep=16)  # 2 whole nodes per EP group


# ----------------------------------------------------------------------- model errors
def test_experts_not_divisible_by_ep():
    with pytest.raises(ValueError, match="n_routed_experts=96 is not divisible by ep=64"):
        v3_dims().check_experts(96, 8)


def test_expert_groups_not_lining_up_with_nodes():
    with pytest.raises(ValueError, match="expert groups do not line up with nodes.*"
                                         "set n_expert_groups=8 or ep=32"):
        v3_dims().check_experts(256, 4)
    # inside one node any grouping is fine: the whole EP group is one node
    ParallelDims(world_size=16, dp=16, ep=8).check_experts(64, 4)


def test_layers_fewer_than_stages():
    with pytest.raises(ValueError, match="n_layers=12 is fewer than the 16 pipeline stages"):
        layout_of(n_layers=12)
    small = dict(model="tiny", n_layers=6, seq_len=64, n_micro=8, pp=4, dp=1, ep=1)
    layout_of(**small, schedule="dualpipe")
    with pytest.raises(ValueError, match="dualpipev holds 2 stages per rank"):
        layout_of(**small, schedule="dualpipev")


def test_seq_len_not_divisible_by_two_sp():
    d = ParallelDims(world_size=8, dp=2, sp=4, ep=8)
    d.check_seq_len(4096)
    with pytest.raises(ValueError, match=r"seq_len=4100 must be divisible by 2\*sp=8.*4104"):
        d.check_seq_len(4100)
    ParallelDims(world_size=1).check_seq_len(7)  # sp=1: no chunking


def test_micro_batch_rules():
    """The schedule registry states each rule once; the messages come from it."""
    with pytest.raises(ValueError, match="dualpipe with pp=16 needs n_micro >= 2\\*pp = 32 "
                                         "micro-batches \\(an even number\\), got n_micro=16: use n_micro=32"):
        schedule_class("dualpipe").check(16, 16)
    with pytest.raises(ValueError, match="must be even .*got n_micro=33: use n_micro=34"):
        schedule_class("dualpipe").check(16, 33)
    schedule_class("dualpipev").check(16, 33)  # DualPipeV: any n >= 2*pp, odd included
    with pytest.raises(ValueError, match="got n_micro=31: use n_micro=32"):
        schedule_class("dualpipev").check(16, 31)
    schedule_class("1f1b").check(16, 16)
    with pytest.raises(ValueError, match="1f1b with pp=16 needs n_micro >= pp = 16"):
        schedule_class("1f1b").check(16, 15)
    schedule_class("1f1b").check(1, 1)
    with pytest.raises(ValueError, match="schedule='gpipe' is unknown"):
        schedule_class("gpipe")
    # the same rules through the layout of a config
    with pytest.raises(ValueError, match="use n_micro=32"):
        layout_of(n_micro=16)
    assert layout_of(n_micro=33, schedule="dualpipev").n_micro == 33


def test_odd_pp_for_dualpipe():
    d = ParallelDims(world_size=3, pp=3)
    with pytest.raises(ValueError, match="dualpipe needs an even pp.*pp=3: use pp=4 or 2"):
        schedule_class("dualpipe").check(d.pp, 6)
    schedule_class("dualpipev").check(d.pp, 6)


# ----------------------------------------------------------------------- real process groups
@pytest.fixture
def destroy_pg():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_build_mesh_single_process_gloo(tmp_path, destroy_pg):
    store = dist.FileStore(os.path.join(tmp_path, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    groups = ParallelDims(world_size=1).build_mesh("cpu")
    for name in GROUP_NAMES:
        assert groups.size(name) == 1 and groups.rank(name) == 0
        assert groups.ranks(name) == [0]
        t = torch.ones(2)
        dist.all_reduce(t, group=groups.group(name))
        assert torch.equal(t, torch.ones(2))  # exact: a 1-rank all-reduce of ones
    assert groups.dense_grad_group is groups.group("dp_sp")
    assert groups.mesh.mesh_dim_names == ("pp", "dp", "sp")


def test_build_mesh_rejects_wrong_world(tmp_path, destroy_pg):
    store = dist.FileStore(os.path.join(tmp_path, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    with pytest.raises(ValueError, match="default process group has 1 ranks"):
        ParallelDims(world_size=2, dp=2).build_mesh()


@pytest.mark.parametrize("rank", [0, 1234, 2047])
def test_build_mesh_fake_2048(rank, destroy_pg):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    d = v3_dims()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=2048)
    start = time.perf_counter()
    groups = d.build_mesh("cpu")  # also checks torch's ranks == our arithmetic, per group
    print(f"build_mesh, 2048 fake ranks: {time.perf_counter() - start:.2f} s")  # information, not a check
    expect = {"pp": 16, "dp": 128, "sp": 1, "dp_sp": 128, "ep": 64, "edp": 2}
    for name, size in expect.items():
        assert groups.size(name) == size
        assert groups.group(name).size() == size
        assert sorted(dist.get_process_group_ranks(groups.group(name))) == groups.ranks(name)
        assert groups.rank(name) == dist.get_rank(groups.group(name))
    assert list(groups.mesh.get_coordinate()) == [d.coords(rank)[k] for k in ("pp", "dp", "sp")]
    assert len(d.nodes_of_group(groups.ranks("ep"))) == 8
