"""A checkpoint written under one layout resumes under another and continues exactly
(the ZeRO-1 state is saved in global per-parameter coordinates): dp2 x sp1 -> one
process, and one process -> dp2 x sp2 with a different sharding of every bucket; and it loads
into a plain full model for evaluation or export (``load_weights``)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hai_llm.parallel.spawn import run_ranks
from hai_llm.train.trainer import Trainer
from helpers import fit_rank, layout_config


def _with(cfg, steps, **parallel):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, resume=True),
                               parallel=dataclasses.replace(cfg.parallel, **parallel))


@pytest.mark.dist
def test_resume_across_layouts(corpus_dir, tmp_path):
    base = layout_config(str(corpus_dir), str(tmp_path / "straight"), steps=4)
    # a constant lr: the runs below stop at step 2 and are resumed with train.steps=4, and a cosine
    # schedule keeps the horizon a run started with (2), unlike the straight 4-step run
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, ema_decay=0.5),
                               optim=dataclasses.replace(base.optim, schedule="constant"))
    straight = [r.loss for r in Trainer(base).fit()]

    # dp2 writes step 2; one process continues to step 4
    a = dataclasses.replace(base, train=dataclasses.replace(base.train, out_dir=str(tmp_path / "a")))
    first = run_ranks(fit_rank, 2, _with(a, 2, nprocs=2, dp=2), timeout=300)[0]
    rest = [r.loss for r in Trainer(_with(a, 4)).fit()]
    assert len(rest) == 2
    # rtol 1e-5, not bit-exact: dp2 / dp2 x sp2 run other per-rank shapes and reduction orders
    # than one process (fp32 rounding, ~1e-7); a lost optimizer shard would be off by >= 1e-3
    for x, y in zip(first + rest, straight, strict=True):
        assert abs(x - y) <= 1e-5 * abs(y), (first + rest, straight)

    # one process writes step 2; dp2 x sp2 continues to step 4
    b = dataclasses.replace(base, train=dataclasses.replace(base.train, out_dir=str(tmp_path / "b")))
    first = [r.loss for r in Trainer(_with(b, 2)).fit()]
    rest = run_ranks(fit_rank, 4, _with(b, 4, nprocs=4, dp=2, sp=2), timeout=300)[0]
    for x, y in zip(first + rest, straight, strict=True):
        assert abs(x - y) <= 1e-5 * abs(y), (first + rest, straight)


def test_load_weights_into_a_plain_model(make_config, tmp_path):
    """The evaluation / export path of docs/checkpoints.md: a training checkpoint loads into a
    freshly built full model, bit for bit the trainer's parameters and routing biases (a copy
    of the same fp32 values)."""
    from hai_llm.checkpoint.store import latest_checkpoint, load_weights
    from hai_llm.model.transformer import build_model

    cfg = make_config(tmp_path, "train.steps=2")
    trainer = Trainer(cfg)
    trainer.fit()
    model = build_model(cfg.model, "cpu", seed=999)  # other initial values: all must be overwritten
    load_weights(latest_checkpoint(tmp_path / "checkpoints"), model)
    want = dict(trainer.model.named_parameters())
    got = dict(model.named_parameters())
    assert sorted(got) == sorted(want)
    for name, p in got.items():
        assert torch.equal(p, want[name].detach()), name
    buffers = {n: b for n, b in trainer.model.named_buffers() if n.endswith("gate.bias")}
    assert buffers and all(torch.equal(dict(model.named_buffers())[n], b) for n, b in buffers.items())
