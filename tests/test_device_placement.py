"""Tensors on the wrong device, caught on CPU: the class of bug that crashes a first NCCL step.

On GPUs every tensor handed to NCCL must be on the rank's CUDA device and every tensor mixed
with the model's must be on its device; on gloo CPU ranks a tensor built without ``device=``
works by accident. Here each rank sets ``torch.set_default_device("meta")`` while the model and
data live on an explicit CPU device (``train.device=cpu``), so a tensor created without the
model's device is a meta tensor and fails at its first use, and every collective and P2P call
is recorded by ``hai_llm.parallel.collective_trace`` with its tensors' devices, all asserted to
be the model's device (the message names the op, its position and its tensors' shapes).

Paths (gloo ranks, fp32 unless said, one step, a save with an EMA (``train.ema_decay > 0``), a
resume in a fresh trainer and one more step): the pipeline (pp2 DualPipe with expert parallelism inside:
pp2 x dp2 x ep2 on 4 ranks, P2P and EP all-to-alls in the overlapped F&B pairs, ZeRO over the
copy-union groups) and dp2 x ep2 without a pipeline (ZeRO-1 over dp2 for the dense parameters,
expert parallelism, the mesh runtime's metrics), and dp2 x sp2 with ep4 over two virtual nodes
(``parallel.transport=hierarchical``, bf16; no resume); the checkpoints exercise the DCP shard
placements and the EMA's restore.

Also here (no spawn): the node size under torchrun, ``parallel.gpus_per_node`` against
``LOCAL_WORLD_SIZE``, through the launcher's own validation (``launch.ranks.check_layout``).
"""
from __future__ import annotations

import dataclasses

import pytest

from hai_llm.parallel.spawn import run_ranks
from helpers import layout_config

MODEL = ["n_layers=2", "n_dense_layers=1"]  # one dense and one MoE block: every path, least compute


def _cfg(data, out, steps, global_batch=4, ema=0.0, precision="fp32", model=(), **parallel):
    cfg = layout_config(str(data), str(out), steps=steps, model_overrides=MODEL + list(model),
                        parallel=parallel, global_batch=global_batch, precision=precision)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=ema, resume=True))


def placement_rank(rank: int, world: int, cases: list) -> dict:
    """Each case: train ``cfg`` (``steps``; the trainer saves at the end), then, with
    ``resume_to``, a fresh trainer resumes that checkpoint and trains on. Everything under a
    meta default device and the collective device check; returns the checked call counts."""
    import torch

    from hai_llm.layout import build_layout
    from hai_llm.parallel.collective_trace import CollectiveRecorder
    from hai_llm.runtime import build_runtime
    from hai_llm.train.trainer import Trainer

    torch.set_default_device("meta")
    rec = CollectiveRecorder()  # records every call (with its tensors' devices) before issuing it
    try:
        with rec:
            for cfg, resume_to in cases:
                tr = Trainer(cfg, runtime=build_runtime(cfg, build_layout(cfg, world)))
                for r in tr.fit():
                    assert r.loss == r.loss and not r.skipped, (cfg.parallel, r)
                if resume_to:
                    cfg2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=resume_to))
                    tr = Trainer(cfg2, runtime=build_runtime(cfg2, build_layout(cfg2, world)))
                    assert tr.step == cfg.train.steps, "the checkpoint was not resumed"
                    tr.fit()
    finally:
        torch.set_default_device(None)
        # NCCL takes only tensors on the rank's own device: every one must be on the model's
        # (a meta one, created without device=, fails here if gloo did not already reject it)
        for r in rec.traces.get(rank, []):
            bad = [d for d in r.devices if d != "cpu"]
            assert not bad, f"collective #{r.index} {r.op} {r.shapes} got tensors on {bad}, expected cpu"
    calls: dict[str, int] = {}
    for r in rec.traces.get(rank, []):
        calls[r.op] = calls.get(r.op, 0) + 1
    return calls


@pytest.mark.dist
def test_pipeline_with_expert_parallel_on_the_model_device(corpus_dir, tmp_path):
    """pp2 x dp2 x ep2 DualPipe: P2P receive buffers, counts, loss vectors, ZeRO over the copy
    unions, save with EMA and resume. Then, in the same 4 ranks, dp2 x sp2 with ep4 over 2
    virtual nodes of 2 in bf16: sequence-parallel shards and the hierarchical (node-aware)
    all-to-all's intra-/inter-node buffers."""
    cases = [(_cfg(corpus_dir, tmp_path / "pp2", 1, global_batch=8, ema=0.5, nprocs=4, pp=2, dp=2, ep=2,
                   schedule="dualpipe"), 2),
             (_cfg(corpus_dir, tmp_path / "sp2", 1, precision="bf16", nprocs=4, dp=2, sp=2, ep=4,
                   gpus_per_node=2, transport="hierarchical",
                   model=["n_expert_groups=2", "n_limited_groups=1"]), 0)]  # a group per node
    calls = run_ranks(placement_rank, 4, cases, timeout=300)[0]
    assert {"isend", "irecv", "all_to_all_single", "reduce_scatter_single", "all_gather_single"} <= set(calls), calls


@pytest.mark.dist
def test_zero_and_expert_parallel_on_the_model_device(corpus_dir, tmp_path):
    """dp2 x ep2 (ZeRO-1 over dp2, expert all-to-alls) with an EMA, saved and resumed."""
    cases = [(_cfg(corpus_dir, tmp_path / "ep2", 1, ema=0.5, nprocs=2, dp=2, ep=2), 2)]
    calls = run_ranks(placement_rank, 2, cases, timeout=300)[0]
    assert {"all_to_all_single", "reduce_scatter_single", "all_gather_single", "all_reduce"} <= set(calls), calls


# ----------------------------------------------------------------------------- no spawn
def _node_cfg(tmp_path, gpn):
    return layout_config(str(tmp_path), str(tmp_path), parallel=dict(nprocs=1, dp=8, ep=4, gpus_per_node=gpn))


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives one of 8 ranks on one 8-GPU node."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("HAI_LLM_SIMULATED", raising=False)
    return monkeypatch


def test_gpus_per_node_auto_takes_torchruns_node(tmp_path, torchrun_env):
    from hai_llm.launch.ranks import check_layout

    layout = check_layout(_node_cfg(tmp_path, 0))
    assert layout.dims.gpus_per_node == 8 and layout.dims.n_nodes == 1
    assert check_layout(_node_cfg(tmp_path, 8)).dims.gpus_per_node == 8  # explicit and equal: fine
    torchrun_env.setenv("LOCAL_WORLD_SIZE", "4")  # 2 nodes of 4
    assert check_layout(_node_cfg(tmp_path, 0)).dims.n_nodes == 2


def test_gpus_per_node_mismatch_with_torchrun_is_refused(tmp_path, torchrun_env):
    from hai_llm.launch.ranks import check_layout

    with pytest.raises(ValueError, match=r"parallel\.gpus_per_node=4 but torchrun runs 8 ranks per node "
                                         r"\(LOCAL_WORLD_SIZE=8\): set parallel\.gpus_per_node=0"):
        check_layout(_node_cfg(tmp_path, 4))


def test_gpus_per_node_of_simulated_ranks(tmp_path, monkeypatch):
    """Simulated ranks (and torchrun's variables inside them, HAI_LLM_SIMULATED set) keep the
    configured virtual nodes; auto is one 8-GPU node."""
    from hai_llm.layout.layout import DEFAULT_GPUS_PER_NODE, resolve_gpus_per_node

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_gpus_per_node(0) == DEFAULT_GPUS_PER_NODE == 8
    assert resolve_gpus_per_node(4) == 4
    assert resolve_gpus_per_node(4, {"LOCAL_WORLD_SIZE": "8", "HAI_LLM_SIMULATED": "1"}) == 4
    for bad in (-1, True, "4"):
        with pytest.raises(ValueError, match="parallel.gpus_per_node"):
            resolve_gpus_per_node(bad, {})


def test_parallel_groups_keep_virtual_nodes_and_follow_torchrun(monkeypatch):
    """configs/parallel/*.yaml: virtual nodes when simulated, the real node under torchrun."""
    from omegaconf import OmegaConf

    from hai_llm.config.load import config_dir
    from hai_llm.config.schema import ParallelConfig

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for name, virtual in (("sim8", 4), ("dp4_sp2_ep4", 4), ("dp2_sp2", 2)):
        yaml = OmegaConf.load(config_dir() / "parallel" / f"{name}.yaml")
        node = OmegaConf.merge(OmegaConf.structured(ParallelConfig), yaml)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert OmegaConf.to_object(node).gpus_per_node == virtual, name
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        assert OmegaConf.to_object(node).gpus_per_node == 8, name
