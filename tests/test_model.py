"""Tests of the DeepSeek-V3 model code against independent references.

Every check compares the vectorised implementation with something written differently:
plain Python loops over tokens / groups / experts (gate, experts, balance loss), a float64
textbook attention with DeepSeek's complex-number RoPE (MLA), the YaRN formula evaluated by
hand, the parameter-count formula of docs/deepseek_v3.md#parameter-counts, and the model's own public pieces
re-assembled by hand (MTP shifts). Tiny shapes only: the whole file runs in a few seconds.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from hai_llm.model.args import ModelArgs
from hai_llm.model.attention import MLA
from hai_llm.model.layers import Rope, rope_cos_sin, rope_frequencies
from hai_llm.model.moe import Gate, GroupedExperts, MoE, grouped_mm, sequence_balance_loss
from hai_llm.model.params import parameter_table
from hai_llm.model.transformer import build_model


def _args(tiny, **kw) -> ModelArgs:
    return dataclasses.replace(tiny, **kw)


# =========================================================================================
# Gate: group-limited routing with a selection-only bias
# =========================================================================================
def _route_reference(scores, bias, n_groups, topk_groups, topk, route_scale):
    """Per-token routing written with Python lists: returns (list of chosen expert sets,
    list of {expert: weight}, list of kept-group sets)."""
    T, E = len(scores), len(scores[0])
    per = E // n_groups
    chosen, weights, kept = [], [], []
    for t in range(T):
        biased = [scores[t][e] + bias[e] for e in range(E)]
        group_val = []
        for g in range(n_groups):
            members = sorted((biased[e] for e in range(g * per, (g + 1) * per)), reverse=True)
            group_val.append(sum(members[:2]))
        keep = sorted(range(n_groups), key=lambda g: -group_val[g])[:topk_groups]
        cands = [e for e in range(E) if e // per in keep]
        pick = sorted(cands, key=lambda e: -biased[e])[:topk]
        total = sum(scores[t][e] for e in pick)  # UNBIASED scores give the weights
        chosen.append(set(pick))
        weights.append({e: scores[t][e] / total * route_scale for e in pick})
        kept.append(set(keep))
    return chosen, weights, kept


def test_gate_matches_per_token_reference_with_bias_and_group_limit(tiny_args):
    args = _args(tiny_args, dim=16, n_routed_experts=16, n_expert_groups=4, n_limited_groups=2,
                 n_activated_experts=3, route_scale=2.5)
    torch.manual_seed(0)
    gate = Gate(args)
    gate.reset_parameters(std=0.5)
    with torch.no_grad():
        gate.bias.copy_(torch.randn(16) * 0.15)
    x = torch.randn(64, 16)
    w, idx, s = gate(x)

    # reference scores from the definition, in float64 Python arithmetic
    W = gate.weight.detach().double().tolist()
    X = x.double().tolist()
    scores = [[1.0 / (1.0 + math.exp(-sum(a * b for a, b in zip(xr, wr)))) for wr in W] for xr in X]
    torch.testing.assert_close(s.double(), torch.tensor(scores, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    bias = gate.bias.tolist()
    chosen, ref_w, kept = _route_reference(scores, bias, 4, 2, 3, 2.5)

    got_sets = [set(r) for r in idx.tolist()]
    assert got_sets == chosen
    for t in range(64):
        for k in range(3):
            e = int(idx[t, k])
            assert abs(float(w[t, k].detach()) - ref_w[t][e]) < 1e-6, (t, e)
            assert e // 4 in kept[t]  # only experts of kept groups are chosen
    torch.testing.assert_close(w.sum(-1), torch.full((64,), 2.5), rtol=0, atol=1e-6)

    # the case is meaningful: the bias changes the choice for some tokens, and the group
    # limit excludes some token's globally best experts
    no_bias, _, _ = _route_reference(scores, [0.0] * 16, 4, 2, 3, 2.5)
    assert sum(a != b for a, b in zip(no_bias, chosen, strict=True)) >= 5
    biased = [[scores[t][e] + bias[e] for e in range(16)] for t in range(64)]
    global_top = [set(sorted(range(16), key=lambda e: -biased[t][e])[:3]) for t in range(64)]
    assert sum(a != b for a, b in zip(global_top, chosen, strict=True)) >= 1

    # weights come from unbiased scores: the bias-weighted alternative would differ
    t = next(i for i in range(64) if no_bias[i] != chosen[i])
    e0 = int(idx[t, 0])
    bw = (scores[t][e0] + bias[e0]) / sum(scores[t][e] + bias[e] for e in chosen[t]) * 2.5
    assert abs(bw - float(w[t, 0].detach())) > 1e-4


def test_gate_weights_are_differentiable_but_bias_is_not(tiny_args):
    args = _args(tiny_args, dim=16)
    torch.manual_seed(1)
    gate = Gate(args)
    gate.reset_parameters(std=0.5)
    w, _, _ = gate(torch.randn(8, 16))
    (w * torch.randn_like(w)).sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert "bias" not in dict(gate.named_parameters())
    assert "bias" in dict(gate.named_buffers())
    assert not gate.bias.requires_grad and gate.bias.grad is None


# =========================================================================================
# Routed experts: grouped GEMM vs a per-expert loop
# =========================================================================================
def _experts_reference(x, weights, idx, w1, w2, w3):
    out = torch.zeros_like(x)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            h = F.silu(w1[e] @ x[t]) * (w3[e] @ x[t])
            acc = acc + weights[t, k] * (w2[e] @ h)
        rows.append(acc)
    return out + torch.stack(rows)


def _routing_cases(T, E, K, gen):
    # random distinct experts per token, but expert 2 never used
    avail = [e for e in range(E) if e != 2]
    idx = torch.stack([torch.tensor(avail)[torch.randperm(len(avail), generator=gen)[:K]] for _ in range(T)])
    yield "random_with_idle_expert", idx
    yield "all_on_one_expert", torch.full((T, 1), 1, dtype=torch.long)
    yield "single_token", idx[:1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_routed_equals_per_expert_loop(tiny_args, dtype):
    E, D, I = 6, 16, 8
    args = _args(tiny_args, dim=D, moe_inter_dim=I, n_routed_experts=E, n_expert_groups=3,
                 n_limited_groups=2, n_activated_experts=2)
    gen = torch.Generator().manual_seed(0)
    for name, idx in _routing_cases(12, E, 2, gen):
        torch.manual_seed(3)
        moe = MoE(args).to(dtype)
        moe.reset_parameters(0.3)
        T, K = idx.shape
        x = torch.randn(T, D, dtype=dtype, requires_grad=True)
        wts = torch.rand(T, K, dtype=torch.float32, requires_grad=True)
        y = moe.routed(x, wts, idx)
        g = torch.randn_like(y)
        (y.float() * g.float()).sum().backward()
        got = [x.grad, wts.grad] + [p.grad for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3)]

        # reference in float64 on the same (rounded) values
        ref_in = [t.detach().double().requires_grad_() for t in (x, wts, moe.experts.w1, moe.experts.w2, moe.experts.w3)]
        yr = _experts_reference(ref_in[0], ref_in[1], idx, *ref_in[2:])
        (yr * g.double()).sum().backward()
        if dtype == torch.float32:
            tol = dict(rtol=1e-6, atol=1e-6)
        else:
            tol = dict(rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(y.double(), yr.detach(), **tol, msg=f"{name} forward")
        for a, r, n in zip(got, ref_in, ("x", "weights", "w1", "w2", "w3"), strict=True):
            torch.testing.assert_close(a.double(), r.grad, **tol, msg=f"{name} grad {n}")
        # unused experts get exactly zero gradient
        used = set(idx.flatten().tolist())
        for e in range(E):
            if e not in used:
                assert moe.experts.w1.grad[e].abs().max() == 0


def test_grouped_mm_paths_agree_and_handle_zero_counts():
    torch.manual_seed(0)
    E, I, O = 4, 16, 8
    counts = torch.tensor([3, 0, 5, 0])
    x = torch.randn(int(counts.sum()), I)
    w = torch.randn(E, O, I)
    ref = torch.cat([x[:3] @ w[0].T, x[3:8] @ w[2].T])
    torch.testing.assert_close(grouped_mm(x, w, counts), ref, rtol=1e-6, atol=1e-6)
    # bf16 goes through torch._grouped_mm
    yb = grouped_mm(x.bfloat16(), w.bfloat16(), counts)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, rtol=3e-2, atol=5e-2)
    # no rows at all
    assert grouped_mm(x[:0], w, torch.zeros(E, dtype=torch.long)).shape == (0, O)
    # GroupedExperts as a module on the same rows
    ge = GroupedExperts(E, I, O)
    ge.reset_parameters(0.2)
    h = F.silu(x[:3] @ ge.w1[0].T) * (x[:3] @ ge.w3[0].T)
    torch.testing.assert_close(ge(x, counts)[:3], h @ ge.w2[0].T, rtol=1e-6, atol=1e-6)


# =========================================================================================
# Complementary sequence-wise balance loss
# =========================================================================================
def _balance_reference(scores, idx, E):
    """The paper's formula in float64 Python: mean over sequences of sum_i f_i P_i."""
    B, S, K = len(idx), len(idx[0]), len(idx[0][0])
    total = 0.0
    for b in range(B):
        count = [0] * E
        for t in range(S):
            for e in idx[b][t]:
                count[e] += 1
        f = [E / (K * S) * c for c in count]
        P = [sum(scores[b][t][i] / sum(scores[b][t]) for t in range(S)) / S for i in range(E)]
        total += sum(fi * pi for fi, pi in zip(f, P))
    return total / B


def _random_routing(B, S, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, S, E, generator=g) * 0.9 + 0.05
    # skewed choice so that f_i differs strongly between experts
    idx = (torch.rand(B, S, E, generator=g) + torch.linspace(0, 1, E)).topk(K, dim=-1).indices
    return scores, idx


def test_sequence_balance_loss_matches_formula():
    B, S, E, K = 3, 10, 8, 2
    scores, idx = _random_routing(B, S, E, K, 0)
    got = sequence_balance_loss(scores, idx, E)
    ref = _balance_reference(scores.double().tolist(), idx.tolist(), E)
    assert abs(float(got) - ref) < 1e-6 * max(1.0, abs(ref))
    # a perfectly balanced uniform router gives exactly 1
    uni = torch.full((1, 8, 4), 0.3)
    uidx = torch.arange(8).remainder(4).view(1, 8, 1)
    assert abs(float(sequence_balance_loss(uni, uidx, 4)) - 1.0) < 1e-6


def test_sequence_balance_loss_sequence_parallel_halves_equal_whole():
    B, S, E, K = 2, 12, 8, 2
    scores, idx = _random_routing(B, S, E, K, 1)
    whole_s = scores.clone().requires_grad_()
    whole = sequence_balance_loss(whole_s, idx, E)
    whole.backward()

    halves = [slice(0, S // 2), slice(S // 2, S)]

    def local_counts(i):
        c = torch.zeros(B, E)
        for b in range(B):
            c[b] += torch.bincount(idx[b, halves[i]].flatten(), minlength=E).float()
        return c

    parts_s = [scores[:, h].clone().requires_grad_() for h in halves]
    losses = []
    for i in range(2):
        other = local_counts(1 - i)
        # the reducer is an all-reduce(sum) over the two ranks sharing the sequence
        losses.append(sequence_balance_loss(parts_s[i], idx[:, halves[i]], E,
                                            reducer=lambda c, o=other: c + o, world=2))
    mean = (losses[0] + losses[1]) / 2  # what the data-parallel gradient average computes
    assert abs(float(mean.detach()) - float(whole.detach())) < 1e-6
    mean.backward()
    torch.testing.assert_close(torch.cat([p.grad for p in parts_s], dim=1), whole_s.grad, rtol=1e-5, atol=1e-8)
    # without the reducer, each half sees only its own counts: a different (wrong) loss
    wrong = [sequence_balance_loss(scores[:, h], idx[:, h], E, world=2) for h in halves]
    assert abs(float((wrong[0] + wrong[1]) / 2) - float(whole)) > 1e-3


# =========================================================================================
# Auxiliary-loss-free bias update
# =========================================================================================
def test_update_bias_direction_and_buffer(tiny_args):
    model = build_model(tiny_args, device="cpu", seed=0)
    layers = model.moe_layers()
    E = tiny_args.n_routed_experts
    assert len(layers) == tiny_args.n_moe_layers + tiny_args.n_mtp_layers  # MTP block is MoE too
    gamma = 0.001
    load = torch.tensor([[10, 2, 5, 5, 9, 1, 5, 3]] * len(layers), dtype=torch.float32)  # mean 5
    model.update_expert_bias(load, gamma)
    g = torch.tensor(gamma, dtype=torch.float32)
    expect = torch.stack([-g, g, 0 * g, 0 * g, -g, g, 0 * g, g])
    for m in layers:  # bit-exact: 0 +- gamma, no reduction involved
        assert torch.equal(m.gate.bias, expect)
    # a second step with a different load moves each expert by exactly one more gamma or 0
    load2 = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 8]] * len(layers), dtype=torch.float32)
    model.update_expert_bias(load2)  # default gamma = args.bias_update_speed
    step = tiny_args.bias_update_speed
    for m in layers:
        d = (m.gate.bias - expect).tolist()
        assert all(abs(v - step) < 1e-7 for v in d[:7]) and abs(d[7] + step) < 1e-7

    # bias is a persistent buffer (saved in checkpoints), never a parameter or a grad target
    names = dict(model.named_parameters())
    assert not any(n.endswith("gate.bias") for n in names)
    assert sum(n.endswith("gate.bias") for n in model.state_dict()) == len(layers)
    out = model.loss(torch.randint(0, 320, (2, 18)))
    out.loss.backward()
    assert all(m.gate.bias.grad is None for m in layers)

    with pytest.raises(ValueError, match=r"load has 2 rows but the model has 3 MoE layers"):
        model.update_expert_bias(torch.zeros(2, E))


# =========================================================================================
# Multi-token prediction shifts
# =========================================================================================
def test_mtp_loss_uses_correct_shifts(tiny_args):
    torch.manual_seed(0)
    model = build_model(tiny_args, device="cpu", seed=0)
    with torch.no_grad():  # sharper logits so that the target shift matters a lot
        model.head.weight.mul_(50)
        model.embed.weight.mul_(20)
    B, S, D = 2, 16, tiny_args.n_mtp_layers
    tokens = torch.randint(0, tiny_args.vocab_size, (B, S + 1 + D))
    out = model.loss(tokens)

    # recomputed by hand with grad enabled (the balance loss is only built under autograd)
    pos = torch.arange(S)
    h = model.hidden(tokens[:, :S])
    ce = F.cross_entropy(model.head(model.norm(h)).flatten(0, 1), tokens[:, 1:S + 1].flatten())
    balance = sum(s.balance_loss for s in model.pop_moe_stats())  # main-model MoE layers
    rope = model.rope(pos)

    def mtp_ce(emb_shift, tgt_shift, h_in):
        mod = model.mtp[0]
        hk = mod(h_in, model.embed(tokens[:, emb_shift:S + emb_shift]), rope)
        return F.cross_entropy(model.head(mod.norm(hk)).flatten(0, 1),
                               tokens[:, tgt_shift:S + tgt_shift].flatten())

    # depth 1: the main model's normed final state (docs/deepseek_v3.md#mtp) and the embedding of
    # t+1, predicting t+2
    mtp = mtp_ce(1, 2, model.norm(h))
    balance = balance + sum(s.balance_loss for s in model.pop_moe_stats())  # + the MTP block's
    assert float(balance) > 0
    assert abs(float(out.ce) - float(ce)) < 1e-5
    assert abs(float(out.mtp) - float(mtp)) < 1e-5
    assert abs(float(out.balance) - float(balance)) < 1e-7
    expect = ce + tiny_args.mtp_lambda * mtp + balance
    assert abs(float(out.loss) - float(expect)) < 1e-5
    for wrong in (mtp_ce(1, 1, model.norm(h)), mtp_ce(0, 2, model.norm(h)), mtp_ce(2, 2, model.norm(h))):
        assert abs(float(out.mtp) - float(wrong)) > 1e-2

    # inside the module: eh_proj([enorm(embedding) ; hnorm(h)]), embedding first
    mod = model.mtp[0]
    emb = model.embed(tokens[:, 1:S + 1])
    got = mod(h, emb, rope)
    by_hand = mod.block(F.linear(torch.cat([mod.enorm(emb), mod.hnorm(h)], -1), mod.eh_proj.weight), rope)
    swapped = mod.block(F.linear(torch.cat([mod.hnorm(h), mod.enorm(emb)], -1), mod.eh_proj.weight), rope)
    torch.testing.assert_close(got, by_hand, rtol=1e-6, atol=1e-6)
    assert (got - swapped).abs().max() > 1e-3


def test_loss_rejects_too_short_window(tiny_args):
    model = build_model(tiny_args, device="cpu", seed=0)
    with pytest.raises(ValueError, match="seq_len \\+ 1 \\+ n_mtp_layers"):
        model.loss(torch.zeros(1, 2, dtype=torch.long))


# =========================================================================================
# MLA attention vs a float64 textbook implementation with DeepSeek's complex RoPE
# =========================================================================================
def _deepseek_freqs_cis(args, seqlen):
    """precompute_freqs_cis of DeepSeek-V3's inference/model.py, in float64."""
    dim, base, factor = args.qk_rope_head_dim, args.rope_theta, args.rope_factor

    def corr_dim(n_rot):
        return dim * math.log(args.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if args.max_seq_len > args.original_seq_len:
        low = max(math.floor(corr_dim(args.beta_fast)), 0)
        high = min(math.ceil(corr_dim(args.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    ang = torch.outer(torch.arange(seqlen, dtype=torch.float64), freqs)
    return torch.polar(torch.ones_like(ang), ang)


def _rope_complex(x, freqs_cis, interleaved=True):
    # x [B, S, H, R] real -> rotate interleaved pairs (x[2i], x[2i+1]) by complex
    # multiplication, as DeepSeek's apply_rotary_emb; interleaved=False pairs (x[i], x[i+R/2])
    # instead (the "rotate half" layout), only used to show that the test tells them apart
    if interleaved:
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(-2)
    xc = torch.view_as_complex(x.unflatten(-1, (2, -1)).transpose(-1, -2).contiguous())
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).transpose(-1, -2).flatten(-2)


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _mla_reference(attn, args, x, scale, first_pos=0, interleaved=True):
    p = {n: t.detach().double() for n, t in attn.state_dict().items()}
    B, S, _ = x.shape
    H, dn, R, dv, C = args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim, args.kv_lora_rank
    q = _rms(x @ p["wq_a.weight"].T, p["q_norm.weight"], args.norm_eps) @ p["wq_b.weight"].T
    q = q.view(B, S, H, dn + R)
    q_nope, q_pe = q[..., :dn], q[..., dn:]
    kv = x @ p["wkv_a.weight"].T
    lat, k_pe = kv[..., :C], kv[..., C:]
    fc = _deepseek_freqs_cis(args, first_pos + S)[first_pos:]
    q_pe = _rope_complex(q_pe, fc, interleaved)
    k_pe = _rope_complex(k_pe.unsqueeze(2), fc, interleaved).squeeze(2)  # ONE rope key shared by all heads
    kvu = (_rms(lat, p["kv_norm.weight"], args.norm_eps) @ p["wkv_b.weight"].T).view(B, S, H, dn + dv)
    k_nope, v = kvu[..., :dn], kvu[..., dn:]
    out = torch.zeros(B, S, H, dv, dtype=torch.float64)
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
    for b in range(B):
        for h in range(H):
            sc = (q_nope[b, :, h] @ k_nope[b, :, h].T + q_pe[b, :, h] @ k_pe[b].T) * scale
            sc = sc.masked_fill(causal, float("-inf"))
            e = torch.exp(sc - sc.max(-1, keepdim=True).values)
            out[b, :, h] = (e / e.sum(-1, keepdim=True)) @ v[b, :, h]
    return out.flatten(2) @ p["wo.weight"].T


def test_mla_matches_float64_reference_with_yarn(tiny_args):
    args = tiny_args
    assert args.max_seq_len > args.original_seq_len  # YaRN active in the tiny config
    torch.manual_seed(0)
    attn = MLA(args)
    with torch.no_grad():
        for n, prm in attn.named_parameters():
            if "norm" in n:
                prm.copy_(1 + 0.3 * torch.randn_like(prm))
            else:
                prm.normal_(0, 0.25)
    B, S, first = 2, 24, 200  # positions beyond original_seq_len use the blended frequencies
    pos = torch.arange(first, first + S)
    x = torch.randn(B, S, args.dim)
    cos, sin = rope_cos_sin(args)
    y = attn(x, Rope(cos[pos], sin[pos], pos))

    mscale = 0.1 * 1.0 * math.log(args.rope_factor) + 1.0
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5 * mscale ** 2
    yr = _mla_reference(attn, args, x.double(), scale, first)
    torch.testing.assert_close(y.double(), yr, rtol=1e-4, atol=1e-5)
    # the comparison is sensitive: without mscale^2, or with the rotate-half RoPE layout,
    # the reference does not match
    plain = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    assert (_mla_reference(attn, args, x.double(), plain, first) - yr).abs().max() > 1e-3
    assert (_mla_reference(attn, args, x.double(), scale, first, interleaved=False) - yr).abs().max() > 1e-3
    # and the model's standard path (positions 0..S-1) matches the reference there too
    torch.testing.assert_close(attn(x, Rope(cos[:S], sin[:S], torch.arange(S))).double(),
                               _mla_reference(attn, args, x.double(), scale, 0), rtol=1e-4, atol=1e-5)


# =========================================================================================
# YaRN frequencies
# =========================================================================================
def test_rope_frequencies_yarn_formula():
    from hai_llm.config.load import load_model_args

    # R = 64, theta 1e4, factor 40, original 4096; stretched to 128K so YaRN is active
    args = load_model_args("deepseek_v3_671b", ["max_seq_len=131072"])
    assert args.yarn_active
    f = rope_frequencies(args).double()
    base = [10000.0 ** (-2 * i / 64) for i in range(32)]
    # correction range by hand: dims where 32 and 1 turns fit into 4096 positions
    #   64 * ln(4096 / (32 * 2 pi)) / (2 ln 1e4) = 10.47 -> floor 10
    #   64 * ln(4096 / (1 * 2 pi))  / (2 ln 1e4) = 22.51 -> ceil 23
    low, high = 10, 23
    for i in (0, 5, 10):  # high-frequency pairs: unchanged
        assert abs(f[i] - base[i]) <= 1e-6 * base[i]
    for i in (23, 27, 31):  # low-frequency pairs: divided by the factor
        assert abs(f[i] - base[i] / 40) <= 1e-6 * base[i] / 40
    for i in (11, 15, 20):  # linear ramp in between
        r = (i - low) / (high - low)
        expect = base[i] / 40 * r + base[i] * (1 - r)
        assert abs(f[i] - expect) <= 1e-6 * expect
    # no YaRN when the context is not stretched
    plain = rope_frequencies(dataclasses.replace(args, max_seq_len=4096, original_seq_len=4096)).double()
    torch.testing.assert_close(plain, torch.tensor(base, dtype=torch.float64), rtol=1e-6, atol=0)
    # softmax scale: (128 + 64)^-0.5 * (0.1 ln 40 + 1)^2 when stretched, plain otherwise
    assert abs(args.softmax_scale - 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2) < 1e-12
    assert abs(dataclasses.replace(args, max_seq_len=4096).softmax_scale - 192 ** -0.5) < 1e-12


# =========================================================================================
# Parameter counts of the 671B config (meta device)
# =========================================================================================
def _count_by_formula(a: ModelArgs) -> tuple[int, int]:
    """(main total, MTP total) from the architecture in docs/deepseek_v3.md#architecture, by hand."""
    D, H = a.dim, a.n_heads
    attn = (D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * (a.qk_nope_head_dim + a.qk_rope_head_dim)
            + D * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
            + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) + H * a.v_head_dim * D)
    dense = 3 * D * a.inter_dim
    moe = (a.n_routed_experts * D + a.n_routed_experts  # gate weight + routing bias
           + 3 * a.n_routed_experts * D * a.moe_inter_dim + 3 * D * a.moe_inter_dim * a.n_shared_experts)
    block_dense, block_moe = attn + dense + 2 * D, attn + moe + 2 * D
    main = 2 * a.vocab_size * D + D + a.n_dense_layers * block_dense + a.n_moe_layers * block_moe
    mtp = a.n_mtp_layers * (block_moe + 3 * D + 2 * D * D)  # enorm, hnorm, norm, eh_proj
    return main, mtp


def test_parameter_counts_671b():
    from hai_llm.config.load import load_model_args

    args = load_model_args("deepseek_v3_671b")
    t = parameter_table(args)
    assert t["main"]["total"] == 671_026_419_200
    assert (t["main"]["total"], t["mtp"]["total"]) == _count_by_formula(args)
    assert round(t["main"]["activated"] / 1e9, 2) == 37.55
    assert round(t["main"]["activated_no_embedding"] / 1e9, 2) == 36.63
    assert round(t["mtp"]["total"] / 1e9, 2) == 11.61
    model = build_model(args, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_parameter_counts_tiny_match_materialized_model(tiny_args):
    t = parameter_table(tiny_args)
    model = build_model(tiny_args, device="cpu")
    n_main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    n_bias = sum(b.numel() for n, b in model.named_buffers() if n.endswith("gate.bias") and not n.startswith("mtp."))
    assert t["main"]["total"] == n_main + n_bias == _count_by_formula(tiny_args)[0]


# =========================================================================================
# Activation recomputation does not change the math
# =========================================================================================
def test_recompute_modes_give_identical_loss_and_grads(tiny_args):
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 34), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("none", "selective", "full"):
        model = build_model(dataclasses.replace(tiny_args, recompute=mode, seq_aux_alpha=0.01), device="cpu", seed=7)
        out = model.loss(tokens)
        out.loss.backward()
        results[mode] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                         out.expert_counts)
    ref_loss, ref_grads, ref_counts = results["none"]
    for mode in ("selective", "full"):
        loss, grads, counts = results[mode]
        # bit-exact (legitimately): recomputation reruns the same ops on the same shapes, in order
        assert torch.equal(loss, ref_loss), mode
        assert torch.equal(counts, ref_counts), mode
        for n, g in grads.items():
            assert torch.equal(g, ref_grads[n]), f"{mode}: grad of {n} differs"
    assert any(g.abs().sum() > 0 for n, g in ref_grads.items() if "gate.weight" in n)


# =========================================================================================
# ModelArgs validation
# =========================================================================================
@pytest.mark.parametrize("kw, msg", [
    (dict(n_routed_experts=6), r"n_routed_experts=6 must be divisible by n_expert_groups=4"),
    (dict(n_limited_groups=5), r"n_limited_groups=5 must be in \[1, n_expert_groups=4\]"),
    (dict(recompute="some"), r"recompute must be none \| selective \| full, got 'some'"),
    (dict(qk_rope_head_dim=7), r"qk_rope_head_dim=7 must be a positive even number"),
    (dict(n_activated_experts=9), r"n_activated_experts=9 must be in \[1, n_routed_experts=8\]"),
    (dict(score_func="relu"), r"score_func must be 'sigmoid' or 'softmax'"),
])
def test_model_args_validation(tiny_args, kw, msg):
    with pytest.raises(ValueError, match=r"model config 'tiny': " + msg):
        dataclasses.replace(tiny_args, **kw)
