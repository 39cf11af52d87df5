"""The DeepSeek-V2 family (V2, V2-Lite): softmax routing scores used as weights as they are
(``norm_topk_prob=False``), ``topk_method`` greedy / group_limited_greedy (a group is worth its best
score), no correction bias, YaRN with ``mscale == mscale_all_dim = 0.707``.

Checked against transformers' ``DeepseekV2ForCausalLM`` on random tiny configs in both directions
(logits and checkpoints), against float64 loops of DeepSeek's V2 ``MoEGate`` (routing and its
sequence-wise auxiliary loss), and the V2-Lite config against the released ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from transformers import DeepseekV2Config, DeepseekV2ForCausalLM  # noqa: E402

from hai_llm.config.load import load_model_args  # noqa: E402
from hai_llm.interop.hf import (CheckpointMismatchError, args_from_hf_config, check_config_matches,  # noqa: E402
                                load_hf_checkpoint, save_hf_checkpoint)
from hai_llm.model.moe import MoE  # noqa: E402
from hai_llm.model.params import parameter_table  # noqa: E402
from hai_llm.model.transformer import build_model  # noqa: E402

YARN_V2 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

# deepseek-ai/DeepSeek-V2-Lite config.json (the keys that decide the math; docs/checkpoints.md)
V2_LITE_JSON = {
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
    "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
    "aux_loss_alpha": 0.001, "seq_aux": True, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "max_position_embeddings": 163840, "hidden_act": "silu", "tie_word_embeddings": False, "initializer_range": 0.02,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
}


def tiny_v2_config(method="greedy", q_lora_rank=None, **kw) -> DeepseekV2Config:
    # 8 experts, top-2 (group_limited_greedy: 4 groups of 2, keep 2); 1 dense + 2 MoE layers;
    # YaRN stretched 64 -> 256 with V2's mscale = mscale_all_dim = 0.707
    groups = dict(n_group=4, topk_group=2) if method == "group_limited_greedy" else dict(n_group=1, topk_group=1)
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
                n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=q_lora_rank,
                qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, first_k_dense_replace=1,
                max_position_embeddings=256, rope_parameters=dict(YARN_V2), topk_method=method,
                routed_scaling_factor=2.0, norm_topk_prob=False, **groups)
    base.update(kw)
    return DeepseekV2Config(**base)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Larger-than-default weights so routing is far from uniform and norms away from 1."""
    g = torch.Generator().manual_seed(seed)
    for n, p in module.named_parameters():
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if n.endswith("norm.weight")
                else 0.08 * torch.randn(p.shape, generator=g))


def hf_v2(cfg, seed=0) -> DeepseekV2ForCausalLM:
    torch.manual_seed(seed)
    m = DeepseekV2ForCausalLM(cfg).eval()
    randomize(m, seed)
    return m


def _set_routing(model, **kw) -> None:
    """Change the routing settings of every MoE gate in place (same weights)."""
    for m in model.moe_layers():
        m.gate.args = dataclasses.replace(m.gate.args, **kw)


# ------------------------------------------------------------------------ logits vs transformers
@pytest.mark.parametrize("method, q_lora_rank", [("greedy", None), ("group_limited_greedy", 48)])
def test_logits_match_transformers_deepseek_v2(tmp_path, method, q_lora_rank):
    hf = hf_v2(tiny_v2_config(method, q_lora_rank))
    hf.save_pretrained(tmp_path)  # per-expert tensors + config.json (model_type deepseek_v2)
    args = args_from_hf_config(tmp_path)
    assert (args.topk_method, args.score_func, args.norm_topk_prob, args.routing_bias) == \
        (method, "softmax", False, False)
    assert args.mscale == 0.707 and args.softmax_scale == pytest.approx(32 ** -0.5 * (0.0707 * math.log(4) + 1) ** 2)
    ours = build_model(args, device="cpu", seed=5).eval()
    report = load_hf_checkpoint(ours, tmp_path)
    assert not report.missing and not report.unexpected and not report.nonfinite
    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert (ours(tokens) - ref).abs().max() < 1e-4
        # the test is sensitive to the V2 routing settings: normalizing the top-k weights, or
        # scoring groups by their top-2 (V3) instead of their best score, changes the logits
        _set_routing(ours, norm_topk_prob=True)
        assert (ours(tokens) - ref).abs().max() > 1e-3
        _set_routing(ours, norm_topk_prob=False)
        if method == "group_limited_greedy":
            _set_routing(ours, topk_method="noaux_tc")
            assert (ours(tokens) - ref).abs().max() > 1e-3


def test_transformers_reads_our_v2_checkpoint(tmp_path):
    args = args_from_hf_config(tiny_v2_config("group_limited_greedy", 48))
    ours = build_model(args, device="cpu", seed=3).eval()
    randomize(ours, 3)
    save_hf_checkpoint(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and cfg["topk_method"] == "group_limited_greedy"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("e_score_correction_bias" in k for k in index)  # V2 has no correction bias
    hf = DeepseekV2ForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() < 1e-4
    back = build_model(args, device="cpu", seed=9)
    load_hf_checkpoint(back, tmp_path)
    for k, v in ours.state_dict().items():  # bit-exact: same dtype, bytes copied
        assert torch.equal(v, back.state_dict()[k]), k


# ------------------------------------------------------------- float64 reference of V2's MoEGate
def _v2_gate_reference(x, w, method, n_group, topk_group, k, scale):
    """DeepSeek's V2 MoEGate (modeling_deepseek.py) in float64 Python: softmax scores; greedy top-k,
    or group_limited_greedy (groups ranked by their best score, experts of other groups zeroed);
    weights = score * routed_scaling_factor (norm_topk_prob=False)."""
    out = []
    for xt in x.double().tolist():
        logits = [sum(a * b for a, b in zip(xt, wr)) for wr in w.double().tolist()]
        m = max(logits)
        e = [math.exp(v - m) for v in logits]
        s = [v / sum(e) for v in e]
        E, per = len(s), len(s) // n_group
        if method == "group_limited_greedy":
            best = [max(s[g * per:(g + 1) * per]) for g in range(n_group)]
            keep = sorted(range(n_group), key=lambda g: -best[g])[:topk_group]
            s_masked = [s[i] if i // per in keep else 0.0 for i in range(E)]
        else:
            s_masked = s
        pick = sorted(range(E), key=lambda i: -s_masked[i])[:k]
        out.append({i: s[i] * scale for i in pick})
    return out


@pytest.mark.parametrize("method, groups", [("greedy", (1, 1)), ("group_limited_greedy", (4, 2))])
def test_v2_routing_and_balance_loss_match_float64_reference(tiny_args, method, groups):
    args = dataclasses.replace(tiny_args, dim=16, n_routed_experts=16, n_activated_experts=3, score_func="softmax",
                               topk_method=method, norm_topk_prob=False, route_scale=16.0, bias_update_speed=0.0,
                               n_expert_groups=groups[0], n_limited_groups=groups[1], seq_aux_alpha=0.003)
    torch.manual_seed(0)
    moe = MoE(args)
    moe.reset_parameters(0.5)
    B, S = 2, 32
    x = torch.randn(B, S, 16)
    r = moe.route(x)
    ref = _v2_gate_reference(x.view(-1, 16), moe.gate.weight.detach(), method, *groups, 3, 16.0)
    for t in range(B * S):
        got = {int(e): float(w) for e, w in zip(r.idx_TK[t], r.weights_TK[t].detach())}
        assert got.keys() == ref[t].keys(), t
        assert all(abs(got[e] - ref[t][e]) < 1e-5 * 16 for e in got), t
    # the group limit matters for some token (its best experts are not all in its kept groups)
    if method == "group_limited_greedy":
        plain = _v2_gate_reference(x.view(-1, 16), moe.gate.weight.detach(), "greedy", 1, 1, 3, 16.0)
        assert sum(a.keys() != b.keys() for a, b in zip(plain, ref)) >= 1

    # V2's sequence-wise auxiliary loss (seq_aux): alpha * mean_b sum_i (count_bi / (S K / E)) * mean_t s_bti
    logits = x.double() @ moe.gate.weight.detach().double().T
    s = logits.softmax(-1)
    idx = r.idx_TK.view(B, S, 3)
    aux = 0.0
    for b in range(B):
        ones = torch.ones(S * 3, dtype=torch.float64)
        ce = torch.zeros(16, dtype=torch.float64).index_add_(0, idx[b].flatten(), ones)
        aux += float((ce / (S * 3 / 16) * s[b].mean(0)).sum())
    aux = 0.003 * aux / B
    assert abs(float(moe.pop_stats().balance_loss) - aux) < 1e-6 * aux


# ------------------------------------------------------------------------------ V2-Lite config
def test_v2_lite_config_matches_release_and_parameter_count():
    ours = load_model_args("deepseek_v2_lite", ["max_seq_len=163840"])  # the released context length
    check_config_matches(ours, V2_LITE_JSON)  # raises naming any field that computes differently
    a = args_from_hf_config(V2_LITE_JSON)
    assert (a.seq_aux_alpha, a.bias_update_speed, a.n_mtp_layers, a.q_lora_rank) == (0.001, 0.0, 0, 0)
    assert a.softmax_scale == pytest.approx(ours.softmax_scale)
    t = parameter_table(load_model_args("deepseek_v2_lite"))
    # model card: 15.7B total, 2.4B activated (our count without the embedding: 2.45B)
    assert round(t["main"]["total"] / 1e9, 1) == 15.7
    assert 2.4e9 <= t["main"]["activated_no_embedding"] < 2.5e9


@pytest.mark.parametrize("change, match", [
    (dict(norm_topk_prob=True), "norm_topk_prob=True for deepseek_v2"),
    (dict(topk_method="noaux_tc"), "topk_method='noaux_tc' for deepseek_v2"),
    (dict(scoring_func="sigmoid"), "scoring_func='sigmoid'"),
    (dict(moe_layer_freq=2), "moe_layer_freq=2"),
    (dict(rope_scaling={**V2_LITE_JSON["rope_scaling"], "mscale": 1.0}), "attention_factor"),
])
def test_v2_config_rejects_what_we_cannot_reproduce(change, match):
    with pytest.raises(CheckpointMismatchError, match=match):
        args_from_hf_config({**V2_LITE_JSON, **change})


def test_v2_model_args_validation(tiny_args):
    with pytest.raises(ValueError, match=r"topk_method='greedy' has no routing bias .*set bias_update_speed=0"):
        dataclasses.replace(tiny_args, topk_method="greedy", n_expert_groups=1, n_limited_groups=1)
    with pytest.raises(ValueError, match=r"topk_method='greedy' ignores expert groups: set n_expert_groups=1"):
        dataclasses.replace(tiny_args, topk_method="greedy", bias_update_speed=0.0)
    with pytest.raises(ValueError, match=r"topk_method must be noaux_tc \| group_limited_greedy \| greedy"):
        dataclasses.replace(tiny_args, topk_method="topk")
