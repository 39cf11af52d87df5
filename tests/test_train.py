"""Tests of the single-process training loop: exact resume, atomic checkpoints, non-finite
loss handling, gradient accumulation, the expert-bias step, the CPU EMA, learning-rate
schedules, the AdamW variant, metrics output and the Hydra entry point.

All runs use the tiny model on the session's small prepared corpus (seq_len 32, global
batch 4): a training step takes a few tens of milliseconds.
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from hai_llm.config.schema import OptimConfig
from hai_llm.checkpoint import store as ckpt
from hai_llm.train.metrics import read_metrics
from hai_llm.optim import AdamW, lr_at
from hai_llm.train.trainer import NonFiniteLossError, Trainer
from helpers import rel_err


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _biases(model) -> list[torch.Tensor]:
    return [m.gate.bias.clone() for m in model.moe_layers()]


# =========================================================================================
# Resume
# =========================================================================================
class _Crash(Exception):
    pass


@pytest.mark.parametrize("interrupt", ["crash", "extend"])
def test_resume_is_bit_exact(make_config, tmp_path, interrupt):
    """Straight 6-step run vs. a run interrupted after step 3 and resumed.

    "crash": the run is configured for 6 steps and dies after computing step 4 but before
    its checkpoint (step 4 is redone after resume). "extend": a 3-step run, then a new
    Trainer with steps=6 (with a constant schedule, since the cosine horizon would
    otherwise change the learning rates of steps 1..3)."""
    common = ["train.ema_decay=0.9", "train.ckpt_every=3", "model.seq_aux_alpha=0.01"]
    if interrupt == "extend":
        common.append("optim.schedule=constant")
    a = Trainer(make_config(tmp_path / "a", "train.steps=6", *common))
    res_a = a.fit()
    assert len(res_a) == 6 and not any(r.skipped for r in res_a)

    out_b = tmp_path / "b"
    if interrupt == "crash":
        b1 = Trainer(make_config(out_b, "train.steps=6", *common))
        orig = b1.train_step

        def dying_step():
            r = orig()
            if b1.step == 4:  # step 4 computed, its checkpoint (at 6) never written
                raise _Crash
            return r

        b1.train_step = dying_step
        with pytest.raises(_Crash):
            b1.fit()
    else:
        b1 = Trainer(make_config(out_b, "train.steps=3", *common))
        res_b1 = b1.fit()
        # bit-exact: same layout, same shapes, same ops in the same order as the straight run
        assert [r.loss for r in res_b1] == [r.loss for r in res_a[:3]]
    del b1

    b2 = Trainer(make_config(out_b, "train.steps=6", *common))
    assert b2.step == 3
    res_b2 = b2.fit()
    # bit-exact (legitimately): resume of the same layout replays the same shapes and ops in the
    # same order from bit-identical saved state; any difference means lost or stale state
    assert [r.loss for r in res_b2] == [r.loss for r in res_a[3:]]  # bit-identical
    assert [r.grad_norm for r in res_b2] == [r.grad_norm for r in res_a[3:]]
    pa, pb = _params(a.model), _params(b2.model)
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    for ba, bb in zip(_biases(a.model), _biases(b2.model), strict=True):
        assert torch.equal(ba, bb)
    assert any(bool(b.abs().sum() > 0) for b in _biases(a.model))  # the bias did move
    ea, eb = a.ema.state_dict(), b2.ema.state_dict()
    for n in ea:
        assert torch.equal(ea[n], eb[n]), n
    # the optimizer's fp32 master weights, moments and step count resume too
    sa, sb = a.optimizer.sharded_state(), b2.optimizer.sharded_state()
    assert sa.keys() == sb.keys() and sa["step"] == sb["step"] == 6
    for k in sa:
        if k != "step":
            assert torch.equal(sa[k][0], sb[k][0]), k
    # metrics.jsonl of the resumed run holds each step once (lines after the ckpt dropped)
    steps = [r["step"] for r in read_metrics(out_b / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    # resuming a finished run does nothing
    b3 = Trainer(make_config(out_b, "train.steps=6", *common))
    assert b3.step == 6 and b3.fit() == []


# =========================================================================================
# Checkpoint atomicity and pruning
# =========================================================================================
def test_checkpoint_pointer_tmp_folders_and_pruning(make_config, tmp_path):
    cfg = make_config(tmp_path, "train.steps=4", "train.ckpt_every=1", "train.keep_ckpts=2")
    Trainer(cfg).fit()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000003", "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert (root / "step_00000004" / "trainer.json").is_file()
    assert not list(root.glob("*.tmp"))

    # a crash while writing step 9 leaves a half-written .tmp folder: resume ignores it, and
    # start-up removes it
    junk = root / "step_00000009.tmp"
    junk.mkdir()
    (junk / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(root) == root / "step_00000004"
    t = Trainer(make_config(tmp_path, "train.steps=5", "train.ckpt_every=1", "train.keep_ckpts=2"))
    assert t.step == 4 and not junk.exists()
    t.fit()
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp")) == \
        ["step_00000004", "step_00000005"]

    # a pointer to an incomplete folder is an error with instructions, not a silent restart
    (root / "latest").write_text("step_00000009")
    with pytest.raises(ckpt.CheckpointError, match="missing or incomplete; delete .*newest complete one is "
                                                   "step_00000005"):
        ckpt.latest_checkpoint(root)


def test_no_resume_when_disabled(make_config, tmp_path):
    Trainer(make_config(tmp_path, "train.steps=2")).fit()
    t = Trainer(make_config(tmp_path, "train.steps=2", "train.resume=false"))
    assert t.step == 0


# =========================================================================================
# Non-finite losses
# =========================================================================================
def _poison(monkeypatch, trainer, bad_steps: set[int]):
    """Make the loss NaN during the given (0-based) optimizer steps."""
    orig = trainer.model.loss

    def loss(tokens, *a, **kw):
        out = orig(tokens, *a, **kw)
        if trainer.step in bad_steps:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "loss", loss)


def test_nonfinite_steps_are_skipped_then_training_continues(make_config, tmp_path, monkeypatch):
    t = Trainer(make_config(tmp_path, "train.steps=5", "train.max_bad_steps=3", "train.ema_decay=0.5"))
    _poison(monkeypatch, t, {1, 2})
    r0 = t.train_step()
    assert not r0.skipped
    before, bias_before, ema_before = _params(t.model), _biases(t.model), t.ema.state_dict()
    ema_before = {k: v.clone() for k, v in ema_before.items()}
    adam_steps = [float(s["step"]) for s in t.optimizer.inner.state.values()]
    for _ in range(2):
        r = t.train_step()
        assert r.skipped and math.isnan(r.loss)
        after = _params(t.model)
        # bit-exact: a skipped step must not write weights, biases or the EMA at all
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert all(torch.equal(a, b) for a, b in zip(bias_before, _biases(t.model), strict=True))
        assert all(torch.equal(ema_before[k], v) for k, v in t.ema.state_dict().items())
        assert [float(s["step"]) for s in t.optimizer.inner.state.values()] == adam_steps
        assert all(p.grad is None for p in t.model.parameters())
    assert t.skipped_total == 2 and t.bad_in_a_row == 2 and t.step == 3
    r3 = t.train_step()  # finite again: applied, counter reset
    assert not r3.skipped and math.isfinite(r3.loss)
    assert t.bad_in_a_row == 0 and t.skipped_total == 2
    assert any(not torch.equal(before[n], p) for n, p in _params(t.model).items())


def test_nonfinite_grad_norm_is_skipped(make_config, tmp_path):
    t = Trainer(make_config(tmp_path, "train.steps=2"))
    w = t.model.layers[0].attn.wkv_a.weight
    h = w.register_hook(lambda g: g * float("inf"))
    before = _params(t.model)
    r = t.train_step()
    h.remove()
    assert r.skipped and math.isfinite(r.loss) and not math.isfinite(r.grad_norm)
    # bit-exact: a skipped step leaves the weights untouched
    assert all(torch.equal(before[n], p) for n, p in _params(t.model).items())


def test_too_many_bad_steps_raise(make_config, tmp_path, monkeypatch):
    t = Trainer(make_config(tmp_path, "train.steps=10", "train.max_bad_steps=3"))
    _poison(monkeypatch, t, set(range(1, 10)))
    # 1-based step numbers, as in metrics.jsonl: steps 2, 3, 4 were bad, 4 stops the run
    with pytest.raises(NonFiniteLossError,
                       match=r"^step 4: .*non-finite for 3 steps in a row \(steps 2-4, .*train\.max_bad_steps"):
        t.fit()
    assert t.step == 4 and t.skipped_total == 3
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, 0), (2, 1), (3, 1), (4, 1)]  # the stopping step too


# =========================================================================================
# Gradient accumulation
# =========================================================================================
def _grads_after_one_batch(make_config, out, micro):
    t = Trainer(make_config(out, "train.global_batch=4", f"train.micro_batch={micro}",
                            "model.seq_aux_alpha=0.1"))
    batch = t.sampler.next_batch()
    tot = t.rt.forward_backward(t.model, batch, t.rt.layout.n_micro, t._autocast)
    return t, tot, {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_matches_one_big_batch(make_config, tmp_path):
    t1, tot1, g1 = _grads_after_one_batch(make_config, tmp_path / "m1", 1)
    t4, tot4, g4 = _grads_after_one_batch(make_config, tmp_path / "m4", 4)
    assert t1.rt.layout.n_micro == 4 and t4.rt.layout.n_micro == 1
    assert g1.keys() == g4.keys()
    for n in g4:  # measured: <= 2.4e-7 (fp32 summation order)
        assert rel_err(g1[n], g4[n]) < 1e-6, (n, rel_err(g1[n], g4[n]))
    # loss terms: means of per-micro-batch means equal the big-batch means; the balance
    # loss (a mean over sequences of per-sequence terms) too, since sequences never span
    # micro-batches
    for k in ("loss", "ce", "mtp", "balance"):
        assert abs(tot1[k] - tot4[k]) <= 1e-6 * abs(tot4[k]), k
    assert tot4["balance"] > 0
    # exact: integer routing counts, summed over micro-batches (a top-k flip would need a score
    # tie within fp32 rounding; the grads above would then fail too)
    assert torch.equal(tot1["counts"], tot4["counts"])  # summed over micro-batches


def test_gradient_accumulation_full_step_params(make_config, tmp_path):
    ts = [Trainer(make_config(tmp_path / f"s{m}", "train.global_batch=4", f"train.micro_batch={m}",
                              "model.seq_aux_alpha=0.1", "optim.lr=1e-3")) for m in (1, 4)]
    for t in ts:
        t.train_step()
    p1, p4 = _params(ts[0].model), _params(ts[1].model)
    # Adam's first step is ~lr*sign(g): compare the update, relative to its size
    init = _params(Trainer(make_config(tmp_path / "s0", "train.global_batch=4")).model)
    for n in p4:
        d1, d4 = p1[n] - init[n], p4[n] - init[n]
        assert (d1 - d4).norm() <= 1e-3 * d4.norm() + 1e-9, n
    # exact although the batch split differs: the bias step is +-gamma from the integer global
    # counts (the same routing, see test_gradient_accumulation_matches_one_big_batch)
    for b1, b4 in zip(_biases(ts[0].model), _biases(ts[1].model), strict=True):
        assert torch.equal(b1, b4)


# =========================================================================================
# Expert-bias step with global-batch counts
# =========================================================================================
def test_bias_update_each_step_uses_global_batch_counts(make_config, tmp_path):
    t = Trainer(make_config(tmp_path, "train.steps=3"))
    gamma = t.cfg.model.bias_update_speed
    K = t.cfg.model.n_activated_experts
    tokens = t.cfg.train.global_batch * t.cfg.data.seq_len
    n_layers = len(t.model.moe_layers())
    for _ in range(3):
        before = _biases(t.model)
        r = t.train_step()
        load = r.expert_load
        assert load.shape == (n_layers, t.cfg.model.n_routed_experts)
        # every token of BOTH micro-batches routed to K experts, in every MoE layer
        assert load.sum(-1).tolist() == [tokens * K] * n_layers
        for b0, b1, ld in zip(before, _biases(t.model), load.float(), strict=True):
            d = (b1 - b0).double()
            mean = ld.mean()
            for e in range(len(ld)):
                if ld[e] > mean:
                    assert abs(d[e] + gamma) < 1e-7
                elif ld[e] < mean:
                    assert abs(d[e] - gamma) < 1e-7
                else:
                    assert d[e] == 0


def test_bias_update_disabled(make_config, tmp_path):
    t = Trainer(make_config(tmp_path, "train.steps=2", "train.bias_update=false"))
    t.fit()
    assert all(bool((b == 0).all()) for b in _biases(t.model))


# =========================================================================================
# EMA
# =========================================================================================
def test_ema_equals_hand_computed_average(make_config, tmp_path):
    decay = 0.9
    t = Trainer(make_config(tmp_path, "train.steps=4", f"train.ema_decay={decay}"))
    ema = {n: p.double() for n, p in _params(t.model).items()}  # starts at the init weights
    for n, v in t.ema.state_dict().items():  # bit-exact: the EMA starts as a copy
        assert torch.equal(v, _params(t.model)[n[len("ema."):]])
    for _ in range(4):
        t.train_step()
        snap = _params(t.model)
        ema = {n: decay * ema[n] + (1 - decay) * snap[n].double() for n in ema}
    got = t.ema.state_dict()  # waits for the background fold
    for n in ema:
        torch.testing.assert_close(got[f"ema.{n}"].double(), ema[n], rtol=1e-6, atol=1e-7)
        assert got[f"ema.{n}"].device.type == "cpu" and got[f"ema.{n}"].dtype == torch.float32
    # it really lags behind the weights
    assert any(not torch.allclose(got[f"ema.{n}"], p) for n, p in _params(t.model).items())
    # copy_to loads it into a model
    t.ema.copy_to(t.model)  # bit-exact: a copy
    assert all(torch.equal(got[f"ema.{n}"], p) for n, p in _params(t.model).items())


# =========================================================================================
# Learning-rate schedules
# =========================================================================================
@pytest.mark.parametrize("schedule, expected", [
    # warmup (10 steps, linear to 1.0) is shared: lr(step) = (step + 1) / 10
    ("constant", {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 55: 1.0, 99: 1.0}),
    # cosine from step 10 to 100 down to 0.1: 0.1 + 0.45 (1 + cos(pi (s-10)/90))
    ("cosine", {0: 0.1, 9: 1.0, 10: 1.0, 40: 0.775, 55: 0.55, 100: 0.1, 150: 0.1}),
    # deepseek: constant until 0.8 * 100 = 80, then cosine over 20 steps
    ("deepseek", {0: 0.1, 9: 1.0, 50: 1.0, 80: 1.0, 85: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)),
                  90: 0.55, 100: 0.1}),
])
def test_lr_schedules(schedule, expected):
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule=schedule, decay_start=0.8)
    for step, lr in expected.items():
        assert abs(lr_at(step, 100, cfg) - lr) < 1e-12, (schedule, step)


def test_lr_schedule_deepseek_paper_numbers():
    # the paper: 2.2e-4 after 2K warmup steps, cosine to 2.2e-5 at the end
    cfg = OptimConfig(lr=2.2e-4, warmup_steps=2000, min_lr_ratio=0.1, schedule="deepseek", decay_start=0.67)
    assert abs(lr_at(0, 10000, cfg) - 2.2e-4 / 2000) < 1e-15
    assert abs(lr_at(1999, 10000, cfg) - 2.2e-4) < 1e-15
    assert abs(lr_at(6000, 10000, cfg) - 2.2e-4) < 1e-15
    assert abs(lr_at(10000, 10000, cfg) - 2.2e-5) < 1e-15


# =========================================================================================
# AdamW
# =========================================================================================
def _tiny_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def test_adamw_fp32_matches_torch():
    a, b = _tiny_net(0), _tiny_net(0)

    def groups(m):
        return [{"params": [p for p in m.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                {"params": [p for p in m.parameters() if p.ndim < 2], "weight_decay": 0.0}]

    ours = AdamW(groups(a), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(8, 6, generator=gen)
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    st = ours.state[next(a.parameters())]
    assert st["exp_avg"].dtype == torch.float32 and float(st["step"]) == 6
    # and the weights did move
    assert not torch.allclose(next(a.parameters()), next(_tiny_net(0).parameters()))


def test_adamw_bf16_moments():
    a, b = _tiny_net(0), _tiny_net(0)
    ours = AdamW(a.parameters(), lr=1e-2, moments_dtype=torch.bfloat16)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for p in a.parameters():
        st = ours.state[p]
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
        assert p.dtype == torch.float32  # master weights stay fp32
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=2e-2, atol=2e-3)


@torch.no_grad()
def _former_adamw_step(opt):
    """AdamW.step as it was before the update ran slice by slice (whole-tensor temporaries)."""
    for group in opt.param_groups:
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            st = opt.state[p]
            if not st:
                st.update(step=0.0, exp_avg=torch.zeros_like(p, dtype=opt.moments_dtype),
                          exp_avg_sq=torch.zeros_like(p, dtype=opt.moments_dtype))
            st["step"] = t = st["step"] + 1.0
            g = p.grad.float()
            m = st["exp_avg"].float().lerp_(g, 1 - b1)
            v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
            st["exp_avg"].copy_(m), st["exp_avg_sq"].copy_(v)
            denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd).add_((m / (1 - b1 ** t)).div_(denom), alpha=-lr)  # fp32 p, wd > 0


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
def test_adamw_slices_are_bit_identical_to_the_whole_tensor_update(moments):
    """The slice-by-slice update (bounded scratch) against the former whole-tensor formula: the
    arithmetic is elementwise, so any slicing gives the same bits (weights and both moments)."""
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(1000, 3, generator=gen)
    for chunk in (7, 1024, 1 << 22):  # uneven slices, a few, one
        a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
        ours = AdamW([a], lr=1e-2, moments_dtype=moments, chunk=chunk)
        ref = AdamW([b], lr=1e-2, moments_dtype=moments)
        for _ in range(4):
            g = torch.randn(1000, 3, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
            ours.step()
            _former_adamw_step(ref)
            # bit-exact: the same elementwise operations on the same values, in the same order
            assert torch.equal(a, b) and all(torch.equal(ours.state[a][k], ref.state[b][k])
                                             for k in ("exp_avg", "exp_avg_sq")), chunk
        assert ours.state[a]["step"].device.type == "cpu"  # host-side counter: no device sync


def test_single_process_zero_optimizer_matches_torch_adamw_with_clipping():
    """The trainer's optimizer (ZeRO-1 wrapper, one process) = clip_grad_norm_ + torch AdamW
    with decay on matrices only."""
    from hai_llm.parallel.zero import ZeroOptimizer
    from hai_llm.optim import set_lr

    a, b = _tiny_net(0), _tiny_net(0)
    zo = ZeroOptimizer(a, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, moments_dtype=torch.float32)
    ref = torch.optim.AdamW([{"params": [p for p in b.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in b.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    gen = torch.Generator().manual_seed(2)
    clipped = 0
    for step in range(5):
        x = torch.randn(8, 6, generator=gen)
        lr = 1e-2 * (step + 1) / 5
        zo.zero_grad()
        a(x).pow(2).sum().backward()
        norm_t = zo.reduce_gradients()  # a float64 device tensor: the trainer reads it once per step
        assert norm_t.dtype == torch.float64 and norm_t.device == a[0].weight.device
        norm = float(norm_t)
        zo.clip(norm, 0.5)
        set_lr(zo, lr)
        zo.step()
        ref.zero_grad()
        b(x).pow(2).sum().backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5))
        for g in ref.param_groups:
            g["lr"] = lr
        ref.step()
        clipped += norm > 0.5
        assert abs(norm - ref_norm) <= 1e-6 * ref_norm
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    assert clipped >= 1  # the clipping path was exercised


def test_trainer_optimizer_groups_and_moments_dtype(make_config, tmp_path):
    t = Trainer(make_config(tmp_path, "optim.moments_dtype=bfloat16"))
    t.train_step()
    opt = t.optimizer
    wd = t.cfg.optim.weight_decay
    for b, g in zip(opt.buckets, opt.param_groups, strict=True):
        assert g["params"] == [b.master]
        # matrices decay, vectors (norm weights) do not
        assert all((p.ndim >= 2) == b.decay for p in b.params)
        assert g["weight_decay"] == (wd if b.decay else 0.0)
        st = opt.inner.state[b.master]
        assert b.master.dtype == torch.float32
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
    assert {b.decay for b in opt.buckets} == {True, False}
    # every parameter is optimized exactly once; the routing bias (a buffer) is not
    names = [n for b in opt.buckets for n in b.names]
    assert sorted(names) == sorted(n for n, _ in t.model.named_parameters())
    # the model parameters are the (all-gathered) master weights
    for b in opt.buckets:
        for p, o in zip(b.params, b.offsets, strict=True):  # bit-exact: params are copies
            assert torch.equal(p.detach().flatten(), b.master[o:o + p.numel()])


# =========================================================================================
# One host read per step; precision default
# =========================================================================================
def test_one_host_read_per_step(make_config, tmp_path, monkeypatch):
    """The loop, runtime, ZeRO and AdamW read nothing back during a step but the trainer's one
    ``tolist`` of [loss terms, grad norm, load stats] (on a GPU each read is a synchronisation;
    AdamW's step counter is a host tensor by design, not counted)."""
    import sys
    files = ("hai_llm/train/", "hai_llm/runtime/", "hai_llm/parallel/zero.py", "hai_llm/optim/")
    t = Trainer(make_config(tmp_path, "train.steps=3", "train.ema_decay=0.5", "model.seq_aux_alpha=0.01"))
    t.train_step()  # warm-up: lazy state
    counters, reads = {id(st["step"]) for st in t.optimizer.inner.state.values()}, []

    def wrap(name, orig):
        def read(self, *a, **k):
            f = sys._getframe(1)  # the line that reads
            if any(d in f.f_code.co_filename for d in files) and id(self) not in counters:
                reads.append((f.f_code.co_filename.rsplit("hai_llm/", 1)[-1], f.f_lineno, name))
            return orig(self, *a, **k)
        return read

    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    r = t.train_step()
    monkeypatch.undo()
    assert [(f, n) for f, _, n in reads] == [("train/trainer.py", "tolist")], reads
    assert not r.skipped and math.isfinite(r.loss) and r.load_max_over_mean >= 1.0


def test_precision_auto_is_bf16_on_cuda_fp32_on_cpu(make_config, tmp_path):
    from hai_llm.config.schema import TrainConfig
    from hai_llm.train.trainer import resolve_precision
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert TrainConfig().precision == "auto" and resolve_precision("auto", cuda) == "bf16"
    assert [resolve_precision(p, cpu) for p in ("auto", "fp32", "bf16", "fp8")] == ["fp32", "fp32", "bf16", "fp8"]
    assert Trainer(make_config(tmp_path, "train.precision=auto")).precision == "fp32"  # CI has no GPU


# =========================================================================================
# Metrics output
# =========================================================================================
def test_metrics_jsonl_and_plot(make_config, tmp_path):
    cfg = make_config(tmp_path, "train.steps=3", "logging.plot=true")
    t = Trainer(cfg)
    res = t.fit()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert len(rows) == len(res) == 3
    for i, (row, r) in enumerate(zip(rows, res, strict=True)):
        for k in ("loss", "ce", "mtp", "balance", "lr", "tokens_per_s", "grad_norm",
                  "expert_load_max_over_mean", "expert_load_worst_layer"):
            assert k in row and math.isfinite(row[k]), k
        assert row["loss"] == r.loss  # exact: the logged number is the returned one (JSON float repr)
        assert row["lr"] == lr_at(i, 3, cfg.optim)
        assert row["tokens_per_s"] > 0
        load = r.expert_load.float()
        assert abs(row["expert_load_max_over_mean"]
                   - float((load.max(-1).values / load.mean(-1)).mean())) < 1e-6
        assert row["expert_load_max_over_mean"] >= 1.0
    png = tmp_path / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# =========================================================================================
# Hydra entry point
# =========================================================================================
def _compose(overrides):
    from hydra import compose, initialize_config_dir

    import hai_llm.launch.train  # noqa: F401  (registers the schema)
    from hai_llm.config.load import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _fast_overrides(out_dir, corpus_dir, steps, wandb="disabled"):
    return ["model=tiny", "parallel=single", f"train.steps={steps}", "train.global_batch=4", "train.micro_batch=2",
            "train.device=cpu", f"train.out_dir={out_dir}", f"data.path={corpus_dir}", "data.seq_len=32",
            f"logging.wandb={wandb}", "logging.progress=false", "logging.plot=false"]


def test_hydra_entry_point_end_to_end(tmp_path, corpus_dir):
    from omegaconf import OmegaConf

    from hai_llm.launch.train import run

    out = tmp_path / "run"
    summary = run(_compose(_fast_overrides(out, corpus_dir, 3)))
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.model.name == "tiny" and saved.train.steps == 3
    assert saved.train.out_dir == str(out) and saved.data.path == str(corpus_dir)
    assert saved.model.dim == 64 and saved.optim.betas == [0.9, 0.95]
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert abs(summary["final_loss"] - sum(r["loss"] for r in rows) / 3) < 1e-9
    assert (out / "checkpoints" / "step_00000003" / "trainer.json").is_file()


@pytest.mark.slow  # ~5 s unloaded (wandb starts its service process), 12-23 s on a busy machine
def test_wandb_offline_run(tmp_path, corpus_dir, monkeypatch):
    from hai_llm.launch.train import run

    # no network: an unreachable proxy makes any accidental connection fail fast
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "run"
    t0 = time.perf_counter()
    summary = run(_compose(_fast_overrides(out, corpus_dir, 2, wandb="offline")))
    print(f"wandb offline run: {time.perf_counter() - t0:.1f} s wall")  # information, not a check
    assert math.isfinite(summary["final_loss"])
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb"))  # the offline log that `wandb sync` uploads later
