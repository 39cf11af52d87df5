"""Hugging Face config <-> ModelArgs for the DeepSeek-V3 and DeepSeek-V2 checkpoint families.

Why it exists: a checkpoint is only useful if our model computes exactly what its config says.
This module maps ``config.json`` (DeepSeek's release or transformers' ``DeepseekV3Config`` /
``DeepseekV2Config``) onto :class:`ModelArgs` and back, and refuses, naming the key, every setting
whose math ours would not reproduce. The tensor layout is ``hf.py``'s job.

Families (docs/checkpoints.md lists the checkpoints and settings):
- ``deepseek_v3``: sigmoid scores, ``topk_method='noaux_tc'`` (groups scored by their two best
  biased scores, ``e_score_correction_bias``), ``norm_topk_prob`` either way, MTP layers.
- ``deepseek_v2`` (V2, V2-Lite): softmax scores, ``topk_method`` ``greedy`` or
  ``group_limited_greedy`` (groups scored by their best score), no correction bias, weights =
  score * ``routed_scaling_factor`` (``norm_topk_prob=False``), YaRN with ``mscale ==
  mscale_all_dim`` (0.707), the sequence-wise ``aux_loss_alpha`` as the balance loss.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from hai_llm.model.args import ModelArgs

# HF builds q_a_layernorm / kv_a_layernorm with this eps whatever rms_norm_eps says (as DeepSeek's
# reference code does); our MLA uses norm_eps, so only norm_eps == 1e-6 converts exactly.
HF_LATENT_NORM_EPS = 1e-6
V2_METHODS = ("greedy", "group_limited_greedy")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: missing/unexpected tensors, shapes or config."""


def _yarn_mscale(factor: float, m: float) -> float:  # HF's get_mscale: 1 without stretching
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise CheckpointMismatchError(msg)


def hf_config_from_args(args: ModelArgs):
    """The transformers config (``DeepseekV3Config``, or ``DeepseekV2Config`` for the V2 routing
    methods) computing exactly what ``args`` computes."""
    v2 = args.topk_method in V2_METHODS
    pre = f"model config '{args.name}' has no exact HF {'DeepseekV2' if v2 else 'DeepseekV3'} equivalent: "
    _need(args.norm_eps == HF_LATENT_NORM_EPS,
          pre + f"norm_eps={args.norm_eps}, but HF fixes eps=1e-6 in q_a_layernorm/kv_a_layernorm")
    _need(not args.yarn_active or args.rope_factor >= 1, pre + f"rope_factor={args.rope_factor} < 1")
    _need(not args.yarn_active or (args.beta_fast > 0 and args.beta_slow > 0),
          pre + "HF replaces beta_fast/beta_slow = 0 by 32/1")
    if v2:
        _need(args.score_func == "softmax", pre + "HF's DeepseekV2 router always scores with softmax")
        _need(not args.norm_topk_prob, pre + "HF's DeepseekV2 router never normalizes the top-k weights "
                                             "(set norm_topk_prob=false)")
    else:
        _need(args.score_func == "sigmoid", pre + "HF's DeepseekV3 router always scores with sigmoid")
        _need(args.n_moe_layers == 0 or args.n_routed_experts // args.n_expert_groups >= 2,
              pre + "HF scores each expert group by its top-2 experts, so groups need >= 2 experts")
    if args.yarn_active:
        # HF multiplies cos/sin by attention_factor (mscale/mscale_all_dim, 1 here; we never scale
        # cos/sin) and the softmax scale by yarn_mscale(factor, mscale_all_dim)^2 (ours: mscale^2).
        rope = {"rope_type": "yarn", "rope_theta": float(args.rope_theta), "factor": float(args.rope_factor),
                "original_max_position_embeddings": args.original_seq_len, "beta_fast": args.beta_fast,
                "beta_slow": args.beta_slow, "mscale": float(args.mscale), "mscale_all_dim": float(args.mscale),
                "attention_factor": 1.0}
    else:
        # HF's YaRN frequencies do not depend on max_position_embeddings: without stretching it must
        # be plain RoPE, as ours is when max_seq_len <= original_seq_len
        rope = {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    common = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim, num_hidden_layers=args.n_layers,
        first_k_dense_replace=args.n_dense_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_heads, n_routed_experts=args.n_routed_experts,
        n_shared_experts=args.n_shared_experts, num_experts_per_tok=args.n_activated_experts,
        n_group=args.n_expert_groups, topk_group=args.n_limited_groups,
        routed_scaling_factor=float(args.route_scale), norm_topk_prob=args.norm_topk_prob,
        q_lora_rank=args.q_lora_rank or None, kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim, qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim, rms_norm_eps=args.norm_eps, rope_parameters=rope,
        max_position_embeddings=args.max_seq_len, num_nextn_predict_layers=args.n_mtp_layers,
        initializer_range=args.init_std, hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
        pad_token_id=None,
    )
    if v2:
        from transformers import DeepseekV2Config

        # scoring_func / seq_aux / aux_loss_alpha: read by DeepSeek's own V2 code and by our loader
        cfg = DeepseekV2Config(**common, topk_method=args.topk_method, scoring_func="softmax",
                               seq_aux=True, aux_loss_alpha=float(args.seq_aux_alpha))
        cfg.architectures = ["DeepseekV2ForCausalLM"]
    else:
        from transformers import DeepseekV3Config

        cfg = DeepseekV3Config(**common, rope_interleave=True)
        cfg.architectures = ["DeepseekV3ForCausalLM"]
    return cfg


def _read(hf_config: Any):
    """(transformers config object, model_type) from a config object, a dict, or a path."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    if isinstance(hf_config, (str, os.PathLike)):
        p = Path(hf_config)
        hf_config = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    if isinstance(hf_config, Mapping):
        kind = hf_config.get("model_type", "deepseek_v3")
        _need(kind in ("deepseek_v3", "deepseek_v2"),
              f"HF config model_type={kind!r}: only deepseek_v3 and deepseek_v2 checkpoints are supported")
        cls = DeepseekV2Config if kind == "deepseek_v2" else DeepseekV3Config
        # from_dict also turns the legacy "rope_scaling" of DeepSeek's config.json into rope_parameters
        return cls.from_dict(dict(hf_config)), kind
    return hf_config, getattr(hf_config, "model_type", "deepseek_v3")


def args_from_hf_config(hf_config: Any, **overrides) -> ModelArgs:
    """ModelArgs from a ``DeepseekV3Config`` / ``DeepseekV2Config``, a config.json dict, or a path to
    one (or its folder).

    Raises CheckpointMismatchError for settings our model cannot reproduce exactly. ``overrides``
    set training-only fields (name, recompute, mtp_lambda, ...) or replace mapped ones.
    """
    cfg, kind = _read(hf_config)
    v2 = kind == "deepseek_v2"

    def need(ok: bool, msg: str) -> None:
        _need(ok, f"HF config cannot be represented by ModelArgs: {msg}")

    get = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    need(get("hidden_act", "silu") == "silu", f"hidden_act={get('hidden_act')!r} (ours is SwiGLU)")
    need(not get("attention_bias", False), "attention_bias=True (ours has no biases)")
    need(not get("mlp_bias", False), "mlp_bias=True (ours has no biases)")
    need(not get("tie_word_embeddings", False), "tie_word_embeddings=True (ours keeps a separate head)")
    need(get("num_key_value_heads") in (None, cfg.num_attention_heads), "num_key_value_heads != num_attention_heads")
    need(cfg.rms_norm_eps == HF_LATENT_NORM_EPS,
         f"rms_norm_eps={cfg.rms_norm_eps}: HF uses 1e-6 in the MLA latent norms, ours uses norm_eps everywhere")
    routing: dict[str, Any] = {}
    if v2:  # HF's DeepseekV2TopkRouter / DeepSeek's V2 MoEGate
        method = get("topk_method") or "greedy"
        need(method in V2_METHODS, f"topk_method={method!r} for deepseek_v2 (greedy | group_limited_greedy)")
        need(get("scoring_func", "softmax") == "softmax", f"scoring_func={get('scoring_func')!r} for deepseek_v2")
        need(not get("norm_topk_prob", False),
             "norm_topk_prob=True for deepseek_v2: HF's DeepseekV2 ignores it (raw scores * routed_scaling_factor) "
             "while DeepSeek's V2 code normalizes and drops routed_scaling_factor, so the checkpoint is ambiguous")
        need((get("moe_layer_freq") or 1) == 1, f"moe_layer_freq={get('moe_layer_freq')} (every layer after "
                                                "first_k_dense_replace is MoE in ours and in HF's DeepseekV2)")
        greedy = method == "greedy"  # plain top-k: groups play no part, whatever n_group says
        routing.update(topk_method=method, score_func="softmax", norm_topk_prob=False, bias_update_speed=0.0,
                       n_expert_groups=1 if greedy else get("n_group") or 1,
                       n_limited_groups=1 if greedy else get("topk_group") or 1)
        # V2's only balancing is its auxiliary loss; with seq_aux it is our sequence-wise loss
        if get("aux_loss_alpha") is not None and get("seq_aux", True):
            routing["seq_aux_alpha"] = float(get("aux_loss_alpha"))
    else:  # HF's DeepseekV3TopkRouter
        need(get("rope_interleave", True), "rope_interleave=False stores the rope dims in a different layout")
        need(get("scoring_func", "sigmoid") == "sigmoid", f"scoring_func={get('scoring_func')!r}")
        need(get("topk_method", "noaux_tc") == "noaux_tc", f"topk_method={get('topk_method')!r} (ours is noaux_tc)")
        routing.update(topk_method="noaux_tc", score_func="sigmoid", norm_topk_prob=bool(get("norm_topk_prob", True)),
                       n_expert_groups=get("n_group") or 1, n_limited_groups=get("topk_group") or 1)

    rope = dict(get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    need(rope.get("partial_rotary_factor", 1.0) == 1.0, "partial_rotary_factor != 1")
    max_pos = cfg.max_position_embeddings
    fields: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", get("rope_theta", 10000.0))),
                              "max_seq_len": max_pos}
    if rope_type == "default":
        fields["original_seq_len"] = max_pos  # YaRN off
    elif rope_type == "yarn":
        need("original_max_position_embeddings" in rope, "yarn without original_max_position_embeddings")
        orig = rope["original_max_position_embeddings"]
        factor = float(rope.get("factor") or max_pos / orig)
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attn_factor = rope.get("attention_factor")
        if attn_factor is None:
            attn_factor = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all \
                else _yarn_mscale(factor, 1.0)
        need(abs(attn_factor - 1.0) < 1e-12,
             f"YaRN attention_factor={attn_factor} scales cos/sin; ours never does (needs mscale == mscale_all_dim)")
        need(max_pos > orig, f"yarn with max_position_embeddings={max_pos} <= original {orig}: "
                             "ours enables YaRN only when max_seq_len > original_seq_len")
        need(factor >= 1, f"yarn factor={factor} < 1")
        need(rope.get("truncate", True), "yarn truncate=False (ours rounds the correction range)")
        fields.update(original_seq_len=orig, rope_factor=factor, beta_fast=rope.get("beta_fast") or 32,
                      beta_slow=rope.get("beta_slow") or 1, mscale=float(m_all or 0.0))
    else:
        need(False, f"rope_type={rope_type!r} (only 'default' and 'yarn' are supported)")

    n_mtp = get("num_nextn_predict_layers")
    fields.update(
        name=str(get("_name_or_path") or f"{kind}_hf"), vocab_size=cfg.vocab_size, dim=cfg.hidden_size,
        inter_dim=cfg.intermediate_size, moe_inter_dim=cfg.moe_intermediate_size, n_layers=cfg.num_hidden_layers,
        n_dense_layers=min(get("first_k_dense_replace") or 0, cfg.num_hidden_layers),
        n_heads=cfg.num_attention_heads, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=get("n_shared_experts") or 0, n_activated_experts=cfg.num_experts_per_tok,
        route_scale=float(cfg.routed_scaling_factor), q_lora_rank=cfg.q_lora_rank or 0,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, norm_eps=float(cfg.rms_norm_eps),
        init_std=float(get("initializer_range", 0.006)),
        n_mtp_layers=int(n_mtp if n_mtp is not None else get("num_mtp_layers", 0) or 0), **routing,
    )
    fields.update(overrides)
    return ModelArgs(**fields)


def _math_fields(a: ModelArgs) -> dict[str, Any]:
    """The ModelArgs fields that decide what a checkpoint computes (not training knobs, not the
    rope table length, not the MTP depth: the key check reports that one)."""
    out = {k: getattr(a, k) for k in (
        "vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
        "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
        "score_func", "topk_method", "norm_topk_prob", "route_scale", "q_lora_rank", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_theta", "norm_eps", "yarn_active")}
    if a.yarn_active:
        out.update({k: getattr(a, k) for k in ("original_seq_len", "rope_factor", "beta_fast", "beta_slow", "mscale")})
    return out


def check_config_matches(args: ModelArgs, hf_config: Any) -> None:
    """Raise CheckpointMismatchError naming every field where the checkpoint's config.json
    computes something different from ``args``."""
    ours, theirs = _math_fields(args), _math_fields(args_from_hf_config(hf_config))
    diff = [f"{k}: model {ours.get(k)!r} vs checkpoint {theirs.get(k)!r}"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if diff:
        raise CheckpointMismatchError("checkpoint config.json does not match the model: " + "; ".join(diff))
