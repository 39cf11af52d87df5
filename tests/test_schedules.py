"""The training schedules (hai_llm/optim/schedules.py): the paper's values at its token
breakpoints, the trainer applying lr, gamma, lambda and alpha of each step, resume (also after
an explicit extension of the lr schedule) equal to a straight run, the same values under a
parallel layout, and the recipe configs.

Trainer runs use the tiny model on the session corpus: global batch 4 x seq_len 32 = 128
tokens per step, so token breakpoints below are multiples of 128.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from hai_llm.config.schema import OptimConfig, ParallelConfig, register_configs, to_config
from hai_llm.optim.schedules import LRSchedule, Piecewise, TrainingSchedule, lr_at
from hai_llm.parallel.spawn import run_ranks
from helpers import fast_config

TOK = 128  # tokens per step of make_config's runs (4 x 32)


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from hai_llm.config.load import config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=list(overrides)))


# =========================================================================================
# The paper's numbers (DeepSeek-V3 report §4.2, docs/deepseek_v3.md#training-recipe)
# =========================================================================================
def test_recipe_config_has_the_papers_schedules_at_their_breakpoints():
    cfg = _compose("recipe=deepseek_v3", "model=deepseek_v3_671b")
    o = cfg.optim
    sched = TrainingSchedule.start(cfg)
    T = 1e12
    # the four lr phases add up to the 14.8T tokens of pre-training
    assert o.decay_start_tokens + o.decay_tokens + 333e9 == o.final_start_tokens and o.final_start_tokens + 167e9 == 14.8 * T
    lr = lambda step, tokens: sched.at(step, tokens).lr  # noqa: E731
    # warm-up: linear over the first 2K steps, whatever the tokens
    assert lr(0, 0) == 2.2e-4 / 2000 and lr(999, 0) == 2.2e-4 * 1000 / 2000 and lr(1999, 0) == 2.2e-4
    # constant 2.2e-4 until 10T tokens (exactly)
    assert lr(2000, 0) == lr(100_000, 10 * T - 1) == 2.2e-4
    # cosine over 4.3T: its first value is 2.2e-4 up to rounding of floor + (lr - floor), its middle
    # the mean of the two ends, its end exactly the floor 2.2e-5 (= 0.1 x 2.2e-4)
    assert lr(100_000, 10 * T) == pytest.approx(2.2e-4, rel=1e-15)
    assert lr(100_000, 12.15 * T) == pytest.approx((2.2e-4 + 2.2e-5) / 2, rel=1e-15)
    assert lr(100_000, 14.3 * T) == o.lr * o.min_lr_ratio == pytest.approx(2.2e-5, rel=1e-15)
    # 2.2e-5 for 333B tokens, then 7.3e-6 for the last 167B
    assert lr(200_000, 14.633 * T - 1) == o.lr * o.min_lr_ratio
    assert lr(200_000, 14.633 * T) == lr(235_000, 14.8 * T) == 7.3e-6
    # gamma 0.001 for the first 14.3T tokens then 0; lambda 0.3 for the first 10T then 0.1; alpha 1e-4
    at = lambda tokens: sched.at(5000, tokens)  # noqa: E731
    assert (at(0).bias_update_speed, at(14.3 * T - 1).bias_update_speed, at(14.3 * T).bias_update_speed) == (0.001, 0.001, 0.0)
    assert (at(0).mtp_lambda, at(10 * T - 1).mtp_lambda, at(10 * T).mtp_lambda, at(14.8 * T).mtp_lambda) == (0.3, 0.3, 0.1, 0.1)
    assert {at(t).seq_aux_alpha for t in (0, 10 * T, 14.8 * T)} == {1e-4}
    assert cfg.data.seq_len == 4096 and cfg.optim.moments_dtype == "bfloat16"


def test_recipe_reaches_14_8t_tokens_within_its_steps():
    """train.max_tokens=14.8e12 ends the recipe's run at the first step reaching 14.8T tokens and
    train.steps is only a cap above it: on the paper's layout (PP16 x DP128, DualPipe, one
    sequence per micro-batch: granularity 256, ramp from 4096) and with the recipe's own start
    3072 in multiples of 1 and 256. The step counts are walked step by step here (independent
    of steps_to_tokens' closed form) and equal the ones the recipe's comment gives."""
    from hai_llm.layout import build_layout
    from hai_llm.layout.batch_ramp import BatchRamp
    from hai_llm.train.trainer import steps_to_tokens

    cfg = _compose("recipe=deepseek_v3", "model=deepseek_v3_671b")
    t, seq, goal = cfg.train, cfg.data.seq_len, 14_800_000_000_000
    assert t.max_tokens == goal and (t.batch_ramp_start, t.global_batch, seq) == (3072, 15360, 4096)
    paper = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch=1, batch_ramp_start=4096),
                                parallel=ParallelConfig(pp=16, dp=128, ep=64, schedule="dualpipe"))
    lay = build_layout(paper, 2048)
    assert lay.ramp.multiple == 256
    ramps = {"paper layout": (lay.batch_at, 241_458)}
    for q, want in ((1, 242_785), (256, 243_099)):
        ramps[f"3072 in multiples of {q}"] = (BatchRamp(3072, 15360, t.batch_ramp_tokens, q).batch_at, want)
    for name, (batch_at, want) in ramps.items():
        n = steps_to_tokens(batch_at, t.global_batch, seq, goal, cap=t.steps)
        tokens = []
        done = 0
        for _ in range(n):
            done += batch_at(done) * seq
            tokens.append(done)
        assert n == want < t.steps and tokens[-1] >= goal > tokens[-2], name
    # without a ramp the constant batch needs 235,240 steps, the count the recipe once used
    assert steps_to_tokens(lambda _: 15360, 15360, seq, goal, cap=t.steps) == 235_240


def test_context_extension_recipes_have_the_reports_yarn_settings():
    for name, seq, batch in (("deepseek_v3_yarn_32k", 32768, 1920), ("deepseek_v3_yarn_128k", 131072, 480)):
        cfg = _compose(f"recipe={name}", "model=deepseek_v3_671b")
        m = cfg.model
        assert (m.original_seq_len, m.rope_factor, m.beta_slow, m.beta_fast, m.mscale) == (4096, 40.0, 1, 32, 1.0)
        assert m.yarn_active and cfg.data.seq_len == m.max_seq_len == seq and cfg.train.global_batch == batch
        # sqrt(1/t) = 0.1 ln s + 1 multiplies both q and k: the softmax scale gets its square
        assert m.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-15)
        assert (cfg.optim.schedule, cfg.optim.lr, cfg.train.steps) == ("constant", 7.3e-6, 1000)
        # the same tokens per step as pre-training at the full batch: 15360 x 4K
        assert batch * seq == 15360 * 4096


def test_piecewise_and_lr_formulas():
    p = Piecewise((0.3, 0.1, 0.05), (10.0, 20.0))
    assert [p.at(t) for t in (0, 9.99, 10, 19, 20, 1e9)] == [0.3, 0.3, 0.1, 0.1, 0.05, 0.05]
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, schedule="deepseek_v3", decay_start_tokens=100,
                      decay_tokens=200, final_start_tokens=400, final_lr=0.01)
    # warmup beats the tokens; then lr, cosine 0.1 + 0.45 (1 + cos(pi f)), floor, final
    assert [lr_at(s, 0, cfg, t) for s, t in ((0, 500), (1, 500))] == [0.5, 1.0]
    got = [lr_at(9, 0, cfg, t) for t in (0, 99, 150, 200, 300, 399, 400)]
    want = [1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1, 0.1, 0.01]
    assert all(abs(a - b) < 1e-15 for a, b in zip(got, want, strict=True)), got


# =========================================================================================
# The fixed horizon and its explicit extension (issue: resume with a larger train.steps)
# =========================================================================================
def test_extension_stretches_the_rest_of_the_decay_without_a_jump():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, schedule="cosine", extend_schedule=True)
    base = LRSchedule(cfg, 20)
    ext, note = base.resumed(8, 40)
    assert "extended from 20 to 40 steps at step 8" in note
    assert [ext.at(s) for s in range(9)] == [base.at(s) for s in range(9)]  # the past is unchanged
    # from step 8 on the old remainder (12 steps) is stretched over 32: s -> 8 + (s - 8) * 12 / 32
    for s in (8, 16, 24, 39):
        assert ext.at(s) == pytest.approx(lr_at(8 + (s - 8) * 12 / 32, 20, cfg), abs=1e-15)
    assert ext.at(40) == pytest.approx(0.1, abs=1e-15) and ext.at(100) == pytest.approx(0.1, abs=1e-15)
    lrs = [ext.at(s) for s in range(2, 41)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone: no jump back up
    # a second extension composes with the first, and the state round-trips through JSON
    ext2, _ = ext.resumed(30, 60)
    assert [ext2.at(s) for s in range(31)] == [ext.at(s) for s in range(31)]
    assert LRSchedule.from_state(cfg, ext2.state()) == ext2
    # a finished run extended stays at its floor
    done, note = base.resumed(20, 30)
    assert done.at(25) == pytest.approx(0.1, abs=1e-15) and "finished its decay" in note


def test_without_the_option_the_horizon_stays_and_the_user_is_told():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, schedule="cosine")
    base = LRSchedule(cfg, 20)
    same, note = base.resumed(10, 40)
    assert same == base and "optim.extend_schedule=true" in note and "floor lr 0.1" in note
    assert same.at(30) == pytest.approx(0.1, abs=1e-15)
    assert "stops before" in base.resumed(10, 15)[1]
    assert base.resumed(10, 20) == (base, "")
    # schedules without a step horizon are not affected by train.steps at all
    const = LRSchedule(dataclasses.replace(cfg, schedule="constant"), 20)
    assert const.resumed(10, 40) == (const, "")


# =========================================================================================
# The trainer applies every schedule per step; resume equals a straight run
# =========================================================================================
SCHEDULED = [
    "optim.schedule=deepseek_v3", "optim.warmup_steps=1", f"optim.decay_start_tokens={2 * TOK}",
    f"optim.decay_tokens={3 * TOK}", f"optim.final_start_tokens={6 * TOK}", "optim.final_lr=1e-4",
    "schedules.bias_update_speed.values=[0.01,0.0]", f"schedules.bias_update_speed.until_tokens=[{4 * TOK}]",
    "schedules.mtp_lambda.values=[0.3,0.1]", f"schedules.mtp_lambda.until_tokens=[{2 * TOK}]",
    "schedules.seq_aux_alpha.values=[0.01,0.001]", f"schedules.seq_aux_alpha.until_tokens=[{3 * TOK}]",
]


def _biases(model) -> list[torch.Tensor]:
    return [m.gate.bias.clone() for m in model.moe_layers()]


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_applies_each_steps_values_and_resume_is_bit_exact(make_config, tmp_path):
    from hai_llm.train.metrics import read_metrics
    from hai_llm.train.trainer import Trainer

    cfg = make_config(tmp_path / "a", "train.steps=8", *SCHEDULED)
    straight = Trainer(cfg)
    results, values, biases = [], [], [_biases(straight.model)]
    for k in range(8):
        results.append(straight.train_step())
        values.append(straight.step_values)
        biases.append(_biases(straight.model))
        # the values of step k are the schedules at the tokens consumed before it
        assert values[k] == TrainingSchedule.start(cfg).at(k, k * TOK)
        assert values[k].lr == straight.optimizer.param_groups[0]["lr"] == lr_at(k, 8, cfg.optim, k * TOK)
    assert [v.mtp_lambda for v in values] == [0.3] * 2 + [0.1] * 6
    assert [v.seq_aux_alpha for v in values] == [0.01] * 3 + [0.001] * 5
    assert [v.bias_update_speed for v in values] == [0.01] * 4 + [0.0] * 4
    assert values[6].lr == values[7].lr == 1e-4 and values[5].lr == pytest.approx(3e-4)
    # lambda and alpha reached the loss: loss = ce + lambda * mtp + balance (fp32 sums of the
    # logged fp32 terms: a few ulps apart from the float64 recomputation)
    for r, v in zip(results, values):
        assert r.loss == pytest.approx(r.ce + v.mtp_lambda * r.mtp + r.balance, rel=1e-6)
    assert results[3].balance < results[2].balance / 3  # alpha 0.01 -> 0.001 at step 3 (10x smaller)
    # gamma reached the bias step: the routing biases move while gamma > 0, then stop
    moved = [any(not torch.equal(a, b) for a, b in zip(biases[k], biases[k + 1])) for k in range(8)]
    assert moved == [True] * 4 + [False] * 4
    # the model's config was never touched: the trainer sets the weights on the model's own copy
    assert (cfg.model.mtp_lambda, cfg.model.seq_aux_alpha) == (0.3, 1e-4)

    # the same run stopped after step 4 (mid-schedule: lambda and alpha switched, gamma about to)
    cfg_b = make_config(tmp_path / "b", "train.steps=8", *SCHEDULED)
    first = Trainer(cfg_b)
    head = [first.train_step() for _ in range(4)]
    first.save()
    second = Trainer(cfg_b)
    assert (second.step, second.tokens) == (4, 4 * TOK)
    tail = second.fit()
    # bit-exact: same shapes and ops in the same order from bit-identical saved state
    assert [r.loss for r in head + tail] == [r.loss for r in results]
    assert [r.grad_norm for r in head + tail] == [r.grad_norm for r in results]
    for (n, a), (_, b) in zip(_params(second.model).items(), _params(straight.model).items(), strict=True):
        assert torch.equal(a, b), n
    assert all(torch.equal(a, b) for a, b in zip(_biases(second.model), biases[-1]))
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [(r["lr"], r["mtp_lambda"], r["seq_aux_alpha"], r["bias_update_speed"]) for r in rows[-4:]] == \
        [(v.lr, v.mtp_lambda, v.seq_aux_alpha, v.bias_update_speed) for v in values[4:]]


def _lrs(out) -> dict[int, float]:
    """{0-based step: lr} from a run's metrics.jsonl (only the steps ``fit`` logged)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {int(r["step"]) - 1: r["lr"] for r in rows if "lr" in r}


def _cosine(make_config, out, steps, *extra):
    return make_config(out, f"train.steps={steps}", "optim.schedule=cosine", "optim.warmup_steps=2", *extra)


def test_resume_keeps_the_cosine_horizon_and_extends_only_when_asked(make_config, tmp_path, capsys):
    """The README's example: a 12-step run stopped at step 6, resumed with train.steps=24."""
    from hai_llm.train.trainer import Trainer

    t = Trainer(_cosine(make_config, tmp_path / "run", 12))
    for _ in range(6):
        t.train_step()
    t.save()
    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    shutil.copytree(tmp_path / "run", tmp_path / "run3")
    horizon12 = LRSchedule(t.cfg.optim, 12)

    # default: the horizon stays 12 (the lr of steps 6..11 as in the original schedule, the
    # floor after it), and the user is told how to extend instead
    kept = Trainer(_cosine(make_config, tmp_path / "run", 24))
    assert "optim.extend_schedule=true" in capsys.readouterr().out
    kept.fit()
    lrs = _lrs(tmp_path / "run")
    assert sorted(lrs) == list(range(6, 24))
    assert [lrs[s] for s in range(6, 12)] == [horizon12.at(s) for s in range(6, 12)]
    assert [lrs[s] for s in range(12, 24)] == [pytest.approx(3e-4, rel=1e-12)] * 12

    # extended: continuous at step 6 (no jump back to a higher lr), the floor at step 24
    cfg_ext = _cosine(make_config, tmp_path / "run2", 24, "optim.extend_schedule=true", "train.ckpt_every=3")
    straight = Trainer(cfg_ext)
    assert "extended from 12 to 24 steps at step 6" in capsys.readouterr().out
    res_straight = straight.fit()
    lrs = [_lrs(tmp_path / "run2")[s] for s in range(6, 24)]
    assert lrs[0] == horizon12.at(6) and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] > 3e-4 and straight.schedule.lr.at(24) == pytest.approx(3e-4, rel=1e-12)

    # the extended run stopped at step 15 and resumed (the extension comes from the checkpoint)
    cfg3 = _cosine(make_config, tmp_path / "run3", 24, "optim.extend_schedule=true")
    a = Trainer(cfg3)
    head = [a.train_step() for _ in range(9)]
    a.save()
    b = Trainer(cfg3)
    assert b.step == 15 and b.schedule.lr == straight.schedule.lr
    got = head + b.fit()
    assert [r.loss for r in got] == [r.loss for r in res_straight]  # bit-exact
    for (n, x), (_, y) in zip(_params(b.model).items(), _params(straight.model).items(), strict=True):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("override, key", [
    ("schedules.mtp_lambda.values=[0.3,0.1]", "schedules.mtp_lambda: values needs one more entry"),
    ("schedules.bias_update_speed.until_tokens=[5]", "schedules.bias_update_speed.until_tokens is set"),
    ("optim.schedule=deepseek_v3", "optim.schedule=deepseek_v3 needs optim.decay_start_tokens"),
])
def test_bad_schedule_keys_fail_with_one_line(corpus_dir, tmp_path, override, key):
    with pytest.raises(ValueError) as e:
        fast_config(tmp_path, corpus_dir, override)
    assert key in str(e.value) and "\n" not in str(e.value)


# =========================================================================================
# Parallel layouts: the same values, the same training
# =========================================================================================
def schedule_rank_body(rank: int, world: int, cfgs: list) -> list[dict]:
    from hai_llm.layout import build_layout
    from hai_llm.runtime import build_runtime
    from hai_llm.train.trainer import Trainer

    out = []
    for cfg in cfgs:
        t = Trainer(cfg, runtime=build_runtime(cfg, build_layout(cfg, world)))
        losses, values = [], []
        for _ in range(cfg.train.steps):
            losses.append(t.train_step().loss)
            values.append(dataclasses.astuple(t.step_values))
        out.append({"losses": losses, "values": values})
    return out


@pytest.mark.dist
def test_schedules_identical_under_dp2_and_pp2(corpus_dir, tmp_path):
    from hai_llm.config.schema import ParallelConfig
    from hai_llm.train.trainer import Trainer

    def cfg(name, **par):
        c = fast_config(tmp_path / name, corpus_dir, "train.steps=6", "train.micro_batch=1", "train.resume=false",
                        *SCHEDULED)
        return dataclasses.replace(c, parallel=ParallelConfig(**par))

    single = Trainer(cfg("single"))
    ref_losses, ref_values = [], []
    for _ in range(6):
        ref_losses.append(single.train_step().loss)
        ref_values.append(dataclasses.astuple(single.step_values))
    cases = {"dp2": dict(nprocs=2, dp=2), "pp2": dict(nprocs=2, pp=2, schedule="1f1b")}
    per_rank = run_ranks(schedule_rank_body, 2, [cfg(k, **v) for k, v in cases.items()], timeout=600)
    for i, name in enumerate(cases):
        for r in range(2):
            got = per_rank[r][i]
            # the schedules are host arithmetic on (step, tokens), the same on every rank: exact
            assert got["values"] == ref_values, (name, r)
            # not bit-exact: other per-rank shapes round differently by a few fp32 ulps per step
            # (tests/test_batch_ramp.py explains the 1e-5 bound); a step with the wrong lambda or
            # alpha moves the loss by > 1e-3 here (lambda 0.3 vs 0.1 of an MTP loss of ~5)
            for s, (a, b) in enumerate(zip(got["losses"], ref_losses, strict=True)):
                assert abs(a - b) <= 1e-5 * abs(b), (name, r, s, got["losses"], ref_losses)
