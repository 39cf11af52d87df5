"""Hugging Face / DeepSeek checkpoint interop: config mapping, one rename table, and streaming
safetensors load/save.

Why it exists: to start training from DeepSeek's released weights (any ``DeepseekV3ForCausalLM`` or
``DeepseekV2ForCausalLM`` checkpoint: V3, V2, V2-Lite; the config side is ``hf_config.py``), to hand
trained weights to inference stacks that read the Hugging Face layout, and to test our model against
an independent implementation (``tests/test_hf_interop.py``, ``tests/test_deepseek_v2.py``).

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
from safetensors.torch import save_file

from hai_llm.model.args import ModelArgs
from hai_llm.model.transformer import Transformer, build_model

from .hf_config import (CheckpointMismatchError, args_from_hf_config, check_config_matches,  # noqa: F401
                        hf_config_from_args)
from .shards import SafetensorsReader, checkpoint_files, nonfinite_counts

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
    # router; our routing-only bias buffer is HF's e_score_correction_bias buffer (V3 only: the V2
    # family has none, and our zero buffer is then neither read nor written)
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
def _short(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


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
    if local in _BLOCK_FROM_HF and (args.routing_bias or _BLOCK_FROM_HF[local] != "ffn.gate.bias"):
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
        elif in_block and local == "ffn.gate.bias" and not args.routing_bias:
            continue  # V2 routing: no correction bias in the HF layout
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
def _hf_prefix(name: str, args: ModelArgs) -> tuple[str, str, bool] | None:
    """(HF layer prefix, local name, inside a block) of our tensor ``name``, None for top level."""
    m = _OUR_LAYER.fullmatch(name)
    if m is None:
        return None
    hf = f"model.layers.{int(m[1]) if m[1] is not None else args.n_layers + int(m[2])}."
    return hf, m[4], m[1] is not None or m[3] is not None


def _describe_missing(name: str, args: ModelArgs, experts: list[int] | None = None, n_experts: int = 0) -> str:
    """Our missing tensor with the HF key(s) that would fill it: for a stacked expert tensor the
    missing expert indices and their per-expert keys (``experts``), or both layouts when no expert
    at all was found (``experts=None``)."""
    if name in TOP_LEVEL:
        return f"{name} (HF '{TOP_LEVEL[name]}')"
    hf, local, in_block = _hf_prefix(name, args) or ("", name, False)
    if in_block and local in EXPERT_STACKS:
        proj = EXPERT_STACKS[local]
        fused = FUSED_DOWN if local == "ffn.experts.w2" else FUSED_GATE_UP
        if experts is None:
            return f"{name} (HF '{hf}{fused}' or '{hf}mlp.experts.{{0..{n_experts - 1}}}.{proj}.weight')"
        keys = [f"'{hf}mlp.experts.{e}.{proj}.weight'" for e in experts]
        return f"{name} experts {_short([str(e) for e in experts], 8)} (HF {_short(keys, 3)})"
    if not in_block and local in MTP_EXTRA:
        return f"{name} (HF '{hf}{MTP_EXTRA[local]}')"
    if in_block and local in BLOCK:
        return f"{name} (HF '{hf}{BLOCK[local]}')"
    return name


def _only_mtp_missing(missing: list[str], plan, shared) -> bool:
    """Every missing tensor is an MTP one and the checkpoint has no MTP tensor at all."""
    return all(n.startswith("mtp.") for n in missing) and not shared and \
        not any(p.name.startswith("mtp.") for _, what in plan for p in what)


@dataclass
class LoadReport:
    """What a load did. With strict=True ``missing`` and ``unexpected`` are always empty."""
    files: list[str] = field(default_factory=list)
    loaded: int = 0  # checkpoint tensors copied into the model
    missing: list[str] = field(default_factory=list)  # our tensors not (fully) filled
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors with no place in the model
    shared_copies: list[str] = field(default_factory=list)  # MTP embed/head copies (verified or ignored)
    nonfinite: dict[str, str] = field(default_factory=dict)  # checkpoint key -> "n NaN, m inf of N (file)"


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
        src_shape, is_fp8 = src.meta(key) if isinstance(src, SafetensorsReader) else \
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
    no_bias = [] if args.routing_bias else [n for n in shapes if n.endswith("ffn.gate.bias")]
    described = []
    for name, shape in shapes.items():
        done = filled.get(name, set())
        if name in no_bias or "all" in done:
            continue
        if len(shape) == 3 and "experts" in name:
            absent = sorted(set(range(shape[0])) - done)
            if not absent:
                continue
            described.append(_describe_missing(name, args, absent if done else None, shape[0]))
        else:
            described.append(_describe_missing(name, args))
        report.missing.append(name)
    if strict and report.missing and not report.unexpected and _only_mtp_missing(report.missing, plan, shared):
        raise CheckpointMismatchError(
            f"the model has n_mtp_layers={args.n_mtp_layers} but the checkpoint holds no MTP weights (HF layer "
            f"model.layers.{args.n_layers}.*): Hugging Face's save_pretrained writes num_nextn_predict_layers=1 into "
            "config.json without them. Load the main model only into a model built without MTP, e.g. "
            "args_from_hf_config(path, n_mtp_layers=0) (strict=False would leave the MTP module randomly initialized)")
    msg = [f"{len(report.missing)} model tensors not in the checkpoint: {_short(described)}"] \
        if report.missing else []
    msg += [f"{len(report.unexpected)} checkpoint tensors with no place in the model (n_layers={args.n_layers}, "
            f"n_mtp_layers={args.n_mtp_layers}): {_short(report.unexpected)}"] if report.unexpected else []
    if strict and msg:
        raise CheckpointMismatchError("; ".join(msg) + " (strict=False loads the rest)")

    for key, what in plan:  # one checkpoint tensor in memory at a time
        t = src[key]
        if key + "_scale_inv" in src:
            t = _dequant_fp8(key, t, src[key + "_scale_inv"], fp8_block)
        nan, inf = nonfinite_counts(t)
        if nan or inf:
            where = f" in {src.file_of(key)}" if isinstance(src, SafetensorsReader) else ""
            report.nonfinite[key] = f"{nan} NaN, {inf} inf of {t.numel()}{where}"
        for p in what:
            if allocate and p.name not in dest:
                dest[p.name] = torch.empty(shapes[p.name], dtype=t.dtype)
            target = dest[p.name] if p.expert is None else dest[p.name][p.expert]
            with torch.no_grad():
                target.copy_(t if p.rows is None else t[:, p.rows])
        report.loaded += 1
        del t
    for name in no_bias:  # V2 routing: the checkpoint's "no correction bias" is a zero bias
        if allocate:
            dest[name] = torch.zeros(shapes[name])
        else:
            with torch.no_grad():
                dest[name].zero_()
    if strict and report.nonfinite:
        bad = [f"'{k}': {v}" for k, v in report.nonfinite.items()]
        raise CheckpointMismatchError(
            f"{len(bad)} checkpoint tensors hold non-finite values: {_short(bad)}; they are now in the model. "
            "Re-download or repair those files (strict=False loads anyway and lists them in LoadReport.nonfinite)")
    report.shared_copies = [k for k, _ in shared]
    if mtp_shared_copies == "verify":
        for key, main in shared:
            if main in dest and not torch.equal(src[key].to(dest[main].dtype), dest[main]):
                raise CheckpointMismatchError(
                    f"'{key}' differs from the main model's {TOP_LEVEL[main]}: our MTP shares the embedding and "
                    "head physically (mtp_shared_copies='ignore' skips this check)")
    return report


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
    files, weight_map = checkpoint_files(path)
    config_json = (path if path.is_dir() else path.parent) / "config.json"
    raw_cfg = json.loads(config_json.read_text()) if config_json.exists() else {}
    if check_config and raw_cfg:
        check_config_matches(model.args, raw_cfg)
    if fp8_block is None:
        fp8_block = tuple((raw_cfg.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    dest = dict(model.state_dict(keep_vars=True))  # the live Parameters / buffers
    with ExitStack() as stack:
        src = SafetensorsReader(files, stack, weight_map)
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
