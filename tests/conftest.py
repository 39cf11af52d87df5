"""Shared fixtures of the model / training / config tests.

* ``corpus_dir``: a small prepared corpus (byte tokenizer, ~24 KB of this repository's own
  model source text), built once per session in a temp folder, so no test touches the
  stdlib cache in ``data_cache/``.
* ``tiny_args``: the ``tiny`` model config (``configs/model/tiny.yaml``).
* ``make_config``: a validated :class:`Config` for fast CPU training (tiny model, seq_len 32,
  global_batch 4, micro_batch 2, 3 steps, no wandb / progress bar / plot), taking dotted
  overrides such as ``make_config(tmp_path, "train.steps=6", "train.ema_decay=0.9")``.

The ``slow`` marker is registered here; deselect with ``-m "not slow"``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]

# Two cores are shared by several processes: one intra-op thread keeps timings stable and
# the float reductions deterministic.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes longer than ~15 s (deselect with -m 'not slow')")
    # float(loss) on a graph tensor (trainer metrics, test comparisons) and DCP saving
    # without a process group are expected here
    config.addinivalue_line("filterwarnings", "ignore:Converting a tensor with requires_grad=True to a scalar")
    config.addinivalue_line("filterwarnings", "ignore:torch.distributed is disabled")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    from hai_llm.data import prepare_corpus

    src = tmp_path_factory.mktemp("corpus_src")
    # a few deterministic documents: the repository's own model sources (always present)
    for f in sorted((REPO / "hai_llm" / "model").glob("*.py")):
        (src / (f.stem + ".txt")).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path_factory.mktemp("corpus") / "prepared"
    prepare_corpus([str(src)], out, tokenizer="byte", pattern="*.txt", max_bytes=24_000)
    return out


@pytest.fixture(scope="session")
def tiny_args():
    from hai_llm.config.load import load_model_args

    return load_model_args("tiny")


def build_config(out_dir: str | os.PathLike, data_path: str | os.PathLike, *overrides: str):
    """A validated Config: tiny model, seq_len 32, global_batch 4, micro_batch 2, 3 steps."""
    from hai_llm.config.load import config_dir
    from hai_llm.config.schema import Config, to_config

    base = OmegaConf.structured(Config)
    model = OmegaConf.load(config_dir() / "model" / "tiny.yaml")
    fast = OmegaConf.from_dotlist([
        f"data.path={data_path}", "data.seq_len=32",
        "train.steps=3", "train.global_batch=4", "train.micro_batch=2", "train.device=cpu",
        "train.precision=fp32", f"train.out_dir={out_dir}", "train.seed=1234",
        "optim.warmup_steps=2",
        "logging.wandb=disabled", "logging.progress=false", "logging.plot=false",
    ])
    cfg = OmegaConf.merge(base, {"model": model}, fast, OmegaConf.from_dotlist(list(overrides)))
    return to_config(cfg)


@pytest.fixture
def make_config(corpus_dir):
    def make(out_dir, *overrides: str):
        return build_config(out_dir, corpus_dir, *overrides)

    return make
