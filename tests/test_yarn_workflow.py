"""The long-context extension workflow (docs/training_recipe.md#long-context-extension):
pre-train at a short context, then continue from that checkpoint in a NEW run folder at a longer
``data.seq_len`` with YaRN (``train.init_from``), twice, with the recipe configs of each stage
(configs/recipe/small_yarn_*.yaml: 64 -> 512 -> 2048 tokens, the paper's x1 -> x8 -> x32).

The tiny model runs the stages here with fewer steps and sequences than the documented
small-model commands; every YaRN and length setting comes from the stage configs themselves.
"""
from __future__ import annotations

import math

import pytest
import torch

from hai_llm.config.schema import register_configs, to_config
from hai_llm.model.layers import rope_cos_sin


def _stage(corpus_dir, out, recipe: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    from hai_llm.config.load import config_dir

    register_configs()
    fast = ["model=tiny", "parallel=single", f"recipe={recipe}", f"data.path={corpus_dir}", "train.device=cpu",
            "train.precision=fp32", f"train.out_dir={out}", "logging.wandb=disabled", "logging.progress=false",
            "logging.plot=false"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=fast + list(overrides)))


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _buffers(model) -> dict:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("gate.bias")}


@pytest.fixture(scope="module")
def stage0(corpus_dir, tmp_path_factory):
    """Pre-training at 64 tokens, YaRN off (2 steps of 8 sequences)."""
    from hai_llm.train.trainer import Trainer

    out = tmp_path_factory.mktemp("stage0")
    t = Trainer(_stage(corpus_dir, out, "small_yarn_pretrain", "train.steps=2", "train.global_batch=8"))
    t.fit()
    return out, t


def test_stage_configs_are_the_reports_yarn_at_proportional_lengths(corpus_dir, tmp_path):
    pre = _stage(corpus_dir, tmp_path, "small_yarn_pretrain").model
    assert not pre.yarn_active and pre.max_seq_len == pre.original_seq_len == 64
    for recipe, length in (("small_yarn_stage1", 512), ("small_yarn_stage2", 2048)):
        cfg = _stage(corpus_dir, tmp_path, recipe)
        m = cfg.model
        assert cfg.data.seq_len == m.max_seq_len == length and m.yarn_active
        # the report's YaRN: s = 40, alpha (beta_slow) = 1, beta (beta_fast) = 32, and
        # sqrt(1/t) = 0.1 ln s + 1 on q and k, i.e. its square on the softmax scale
        assert (m.original_seq_len, m.rope_factor, m.beta_slow, m.beta_fast, m.mscale) == (64, 40.0, 1, 32, 1.0)
        assert m.softmax_scale == pytest.approx(m.qk_head_dim ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-15)
        # the paper's lengths relative to pre-training (x8, x32) and its constant tokens per step
        assert length // 64 in (8, 32) and cfg.train.global_batch * length == 32 * 64


def test_two_stage_extension_loads_stage_weights_at_step_0(stage0, corpus_dir, tmp_path, capsys):
    from hai_llm.train.trainer import Trainer

    out0, t0 = stage0
    # stage 1: a new run folder, weights (and routing biases) from stage 0's run folder
    s1_dir = tmp_path / "stage1"
    cfg1 = _stage(corpus_dir, s1_dir, "small_yarn_stage1", f"train.init_from={out0}", "train.steps=1",
                  "train.global_batch=2", "train.ckpt_every=1")
    t1 = Trainer(cfg1)
    assert "initialised weights from" in capsys.readouterr().out
    assert t1.step == 0 and t1.tokens == 0
    p0, p1 = _params(t0.model), _params(t1.model)
    assert p0.keys() == p1.keys() and all(torch.equal(p0[n], p1[n]) for n in p0)  # bit-identical weights
    b0, b1 = _buffers(t0.model), _buffers(t1.model)
    assert b0.keys() == b1.keys() and all(torch.equal(b0[n], b1[n]) for n in b0) and any(b.abs().sum() > 0 for b in b0.values())
    # weights only: the optimizer starts fresh (step 0, zero moments)
    st = t1.optimizer.sharded_state()
    assert st["step"] == 0.0 and all(not v[0].any() for k, v in st.items() if k.startswith("exp_avg"))
    # the RoPE tables follow the new config (YaRN on), not the checkpoint
    cos, sin = rope_cos_sin(t1.model.args)
    assert torch.equal(t1.model.rope_cos, cos) and torch.equal(t1.model.rope_sin, sin)
    assert not torch.allclose(t1.model.rope_cos[:64], t0.model.rope_cos[:64])  # the low frequencies are stretched
    r = t1.fit()
    assert len(r) == 1 and math.isfinite(r[0].loss)
    assert (s1_dir / "checkpoints" / "latest").is_file()
    assert (out0 / "checkpoints" / "latest").read_text().strip() == "step_00000002"  # stage 0 untouched

    # stage 2 from stage 1, optimizer state included (train.init_optimizer)
    cfg2 = _stage(corpus_dir, tmp_path / "stage2", "small_yarn_stage2", f"train.init_from={s1_dir}/checkpoints",
                  "train.init_optimizer=true", "train.steps=1")
    t2 = Trainer(cfg2)
    p1 = _params(t1.model)
    assert all(torch.equal(p1[n], q) for n, q in _params(t2.model).items())
    s1, s2 = t1.optimizer.sharded_state(), t2.optimizer.sharded_state()
    assert s2["step"] == s1["step"] == 1.0
    assert all(torch.equal(s1[k][0], s2[k][0]) for k in s1 if k != "step")
    assert t2.step == 0 and t2.model.args.max_seq_len == 2048
    r2 = t2.fit()
    assert math.isfinite(r2[0].loss)

    # a stage run that already has checkpoints resumes them; init_from is not applied again
    capsys.readouterr()
    again = Trainer(_stage(corpus_dir, s1_dir, "small_yarn_stage1", f"train.init_from={out0}", "train.steps=1",
                           "train.global_batch=2"))
    assert again.step == 1 and "initialised" not in capsys.readouterr().out


def test_init_from_errors_name_the_key(stage0, corpus_dir, tmp_path):
    from hai_llm.train.trainer import Trainer

    out0, _ = stage0
    with pytest.raises(ValueError, match=r"train.init_from=.*is not a checkpoint"):
        Trainer(_stage(corpus_dir, tmp_path / "a", "small_yarn_stage1", f"train.init_from={tmp_path}/nothing"))
    with pytest.raises(ValueError) as e:  # another model shape
        Trainer(_stage(corpus_dir, tmp_path / "b", "small_yarn_stage1", f"train.init_from={out0}", "model.dim=32"))
    assert str(e.value).startswith(f"train.init_from={out0}: cannot load") and "model config must match" in str(e.value)
