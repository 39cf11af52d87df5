"""The planner's FLOPs per token (``hai_llm.planner.flops``) against two independent counters on
a real forward + backward of a small config: torch's ``FlopCounterMode`` and DeepSpeed's FLOPs
profiler; and the 671B number next to the usual "~250 GFLOPs per token".

What each counter sees (why the comparisons are exact or within a stated tolerance):

* ``FlopCounterMode`` counts matmul-like aten ops only (mm, bmm, addmm, convolution, the fused
  attention kernels): element-wise work is invisible to it, as it is to our formula. It has no
  formula for ``aten._grouped_mm`` (the routed experts), so the test registers one through its
  public ``custom_mapping`` argument (2 x rows x in x out, forward and each backward call). On
  CPU in fp32 ``scaled_dot_product_attention`` runs as its math decomposition, two bmm over
  the full S x S score matrix, causal or not, hence ``causal=False`` on our side. Every
  count is an integer sum of products of the same shapes: equal to float64 rounding.
* DeepSpeed's profiler patches ``torch.nn.functional`` (linear, the attention function,
  activations, norms) and counts the FORWARD only; it does not see ``_grouped_mm`` either and
  adds element-wise FLOPs (SiLU, softmax, RMSNorm), which our formula leaves out: the forward
  without routed experts must agree within 1 % (measured: 0.15 %).
"""
from __future__ import annotations

import pytest
import torch

from hai_llm.config.load import load_model_args
from hai_llm.planner.flops import flops_summary, mlp_piece, model_flops

S, BATCH = 64, 2


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 x M x K x N of a grouped GEMM (2-D x 3-D: rows x in x out; 2-D x 2-D: the weight
    gradient, contraction over the grouped rows; 3-D x 3-D: batched)."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def _model_and_tokens(overrides=()):
    from hai_llm.model.transformer import build_model

    args = load_model_args("tiny", list(overrides))
    model = build_model(args, "cpu", seed=0)
    tokens = torch.randint(0, args.vocab_size, (BATCH, S + 1 + args.n_mtp_layers),
                           generator=torch.Generator().manual_seed(0))
    return args, model, tokens


@pytest.mark.parametrize("overrides", [[], ["n_routed_experts=4", "n_activated_experts=4",
                                            "n_expert_groups=1", "n_limited_groups=1"]])
def test_flops_per_token_equal_flop_counter_mode(overrides):
    from torch.utils.flop_counter import FlopCounterMode

    args, model, tokens = _model_and_tokens(overrides)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    with counter:
        model.loss(tokens).loss.backward()
    measured = counter.get_total_flops() / (BATCH * S)
    ours = model_flops(args, S, causal=False, recompute="none").model
    # integer FLOP sums of identical shapes: only float64 rounding of the per-token division
    assert measured == pytest.approx(ours, rel=1e-12), (measured, ours)


def test_flops_per_token_match_deepspeed_profiler():
    fp = pytest.importorskip("deepspeed.profiling.flops_profiler",
                             reason="DeepSpeed is not installed (pip install -e .[test])")
    args, model, tokens = _model_and_tokens()
    prof = fp.FlopsProfiler(model)
    prof.start_profile()
    with torch.no_grad():
        model.loss(tokens)
    ds_forward = prof.get_total_flops() / (BATCH * S)
    prof.end_profile()
    ours = model_flops(args, S, causal=False, recompute="none")
    # DeepSpeed does not see torch._grouped_mm (the routed experts)
    n_moe = args.n_moe_layers + args.n_mtp_layers
    routed = n_moe * 2.0 * args.dim * args.moe_inter_dim * 3 * args.n_activated_experts
    expected = ours.forward - routed
    # DeepSpeed adds element-wise FLOPs (activations, softmax, norms) that we do not count
    assert ds_forward == pytest.approx(expected, rel=1e-2), (ds_forward, expected)
    assert ds_forward >= expected


def test_deepseek_v3_flops_per_token_next_to_250g():
    args = load_model_args("deepseek_v3_671b", [])
    f = flops_summary(args, 4096)
    # the common quote: ~250 GFLOPs per token = 6 x 37B activated (222 G) + attention
    assert 245e9 < f["model_without_mtp"] < 256e9
    assert f["mtp"] == pytest.approx(f["model"] - f["model_without_mtp"])
    # 6N with N = the activated matmul parameters of the main model (no embedding, no MTP)
    mlp = mlp_piece(args, True)
    assert mlp.terms["experts"] == 2.0 * args.dim * args.moe_inter_dim * 3 * (args.n_activated_experts + 1)
    assert 28e9 < f["attention_core"] < 34e9  # causal, 4K: 3 x 2 H (dn+dr+dv) (S+1)/2 x 62 blocks
    assert f["recompute"] > 0 and f["model_dense_mask"] > f["model"]
