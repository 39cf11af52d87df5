"""Activation memory of one micro-batch: the bytes each unit stashes for its backward.

Per token of the local micro-batch and per unit (embedding, dense block, MoE block, head,
MTP module), ``activation_terms`` lists what is kept from the forward until the weight
gradient step, term by term, for the paper's selective recompute (every RMSNorm and the MLA
up-projections recomputed, the SwiGLU output recomputed from its cached input), for no
recompute and for full recompute. The residual stream is bf16; with ``precision="fp8"`` the
Linear inputs the paper caches in FP8 cost 1 + 4/128 bytes per element (E4M3 plus an fp32
scale per 1x128 tile), and the attention output (input of ``wo``) the paper's finer E5M6
format, 1.5 + 4/128 bytes. One micro-batch of a chunk stashes ``T * sum(terms)`` bytes with
``T = micro_batch * seq_len / sp`` tokens; ``hai_llm.planner.plan`` walks the schedule's
action list to find how many stashes are alive at once.
"""
from __future__ import annotations

from hai_llm.model.args import ModelArgs

FP8_TILE = 128  # elements sharing one fp32 scale (1x128 activation tiles)
SCALE_BYTES = 4
PRECISIONS = ("bf16", "fp8")
RECOMPUTE = ("selective", "none", "full")


def activation_terms(args: ModelArgs, kind: str, *, precision: str = "fp8",
                     recompute: str = "selective", fused_ce: bool = True,
                     sp: int = 1) -> dict[str, float]:
    """Bytes stashed for backward PER TOKEN of the local micro-batch by one unit, term by term.

    ``recompute="selective"`` is the paper's: every RMSNorm and the MLA up-projections
    (q_norm + wq_b, kv_norm + wkv_b, hence q, k, v) are recomputed in backward, and the SwiGLU
    output of every FFN / expert is recomputed from its cached input. ``"none"`` also keeps the
    norm outputs, q/k/v and the SwiGLU outputs; ``"full"`` keeps only each block's input.
    Routed-expert terms assume balanced routing (each token's K expert copies are stored on
    the expert ranks, T*K rows per rank on average). Routing weights are applied to the
    SwiGLU output inside the expert, so their gradient needs no stored expert output. Under
    sequence parallelism the gathered full-sequence latents (sp x local) are kept for the
    recomputed up-projection. ``fused_ce``: the cross-entropy keeps only a log-sum-exp per
    token instead of fp32 log-probabilities over the vocabulary (V * 4 bytes per token).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    D, H, V = args.dim, args.n_heads, args.vocab_size
    fp8 = precision == "fp8"
    bx = 2.0  # bf16 residual stream / latents
    ba = 1.0 + SCALE_BYTES / FP8_TILE if fp8 else 2.0  # FP8 E4M3 + 1x128 fp32 scales
    bo = 1.5 + SCALE_BYTES / FP8_TILE if fp8 else 2.0  # E5M6 (12 bit) input of wo
    t: dict[str, float] = {}

    def block(prefix: str, moe: bool) -> None:
        if recompute == "full":
            t[f"{prefix}block_in"] = D * bx
            return
        t[f"{prefix}attn_in"] = D * bx
        if args.q_lora_rank:
            t[f"{prefix}q_latent"] = args.q_lora_rank * bx
        t[f"{prefix}kv_latent"] = (args.kv_lora_rank + args.qk_rope_head_dim) * bx * sp
        t[f"{prefix}attn_out"] = H * args.v_head_dim * bo
        t[f"{prefix}softmax_lse"] = H * 4.0
        if recompute == "none":
            t[f"{prefix}attn_norm_out"] = D * ba
            if args.q_lora_rank:
                t[f"{prefix}q_norm_out"] = args.q_lora_rank * ba
            t[f"{prefix}kv_norm_out"] = args.kv_lora_rank * ba * sp
            t[f"{prefix}q"] = H * args.qk_head_dim * bx
            t[f"{prefix}k_v"] = H * (args.qk_head_dim + args.v_head_dim) * bx * sp
        t[f"{prefix}ffn_in"] = D * bx
        if recompute == "none":
            t[f"{prefix}ffn_norm_out"] = D * ba
        if not moe:
            t[f"{prefix}swiglu_in"] = 2 * args.inter_dim * ba
            if recompute == "none":
                t[f"{prefix}swiglu_out"] = args.inter_dim * ba
            return
        K, I = args.n_activated_experts, args.moe_inter_dim
        t[f"{prefix}router"] = args.n_routed_experts * 4.0 + K * (4.0 + 8.0)
        t[f"{prefix}expert_in"] = K * D * ba
        t[f"{prefix}expert_swiglu_in"] = K * 2 * I * ba
        if args.n_shared_experts:
            t[f"{prefix}shared_swiglu_in"] = args.n_shared_experts * 2 * I * ba
        if recompute == "none":
            t[f"{prefix}expert_swiglu_out"] = K * I * ba
            if args.n_shared_experts:
                t[f"{prefix}shared_swiglu_out"] = args.n_shared_experts * I * ba

    def head(prefix: str) -> None:
        t[f"{prefix}head_norm_in"] = D * bx
        if recompute == "none":
            t[f"{prefix}head_in"] = D * bx  # the head GEMM stays BF16 (paper)
        t[f"{prefix}ce"] = 4.0 if fused_ce else V * 4.0

    if kind == "embed":
        t["token_ids"] = 8.0
    elif kind in ("dense", "moe"):
        block("", kind == "moe")
    elif kind == "head":
        head("")
    elif kind == "mtp":
        t["mtp_norm_in"] = 2 * D * bx  # enorm(embedding) and hnorm(h) inputs
        if recompute == "none":
            t["eh_proj_in"] = 2 * D * ba
        block("", args.n_routed_experts > 0 and args.is_moe_layer(args.n_layers))
        head("mtp_")
    else:
        raise ValueError(f"unknown unit kind {kind!r}")
    return t
