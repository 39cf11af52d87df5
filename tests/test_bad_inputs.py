"""Bad inputs give one line naming the key (or the file) and the fix, before any rank starts
(docs/failures.md).

Most checks run in-process, on the function the launcher calls (``to_config`` /
``validate_config``, ``build_layout``, ``check_run_folder``, ``TokenDataset.check_vocab``): fast.
A representative few run ``python -m hai_llm.launch.train`` as a user would and check that
stderr is exactly one ``hai-llm-train: error:`` line and exit code 2, with no traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from hai_llm.checkpoint.preflight import check_run_folder
from hai_llm.data import TokenDataset, prepare_corpus
from hai_llm.layout import build_layout


@pytest.mark.parametrize("override, msg", [
    ("optim.lr=0", r"^optim\.lr must be > 0, got 0\.0: set e\.g\. optim\.lr="),
    ("optim.lr=-1e-3", r"^optim\.lr must be > 0"),
    ("optim.warmup_steps=-1", r"^optim\.warmup_steps must be >= 0 \(0 = no warmup\), got -1"),
    ("train.ckpt_every=-2", r"^train\.ckpt_every must be >= 0 \(0 = checkpoint only at the end\)"),
    ("train.keep_ckpts=-1", r"^train\.keep_ckpts must be >= 1 \(checkpoints kept\) or 0 \(keep all\)"),
    ("train.max_bad_steps=0", r"^train\.max_bad_steps must be >= 1"),
    ("logging.log_every=0", r"^logging\.log_every must be >= 1 \(log every N steps\), got 0"),
    ("logging.wandb=offlne", r"^logging\.wandb must be offline \| online \| disabled, got 'offlne'"),
])
def test_bad_values_name_key_and_fix(make_config, tmp_path, override, msg):
    with pytest.raises(ValueError, match=msg) as e:
        make_config(tmp_path, override)  # to_config -> validate_config
    assert "\n" not in str(e.value)


def test_unknown_transport_fails_in_the_layout(make_config, tmp_path):
    # the choices live in one place (hai_llm.layout.layout.TRANSPORTS, which the transport module
    # imports); the launcher builds the layout before any rank starts, single process included
    from hai_llm.layout.layout import TRANSPORTS

    for world, par in ((1, []), (2, ["parallel.nprocs=2", "parallel.dp=2", "parallel.ep=2"])):
        cfg = make_config(tmp_path, "parallel.transport=bogus", *par)
        with pytest.raises(ValueError, match=r"^parallel\.transport='bogus' is unknown: use one of") as e:
            build_layout(cfg, world)
        assert all(t in str(e.value) for t in TRANSPORTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_gpu(make_config, tmp_path):
    with pytest.raises(ValueError, match=r"^train\.device=cuda but this machine has no usable CUDA device .*"
                                         r"use train\.device=cpu"):
        check_run_folder(make_config(tmp_path, "train.device=cuda"))


def test_out_dir_that_is_a_file_or_not_writable(make_config, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match=rf"^train\.out_dir={f} is a file, not a folder"):
        check_run_folder(make_config(f))
    with pytest.raises(ValueError, match=r"^train\.out_dir=.* is not writable \("):
        check_run_folder(make_config(f / "sub"))  # a file on the way
    if os.geteuid() == 0:  # root ignores permission bits: a pseudo file system refuses it instead
        ro = "/sys/hai-llm-not-writable"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        ro = tmp_path / "ro" / "run"
    with pytest.raises(ValueError, match=rf"^train\.out_dir={ro} is not writable \(.*\): set train\.out_dir to a "
                                         rf"folder you can write to"):
        check_run_folder(make_config(ro))
    (tmp_path / "run" / "checkpoints").parent.mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    with pytest.raises(ValueError, match=r"checkpoints is a file, but train\.out_dir="):
        check_run_folder(make_config(tmp_path / "run"))


@pytest.mark.parametrize("overrides, msg", [
    (["train.max_tokens=-1"], r"^train\.max_tokens must be >= 0 \(0 = off"),
    (["train.batch_ramp_start=4"], r"^train\.batch_ramp_start=4 / train\.batch_ramp_multiple=0 are set but "
                                   r"train\.batch_ramp_tokens=0 \(no ramp\)"),
    (["train.init_optimizer=true"], r"^train\.init_optimizer=true needs train\.init_from"),
    (["train.bias_update=false", "schedules.bias_update_speed.values=[0.001]"],
     r"^schedules\.bias_update_speed=\[0\.001\] has no effect with train\.bias_update=false"),
    (["optim.schedule=deepseek_v3", "optim.decay_start_tokens=256", "optim.decay_tokens=256",
      "optim.final_start_tokens=1024"], r"^optim\.final_lr must be > 0 when optim\.final_start_tokens=1024"),
])
def test_ignored_or_degenerate_keys_fail_with_one_line(make_config, tmp_path, overrides, msg):
    """Keys that would be silently ignored (or give lr 0) with the other keys as set."""
    with pytest.raises(ValueError, match=msg) as e:
        make_config(tmp_path, *overrides)
    assert "\n" not in str(e.value)


# -- data -----------------------------------------------------------------------------------
def _copy(corpus_dir, tmp_path):
    dst = tmp_path / "corpus"
    shutil.copytree(corpus_dir, dst)
    return dst


def test_token_ids_beyond_vocab_in_data_despite_meta(corpus_dir, tmp_path):
    d = _copy(corpus_dir, tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    tokens = np.memmap(d / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r+")
    tokens[1234] = 400  # the model (tiny: vocab_size 320) has no row 400; meta.json is unchanged
    tokens.flush()
    ds = TokenDataset(d)
    assert ds.max_token_id < 320
    with pytest.raises(ValueError, match=rf"tokens\.bin holds token id 400 but model\.vocab_size is 320 \(its "
                                         rf"meta\.json claims the largest id is {ds.max_token_id}\).*model\.vocab_size > 400"):
        ds.check_vocab(320)
    ds.check_vocab(401)


def test_unparsable_meta_json_names_the_file(corpus_dir, tmp_path):
    d = _copy(corpus_dir, tmp_path)
    (d / "meta.json").write_text('{"format_version": 1, "dtype": ')
    with pytest.raises(ValueError, match=rf"^{d / 'meta.json'} is not valid JSON .*re-run hai-llm-prepare --out"):
        TokenDataset(d)
    (d / "meta.json").write_text('{"format_version": 1}')
    with pytest.raises(ValueError, match=rf"^{d / 'meta.json'} lacks dtype, n_tokens"):
        TokenDataset(d)


def test_prepare_counts_replaced_bytes(tmp_path, capsys):
    from hai_llm.launch.prepare import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("fine text \ufffd kept\n", encoding="utf-8")  # a genuine U+FFFD: not counted
    (src / "bad1.txt").write_bytes(b"abc \xff\xfe def \x80\n")  # 3 invalid bytes
    (src / "bad2.txt").write_bytes(b"tail \xe2\x82\n")  # a truncated 3-byte sequence: 2 bytes
    assert main([str(src), "--out", str(tmp_path / "out"), "--pattern", "*.txt"]) == 0
    assert "replaced:  5 undecodable bytes in 2 file(s) by U+FFFD" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["n_bytes_replaced"] == 5 and meta["n_files_with_decode_errors"] == 2


# -- through the launcher, as a user runs it ------------------------------------------------
def _train(tmp_path, corpus_dir, *overrides):
    args = [sys.executable, "-m", "hai_llm.launch.train", "model=tiny", "parallel=single", "train.steps=2",
            "train.global_batch=4", "train.micro_batch=2", "train.device=cpu", f"data.path={corpus_dir}",
            "data.seq_len=32", "logging.wandb=disabled", "logging.progress=false", "logging.plot=false",
            f"hydra.run.dir={tmp_path / 'hydra'}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HAI_LLM_TRACEBACK", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.dist
@pytest.mark.parametrize("overrides, msg", [
    (["logging.log_every=0"], "logging.log_every must be >= 1"),
    (["parallel.nprocs=2", "parallel.dp=2", "parallel.ep=2", "parallel.transport=bogus"],
     "parallel.transport='bogus' is unknown"),
    (["train.out_dir={file}"], "is a file, not a folder"),
    (["train.out_dir={run}", "model.n_layers=4"], "model.n_layers=3 in the checkpoint, 4 now"),
])
def test_launcher_prints_one_line(tmp_path, corpus_dir, overrides, msg):
    (tmp_path / "file").write_text("")
    if any("{run}" in o for o in overrides):  # a finished tiny run to resume with another shape
        done = _train(tmp_path, corpus_dir, f"train.out_dir={tmp_path / 'run'}")
        assert done.returncode == 0, done.stderr[-2000:]
    overrides = [o.format(file=tmp_path / "file", run=tmp_path / "run") for o in overrides]
    r = _train(tmp_path, corpus_dir, *overrides)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("hai-llm-train: error: ") and msg in lines[0], lines
