"""Hugging Face / DeepSeek checkpoint interop: config mapping, one rename table, and streaming
safetensors load/save.

Why it exists: to start training from DeepSeek's released weights (or any ``DeepseekV3ForCausalLM``
checkpoint), to hand trained weights to inference stacks that read the Hugging Face layout, and to
test our model against an independent implementation (``tests/test_hf_interop.py``).

Layouts handled:
- routed experts: ours are stacked ``w1/w3 [E, I, D]``, ``w2 [E, D, I]``. transformers' module holds
  ``gate_up_proj = cat([w1, w3], dim=1)`` and ``down_proj = w2``; DeepSeek's release (and
  ``save_pretrained``) stores one Linear per expert. Loading accepts both; saving writes either.
- MTP module j (depth j + 1) is stored as layer ``n_layers + j`` ("model.layers.61.*" in DeepSeek-V3):
  its block as a normal layer plus enorm/hnorm/eh_proj/shared_head.norm, and copies of the embedding
  and head that our model shares physically (verified or ignored on load, written only on request).
- DeepSeek's FP8 release: ``X.weight`` (float8) with ``X.weight_scale_inv`` (one fp32 scale per
  128x128 block) is dequantized on load.

Memory: loading reads one tensor at a time from memory-mapped files and ``copy_``s it into the
model's own parameter; saving converts one shard at a time. Neither holds a second copy of the model.
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hai_llm.model.args import ModelArgs
from hai_llm.model.transformer import Transformer, build_model

# ------------------------------------------------------------------------------ rename table
# Top-level tensors, ours -> HF.
TOP_LEVEL = MappingProxyType({"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                              "head.weight": "lm_head.weight"})
# One transformer block: ours relative to "layers.{i}." (or "mtp.{j}.block.") -> HF relative to
# "model.layers.{i}.".
BLOCK = MappingProxyType({
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",  # only when q_lora_rank == 0 (HF: None)
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    # dense SwiGLU FFN of the first n_dense_layers layers: w1 gate, w3 up, w2 down
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    # router; our routing-only bias buffer is HF's e_score_correction_bias buffer
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
})
# Routed experts, stacked ours -> per-expert HF projection name ("mlp.experts.{j}.{name}.weight").
EXPERT_STACKS = MappingProxyType({"ffn.experts.w1": "gate_proj", "ffn.experts.w3": "up_proj",
                                  "ffn.experts.w2": "down_proj"})
FUSED_GATE_UP = "mlp.experts.gate_up_proj"  # [E, 2I, D] = cat([w1, w3], dim=1), gate rows first
FUSED_DOWN = "mlp.experts.down_proj"  # [E, D, I] = w2
# MTP module j, ours relative to "mtp.{j}." -> HF relative to "model.layers.{n_layers + j}.".
MTP_EXTRA = MappingProxyType({"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                              "eh_proj.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight"})
# HF-relative copies of tensors our MTP modules share with the main model -> our main tensor.
MTP_SHARED_COPIES = MappingProxyType({"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"})

_BLOCK_FROM_HF = MappingProxyType({v: k for k, v in BLOCK.items()})
_TOP_FROM_HF = MappingProxyType({v: k for k, v in TOP_LEVEL.items()})
_MTP_FROM_HF = MappingProxyType({v: k for k, v in MTP_EXTRA.items()})
_STACK_FROM_HF = MappingProxyType({v: k for k, v in EXPERT_STACKS.items()})
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OUR_LAYER = re.compile(r"(?:layers\.(\d+)|mtp\.(\d+))\.(block\.)?(.+)")
_HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
# HF builds q_a_layernorm / kv_a_layernorm with this eps whatever rms_norm_eps says (as DeepSeek's
# reference code does); our MLA uses norm_eps, so only norm_eps == 1e-6 converts exactly.
_HF_LATENT_NORM_EPS = 1e-6


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: missing/unexpected tensors, shapes or config."""


def _short(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# ------------------------------------------------------------------------------------ config
def _yarn_mscale(factor: float, m: float) -> float:  # HF's get_mscale: 1 without stretching
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise CheckpointMismatchError(msg)


def hf_config_from_args(args: ModelArgs):
    """The transformers ``DeepseekV3Config`` computing exactly what ``args`` computes."""
    from transformers import DeepseekV3Config

    pre = f"model config '{args.name}' has no exact HF DeepseekV3 equivalent: "
    _need(args.score_func == "sigmoid", pre + "HF's router always scores with sigmoid")
    _need(args.norm_eps == _HF_LATENT_NORM_EPS,
          pre + f"norm_eps={args.norm_eps}, but HF fixes eps=1e-6 in q_a_layernorm/kv_a_layernorm")
    _need(args.n_moe_layers == 0 or args.n_routed_experts // args.n_expert_groups >= 2,
          pre + "HF scores each expert group by its top-2 experts, so groups need >= 2 experts")
    _need(not args.yarn_active or args.rope_factor >= 1, pre + f"rope_factor={args.rope_factor} < 1")
    _need(not args.yarn_active or (args.beta_fast > 0 and args.beta_slow > 0),
          pre + "HF replaces beta_fast/beta_slow = 0 by 32/1")
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
    cfg = DeepseekV3Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.inter_dim,
        moe_intermediate_size=args.moe_inter_dim, num_hidden_layers=args.n_layers,
        first_k_dense_replace=args.n_dense_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_heads, n_routed_experts=args.n_routed_experts,
        n_shared_experts=args.n_shared_experts, num_experts_per_tok=args.n_activated_experts,
        n_group=args.n_expert_groups, topk_group=args.n_limited_groups,
        routed_scaling_factor=float(args.route_scale), norm_topk_prob=True,
        q_lora_rank=args.q_lora_rank or None, kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim, qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim, rms_norm_eps=args.norm_eps, rope_parameters=rope, rope_interleave=True,
        max_position_embeddings=args.max_seq_len, num_nextn_predict_layers=args.n_mtp_layers,
        initializer_range=args.init_std, hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
        pad_token_id=None,
    )
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    return cfg


def args_from_hf_config(hf_config: Any, **overrides) -> ModelArgs:
    """ModelArgs from a ``DeepseekV3Config``, a config.json dict, or a path to one (or its folder).

    Raises CheckpointMismatchError for settings our model cannot reproduce exactly. ``overrides``
    set training-only fields (name, recompute, mtp_lambda, ...) or replace mapped ones.
    """
    from transformers import DeepseekV3Config

    if isinstance(hf_config, (str, os.PathLike)):
        p = Path(hf_config)
        hf_config = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    # from_dict also turns the legacy "rope_scaling" of DeepSeek's config.json into rope_parameters
    cfg = DeepseekV3Config.from_dict(dict(hf_config)) if isinstance(hf_config, Mapping) else hf_config

    def need(ok: bool, msg: str) -> None:
        _need(ok, f"HF config cannot be represented by ModelArgs: {msg}")

    get = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    need(get("hidden_act", "silu") == "silu", f"hidden_act={get('hidden_act')!r} (ours is SwiGLU)")
    need(not get("attention_bias", False), "attention_bias=True (ours has no biases)")
    need(not get("tie_word_embeddings", False), "tie_word_embeddings=True (ours keeps a separate head)")
    need(get("norm_topk_prob", True), "norm_topk_prob=False (ours normalizes the top-k sigmoid weights)")
    need(get("rope_interleave", True), "rope_interleave=False stores the rope dims in a different layout")
    need(get("num_key_value_heads") in (None, cfg.num_attention_heads), "num_key_value_heads != num_attention_heads")
    need(get("scoring_func", "sigmoid") == "sigmoid", f"scoring_func={get('scoring_func')!r}")
    need(get("topk_method", "noaux_tc") == "noaux_tc", f"topk_method={get('topk_method')!r} (ours is noaux_tc)")
    need(cfg.rms_norm_eps == _HF_LATENT_NORM_EPS,
         f"rms_norm_eps={cfg.rms_norm_eps}: HF uses 1e-6 in the MLA latent norms, ours uses norm_eps everywhere")

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
        name=str(get("_name_or_path") or "deepseek_v3_hf"), vocab_size=cfg.vocab_size, dim=cfg.hidden_size,
        inter_dim=cfg.intermediate_size, moe_inter_dim=cfg.moe_intermediate_size, n_layers=cfg.num_hidden_layers,
        n_dense_layers=min(get("first_k_dense_replace") or 0, cfg.num_hidden_layers),
        n_heads=cfg.num_attention_heads, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=get("n_shared_experts") or 0, n_activated_experts=cfg.num_experts_per_tok,
        n_expert_groups=get("n_group") or 1, n_limited_groups=get("topk_group") or 1, score_func="sigmoid",
        route_scale=float(cfg.routed_scaling_factor), q_lora_rank=cfg.q_lora_rank or 0,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, norm_eps=float(cfg.rms_norm_eps),
        init_std=float(get("initializer_range", 0.006)),
        n_mtp_layers=int(n_mtp if n_mtp is not None else get("num_mtp_layers", 0) or 0),
    )
    fields.update(overrides)
    return ModelArgs(**fields)


def _math_fields(a: ModelArgs) -> dict[str, Any]:
    """The ModelArgs fields that decide what a checkpoint computes (not training knobs, not the
    rope table length, not the MTP depth: the key check reports that one)."""
    out = {k: getattr(a, k) for k in (
        "vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
        "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups",
        "score_func", "route_scale", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
        "v_head_dim", "rope_theta", "norm_eps", "yarn_active")}
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


# ------------------------------------------------------------------------- name resolution
@dataclass(frozen=True)
class _Piece:
    """Where (part of) one checkpoint tensor goes in our state dict."""
    name: str
    expert: int | None = None  # write into row ``expert`` of a stacked expert tensor
    rows: slice | None = None  # take source[:, rows]: one half of the fused gate_up_proj


def _resolve(key: str, args: ModelArgs) -> tuple[str, Any]:
    """HF key -> ("pieces", [_Piece]) | ("shared", our main tensor's name) | ("unknown", None)."""
    if key in _TOP_FROM_HF:
        return "pieces", [_Piece(_TOP_FROM_HF[key])]
    m = _HF_LAYER.fullmatch(key)
    if m is None:
        return "unknown", None
    i, local = int(m.group(1)), m.group(2)
    if i < args.n_layers:
        prefix = f"layers.{i}."
    elif i < args.n_layers + args.n_mtp_layers:
        j = i - args.n_layers
        if local in _MTP_FROM_HF:
            return "pieces", [_Piece(f"mtp.{j}.{_MTP_FROM_HF[local]}")]
        if local in MTP_SHARED_COPIES:
            return "shared", MTP_SHARED_COPIES[local]
        prefix = f"mtp.{j}.block."
    else:
        return "unknown", None
    if local in _BLOCK_FROM_HF:
        return "pieces", [_Piece(prefix + _BLOCK_FROM_HF[local])]
    if local == FUSED_GATE_UP:
        I = args.moe_inter_dim
        return "pieces", [_Piece(prefix + "ffn.experts.w1", rows=slice(0, I)),
                          _Piece(prefix + "ffn.experts.w3", rows=slice(I, 2 * I))]
    if local == FUSED_DOWN:
        return "pieces", [_Piece(prefix + "ffn.experts.w2")]
    m = _HF_EXPERT.fullmatch(local)
    if m is not None:
        return "pieces", [_Piece(prefix + _STACK_FROM_HF[m.group(2)], expert=int(m.group(1)))]
    return "unknown", None


@dataclass(frozen=True)
class _Out:
    """One HF tensor to write: its key, size, and how to produce it from our tensors."""
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    keep_fp32: bool = False  # HF keeps e_score_correction_bias in fp32 whatever the model dtype


def _hf_outputs(named: Mapping[str, torch.Tensor], args: ModelArgs, expert_layout: str,
                mtp_shared_copies: bool) -> list[_Out]:
    if expert_layout not in ("fused", "per_expert"):
        raise ValueError(f"expert_layout must be 'fused' or 'per_expert', got {expert_layout!r}")
    outs: list[_Out] = []

    def add(key: str, t: torch.Tensor, make=None, shape=None, keep_fp32: bool = False) -> None:
        outs.append(_Out(key, tuple(t.shape if shape is None else shape), t.dtype, make or (lambda: t), keep_fp32))

    for name, t in named.items():
        m = _OUR_LAYER.fullmatch(name)
        if name in TOP_LEVEL:
            add(TOP_LEVEL[name], t)
            continue
        if m is None:
            raise CheckpointMismatchError(f"no Hugging Face name for our tensor '{name}'")
        hf = f"model.layers.{int(m[1]) if m[1] is not None else args.n_layers + int(m[2])}."
        local, in_block = m[4], m[1] is not None or m[3] is not None
        if not in_block and local in MTP_EXTRA:
            add(hf + MTP_EXTRA[local], t)
        elif in_block and local in BLOCK:
            add(hf + BLOCK[local], t, keep_fp32=local == "ffn.gate.bias")
        elif in_block and local in EXPERT_STACKS and expert_layout == "per_expert":
            for j in range(t.shape[0]):
                add(f"{hf}mlp.experts.{j}.{EXPERT_STACKS[local]}.weight", t[j])
        elif in_block and local == "ffn.experts.w1":  # fused: w3 travels inside gate_up_proj
            w3 = named[name[: -len(local)] + "ffn.experts.w3"]
            add(hf + FUSED_GATE_UP, t, lambda a=t, b=w3: torch.cat([a, b], dim=1),
                (t.shape[0], t.shape[1] + w3.shape[1], t.shape[2]))
        elif in_block and local == "ffn.experts.w2":
            add(hf + FUSED_DOWN, t)
        elif not (in_block and local == "ffn.experts.w3"):
            raise CheckpointMismatchError(f"no Hugging Face name for our tensor '{name}'")
    if mtp_shared_copies:  # separate storage: safetensors refuses two names for one buffer
        for j in range(args.n_mtp_layers):
            for hf_local, main in MTP_SHARED_COPIES.items():
                add(f"model.layers.{args.n_layers + j}.{hf_local}", named[main], lambda t=named[main]: t.clone())
    return outs


# --------------------------------------------------------------------------- filling tensors
@dataclass
class LoadReport:
    """What a load did. With strict=True ``missing`` and ``unexpected`` are always empty."""
    files: list[str] = field(default_factory=list)
    loaded: int = 0  # checkpoint tensors copied into the model
    missing: list[str] = field(default_factory=list)  # our tensors not (fully) filled
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors with no place in the model
    shared_copies: list[str] = field(default_factory=list)  # MTP embed/head copies (verified or ignored)


def _dequant_fp8(key: str, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek's FP8 release: fp32 weight = fp8 weight * scale_inv of its (bo x bi) block."""
    (bo, bi), (rows, cols) = block, w.shape
    want = (math.ceil(rows / bo), math.ceil(cols / bi))
    if tuple(scale_inv.shape) != want:
        raise CheckpointMismatchError(f"'{key}_scale_inv' has shape {tuple(scale_inv.shape)}, expected {want} "
                                      f"for a {tuple(w.shape)} weight in {bo}x{bi} blocks")
    s = scale_inv.float().repeat_interleave(bo, 0)[:rows].repeat_interleave(bi, 1)[:, :cols]
    return w.float() * s


def _fill(src, args: ModelArgs, dest: dict[str, torch.Tensor], shapes: Mapping[str, torch.Size], *,
          allocate: bool, strict: bool, mtp_shared_copies: str, fp8_block: tuple[int, int]) -> LoadReport:
    """Copy every tensor of ``src`` (keys(), ``in``, [] over HF keys) to its place in ``dest``.

    Names, shapes and coverage are checked from the file headers first, so a checkpoint that does
    not fit raises before any model tensor is touched; then tensors are read and copied one at a
    time. ``allocate``: create dest tensors on first write (pure conversion)."""
    if mtp_shared_copies not in ("verify", "ignore"):
        raise ValueError(f"mtp_shared_copies must be 'verify' or 'ignore', got {mtp_shared_copies!r}")
    report = LoadReport()
    filled: dict[str, set] = {}
    plan: list[tuple[str, list[_Piece]]] = []
    shared: list[tuple[str, str]] = []
    for key in src.keys():
        if key.endswith("_scale_inv"):  # consumed with its weight
            if key[: -len("_scale_inv")] not in src:
                report.unexpected.append(key)
            continue
        kind, what = _resolve(key, args)
        if kind == "shared":
            shared.append((key, what))
            continue
        if kind == "unknown" or any(p.name not in shapes for p in what) \
                or any(p.expert is not None and p.expert >= shapes[p.name][0] for p in what):
            report.unexpected.append(key)
            continue
        # (shape, is FP8) from the file header, or from the tensor of an in-memory dict
        src_shape, is_fp8 = src.meta(key) if isinstance(src, _SafetensorsReader) else \
            (tuple(src[key].shape), src[key].dtype in _FP8_DTYPES)
        if is_fp8 and key + "_scale_inv" not in src:
            raise CheckpointMismatchError(f"'{key}' is FP8 but the checkpoint has no '{key}_scale_inv'")
        for p in what:
            shape = tuple(shapes[p.name])
            if p.rows is not None:  # fused gate_up_proj holds w1 and w3
                want, note = (shape[0], 2 * shape[1], *shape[2:]), f" (= cat of two {shape})"
            elif p.expert is not None:
                want, note = shape[1:], f" (expert {p.expert} of {shape})"
            else:
                want, note = shape, ""
            if src_shape != want:
                raise CheckpointMismatchError(f"shape mismatch: checkpoint '{key}' is {src_shape} but our "
                                              f"'{p.name}' needs {want}{note}")
            if not allocate and dest[p.name].is_meta:
                raise CheckpointMismatchError(f"our '{p.name}' is on the meta device: materialize the model "
                                              "(build_model(args, device=...)) before loading")
            part = "all" if p.expert is None else p.expert
            done = filled.setdefault(p.name, set())
            if part in done or "all" in done or (part == "all" and done):
                raise CheckpointMismatchError(f"our '{p.name}' is written twice (again by '{key}'): does the "
                                              "checkpoint hold both fused and per-expert experts?")
            done.add(part)
        plan.append((key, what))
    for name, shape in shapes.items():
        done = filled.get(name, set())
        if "all" not in done and not (len(shape) == 3 and "experts" in name and done >= set(range(shape[0]))):
            report.missing.append(name)
    msg = [f"{len(report.missing)} model tensors not in the checkpoint: {_short(report.missing)}"] \
        if report.missing else []
    msg += [f"{len(report.unexpected)} checkpoint tensors with no place in the model (n_layers={args.n_layers}, "
            f"n_mtp_layers={args.n_mtp_layers}): {_short(report.unexpected)}"] if report.unexpected else []
    if strict and msg:
        raise CheckpointMismatchError("; ".join(msg) + " (strict=False loads the rest)")

    for key, what in plan:  # one checkpoint tensor in memory at a time
        t = src[key]
        if key + "_scale_inv" in src:
            t = _dequant_fp8(key, t, src[key + "_scale_inv"], fp8_block)
        for p in what:
            if allocate and p.name not in dest:
                dest[p.name] = torch.empty(shapes[p.name], dtype=t.dtype)
            target = dest[p.name] if p.expert is None else dest[p.name][p.expert]
            with torch.no_grad():
                target.copy_(t if p.rows is None else t[:, p.rows])
        report.loaded += 1
        del t
    report.shared_copies = [k for k, _ in shared]
    if mtp_shared_copies == "verify":
        for key, main in shared:
            if main in dest and not torch.equal(src[key].to(dest[main].dtype), dest[main]):
                raise CheckpointMismatchError(
                    f"'{key}' differs from the main model's {TOP_LEVEL[main]}: our MTP shares the embedding and "
                    "head physically (mtp_shared_copies='ignore' skips this check)")
    return report


class _SafetensorsReader:
    """Read-only view over the tensors of several memory-mapped .safetensors files; [] reads one tensor."""

    def __init__(self, files: list[Path], stack: ExitStack):
        self._where: dict[str, Any] = {}
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            for k in handle.keys():
                if k in self._where:
                    raise CheckpointMismatchError(f"tensor '{k}' is stored in two files (second: {f})")
                self._where[k] = handle

    def keys(self):
        return self._where.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def meta(self, key: str) -> tuple[tuple[int, ...], bool]:
        sl = self._where[key].get_slice(key)
        return tuple(sl.get_shape()), sl.get_dtype().startswith("F8")


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that do not exist: {_short(absent)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def _ref_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in build_model(args, device="meta").state_dict().items()}


# ------------------------------------------------------------------------------- public API
def convert_state_dict_to_hf(sd: Mapping[str, torch.Tensor], args: ModelArgs, *, expert_layout: str = "fused",
                             mtp_shared_copies: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names. Renamed tensors are the same objects (no copy); fused expert
    tensors are new. MTP layers come after the main layers (HF's ForCausalLM ignores them)."""
    shapes = _ref_shapes(args)
    missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    if missing or unexpected:
        raise CheckpointMismatchError(f"state dict does not match model config '{args.name}': "
                                      f"missing {_short(missing)}; unexpected {_short(unexpected)}")
    bad = [f"'{k}' is {tuple(sd[k].shape)}, config needs {tuple(v)}" for k, v in shapes.items() if sd[k].shape != v]
    if bad:
        raise CheckpointMismatchError("shape mismatch: " + "; ".join(bad))
    return {o.key: o.make() for o in _hf_outputs(sd, args, expert_layout, mtp_shared_copies)}


def convert_state_dict_from_hf(sd: Mapping[str, torch.Tensor], args: ModelArgs, *, strict: bool = True,
                               mtp_shared_copies: str = "verify",
                               fp8_block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """HF (fused or per-expert, optionally FP8) state dict -> ours, for ``model.load_state_dict``."""
    shapes = _ref_shapes(args)
    dest: dict[str, torch.Tensor] = {}
    _fill(sd, args, dest, shapes, allocate=True, strict=strict, mtp_shared_copies=mtp_shared_copies,
          fp8_block=fp8_block)
    return {k: dest[k] for k in shapes if k in dest}


@torch.no_grad()
def load_hf_checkpoint(model: Transformer, path: str | os.PathLike, *, strict: bool = True,
                       mtp_shared_copies: str = "verify", check_config: bool = True,
                       fp8_block: tuple[int, int] | None = None) -> LoadReport:
    """Stream a HF/DeepSeek safetensors checkpoint (a file, or a folder with or without
    model.safetensors.index.json) into ``model``'s own tensors, one tensor at a time.

    strict: every model tensor must be filled and every checkpoint tensor used.
    check_config: compare the folder's config.json (if any) with ``model.args`` first.
    fp8_block: FP8 scale block size; default from config.json's quantization_config, else 128x128.
    """
    path = Path(path)
    files = _checkpoint_files(path)
    config_json = (path if path.is_dir() else path.parent) / "config.json"
    raw_cfg = json.loads(config_json.read_text()) if config_json.exists() else {}
    if check_config and raw_cfg:
        check_config_matches(model.args, raw_cfg)
    if fp8_block is None:
        fp8_block = tuple((raw_cfg.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    dest = dict(model.state_dict(keep_vars=True))  # the live Parameters / buffers
    with ExitStack() as stack:
        src = _SafetensorsReader(files, stack)
        report = _fill(src, model.args, dest, {k: v.shape for k, v in dest.items()}, allocate=False,
                       strict=strict, mtp_shared_copies=mtp_shared_copies, fp8_block=fp8_block)
    report.files = [str(f) for f in files]
    return report


@torch.no_grad()
def save_hf_checkpoint(model: Transformer, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
                       dtype: torch.dtype | None = None, expert_layout: str = "fused",
                       mtp_shared_copies: bool = False, write_config: bool = True,
                       overwrite: bool = False) -> list[Path]:
    """Write ``model`` as HF safetensors shards + model.safetensors.index.json (+ config.json),
    converting one shard at a time. ``expert_layout='per_expert'`` writes DeepSeek's released
    layout; ``dtype`` casts on the way out (the routing bias stays fp32). Returns the shard paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("*.safetensors")) + sorted(out.glob("model.safetensors.index.json"))
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds a checkpoint ({stale[0].name}, ...); pass overwrite=True")
    for f in stale:
        f.unlink()
    outs = _hf_outputs(model.state_dict(), model.args, expert_layout, mtp_shared_copies)

    def out_dtype(o: _Out) -> torch.dtype:
        return o.dtype if dtype is None or o.keep_fp32 else dtype

    shards: list[list[_Out]] = [[]]
    size = 0
    for o in outs:  # greedy in state-dict order; a tensor larger than the limit gets its own shard
        nbytes = math.prod(o.shape) * torch.empty((), dtype=out_dtype(o)).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, group in zip(names, shards):  # only this shard's converted tensors exist at a time
        tensors = {}
        for o in group:
            t = o.make().detach().to(out_dtype(o)).contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a slice of a stacked expert tensor: safetensors wants unshared storage
            tensors[o.key], weight_map[o.key] = t, fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if write_config:
        hf_config_from_args(model.args).to_json_file(str(out / "config.json"), use_diff=False)
    return [out / f for f in names]
