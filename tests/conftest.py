"""Shared fixtures of the model / training / config tests.

* ``corpus_dir``: a small prepared corpus (byte tokenizer, ~24 KB of this repository's own
  model source text), built once per session in a temp folder, so no test touches the
  stdlib cache in ``data_cache/``.
* ``tiny_args``: the ``tiny`` model config (``configs/model/tiny.yaml``).
* ``make_config``: ``helpers.fast_config`` bound to ``corpus_dir``: a validated :class:`Config`
  for fast CPU training (tiny model, seq_len 32, global_batch 4, micro_batch 2, 3 steps, no
  wandb / progress bar / plot), taking dotted overrides such as
  ``make_config(tmp_path, "train.steps=6", "train.ema_decay=0.9")``.

Helpers shared by several test files live in ``helpers.py``; markers (``slow``, ``dist``) and
warning filters are registered once, in pytest.ini.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import fast_config  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]

# Two cores are shared by several processes: one intra-op thread keeps timings stable and
# the float reductions deterministic.
torch.set_num_threads(1)


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


@pytest.fixture
def make_config(corpus_dir):
    def make(out_dir, *overrides: str):
        return fast_config(out_dir, corpus_dir, *overrides)

    return make
