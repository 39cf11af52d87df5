"""The batch-size ramp (DeepSeek-V3: 3072 -> 15360 sequences over the first 469B tokens).

* the formula: integer-exact values against a rational reference, the paper's end points, the
  rounding rule (multiples of q, never below the start, never above the end);
* the sampler: per-step batches take consecutive, disjoint global samples on every dp rank,
  and a resume in the middle continues at the exact sample;
* one process: a ramped run equals a hand-built loop over the same per-step batches, bit for
  bit (same shapes, same ops, same order), losses and every parameter;
* resume in the middle of the ramp equals the straight run bit for bit (tokens consumed, data
  position, optimizer state all come back), and ``metrics.jsonl`` logs ``global_batch`` and
  ``tokens``;
* layouts: dp2, pp2 DualPipe (n_micro 4 -> 8 -> 12, one executor per count), pp2 1F1B and pp2
  1F1B x dp2 x ep2 equal the single-process ramped run within float32 tolerances;
* a ramp that does not fit DualPipe fails in ``build_layout`` (the launcher calls it before any
  rank starts) with one line naming the key.

The ramped test config: tiny model, seq_len 32, micro_batch 1, ramp 4 -> 12 sequences over 640
tokens in multiples of 4: steps of 4, 4, 4, 8, 12, 12 sequences (tokens before each step 0,
128, 256, 384, 640, 1024), so the micro-batch count changes twice on every layout.
"""
from __future__ import annotations

import dataclasses
import json
from fractions import Fraction

import pytest
import torch

from hai_llm.layout import build_layout
from hai_llm.layout.batch_ramp import BatchRamp
from hai_llm.parallel.spawn import run_ranks
from helpers import layout_config

STEPS = 6
SEQ = 32
BATCHES = [4, 4, 4, 8, 12, 12]  # by hand from the formula: see the module docstring
PAPER = dict(start=3072, end=15360, tokens=469_000_000_000)


def _ramp_cfg(data, out, steps=STEPS, **parallel):
    cfg = layout_config(str(data), str(out), steps=steps, parallel=parallel, global_batch=12, micro_batch=1,
                        seq_len=SEQ)
    cfg.train = dataclasses.replace(cfg.train, batch_ramp_start=4, batch_ramp_tokens=640, batch_ramp_multiple=4)
    return cfg


def _params(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _run(trainer, steps: int) -> dict:
    """Per-step losses, norms, batches and tokens; end parameters, expert offsets and biases."""
    rs = [trainer.train_step() for _ in range(steps)]
    return {"losses": [r.loss for r in rs], "norms": [r.grad_norm for r in rs],
            "batches": [r.global_batch for r in rs], "tokens": [r.tokens for r in rs],
            "params": _params(trainer), "offsets": trainer.optimizer.expert_row_offsets(),
            "bias": {n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("gate.bias")}}


# ----------------------------------------------------------------------------- the formula
def _reference(r: BatchRamp, t: int) -> int:
    """The rule in rationals: the line start + (end-start) * t/R, floored to a sequence, then to
    a multiple of q; end from R tokens on."""
    if t >= r.tokens:
        return r.end
    raw = int(Fraction(r.start) + Fraction(r.end - r.start) * Fraction(t, r.tokens))  # floor (>= 0)
    return raw // r.multiple * r.multiple


def test_ramp_values_exact_in_tokens():
    r = BatchRamp(multiple=1, **PAPER)
    R = PAPER["tokens"]
    assert r.batch_at(0) == 3072 and r.batch_at(R) == 15360 and r.batch_at(10 * R) == 15360
    assert r.batch_at(R // 2) == 9216  # half way: 3072 + 12288 / 2, exactly
    assert r.batch_at(R - 1) == 15359  # one token short of the end: floored, not rounded up
    q = BatchRamp(multiple=256, **PAPER)  # PP16 x DP128 DualPipe granularity with micro_batch 1
    assert q.batch_at(R - 1) == 15104 and q.batch_at(R) == 15360
    g = torch.Generator().manual_seed(0)
    for ramp in (r, q, BatchRamp(start=4, end=12, tokens=640, multiple=4)):
        ts = [0, 1, ramp.tokens - 1, ramp.tokens] + torch.randint(0, ramp.tokens, (200,), generator=g).tolist()
        for t in sorted(ts):
            b = ramp.batch_at(t)
            assert b == _reference(ramp, t), (ramp, t)
            assert ramp.start <= b <= ramp.end and (b % ramp.multiple == 0 or b == ramp.end)
        vals = [ramp.batch_at(t) for t in sorted(ts)]
        assert vals == sorted(vals)  # non-decreasing in tokens
    # the steps of the test config, and the paper's ramp length at 4K tokens per sequence
    small = BatchRamp(start=4, end=12, tokens=640, multiple=4)
    assert list(small.steps(SEQ)) == [(0, 4), (128, 4), (256, 4), (384, 8)]
    steps = list(q.steps(4096))
    consumed = steps[-1][0] + steps[-1][1] * 4096
    assert steps[0] == (0, 3072) and consumed >= R > steps[-1][0]
    assert all(t1 == t0 + b0 * 4096 for (t0, b0), (t1, _) in zip(steps, steps[1:]))


def test_layout_ramp_plan(corpus_dir, tmp_path):
    """The layout is the one authority: the step's batch from tokens, its n_micro and schedule."""
    cfg = _ramp_cfg(corpus_dir, tmp_path, pp=2, schedule="dualpipe")
    lay = build_layout(cfg, 2)
    got, t = [], 0
    for _ in range(STEPS):
        b = lay.batch_at(t)
        step = lay.for_batch(b)
        got.append((b, step.n_micro, step.schedule.n_micro, step.local_batch))
        t += b * SEQ
    assert got == [(b, b, b, b) for b in BATCHES]  # dp 1, micro_batch 1: n_micro = batch
    assert lay.for_batch(12) is lay and lay.ramp.describe(SEQ).endswith("(4 steps at seq_len 32)")


# ----------------------------------------------------------------------------- the sampler
def test_sampler_position_exact(corpus_dir):
    from hai_llm.data import SequenceSampler, TokenDataset

    ds = TokenDataset(corpus_dir)
    kw = dict(seq_len=SEQ, global_batch=12, seed=5, extra_tokens=2)
    one = SequenceSampler(ds, **kw)
    ranks = [SequenceSampler(ds, dp_rank=r, dp_world=2, **kw) for r in range(2)]
    whole = one.global_samples(0, sum(BATCHES))
    pos = 0
    for b in BATCHES:
        step = one.next_batch(b)
        assert torch.equal(step, whole[pos:pos + b])  # consecutive, no gap, no repeat
        assert torch.equal(torch.cat([s.next_batch(b) for s in ranks]), step)  # dp slices
        pos += b
        assert one.samples_consumed == pos == ranks[1].samples_consumed
    # resume after 3 ramp steps (12 samples) continues at sample 12, whatever the next batches
    resumed = SequenceSampler(ds, **kw)
    mid = SequenceSampler(ds, **kw)
    for b in BATCHES[:3]:
        mid.next_batch(b)
    resumed.load_state_dict(mid.state_dict())
    assert torch.equal(torch.cat([resumed.next_batch(b) for b in BATCHES[3:]]), whole[12:])
    with pytest.raises(ValueError, match="multiple of 2"):
        ranks[0].next_batch(5)


# ----------------------------------------------------------------------------- one process
def test_single_process_ramp_equals_hand_built_reference(corpus_dir, tmp_path):
    """The ramped trainer against a loop written here: the batches listed by hand, the samples
    taken by position, the same runtime calls and optimizer calls in the trainer's order, and
    the learning rate the trainer used (the lr schedule is not under test). Bit-exact."""
    from hai_llm.optim import set_lr
    from hai_llm.train.trainer import Trainer

    cfg = _ramp_cfg(corpus_dir, tmp_path / "ramp")
    ramped = Trainer(cfg)
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_ramp_tokens=0,
                                                               out_dir=str(tmp_path / "ref")))
    ref = Trainer(plain)  # same seed: same initial weights and sample order
    assert all(torch.equal(a, b) for a, b in zip(_params(ramped).values(), _params(ref).values()))
    pos = 0
    for s, b in enumerate(BATCHES):
        r = ramped.train_step()
        batch = ref.sampler.global_samples(pos, b)
        pos += b
        ref.optimizer.zero_grad(set_to_none=True)
        tot = ref.rt.forward_backward(ref.model, batch, b // cfg.train.micro_batch, ref._autocast)
        norm = float(ref.optimizer.reduce_gradients())
        ref.optimizer.clip(norm, cfg.optim.grad_clip)
        set_lr(ref.optimizer, ramped.optimizer.param_groups[0]["lr"])
        ref.optimizer.step()
        ref.model.update_expert_bias(tot["counts"].float())
        assert (r.global_batch, r.tokens) == (b, pos * SEQ)
        assert r.loss == float(tot["loss"]) and r.grad_norm == norm, (s, r.loss, float(tot["loss"]))
    assert ramped.sampler.samples_consumed == pos == sum(BATCHES)
    for (n, a), (_, b) in zip(_params(ramped).items(), _params(ref).items(), strict=True):
        assert torch.equal(a, b), n


def test_resume_mid_ramp_equals_straight_run(corpus_dir, tmp_path):
    from hai_llm.train.trainer import Trainer

    straight_cfg = _ramp_cfg(corpus_dir, tmp_path / "straight")
    straight = Trainer(straight_cfg)
    results = straight.fit()
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rows = [m for m in metrics if "global_batch" in m]
    assert [m["global_batch"] for m in rows] == BATCHES
    assert [m["tokens"] for m in rows] == [SEQ * sum(BATCHES[:i + 1]) for i in range(STEPS)]

    cfg = _ramp_cfg(corpus_dir, tmp_path / "resumed")
    first = Trainer(cfg)
    head = [first.train_step() for _ in range(3)]  # stops after 256+128 tokens: the next step is 8
    first.save()
    cfg.train = dataclasses.replace(cfg.train, resume=True)
    second = Trainer(cfg)
    assert (second.step, second.tokens, second.sampler.samples_consumed) == (3, 12 * SEQ, 12)
    tail = second.fit()
    got = head + tail
    assert [r.global_batch for r in got] == BATCHES == [r.global_batch for r in results]
    assert [r.loss for r in got] == [r.loss for r in results]  # bit-exact
    assert [r.grad_norm for r in got] == [r.grad_norm for r in results]
    for (n, a), (_, b) in zip(_params(second).items(), _params(straight).items(), strict=True):
        assert torch.equal(a, b), n
    assert second.tokens == straight.tokens == SEQ * sum(BATCHES)


# ----------------------------------------------------------------------------- layouts
def ramp_rank_body(rank: int, world: int, cfgs: list, stop_after: dict | None = None) -> list[dict]:
    """Train each config with its layout; ``stop_after[i] = k``: only k steps, then a checkpoint."""
    from hai_llm.runtime import build_runtime
    from hai_llm.train.trainer import Trainer

    out = []
    for i, cfg in enumerate(cfgs):
        rt = build_runtime(cfg, build_layout(cfg, world))
        t = Trainer(cfg, runtime=rt)
        res = _run(t, (stop_after or {}).get(i, cfg.train.steps))
        if i in (stop_after or {}):
            t.save()
        res["executors"] = sorted(getattr(rt, "executors", {}))
        out.append(res)
    return out


def _stitched_params(results: list[dict]) -> dict:
    """Every parameter of a layout: each stage's from the rank holding it, experts assembled
    from their ep slices by global row offset."""
    full: dict = {}
    for r in results:
        for n, p in r["params"].items():
            if n in r["offsets"]:
                off, rows = r["offsets"][n]
                full.setdefault(n, torch.zeros((rows,) + tuple(p.shape[1:])))[off:off + p.shape[0]] = p
            else:
                full.setdefault(n, p)
    return full


@pytest.fixture(scope="module")
def single(corpus_dir, tmp_path_factory):
    from hai_llm.train.trainer import Trainer

    return _run(Trainer(_ramp_cfg(corpus_dir, tmp_path_factory.mktemp("single"))), STEPS)


def _check_layout(name: str, results: list[dict], ref: dict) -> None:
    for r in results:
        assert r["batches"] == BATCHES and r["tokens"] == ref["tokens"], name
        # Not bit-exact: other per-rank shapes (stage splits, dp/ep token splits) let BLAS round
        # differently, a few fp32 ulps of the loss at step 1 (test_pipeline_runtime measures
        # <= 9e-8 relative); each later step adds last-bit update differences, which Adam's
        # lr * m / (sqrt(v) + eps) amplifies for entries near eps. rtol 1e-5 over 6 steps leaves
        # margin, while a wrong batch, a dropped or repeated micro-batch or a wrong 1/n_micro
        # scale moves the loss by 1e-3 or more.
        for s, (a, b) in enumerate(zip(r["losses"], ref["losses"], strict=True)):
            assert abs(a - b) <= 1e-5 * abs(b), (name, s, r["losses"], ref["losses"])
        for s, (a, b) in enumerate(zip(r["norms"], ref["norms"], strict=True)):
            assert abs(a - b) <= 1e-4 * b, (name, s, r["norms"], ref["norms"])
    params = _stitched_params(results)
    assert set(params) == set(ref["params"]), name
    # parameters after 6 Adam steps of lr 3e-3, no clipping: Adam's lr * m / (sqrt(v) + eps)
    # turns a last-bit difference of a gradient entry near eps into an update difference of up
    # to lr, so parameters drift far more than losses. Measured (AMD EPYC, 2 cores): worst tensor
    # 2.4e-6 (1f1b) .. 5.5e-6 (pp2 x dp2 x ep2) relative, losses <= 2.5e-8, norms <= 3.8e-8.
    # 1e-4 leaves ~20x margin and is still far below one step's update (~lr / |w| ~ 1e-1
    # relative for the 0.02-std weights), i.e. below any wrong batch or micro-batch scale.
    worst, which = max((float((params[n] - p).norm() / p.norm().clamp_min(1e-30)), n)
                       for n, p in ref["params"].items())
    assert worst < 1e-4, (name, which, worst)


@pytest.mark.dist
def test_ramp_layouts_match_single_process(single, corpus_dir, tmp_path):
    cases = {
        "dp2": dict(nprocs=2, dp=2),
        "pp2-dualpipe": dict(nprocs=2, pp=2, schedule="dualpipe"),
        "pp2-1f1b": dict(nprocs=2, pp=2, schedule="1f1b"),
    }
    cfgs = [_ramp_cfg(corpus_dir, tmp_path / k, **v) for k, v in cases.items()]
    # and a DualPipe run stopped in the middle of the ramp (3 steps, 12 of 44 sequences), saved
    cfgs.append(_ramp_cfg(corpus_dir, tmp_path / "stopped", **cases["pp2-dualpipe"]))
    per_rank = run_ranks(ramp_rank_body, 2, cfgs, {3: 3}, timeout=600)
    for i, name in enumerate(cases):
        _check_layout(name, [per_rank[r][i] for r in range(2)], single)
    # DualPipe ran one executor per micro-batch count: the full batch's (12) and the ramp's
    assert per_rank[0][1]["executors"] == [4, 8, 12]
    # ... resumed on ONE process (the checkpoint reshards): the ramp continues at 384 tokens with
    # batch 8, and the run ends where the single-process straight run ends (float32 tolerances:
    # the first 3 steps ran on the pipeline)
    from hai_llm.train.trainer import Trainer

    cfg = _ramp_cfg(corpus_dir, tmp_path / "stopped")
    cfg.train = dataclasses.replace(cfg.train, resume=True)
    resumed = Trainer(cfg)
    assert (resumed.step, resumed.tokens, resumed.sampler.samples_consumed) == (3, 12 * SEQ, 12)
    tail = _run(resumed, STEPS - 3)
    head = per_rank[0][3]
    joined = {k: head[k] + tail[k] for k in ("losses", "norms", "batches", "tokens")}
    joined.update(params=tail["params"], offsets=tail["offsets"])
    _check_layout("pp2-dualpipe stopped + one process", [joined], single)


@pytest.mark.dist
def test_ramp_pp2_dp2_ep2_matches_single_process(single, corpus_dir, tmp_path):
    cfg = _ramp_cfg(corpus_dir, tmp_path / "pp2dp2ep2", nprocs=4, pp=2, dp=2, ep=2, schedule="1f1b")
    per_rank = run_ranks(ramp_rank_body, 4, [cfg], timeout=600)
    _check_layout("pp2-dp2-ep2-1f1b", [per_rank[r][0] for r in range(4)], single)
    assert per_rank[0][0]["executors"] == [2, 4, 6]  # 4, 8, 12 sequences over 2 dp ranks


# ----------------------------------------------------------------------------- start-up errors
@pytest.mark.parametrize("start,expect", [(2, "use train.batch_ramp_start=4"),
                                          (6, "multiple of 4 (train.batch_ramp_multiple)")])
def test_ramp_not_fitting_dualpipe_fails_at_start_up(corpus_dir, tmp_path, start, expect):
    cfg = _ramp_cfg(corpus_dir, tmp_path, pp=2, schedule="dualpipe")
    cfg.train = dataclasses.replace(cfg.train, batch_ramp_start=start)
    with pytest.raises(ValueError) as e:
        build_layout(cfg, 2)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"train.batch_ramp_start={start} ") and expect in msg, msg


def test_bad_ramp_keys_fail_with_one_line(corpus_dir, tmp_path):
    cases = [({"batch_ramp_multiple": 3}, {}, "train.batch_ramp_multiple=3"),  # not a multiple of g=2
             ({"batch_ramp_start": 16}, {}, "train.batch_ramp_start=16 must be in [1"),
             ({}, {"n_micro": 4}, "parallel.n_micro=4 fixes")]
    for train, par, expect in cases:
        cfg = _ramp_cfg(corpus_dir, tmp_path, pp=2, schedule="dualpipe", **par)
        cfg.train = dataclasses.replace(cfg.train, **train)
        with pytest.raises(ValueError) as e:
            build_layout(cfg, 2)
        assert "\n" not in str(e.value) and str(e.value).startswith(expect), str(e.value)


def test_paper_ramp_on_paper_layout_needs_4096_to_start():
    """PP16 x DP128 (2048 ranks) with DualPipe and one sequence per micro-batch: 3072 sequences
    are 24 micro-batches per rank, fewer than DualPipe's 2*pp = 32, so the paper's start does not
    fit that layout and the error names the smallest start that does."""
    from hai_llm.config.load import load_model_args
    from hai_llm.config.schema import Config, ParallelConfig, TrainConfig

    cfg = Config(model=load_model_args("deepseek_v3_671b", []),
                 train=TrainConfig(global_batch=15360, micro_batch=1, batch_ramp_start=3072,
                                   batch_ramp_tokens=PAPER["tokens"]),
                 parallel=ParallelConfig(pp=16, dp=128, ep=64, schedule="dualpipe"))
    cfg.data.seq_len = 4096
    with pytest.raises(ValueError, match=r"at least 4096 .*use train.batch_ramp_start=4096"):
        build_layout(cfg, 2048)
    cfg.train = dataclasses.replace(cfg.train, batch_ramp_start=4096)
    lay = build_layout(cfg, 2048)
    assert lay.ramp.multiple == 256 and lay.for_batch(lay.batch_at(0)).n_micro == 32


# ----------------------------------------------------------------------------- train.max_tokens
def test_max_tokens_stops_at_the_first_step_reaching_it(corpus_dir, tmp_path):
    """Tokens after each ramp step: 128, 256, 384, 640, 1024, ... (BATCHES x 32). max_tokens=600
    ends the run at step 4 (640 >= 600 > 384) although train.steps=20: the last step logs,
    checkpoints and ends the lr horizon (cosine: its shape depends on where the run ends)."""
    from hai_llm.train.trainer import Trainer

    cfg = _ramp_cfg(corpus_dir, tmp_path / "run", steps=20)
    cfg.train = dataclasses.replace(cfg.train, max_tokens=600.0)
    cfg.optim = dataclasses.replace(cfg.optim, schedule="cosine")
    tr = Trainer(cfg)
    assert tr.run_length() == 4 and tr.schedule.lr.horizon == 4
    rs = tr.fit()
    assert [r.global_batch for r in rs] == BATCHES[:4] and rs[-1].tokens == 640 and tr.step == 4
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["tokens"] == 640
    # train.steps first: the cap wins, the horizon is train.steps
    cfg.train = dataclasses.replace(cfg.train, steps=3, out_dir=str(tmp_path / "capped"))
    assert Trainer(cfg).schedule.lr.horizon == 3
