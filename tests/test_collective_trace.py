"""The one collective tracer (hai_llm.parallel.collective_trace) sees every collective of a real
training step, including those that go through ``hai_llm.parallel.comm`` (ZeRO-1's
reduce-scatter / all-gather, sequence parallelism's latent all-gather and its backward
reduce-scatter): ``comm`` looks the torch function up at call time, so the recorder's patch
applies. ONE spawn: 2 gloo ranks, sp=2 (the dp x sp group of ZeRO is the same two ranks)."""
from __future__ import annotations

import pytest

from hai_llm.parallel.spawn import run_ranks
from helpers import layout_config


def traced_train_step(rank: int, world: int, cfg) -> list:
    from hai_llm.layout import build_layout
    from hai_llm.parallel.collective_trace import CollectiveRecorder
    from hai_llm.runtime.mesh import MeshRuntime
    from hai_llm.train.trainer import Trainer

    with CollectiveRecorder() as rec:
        trainer = Trainer(cfg, runtime=MeshRuntime(cfg, build_layout(cfg, world)))
        trainer.train_step()
    return rec.traces.get(rank, [])


@pytest.mark.dist
def test_recorder_sees_zero_and_sequence_parallel_collectives(corpus_dir, tmp_path):
    from hai_llm.parallel.collective_trace import check_consistent

    cfg = layout_config(str(corpus_dir), str(tmp_path), steps=1, global_batch=2, micro_batch=1,
                      parallel=dict(nprocs=2, sp=2))
    traces = dict(enumerate(run_ranks(traced_train_step, 2, cfg, timeout=300)))
    assert check_consistent(traces).ok
    recs = traces[0]
    n_layers = cfg.model.n_layers + cfg.model.n_mtp_layers  # attention blocks per forward
    # sequence parallelism: per micro-batch and attention block, the latent all-gather ([B, L, C])
    # in forward and its reduce-scatter in backward
    sp_gather = [r for r in recs if r.kind == "all_gather_single" and len(r.shapes[0]) == 3]
    sp_scatter = [r for r in recs if r.kind == "reduce_scatter_single" and len(r.shapes[0]) == 3]
    assert len(sp_gather) >= 2 * n_layers and len(sp_scatter) >= 2 * n_layers, (len(sp_gather), len(sp_scatter))
    # ZeRO-1: flat fp32 buckets reduce-scattered, master shards all-gathered back
    zero_scatter = [r for r in recs if r.kind == "reduce_scatter_single" and len(r.shapes[0]) == 1]
    zero_gather = [r for r in recs if r.kind == "all_gather_single" and len(r.shapes[0]) == 1
                   and r.dtype == "torch.float32" and r.shapes[0][0] > 2 * cfg.data.seq_len]
    assert zero_scatter and zero_gather, sorted({(r.op, r.shapes) for r in recs})
    assert all(r.group == (0, 1) for r in sp_gather + zero_scatter)
