"""Checkpoint faults (docs/failures.md): loading runs no code, damaged and mismatched checkpoints
are refused in one line naming the checkpoint and the fix, a full disk keeps the previous
checkpoint, and the run folder is never mixed.

* a legacy (pickle-based DCP) ``.metadata`` that would run code is refused before anything runs
  (a marker file it would create stays absent), and a ``.metadata`` dropped into a new-format
  folder is never read;
* legacy checkpoints written by the former code keep loading (through the allow-list unpickler),
  bit-exact, and the next save converts the run to safetensors + JSON;
* a truncated shard / corrupted ``trainer.json`` names the checkpoint and the previous one;
  following the hint resumes from it;
* ``latest`` must name a ``step_N`` folder inside the checkpoint folder; without it the newest
  complete checkpoint is used;
* ENOSPC during a save (the writer monkeypatched to raise it, here only) says "no space left",
  removes the ``.tmp`` folder and keeps the previous checkpoint, on one rank and on two;
* another model shape is refused naming the ``model.*`` key; a finished run resumed with a
  smaller ``train.steps`` keeps its summary; ``train.resume=false`` on a run folder is refused.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from hai_llm.checkpoint import store as ckpt
from hai_llm.checkpoint.preflight import check_run_folder
from hai_llm.checkpoint.zero_state import dcp_state
from hai_llm.train.trainer import Trainer


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class _Evil:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_legacy(trainer, root, step):
    """A checkpoint exactly as the former store.save_checkpoint wrote it: DCP's default pickle
    format with the trainer state as non-tensor values, then the rename and the pointer."""
    tmp = root / f"step_{step:08d}.tmp"
    state = {"weights": dcp_state(trainer.optimizer, trainer.ema), "buffers": trainer._buffers(),
             "trainer": {**trainer._trainer_state(), "optim_step": float(trainer.optimizer.sharded_state()["step"])}}
    dcp.save(state, checkpoint_id=str(tmp))
    os.replace(tmp, root / f"step_{step:08d}")
    (root / "latest").write_text(f"step_{step:08d}")


# -- code execution ------------------------------------------------------------------------
def test_malicious_metadata_runs_nothing(make_config, tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "run" / "checkpoints"
    bad = root / "step_00000002"
    bad.mkdir(parents=True)
    (bad / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    (bad / "__0_0.distcp").write_bytes(b"")
    (root / "latest").write_text(bad.name)
    cfg = make_config(tmp_path / "run")
    with pytest.raises(ckpt.CheckpointError) as e:
        check_run_folder(cfg)  # before any rank starts
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "system" in msg and "nothing was run" in msg
    assert "train.trust_checkpoint=true" in msg
    with pytest.raises(ckpt.CheckpointError, match="could run code; nothing was run"):
        Trainer(cfg)  # and in the trainer itself
    assert not marker.exists()

    # a .metadata planted in a new-format checkpoint is never read
    good = make_config(tmp_path / "good", "train.steps=2")
    Trainer(good).fit()
    step = tmp_path / "good" / "checkpoints" / "step_00000002"
    (step / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    check_run_folder(dataclasses.replace(good, train=dataclasses.replace(good.train, steps=3)))
    assert Trainer(good).step == 2
    assert not marker.exists()


def test_malicious_legacy_trainer_value_runs_nothing(make_config, tmp_path):
    """DCP's default format stores non-tensor values as torch.save'd pickles, which its own
    planner loads with weights_only=False: ours loads them with weights_only=True."""
    marker = tmp_path / "pwned"
    a = Trainer(make_config(tmp_path / "a", "train.steps=1"))
    a.fit()
    root = tmp_path / "legacy" / "checkpoints"
    root.mkdir(parents=True)
    tmp = root / "step_00000001.tmp"
    state = {"weights": dcp_state(a.optimizer), "buffers": a._buffers(),
             "trainer": {**a._trainer_state(), "optim_step": 1.0, "payload": _Evil(marker)}}
    dcp.save(state, checkpoint_id=str(tmp))
    os.replace(tmp, root / "step_00000001")
    with pytest.raises(ckpt.CheckpointError) as e:
        Trainer(make_config(tmp_path / "legacy", "train.steps=2"))
    msg = str(e.value)
    assert "\n" not in msg and "step_00000001 refused: its value trainer.payload is a pickle" in msg
    assert "posix.system" in msg and "nothing was run" in msg
    assert not marker.exists()


def test_legacy_checkpoint_loads_safely_and_converts(make_config, tmp_path):
    common = ("train.ema_decay=0.9", "optim.schedule=constant")
    a = Trainer(make_config(tmp_path / "a", "train.steps=2", *common))
    a.fit()
    root = tmp_path / "legacy" / "checkpoints"
    root.mkdir(parents=True)
    _write_legacy(a, root, 2)
    assert ckpt.checkpoint_format(root / "step_00000002") == "legacy"
    cfg = make_config(tmp_path / "legacy", "train.steps=4", *common)
    check_run_folder(cfg)
    b = Trainer(cfg)
    assert b.step == 2 and b.sampler.samples_consumed == a.sampler.samples_consumed
    pa, pb = _params(a.model), _params(b.model)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)  # bit-exact: a copy of the saved fp32 values
    assert all(torch.equal(x, y) for x, y in zip(a.ema.state_dict().values(), b.ema.state_dict().values()))
    # the same continuation as from a new-format checkpoint of the same state, bit for bit
    c = Trainer(make_config(tmp_path / "a", "train.steps=4", *common))
    assert [r.loss for r in b.fit()] == [r.loss for r in c.fit()]
    assert ckpt.checkpoint_format(root / "step_00000004") == "safetensors"  # converted by the next save


# -- damaged checkpoints -------------------------------------------------------------------
def test_truncated_or_corrupt_checkpoint_names_it_and_the_previous(make_config, tmp_path):
    Trainer(make_config(tmp_path, "train.steps=4", "train.ckpt_every=2")).fit()
    root = tmp_path / "checkpoints"
    last = root / "step_00000004"
    shard = next(last.glob("*.safetensors"))
    data = shard.read_bytes()
    cfg = make_config(tmp_path, "train.steps=6", "train.ckpt_every=2")

    shard.write_bytes(data[:len(data) // 2])  # an interrupted copy
    for check in (check_run_folder, Trainer):
        with pytest.raises(ckpt.CheckpointError) as e:
            check(cfg)
        msg = str(e.value)
        assert "\n" not in msg and str(last) in msg and "truncated or damaged" in msg
        assert "previous checkpoint step_00000002" in msg and "write step_00000002 into" in msg
    shard.write_bytes(data)

    (last / "trainer.json").write_text('{"format": "hai-llm-checkpoint/2", "step": 4, "trai')
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000004: trainer.json cannot be read .*previous "
                                                   r"checkpoint step_00000002"):
        Trainer(cfg)
    # the hint, followed: resume from the previous one
    shutil.move(last, tmp_path / "bad_step_4")
    (root / "latest").write_text("step_00000002")
    assert Trainer(cfg).step == 2


def test_latest_pointer_and_newest_complete(make_config, tmp_path, capsys):
    Trainer(make_config(tmp_path, "train.steps=4", "train.ckpt_every=2", "train.keep_ckpts=0")).fit()
    root = tmp_path / "checkpoints"
    assert "train.keep_ckpts=0: every checkpoint is kept" in capsys.readouterr().out
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000002", "step_00000004"]
    for name in ("../../elsewhere", "/etc", "step_00000002/../../x"):
        (root / "latest").write_text(name)
        with pytest.raises(ckpt.CheckpointError, match="not a step_N folder inside"):
            ckpt.latest_checkpoint(root)
    (root / "latest").unlink()  # lost pointer: the newest complete checkpoint, said so
    (root / "step_00000006").mkdir()  # an incomplete folder (no trainer.json) is not a checkpoint
    t = Trainer(make_config(tmp_path, "train.steps=5"))
    assert t.step == 4
    assert "resuming from the newest complete checkpoint step_00000004" in capsys.readouterr().out


# -- disk full -----------------------------------------------------------------------------
def _enospc_on_second_save(monkeypatch):
    orig = HuggingFaceStorageWriter.write_data
    calls = []

    def write_data(self, plan, planner):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig(self, plan, planner)

    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", write_data)


def test_disk_full_keeps_previous_checkpoint(make_config, tmp_path, monkeypatch):
    _enospc_on_second_save(monkeypatch)
    cfg = make_config(tmp_path, "train.steps=4", "train.ckpt_every=2")
    with pytest.raises(ckpt.CheckpointError) as e:
        Trainer(cfg).fit()
    msg = str(e.value)
    root = tmp_path / "checkpoints"
    assert "\n" not in msg and msg.startswith("no space left on device while writing checkpoint step 4")
    assert f"the previous checkpoint {root / 'step_00000002'} is kept" in msg
    assert not list(root.glob("*.tmp")) and (root / "latest").read_text() == "step_00000002"
    monkeypatch.undo()
    assert Trainer(cfg).step == 2


def _enospc_rank(rank, world, cfg):
    """dp2: rank 1's writer runs out of space at the second save; every rank must raise the
    same one-line error and the first checkpoint must survive."""
    from hai_llm.layout import build_layout
    from hai_llm.runtime.mesh import MeshRuntime

    if rank == 1:
        orig = HuggingFaceStorageWriter.write_data
        calls = []

        def write_data(self, plan, planner):
            calls.append(1)
            if len(calls) >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return orig(self, plan, planner)

        HuggingFaceStorageWriter.write_data = write_data  # in this spawned test process only
    try:
        Trainer(cfg, runtime=MeshRuntime(cfg, build_layout(cfg, world))).fit()
    except ckpt.CheckpointError as e:
        return str(e)
    return "no error"


@pytest.mark.dist
def test_disk_full_on_one_rank_of_two(corpus_dir, tmp_path):
    from hai_llm.parallel.spawn import run_ranks
    from helpers import layout_config

    cfg = layout_config(str(corpus_dir), str(tmp_path), steps=2, parallel={"nprocs": 2, "dp": 2})
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ckpt_every=1))
    msgs = run_ranks(_enospc_rank, 2, cfg, timeout=300)
    assert all(m.startswith("no space left on device while writing checkpoint step 2") for m in msgs), msgs
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000001"]
    assert not list(root.glob("*.tmp")) and (root / "latest").read_text() == "step_00000001"


# -- mismatched model, finished runs, mixed folders -----------------------------------------
def test_other_model_shape_names_the_key(make_config, tmp_path):
    Trainer(make_config(tmp_path, "train.steps=2")).fit()
    for bad, key in (("model.n_layers=4", "model.n_layers=3 in the checkpoint, 4 now"),
                     ("model.dim=96", "model.dim=64 in the checkpoint, 96 now")):
        cfg = make_config(tmp_path, "train.steps=3", bad)
        for check in (check_run_folder, Trainer):
            with pytest.raises(ckpt.CheckpointError) as e:
                check(cfg)
            assert "\n" not in str(e.value) and key in str(e.value) and "different model shape" in str(e.value)
    # a key that changes no shape may differ (here the routing bias speed)
    assert Trainer(make_config(tmp_path, "train.steps=3", "model.bias_update_speed=0.01")).step == 2
    with pytest.raises(ckpt.CheckpointError, match=r"holds no EMA weights .*train\.ema_decay=0"):
        check_run_folder(make_config(tmp_path, "train.steps=3", "train.ema_decay=0.9"))


def _run(out, corpus_dir, *extra):
    from test_train import _compose, _fast_overrides

    from hai_llm.launch.train import run

    return run(_compose(_fast_overrides(out, corpus_dir, 3) + list(extra)))


def test_finished_run_resumed_with_fewer_steps_keeps_its_summary(tmp_path, corpus_dir, capsys):
    out = tmp_path / "run"
    first = _run(out, corpus_dir)
    saved = json.loads((out / "summary.json").read_text())
    assert math.isfinite(saved["final_loss"]) and saved["final_loss"] == first["final_loss"]
    again = _run(out, corpus_dir, "train.steps=2")
    text = capsys.readouterr().out
    assert "nothing to train: the run in" in text and "already at step 3 and train.steps=2" in text
    assert json.loads((out / "summary.json").read_text()) == saved
    assert again["final_loss"] == saved["final_loss"]


def test_resume_false_on_a_run_folder_is_refused(tmp_path, corpus_dir):
    out = tmp_path / "run"
    _run(out, corpus_dir)
    before = (out / "metrics.jsonl").read_text(), (out / "summary.json").read_text()
    with pytest.raises(ValueError) as e:
        _run(out, corpus_dir, "train.resume=false", "train.steps=2")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"train.resume=false but train.out_dir={out} already holds a run")
    assert "step_00000003" in msg and "metrics.jsonl" in msg and "new train.out_dir" in msg
    assert ((out / "metrics.jsonl").read_text(), (out / "summary.json").read_text()) == before
    assert [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")] == ["step_00000003"]
