"""Tests for ParallelDims: the rank arithmetic of the production 2048-GPU layout, the error
messages that name the fix, and the real torch groups built from the same arithmetic (a
one-process gloo world and a 2048-rank fake world)."""
import os
import time
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from hai_llm.parallel.dims import GROUP_NAMES, ParallelDims


def v3_dims() -> ParallelDims:
    # REFERENCE.md section 1: 256 nodes x 8 GPUs, PP16, DP128, EP64 over 8 nodes
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


def test_v3_validate_for_model_passes():
    v3_dims().validate_for_model(256, 8, 61, 4096, n_micro_batches=32, schedule="dualpipe")


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
        v3_dims().validate_for_model(96, 8, 61, 4096)


def test_expert_groups_not_lining_up_with_nodes():
    with pytest.raises(ValueError, match="expert groups do not line up with nodes.*"
                                         "set n_expert_groups=8 or ep=32"):
        v3_dims().validate_for_model(256, 4, 61, 4096)
    # inside one node any grouping is fine: the whole EP group is one node
    ParallelDims(world_size=16, dp=16, ep=8).validate_for_model(64, 4, 4, 128)


def test_layers_fewer_than_stages():
    with pytest.raises(ValueError, match="n_layers=12 is fewer than the 16 pipeline stages"):
        v3_dims().validate_for_model(256, 8, 12, 4096)
    d = ParallelDims(world_size=4, pp=4)
    d.validate_for_model(8, 1, 6, 64, n_micro_batches=8, schedule="dualpipe")
    with pytest.raises(ValueError, match="dualpipev holds 2 stages per rank"):
        d.validate_for_model(8, 1, 6, 64, n_micro_batches=8, schedule="dualpipev")


def test_seq_len_not_divisible_by_two_sp():
    d = ParallelDims(world_size=8, dp=2, sp=4, ep=8)
    d.validate_for_model(64, 1, 4, 4096)
    with pytest.raises(ValueError, match=r"seq_len=4100 must be divisible by 2\*sp=8.*4104"):
        d.validate_for_model(64, 1, 4, 4100)
    ParallelDims(world_size=1).validate_for_model(8, 2, 1, 7)  # sp=1: no chunking


def test_micro_batch_rules():
    d = v3_dims()
    with pytest.raises(ValueError, match="dualpipe with pp=16 needs an even n_micro_batches "
                                         ">= 2\\*pp = 32, got 16: use n_micro_batches=32"):
        d.validate_for_model(256, 8, 61, 4096, n_micro_batches=16, schedule="dualpipe")
    with pytest.raises(ValueError, match="got 33: use n_micro_batches=34"):
        d.validate_for_model(256, 8, 61, 4096, n_micro_batches=33, schedule="dualpipev")
    d.validate_for_model(256, 8, 61, 4096, n_micro_batches=16, schedule="1f1b")
    with pytest.raises(ValueError, match="1f1b with pp=16 needs n_micro_batches >= 16"):
        d.validate_for_model(256, 8, 61, 4096, n_micro_batches=15, schedule="1f1b")
    ParallelDims(world_size=1).validate_for_model(8, 1, 1, 8, n_micro_batches=1, schedule="1f1b")
    with pytest.raises(ValueError, match="schedule='gpipe' is unknown"):
        d.validate_for_model(256, 8, 61, 4096, schedule="gpipe")


def test_odd_pp_for_dualpipe():
    d = ParallelDims(world_size=3, pp=3)
    with pytest.raises(ValueError, match="dualpipe needs an even pp.*pp=3: use pp=4 or 2"):
        d.validate_for_model(8, 1, 12, 64, n_micro_batches=6, schedule="dualpipe")
    d.validate_for_model(8, 1, 12, 64, n_micro_batches=6, schedule="dualpipev")


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
        assert torch.equal(t, torch.ones(2))
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
    assert time.perf_counter() - start < 10.0
    expect = {"pp": 16, "dp": 128, "sp": 1, "dp_sp": 128, "ep": 64, "edp": 2}
    for name, size in expect.items():
        assert groups.size(name) == size
        assert groups.group(name).size() == size
        assert sorted(dist.get_process_group_ranks(groups.group(name))) == groups.ranks(name)
        assert groups.rank(name) == dist.get_rank(groups.group(name))
    assert list(groups.mesh.get_coordinate()) == [d.coords(rank)[k] for k in ("pp", "dp", "sp")]
    assert len(d.nodes_of_group(groups.ranks("ep"))) == 8
