"""The one layer partitioner: which global layers each pipeline stage holds.

The trainer (``hai_llm.pipeline.stage.build_pipeline_model`` through ``Layout.stages``) and
the planner (``hai_llm.planner``) both take their split from here, so the memory and traffic
the dry run reports are those of the split the trainer actually runs.

``partition_layers`` takes user counts (``parallel.stage_layers``) or balances an estimate of
the forward cost of every stage: 2 x activated parameters per token for each layer (MoE
layers: attention, gate, shared experts and the K routed experts a token visits), plus the
output head (and the MTP modules, each a block, a projection and another pass through the
head) on the last stage. The embedding is a lookup and costs nothing. A contiguous split
minimising the most expensive stage is found by dynamic programming; every stage gets at
least one layer. Pure Python on ``ModelArgs``: no model is built.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from hai_llm.model.args import ModelArgs


def _attn_params(a: ModelArgs) -> int:
    qk = a.qk_head_dim
    q = a.dim * a.n_heads * qk if a.q_lora_rank == 0 else \
        a.dim * a.q_lora_rank + a.q_lora_rank * a.n_heads * qk
    kv = a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + \
        a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + a.n_heads * a.v_head_dim * a.dim


def layer_cost(args: ModelArgs, layer_id: int) -> float:
    """Forward FLOPs per token of one block (2 x activated matmul parameters)."""
    ffn = 3 * args.dim * args.inter_dim
    if args.is_moe_layer(layer_id):
        ffn = 3 * args.dim * args.moe_inter_dim * (args.n_activated_experts + args.n_shared_experts) \
            + args.n_routed_experts * args.dim
    return 2.0 * (_attn_params(args) + ffn)


def head_cost(args: ModelArgs) -> float:
    """Extra forward FLOPs per token of a last stage: head, and each MTP module (projection,
    block, another pass through the head)."""
    head = 2.0 * args.dim * args.vocab_size
    mtp = args.n_mtp_layers * (head + 2.0 * 2 * args.dim * args.dim + layer_cost(args, args.n_layers))
    return head + mtp


def partition_layers(args: ModelArgs, num_stages: int,
                     counts: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Global layer indices of each of ``num_stages`` stages (contiguous, in order).

    ``counts``: user-given layers per stage (must sum to ``n_layers``, each >= 1); otherwise
    the split minimising the most expensive stage under ``layer_cost`` / ``head_cost``.
    """
    L = args.n_layers
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if L < num_stages:
        raise ValueError(f"n_layers={L} is fewer than the {num_stages} pipeline stages: every stage "
                         f"needs at least one layer; lower pp, use another schedule or add layers")
    if counts:
        counts = [int(c) for c in counts]
        if len(counts) != num_stages or sum(counts) != L or min(counts) < 1:
            raise ValueError(f"parallel.stage_layers={counts} must list {num_stages} counts >= 1 summing to "
                             f"n_layers={L}")
    else:
        counts = _balanced_counts(args, num_stages)
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def _balanced_counts(args: ModelArgs, S: int) -> List[int]:
    L = args.n_layers
    cost = [layer_cost(args, i) for i in range(L)]
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    tail = head_cost(args)
    inf = float("inf")
    # best[s][i]: minimal max-stage cost placing layers [0, i) on stages [0, s)
    best = [[inf] * (L + 1) for _ in range(S + 1)]
    cut = [[0] * (L + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    for s in range(1, S + 1):
        for i in range(s, L - (S - s) + 1):
            for j in range(s - 1, i):
                c = prefix[i] - prefix[j] + (tail if s == S else 0.0)
                v = max(best[s - 1][j], c)
                if v < best[s][i] - 1e-9:  # first (shortest earlier stage) on ties
                    best[s][i], cut[s][i] = v, j
    counts, i = [], L
    for s in range(S, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]
