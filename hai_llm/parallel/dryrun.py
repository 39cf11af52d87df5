"""Full-scale dry run: the memory and communication of a 4D layout, in one process, in seconds.

``plan_layout(model_args, dims, ...)`` lays a model out over a ``ParallelDims`` mesh exactly as
training would (pipeline stages, expert slices, ZeRO-1 shards, the pipeline schedule's
micro-batch flow) without allocating a single weight, and reports for every distinct rank
*role* what it holds and what it sends. The 2048-GPU DeepSeek-V3 layout (PP16 x DP128, EP64,
DualPipe) takes a few seconds, dominated by building the model once on the meta device.

Where the numbers come from
---------------------------
* **Parameters** are counted on the REAL model: ``build_model(args, "meta")`` is built once and
  split into units (embedding, each block, final norm + head, each MTP module); a stage's count
  is the sum of ``numel`` of its units' parameters. Routed-expert tensors (``ffn.experts.*``) are
  divided by ``ep`` (every EP rank holds ``n_routed_experts / ep`` whole experts); everything
  else (attention, shared expert, router, norms, dense FFN, embedding, head) is replicated over
  the stage. The routing bias is a buffer (fp32, not trained): counted separately. A check
  asserts that the units cover the model's parameters exactly.
* **Stages.** ``n_stages = pp`` (1f1b, dualpipe) or ``2 pp`` (dualpipev). Layers are split as
  evenly as possible; when they do not divide, the stages with one layer fewer are taken from
  the ends (last, first, second-last, ...) because those also carry the embedding / the head
  and MTP. Stage 0 holds the embedding, the last stage the final norm, the head and the MTP
  modules. Rank r holds stage r (1f1b); stages r and pp-1-r (dualpipe: both directions, so
  every stage exists twice and the pair's gradients are summed); stages r and 2pp-1-r
  (dualpipev: no duplicates). When a rank runs MTP without holding the embedding (1f1b with
  pp > 1) it keeps a shared copy of it whose gradient is all-reduced with stage 0.
* **Memory per rank** (bytes), P = parameters held (experts already / ep), n_d = dp*sp (the
  dense-gradient group ``dp_sp``), n_e = edp (expert-data-parallel group)::

      weights    2 * P                               bf16 compute copy
      master     4 * (P_dense / n_d + P_expert / n_e)  fp32, ZeRO-1 sharded (n = 1 without ZeRO)
      grads      4 * P                               fp32 accumulation buffer (ZeRO-1 keeps it whole)
      optimizer  2 * b_m * (P_dense / n_d + P_expert / n_e)   AdamW m and v, b_m = 2 (bf16, the
                                                     paper) or 4 (fp32)
      buffers    4 * routing-bias entries
      activations  peak over the schedule of the stashed activations (below)

* **Activations** per token per unit are listed term by term in ``activation_terms`` (bf16
  residual stream; with ``precision="fp8"`` the Linear inputs the paper caches in FP8 cost
  1 + 4/128 bytes per element: E4M3 plus an fp32 scale per 1x128 tile; the attention output
  (input of ``wo``) uses the paper's finer E5M6 format, 1.5 + 4/128 bytes). One micro-batch of
  a chunk stashes ``T * sum(terms)`` bytes with ``T = micro_batch * seq_len / sp`` tokens.
  The stash lives from the chunk's forward to its weight-gradient step; the peak is taken by
  walking the real schedule's action list (``hai_llm.pipeline.schedules``), weighting each chunk
  by its own bytes: 1F1B keeps pp micro-batches on rank 0, DualPipe pp+1 chunk-stashes per
  rank (Table 2 of the report).
* **Communication per step per rank** (bytes this rank sends; ring algorithms, so a
  reduce-scatter or an all-gather of B bytes over n ranks sends (n-1)/n * B and an all-reduce
  2 (n-1)/n * B): ZeRO-1 reduce-scatter of fp32 gradients and all-gather of bf16 weights over
  ``dp_sp`` (dense) and ``edp`` (experts); the DualPipe pair all-reduce of the ZeRO shard
  (the two copies of a stage); the EP all-to-all per micro-batch per MoE layer (forward
  dispatch FP8 + backward combine-gradient FP8, forward combine BF16 + backward
  dispatch-gradient BF16) split into InfiniBand and NVLink copies by ``ep_traffic``; the
  pipeline send of activations (forward) and activation gradients (backward), T * dim * 2
  bytes each; the sequence-parallel all-gather of the 576-number MLA latent per attention
  layer (and the reduce-scatter of its gradient).

Everything is plain Python on top of ``ParallelDims`` arithmetic and the schedule's action
lists. ``rank_groups(dims, rank)`` optionally builds the real ``DeviceMesh`` for one rank under
torch's fake process group to show the communicators that rank joins.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from hai_llm.model.args import ModelArgs
from hai_llm.parallel.dims import SCHEDULES, ParallelDims

GIB = 1024 ** 3
FP8_TILE = 128  # elements sharing one fp32 scale (1x128 activation tiles)
SCALE_BYTES = 4
PAPER_GLOBAL_BATCH = 15360  # sequences per step, DeepSeek-V3 pre-training after the ramp-up
PRECISIONS = ("bf16", "fp8")
RECOMPUTE = ("selective", "none", "full")


# ------------------------------------------------------------------------- model units
@dataclass(frozen=True)
class Unit:
    """A piece of the model that is placed whole on one pipeline stage."""

    name: str  # "embed", "L5", "head" (final norm + output head), "MTP0"
    kind: str  # "embed" | "dense" | "moe" | "head" | "mtp"
    dense_params: int  # replicated over the stage (dp_sp group)
    expert_params: int  # routed experts of ALL EP ranks together
    buffers: int  # routing-bias entries (fp32 buffers, not trained)
    moe_blocks: int  # MoE feed-forwards inside (1 for a MoE layer / an MTP module on MoE)
    attn_blocks: int  # MLA blocks inside


def _split_counts(module) -> tuple[int, int, int]:
    dense = expert = 0
    for name, p in module.named_parameters():
        if ".experts." in f".{name}":
            expert += p.numel()
        else:
            dense += p.numel()
    buffers = sum(b.numel() for n, b in module.named_buffers() if n.endswith("gate.bias"))
    return dense, expert, buffers


_UNITS_CACHE: dict[str, tuple[Unit, ...]] = {}


def _build_units(args: ModelArgs) -> tuple[Unit, ...]:
    from hai_llm.model.transformer import build_model

    model = build_model(args, "meta")
    units = [Unit("embed", "embed", model.embed.weight.numel(), 0, 0, 0, 0)]
    for i, block in enumerate(model.layers):
        d, e, b = _split_counts(block)
        moe = args.is_moe_layer(i)
        units.append(Unit(f"L{i}", "moe" if moe else "dense", d, e, b, int(moe), 1))
    d_norm, _, _ = _split_counts(model.norm)
    units.append(Unit("head", "head", d_norm + model.head.weight.numel(), 0, 0, 0, 0))
    for k, mod in enumerate(model.mtp):
        d, e, b = _split_counts(mod)
        units.append(Unit(f"MTP{k}", "mtp", d, e, b, int(args.is_moe_layer(args.n_layers + k)), 1))
    total = sum(p.numel() for p in model.parameters())
    covered = sum(u.dense_params + u.expert_params for u in units)
    if covered != total:  # a new top-level module nobody placed: fail loudly, never under-count
        raise RuntimeError(f"dry-run units cover {covered:,} of the model's {total:,} parameters: "
                           f"update hai_llm.parallel.dryrun.model_units")
    return tuple(units)


def model_units(args: ModelArgs) -> tuple[Unit, ...]:
    """Units of the real model (built once on the meta device; cached per config)."""
    key = repr(args)
    if key not in _UNITS_CACHE:
        if len(_UNITS_CACHE) >= 8:
            _UNITS_CACHE.pop(next(iter(_UNITS_CACHE)))
        _UNITS_CACHE[key] = _build_units(args)
    return _UNITS_CACHE[key]


# ------------------------------------------------------------------------- activations
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


# ------------------------------------------------------------------------- EP traffic
def _distinct_targets(n_gpus: int, per_gpu: int, k: float) -> float:
    """Expected number of distinct GPUs hit when k experts are drawn uniformly without
    replacement from n_gpus * per_gpu experts (per_gpu on each GPU); k may be fractional
    (linear interpolation between floor and ceil)."""
    total = n_gpus * per_gpu

    def exact(kk: int) -> float:
        kk = max(0, min(kk, total))
        miss = math.comb(total - per_gpu, kk) / math.comb(total, kk) if kk <= total - per_gpu else 0.0
        return n_gpus * (1.0 - miss)

    lo = math.floor(k)
    frac = k - lo
    return exact(lo) if frac == 0 else (1 - frac) * exact(lo) + frac * exact(lo + 1)


def ep_traffic(args: ModelArgs, dims: ParallelDims) -> dict[str, float]:
    """Expected copies of one token's hidden state that leave its GPU in one dispatch.

    DeepEP-style node-limited routing (REFERENCE.md sec. 5), balanced uniform routing:

    * EP group on one node (``ep <= gpus_per_node``): the token goes once to every distinct GPU
      hosting one of its K experts, d = ep * (1 - C(E - e, K) / C(E, K)) with e = E / ep experts
      per GPU; the copies that are its own GPU (d / ep of them) stay local. IB = 0.
    * EP group on N = ep / gpus_per_node nodes, one expert group per node, each token limited to
      M = n_limited_groups nodes, K / M experts on each: one IB copy per selected remote node,
      ``ib = M (1 - 1/N)`` (own node selected with probability M/N); on each selected node the
      copy is forwarded over NVLink to the d = g (1 - C(E_node - e, K/M) / C(E_node, K/M))
      distinct target GPUs other than the entry GPU, ``nvlink = M d (1 - 1/g)`` (g GPUs/node).

    ``naive`` is what a per-expert all_to_all_single moves (K (1 - 1/ep) copies, no dedup), of
    which ``naive_cross_node`` cross nodes. Combine moves the same copies back (partial sums
    are reduced on the forwarding GPU before crossing IB).
    """
    E, K, ep, g = args.n_routed_experts, args.n_activated_experts, dims.ep, dims.gpus_per_node
    out = {"ib": 0.0, "nvlink": 0.0, "naive": 0.0, "naive_cross_node": 0.0, "nodes": 1,
           "nodes_per_token": 1.0}
    if ep == 1 or args.n_moe_layers == 0:
        return out
    per_gpu = E // ep
    out["naive"] = K * (1 - 1 / ep)
    n_nodes = dims.nodes_per_ep_group if ep > g and dims.world_size >= g else 1
    out["nodes"] = n_nodes
    if n_nodes == 1:
        d = _distinct_targets(ep, per_gpu, K)
        out["nvlink"] = d * (1 - 1 / ep)
        return out
    M = min(args.n_limited_groups, n_nodes) if args.n_expert_groups == n_nodes else n_nodes
    d = _distinct_targets(g, per_gpu, K / M)
    out["nodes_per_token"] = float(M)
    out["ib"] = M * (1 - 1 / n_nodes)
    out["nvlink"] = M * d * (1 - 1 / g)
    out["naive_cross_node"] = K * (1 - g / ep)
    return out


# ------------------------------------------------------------------------- stages
def partition_layers(n_layers: int, n_stages: int) -> list[int]:
    """Layers per stage, as even as possible; the lighter stages sit at the ends (last,
    first, second-last, second, ...) since those also hold head + MTP / embedding."""
    if n_stages < 1 or n_layers < n_stages:
        raise ValueError(f"cannot split {n_layers} layers over {n_stages} stages (need >= 1 each)")
    base, extra = divmod(n_layers, n_stages)
    order, lo, hi = [], 0, n_stages - 1
    while lo <= hi:
        order.append(hi)
        if lo != hi:
            order.append(lo)
        lo, hi = lo + 1, hi - 1
    light = set(order[: n_stages - extra])
    return [base if s in light else base + 1 for s in range(n_stages)]


@dataclass
class StagePlan:
    index: int
    units: list[str]
    label: str
    first_layer: int
    n_layers: int
    n_dense_layers: int
    n_moe_layers: int  # MoE transformer layers (MTP excluded)
    moe_blocks: int  # MoE feed-forwards incl. MTP
    attn_blocks: int
    dense_params: int
    expert_params: int  # all EP ranks together
    buffers: int
    act_bytes_per_token: float
    moe_flags: list[bool] = field(default_factory=list)  # per attention block: MoE FFN?


def _range_label(first: int, n: int) -> str:
    if n == 0:
        return "-"
    return f"L{first}" if n == 1 else f"L{first}-{first + n - 1}"


def _composition(s: "StagePlan") -> tuple:
    return ("embed" in s.units, s.n_dense_layers, s.n_moe_layers, "head" in s.units,
            sum(1 for u in s.units if u.startswith("MTP")))


def _composition_label(s: "StagePlan") -> str:
    embed, dense, moe, head, mtp = _composition(s)
    parts = (["embed"] if embed else []) + ([f"{dense} dense"] if dense else []) + \
        ([f"{moe} MoE"] if moe else []) + (["head"] if head else []) + \
        (["MTP" if mtp == 1 else f"MTP x{mtp}"] if mtp else [])
    return " + ".join(parts) or "empty"


def build_stages(args: ModelArgs, n_stages: int, units: tuple[Unit, ...], act: dict[str, float],
                 layers_per_stage: list[int] | None = None) -> list[StagePlan]:
    counts = list(layers_per_stage) if layers_per_stage is not None else partition_layers(args.n_layers, n_stages)
    if len(counts) != n_stages or sum(counts) != args.n_layers or min(counts) < 0:
        raise ValueError(f"layers_per_stage={counts} must have {n_stages} non-negative entries "
                         f"summing to n_layers={args.n_layers}")
    by_name = {u.name: u for u in units}
    stages, start = [], 0
    for s, n in enumerate(counts):
        names = (["embed"] if s == 0 else []) + [f"L{i}" for i in range(start, start + n)]
        if s == n_stages - 1:
            names += ["head"] + [u.name for u in units if u.kind == "mtp"]
        us = [by_name[nm] for nm in names]
        dense_l = sum(1 for u in us if u.kind == "dense")
        moe_l = sum(1 for u in us if u.kind == "moe")
        parts = (["embed"] if s == 0 else [])
        if n:
            kinds = "dense" if moe_l == 0 else ("MoE" if dense_l == 0 else f"{dense_l} dense + {moe_l} MoE")
            parts.append(f"{_range_label(start, n)} ({kinds})")
        if s == n_stages - 1:
            parts.append("head")
            n_mtp = sum(1 for u in us if u.kind == "mtp")
            if n_mtp:
                parts.append("MTP" if n_mtp == 1 else f"MTP x{n_mtp}")
        stages.append(StagePlan(
            index=s, units=names, label=" + ".join(parts), first_layer=start, n_layers=n,
            n_dense_layers=dense_l, n_moe_layers=moe_l, moe_blocks=sum(u.moe_blocks for u in us),
            attn_blocks=sum(u.attn_blocks for u in us),
            dense_params=sum(u.dense_params for u in us),
            expert_params=sum(u.expert_params for u in us), buffers=sum(u.buffers for u in us),
            act_bytes_per_token=sum(act[u.kind] for u in us),
            moe_flags=[bool(u.moe_blocks) for u in us if u.attn_blocks]))
        start += n
    return stages


# ------------------------------------------------------------------------- plan
@dataclass
class CommItem:
    name: str
    group: str  # dp_sp | edp | ep | pp | sp | pair | embed
    link: str  # "IB" | "NVLink" | "mixed"
    op: str
    bytes_per_step: float
    detail: str = ""


@dataclass
class RankPlan:
    """One pipeline rank (every dp/sp/ep coordinate of it is identical)."""

    pp_rank: int
    stages: list[int]  # global stage index per local chunk
    chunk_labels: list[str]
    shared: list[str]  # shared copies held for MTP (e.g. the embedding)
    micro_batches: list[int]  # micro-batches flowing through each chunk per step
    n_layers: int
    n_moe_blocks: int
    experts_per_moe_layer: int
    dense_params: int  # held by this rank (both chunks, shared copies included)
    expert_params: int  # this rank's slice: all its chunks' experts / ep
    buffers: int
    act_bytes_per_mb: list[float]  # per chunk, one micro-batch
    inflight_chunks: int  # peak live chunk stashes (Table 2 units)
    memory: dict[str, float]
    comm: list[CommItem]

    @property
    def params(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def total_comm(self) -> float:
        return sum(c.bytes_per_step for c in self.comm)

    def signature(self) -> tuple:
        return (tuple(self.chunk_labels), tuple(self.shared), self.params,
                tuple(round(v) for v in self.memory.values()),
                tuple(round(c.bytes_per_step) for c in self.comm))


@dataclass
class Role:
    name: str  # "pp0,15" / "pp2-13"
    pp_ranks: list[int]
    n_ranks: int  # global ranks with this role (len(pp_ranks) * dp * sp)
    layers: str  # what a rank of this role holds
    rank: RankPlan  # the representative (all are identical)


@dataclass
class Plan:
    model: str
    dims: ParallelDims
    schedule: str
    seq_len: int
    micro_batch: int
    n_micro: int
    precision: str
    zero1: bool
    optim_dtype: str
    recompute: str
    tokens_per_micro_batch: int  # per rank (micro_batch * seq_len / sp)
    global_batch_sequences: int
    n_stages: int
    stages: list[StagePlan]
    ranks: list[RankPlan]  # one per pp rank
    roles: list[Role]
    ep: dict[str, float]
    model_params: dict[str, int]  # main / mtp / total / buffers from the meta model
    activation_terms: dict[str, dict[str, float]]
    formulas: dict[str, str]
    unit_params: dict[str, int]  # parameters + buffers of every model unit, by name
    shape_info: dict[str, int]  # dim, latent (kv_lora + rope), top_k, n_experts
    notes: list[str] = field(default_factory=list)

    # -- consistency ------------------------------------------------------------------
    def stage_param_total(self) -> int:
        """Sum over every stage once of (dense + expert slice * ep) + routing-bias buffers."""
        ep = self.dims.ep
        return sum(s.dense_params + (s.expert_params // ep) * ep + s.buffers for s in self.stages)

    def rank_param_total(self) -> int:
        """Sum over every pp rank of what it holds, expert slice summed over the ep EP ranks
        (so dualpipe counts each stage twice, 1f1b+MTP the embedding copy twice)."""
        return sum(r.dense_params + r.expert_params * self.dims.ep + r.buffers for r in self.ranks)

    def copies_expected(self) -> int:
        """What rank_param_total must equal: copies of every stage + shared copies."""
        per = 2 if self.schedule == "dualpipe" else 1
        shared = sum(self.unit_params[n] for r in self.ranks for n in r.shared)
        return per * self.model_params["total_with_buffers"] + shared

    @property
    def peak_memory(self) -> float:
        return max(r.total_memory for r in self.ranks)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "model": self.model,
            "dims": asdict(self.dims),
            "schedule": self.schedule, "seq_len": self.seq_len, "micro_batch": self.micro_batch,
            "n_micro": self.n_micro, "precision": self.precision, "zero1": self.zero1,
            "optim_dtype": self.optim_dtype, "recompute": self.recompute,
            "tokens_per_micro_batch": self.tokens_per_micro_batch,
            "global_batch_sequences": self.global_batch_sequences,
            "global_batch_tokens": self.global_batch_sequences * self.seq_len,
            "n_stages": self.n_stages,
            "stages": [asdict(s) for s in self.stages],
            "roles": [{"name": r.name, "pp_ranks": r.pp_ranks, "n_ranks": r.n_ranks,
                       "layers": r.layers, **_rank_dict(r.rank)} for r in self.roles],
            "ep_traffic_copies_per_token": self.ep,
            "model_params": self.model_params,
            "consistency": {"stage_param_total": self.stage_param_total(),
                            "rank_param_total": self.rank_param_total(),
                            "copies_expected": self.copies_expected()},
            "activation_terms_bytes_per_token": self.activation_terms,
            "formulas": self.formulas,
            "notes": self.notes,
            "peak_memory_bytes": self.peak_memory,
        }
        return d


def _rank_dict(r: RankPlan) -> dict[str, Any]:
    d = asdict(r)
    d["params"] = r.params
    d["total_memory"] = r.total_memory
    d["total_comm"] = r.total_comm
    return d


def default_n_micro(dims: ParallelDims, micro_batch: int, schedule: str,
                    global_batch: int = PAPER_GLOBAL_BATCH) -> int:
    """Micro-batches per step reproducing the paper's batch of ``global_batch`` sequences
    (15360 after the ramp-up): ceil(global_batch / (dp * micro_batch)), rounded up to what
    the schedule needs (even and >= 2 pp for DualPipe/V, >= pp for 1F1B)."""
    n = max(1, -(-global_batch // (dims.dp * micro_batch)))
    if schedule in ("dualpipe", "dualpipev"):
        n = max(n + n % 2, 2 * dims.pp)
    else:
        n = max(n, dims.pp)
    return n


def make_schedule(name: str, pp: int, n_micro: int):
    """The ``hai_llm.pipeline.schedules`` object for a ``ParallelDims`` schedule name."""
    from hai_llm.pipeline import schedules as S

    if name == "1f1b":
        return S.OneFOneB(pp, n_micro)
    if name == "dualpipe":
        return S.DualPipe(pp, n_micro)
    if name == "dualpipev":
        return S.DualPipeV(pp, n_micro)
    raise ValueError(f"schedule={name!r} is unknown: use one of {SCHEDULES}")


def _peak_weighted(schedule, rank: int, chunk_bytes: list[float]) -> tuple[float, int]:
    """(peak bytes, peak chunk count) of live stashes: allocated at F, freed at W."""
    live = peak = 0.0
    n = peak_n = 0
    for act in schedule.actions(rank):
        for kind, _, chunk in act.parts():
            if kind == "F":
                live += chunk_bytes[chunk]
                n += 1
                peak, peak_n = max(peak, live), max(peak_n, n)
        for kind, _, chunk in act.parts():
            if kind == "W":
                live -= chunk_bytes[chunk]
                n -= 1
    return peak, peak_n


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def _shard(params: int, n: int) -> int:
    return -(-params // n)  # ZeRO pads to a multiple of n


def _fmt_ranks(pp_ranks: list[int]) -> str:
    runs, i = [], 0
    while i < len(pp_ranks):
        j = i
        while j + 1 < len(pp_ranks) and pp_ranks[j + 1] == pp_ranks[j] + 1:
            j += 1
        a, b = pp_ranks[i], pp_ranks[j]
        runs.append(str(a) if a == b else (f"{a},{b}" if b == a + 1 else f"{a}-{b}"))
        i = j + 1
    return "pp" + ",".join(runs)


def plan_layout(model_args: ModelArgs, dims: ParallelDims, seq_len: int = 4096,
                micro_batch: int = 1, n_micro: int | None = None, schedule: str = "dualpipe",
                precision: str = "fp8", zero1: bool = True, optim_dtype: str = "bf16",
                recompute: str = "selective", fused_ce: bool = True,
                layers_per_stage: list[int] | None = None) -> Plan:
    """Lay ``model_args`` out over ``dims`` and account memory and traffic per rank role.

    Validates first (``ParallelDims.validate_for_model``: bad layouts raise ``ValueError``
    naming the fix). ``n_micro`` defaults to ``default_n_micro``. No weights are allocated.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if optim_dtype not in ("bf16", "fp32"):
        raise ValueError(f"optim_dtype must be 'bf16' (the paper) or 'fp32', got {optim_dtype!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown: use one of {SCHEDULES}")
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch={micro_batch} and seq_len={seq_len} must be >= 1")
    if seq_len > model_args.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model_args.max_seq_len}: "
                         f"raise max_seq_len (YaRN extension) or shorten seq_len")
    if n_micro is None:
        n_micro = default_n_micro(dims, micro_batch, schedule)
    dims.validate_for_model(model_args.n_routed_experts, model_args.n_expert_groups,
                            model_args.n_layers, seq_len, n_micro, schedule)

    args, pp, ep = model_args, dims.pp, dims.ep
    n_d, n_e = dims.stage_size, dims.edp
    units = model_units(args)
    unit_params = {u.name: u.dense_params + u.expert_params + u.buffers for u in units}
    kinds = sorted({u.kind for u in units})
    terms = {k: activation_terms(args, k, precision=precision, recompute=recompute,
                                 fused_ce=fused_ce, sp=dims.sp) for k in kinds}
    act = {k: sum(v.values()) for k, v in terms.items()}
    n_stages = 2 * pp if schedule == "dualpipev" else pp
    stages = build_stages(args, n_stages, units, act, layers_per_stage)
    sched = make_schedule(schedule, pp, n_micro)
    T = micro_batch * seq_len // dims.sp
    D = args.dim
    ept = ep_traffic(args, dims)
    fp8 = precision == "fp8"
    b_disp = 1.0 + SCALE_BYTES / FP8_TILE if fp8 else 2.0
    b_opt = 2 * (2 if optim_dtype == "bf16" else 4)
    zd, ze = (n_d, n_e) if zero1 else (1, 1)
    embed_params = next(u.dense_params for u in units if u.kind == "embed")
    has_mtp = any(u.kind == "mtp" for u in units)

    ranks: list[RankPlan] = []
    for r in range(pp):
        chunks = list(range(sched.chunks_per_rank))
        st = [stages[sched.stage_of(r, c)] for c in chunks]
        held_units = {nm for s in st for nm in s.units}
        shared = ["embed"] if has_mtp and pp > 1 and any("head" in s.units for s in st) \
            and "embed" not in held_units else []
        mbs = [len(sched.micro_batches(r, c)) for c in chunks]
        dense = sum(s.dense_params for s in st) + (embed_params if shared else 0)
        expert = sum(s.expert_params for s in st) // ep
        buffers = sum(s.buffers for s in st)
        chunk_bytes = [T * s.act_bytes_per_token for s in st]
        if shared:  # the shared embedding's lookup for MTP: token ids only
            chunk_bytes = [b + (T * act["embed"] if "head" in s.units else 0) for b, s in zip(chunk_bytes, st)]
        peak_bytes, peak_n = _peak_weighted(sched, r, chunk_bytes)
        P = dense + expert
        shard = _shard(dense, zd) + _shard(expert, ze)
        memory = {
            "weights_bf16": 2.0 * P,
            "master_fp32": 4.0 * shard,
            "grads_fp32": 4.0 * P,
            f"adamw_{optim_dtype}": float(b_opt * shard),
            "buffers_fp32": 4.0 * buffers,
            "activations": peak_bytes,
        }
        comm: list[CommItem] = []
        if zero1:
            comm += [
                CommItem("dense grad reduce-scatter", "dp_sp", "mixed", "reduce_scatter fp32",
                         _ring(n_d) * 4 * _shard(dense, n_d) * n_d, f"(n-1)/n * 4 B * P_dense, n={n_d}"),
                CommItem("dense weight all-gather", "dp_sp", "mixed", "all_gather bf16",
                         _ring(n_d) * 2 * _shard(dense, n_d) * n_d, f"(n-1)/n * 2 B * P_dense, n={n_d}"),
                CommItem("expert grad reduce-scatter", "edp", "mixed", "reduce_scatter fp32",
                         _ring(n_e) * 4 * _shard(expert, n_e) * n_e, f"(n-1)/n * 4 B * P_expert, n={n_e}"),
                CommItem("expert weight all-gather", "edp", "mixed", "all_gather bf16",
                         _ring(n_e) * 2 * _shard(expert, n_e) * n_e, f"(n-1)/n * 2 B * P_expert, n={n_e}"),
            ]
        else:
            comm += [
                CommItem("dense grad all-reduce", "dp_sp", "mixed", "all_reduce fp32",
                         2 * _ring(n_d) * 4 * dense, f"2(n-1)/n * 4 B * P_dense, n={n_d}"),
                CommItem("expert grad all-reduce", "edp", "mixed", "all_reduce fp32",
                         2 * _ring(n_e) * 4 * expert, f"2(n-1)/n * 4 B * P_expert, n={n_e}"),
            ]
        if schedule == "dualpipe" and pp > 1:
            comm.append(CommItem("dualpipe pair grad all-reduce", "pair", "IB", "all_reduce fp32",
                                 2 * _ring(2) * 4 * (_shard(dense, zd) + _shard(expert, ze)),
                                 f"ranks r and {pp - 1}-r hold the same 2 stages: sum their "
                                 f"(ZeRO-sharded) fp32 grads"))
        if shared:
            comm.append(CommItem("shared embedding grad all-reduce", "embed", "IB", "all_reduce fp32",
                                 2 * _ring(2) * 4 * embed_params, "stage 0 <-> MTP stage"))
        mb_moe = sum(m * s.moe_blocks for m, s in zip(mbs, st))
        mb_attn = sum(m * s.attn_blocks for m, s in zip(mbs, st))
        for link in ("ib", "nvlink"):
            if ept[link] > 0:
                L = "IB" if link == "ib" else "NVLink"
                comm.append(CommItem(f"EP dispatch ({L})", "ep", L, "all_to_all FP8" if fp8 else "all_to_all bf16",
                                     2 * mb_moe * T * D * ept[link] * b_disp,
                                     f"fwd dispatch + bwd combine-grad: {mb_moe} micro-batch x MoE-layer "
                                     f"x T={T} x D={D} x {ept[link]:.3f} copies x {b_disp:.4g} B"))
                comm.append(CommItem(f"EP combine ({L})", "ep", L, "all_to_all bf16",
                                     2 * mb_moe * T * D * ept[link] * 2.0,
                                     f"fwd combine + bwd dispatch-grad: {mb_moe} x T x D x "
                                     f"{ept[link]:.3f} copies x 2 B"))
        pp_sends = 0
        for c, m in zip(chunks, mbs):
            nxt, prv = sched.next_of(r, c), sched.prev_of(r, c)
            pp_sends += m * ((nxt is not None and nxt[0] != r) + (prv is not None and prv[0] != r))
        if pp_sends:
            comm.append(CommItem("PP send act/grad", "pp", "IB", "send bf16", pp_sends * T * D * 2.0,
                                 f"{pp_sends} sends x T x D x 2 B"))
        if dims.sp > 1:
            lat = args.kv_lora_rank + args.qk_rope_head_dim
            comm.append(CommItem("SP latent all-gather + grad reduce-scatter", "sp", "NVLink",
                                 "all_gather bf16", 2 * mb_attn * (dims.sp - 1) * T * lat * 2.0,
                                 f"2 x {mb_attn} micro-batch x attn-layer x (sp-1) x T x {lat} x 2 B"))
        ranks.append(RankPlan(
            pp_rank=r, stages=[s.index for s in st], chunk_labels=[s.label for s in st],
            shared=shared, micro_batches=mbs, n_layers=sum(s.n_layers for s in st),
            n_moe_blocks=sum(s.moe_blocks for s in st),
            experts_per_moe_layer=args.n_routed_experts // ep if args.n_moe_layers else 0,
            dense_params=dense, expert_params=expert, buffers=buffers,
            act_bytes_per_mb=chunk_bytes, inflight_chunks=peak_n, memory=memory, comm=comm))

    roles: list[Role] = []
    seen: dict[tuple, Role] = {}
    for rp in ranks:
        # ranks with the same composition (kinds and counts of units per chunk) and the same
        # numbers are one role; mirror ranks of dualpipe hold the same stages in the other order
        comp = [_composition(stages[i]) for i in rp.stages]
        sig = (tuple(sorted(comp)) if schedule == "dualpipe" else tuple(comp),) + rp.signature()[1:]
        if sig in seen:
            seen[sig].pp_ranks.append(rp.pp_rank)
            continue
        seen[sig] = Role(name="", pp_ranks=[rp.pp_rank], n_ranks=0, layers="", rank=rp)
        roles.append(seen[sig])
    for role in roles:
        rp = role.rank
        role.name = _fmt_ranks(role.pp_ranks)
        role.n_ranks = len(role.pp_ranks) * dims.stage_size
        if len(role.pp_ranks) == 1:
            role.layers = " | ".join(rp.chunk_labels)
        else:
            role.layers = " | ".join(_composition_label(stages[i]) for i in rp.stages) + \
                f" (pp{rp.pp_rank}: {' | '.join(_range_label(stages[i].first_layer, stages[i].n_layers) for i in rp.stages)})"
        if rp.shared:
            role.layers += " + shared " + ", ".join(rp.shared)

    main = sum(u.dense_params + u.expert_params + u.buffers for u in units if u.kind != "mtp")
    mtp = sum(u.dense_params + u.expert_params + u.buffers for u in units if u.kind == "mtp")
    model_params = {"main": main, "mtp": mtp, "total_with_buffers": main + mtp,
                    "buffers": sum(u.buffers for u in units),
                    "trainable": sum(u.dense_params + u.expert_params for u in units)}
    plan = Plan(
        model=args.name, dims=dims, schedule=schedule, seq_len=seq_len, micro_batch=micro_batch,
        n_micro=n_micro, precision=precision, zero1=zero1, optim_dtype=optim_dtype,
        recompute=recompute, tokens_per_micro_batch=T,
        global_batch_sequences=n_micro * micro_batch * dims.dp, n_stages=n_stages, stages=stages,
        ranks=ranks, roles=roles, ep=ept, model_params=model_params, activation_terms=terms,
        formulas=_formulas(args, dims, precision, optim_dtype, zero1, act, ept, T),
        unit_params=unit_params,
        shape_info={"dim": args.dim, "latent": args.kv_lora_rank + args.qk_rope_head_dim,
                    "top_k": args.n_activated_experts, "n_experts": args.n_routed_experts},
        notes=_notes(schedule, fused_ce, shared_any=any(r.shared for r in ranks)))
    return plan


def _formulas(args, dims, precision, optim_dtype, zero1, act, ept, T) -> dict[str, str]:
    ba = "1+4/128 (FP8 E4M3 + fp32 scale per 1x128 tile)" if precision == "fp8" else "2 (bf16)"
    return {
        "tokens": f"T = micro_batch * seq_len / sp = {T} tokens per micro-batch per rank",
        "activations": (
            "per token per MLA+MoE layer (selective recompute): attn_in D*2 + q_latent q_lora*2 + "
            "kv_latent 576*2*sp + attn_out H*dv*b_o + lse H*4 + ffn_in D*2 + router E*4+K*12 + "
            f"expert_in K*D*b_a + expert_swiglu_in K*2I*b_a + shared_swiglu_in 2I*b_a; b_a = {ba}; "
            + ", ".join(f"{k}: {v:,.0f} B/token" for k, v in act.items())),
        "in_flight": "peak over the schedule's action list of live chunk stashes (F allocates, W frees), "
                     "each chunk weighted by its own bytes: 1F1B pp on rank 0, DualPipe pp+1 chunks",
        "weights": "2 B * P (bf16 compute copy)",
        "master": f"4 B * (P_dense/{dims.stage_size if zero1 else 1} + P_expert/{dims.edp if zero1 else 1})",
        "grads": "4 B * P (fp32, not sharded by ZeRO-1)",
        "optimizer": f"{2 * (2 if optim_dtype == 'bf16' else 4)} B * ZeRO shard (AdamW m, v in {optim_dtype})",
        "ring": "reduce-scatter / all-gather of B bytes over n ranks: (n-1)/n * B sent per rank; "
                "all-reduce 2(n-1)/n * B",
        "ep_copies": (f"per token per dispatch: IB {ept['ib']:.3f} copies = M(1-1/N), NVLink "
                      f"{ept['nvlink']:.3f} copies = M*d*(1-1/g) (N={ept['nodes']} nodes, "
                      f"M={ept['nodes_per_token']:.0f} nodes/token); naive per-expert a2a would send "
                      f"{ept['naive']:.3f} copies ({ept['naive_cross_node']:.3f} cross-node)"),
        "ep_bytes": "per micro-batch per MoE layer: dispatch-like 2 x T*D*copies*b_fp8 (fwd dispatch, "
                    "bwd combine-grad) + combine-like 2 x T*D*copies*2 B (fwd combine, bwd dispatch-grad)",
        "pp": "T*D*2 B per micro-batch per stage boundary, activation forward and gradient backward",
        "sp": "per attention layer per micro-batch: all-gather (sp-1)*T*576*2 B + reduce-scatter of its grad",
    }


def _notes(schedule: str, fused_ce: bool, shared_any: bool) -> list[str]:
    notes = ["not counted: transient working memory inside one layer (recomputed q/k/v, SwiGLU "
             "outputs, all-to-all buffers), CUDA context and fragmentation, the expert-load "
             "all-reduce for the bias update (n_moe_layers x E x 4 B: negligible)"]
    if schedule == "dualpipe":
        notes.append("dualpipe: every stage exists on two ranks (r and pp-1-r), so weights, grads "
                     "and optimizer state are 2x; the pair sums its grads shard-wise after the "
                     "ZeRO reduce-scatter (both then apply the same update)")
    if not fused_ce:
        notes.append("fused_ce=False: fp32 log-probabilities V*4 B per token kept per head")
    if shared_any:
        notes.append("1f1b with MTP: the last stage keeps a copy of the embedding (shared with "
                     "stage 0); its gradient is all-reduced between the two")
    return notes


# ------------------------------------------------------------------------- groups (fake pg)
def rank_groups(dims: ParallelDims, rank: int) -> dict[str, Any]:
    """Build the real DeviceMesh for ``rank`` under torch's fake process group and return
    ``{group name: sorted global ranks}`` (plus ``"coordinate"``: the mesh coordinate).

    The fake backend needs no peers, so one process can stand in for any rank of a 2048-GPU
    world; ``build_mesh`` itself checks torch's groups against the ParallelDims arithmetic.
    Refuses to run inside an initialized process group (it would replace it).
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < dims.world_size:
        raise ValueError(f"rank {rank} out of range [0, {dims.world_size})")
    if dist.is_initialized():
        raise RuntimeError("rank_groups needs a process without an initialized process group")
    import sys

    hook = sys.excepthook  # init_process_group chains a "[rankN]" prefix onto it
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        mg = dims.build_mesh("cpu")
        out: dict[str, Any] = {name: sorted(dist.get_process_group_ranks(g))
                               for name, g in mg.groups.items()}
        out["coordinate"] = dict(zip(("pp", "dp", "sp"), mg.mesh.get_coordinate()))
        return out
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


def format_rank_list(ranks: list[int], head: int = 4) -> str:
    """Short form of a sorted rank list: whole when short, else first terms and the stride."""
    if len(ranks) <= 2 * head:
        return "[" + ", ".join(map(str, ranks)) + "]"
    steps = {b - a for a, b in zip(ranks, ranks[1:])}
    stride = f", stride {steps.pop()}" if len(steps) == 1 else ""
    return f"[{', '.join(map(str, ranks[:head]))}, ..., {ranks[-1]}] ({len(ranks)} ranks{stride})"


def format_groups(dims: ParallelDims, rank: int, groups: dict[str, Any]) -> str:
    c = dims.coords(rank)
    lines = [f"process groups of rank {rank} (node {c['node']}, local {c['local']}; "
             f"mesh coordinate {groups.get('coordinate')}; built with the fake backend):"]
    for name in ("pp", "dp", "sp", "dp_sp", "ep", "edp"):
        g = groups[name]
        nodes = dims.nodes_of_group(g)
        lines.append(f"  {name:<6} size {len(g):>4}  nodes {len(nodes):>3}  {format_rank_list(g)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- text output
def _unit(values: list[float], binary: bool) -> tuple[str, float]:
    """The largest unit in which the biggest value is >= 1 (GiB/MiB/KiB or GB/MB/kB)."""
    top = max(values, default=0.0)
    units = (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024.0)) if binary else \
        (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
    for name, size in units:
        if top >= size:
            return name, size
    return ("B", 1.0)


def _count(n: float) -> str:
    for suffix, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(int(n))


def memory_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    vals = [v for ro in plan.roles for v in list(ro.rank.memory.values()) + [ro.rank.total_memory]]
    name, size = _unit(vals, binary=True)
    f = lambda x: f"{x / size:,.1f}"
    hdr = ["role", "ranks", "holds", "experts/layer", "params", "weights", "master", "grads",
           "AdamW", "act/mb", "in-flight", "act peak", f"total {name}"]
    rows = []
    for role in plan.roles:
        r = role.rank
        m = r.memory
        rows.append([role.name, str(role.n_ranks), role.layers, str(r.experts_per_moe_layer),
                     _count(r.params), f(m["weights_bf16"]), f(m["master_fp32"]),
                     f(m["grads_fp32"]), f(m[f"adamw_{plan.optim_dtype}"]),
                     " / ".join(f(b) for b in r.act_bytes_per_mb), str(r.inflight_chunks),
                     f(m["activations"]), f(r.total_memory)])
    return hdr, rows


def memory_unit(plan: Plan) -> str:
    vals = [v for ro in plan.roles for v in list(ro.rank.memory.values()) + [ro.rank.total_memory]]
    return _unit(vals, binary=True)[0]


def comm_unit(plan: Plan) -> tuple[str, float]:
    return _unit([c.bytes_per_step for ro in plan.roles for c in ro.rank.comm]
                 + [ro.rank.total_comm for ro in plan.roles], binary=False)


COMM_COLUMNS = (
    ("ZeRO dp_sp", lambda c: c.group == "dp_sp"),
    ("ZeRO edp", lambda c: c.group == "edp"),
    ("pair/shared", lambda c: c.group in ("pair", "embed")),
    ("EP IB", lambda c: c.group == "ep" and c.link == "IB"),
    ("EP NVLink", lambda c: c.group == "ep" and c.link == "NVLink"),
    ("PP", lambda c: c.group == "pp"),
    ("SP", lambda c: c.group == "sp"),
)


def comm_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    unit, size = comm_unit(plan)
    f = lambda x: f"{x / size:,.1f}"
    hdr = ["role"] + [name for name, _ in COMM_COLUMNS] + [f"total {unit}"]
    rows = []
    for role in plan.roles:
        r = role.rank
        rows.append([role.name] + [f(sum(c.bytes_per_step for c in r.comm if pick(c)))
                                   for _, pick in COMM_COLUMNS] + [f(r.total_comm)])
    return hdr, rows


def header_lines(plan: Plan) -> list[str]:
    d, mp = plan.dims, plan.model_params
    ok = plan.rank_param_total() == plan.copies_expected() and plan.stage_param_total() == mp["total_with_buffers"]
    where = (f"{d.n_nodes} nodes x {d.gpus_per_node}" if d.world_size >= d.gpus_per_node
             else f"part of one {d.gpus_per_node}-GPU node")
    span = f"spans {d.nodes_per_ep_group} nodes" if d.nodes_per_ep_group > 1 else "inside one node"
    return [
        f"hai-llm dry run: {plan.model} on {d.world_size} GPUs = {where}; "
        f"pp={d.pp} dp={d.dp} sp={d.sp} ep={d.ep} (edp={d.edp}, EP group {span})",
        f"schedule {plan.schedule}, {plan.n_stages} stages, n_micro={plan.n_micro}, micro_batch={plan.micro_batch} "
        f"x seq_len={plan.seq_len} -> T={plan.tokens_per_micro_batch} tokens/micro-batch/rank; global batch "
        f"{plan.global_batch_sequences:,} sequences = {plan.global_batch_sequences * plan.seq_len / 1e6:.1f}M tokens; "
        f"{plan.precision}, AdamW {plan.optim_dtype}, ZeRO-1 {'on' if plan.zero1 else 'off'}, "
        f"recompute {plan.recompute}",
        f"parameters (meta model): main {mp['main']:,} + MTP {mp['mtp']:,} = {mp['total_with_buffers']:,}; "
        f"sum over stages {plan.stage_param_total():,}; over pp ranks x ep "
        f"{plan.rank_param_total():,} = {plan.rank_param_total() / mp['total_with_buffers']:.3f} x model "
        f"{'(consistent)' if ok else '(INCONSISTENT)'}",
    ]


def footer_lines(plan: Plan) -> list[str]:
    e = plan.ep
    worst = max(plan.roles, key=lambda ro: ro.rank.total_memory)
    limit = (f"node-limited to {e['nodes_per_token']:.0f} of {e['nodes']} nodes" if e["nodes"] > 1
             else "EP group inside one node")
    return [
        f"EP traffic per token per dispatch: {e['ib']:.3f} IB copies + {e['nvlink']:.3f} NVLink copies "
        f"({limit}; a per-expert all-to-all would send {e['naive']:.3f} copies, "
        f"{e['naive_cross_node']:.3f} across nodes)",
        f"peak memory per rank: {worst.rank.total_memory / GIB:,.2f} GiB on {worst.name}; memory in "
        f"{memory_unit(plan)}, traffic in {comm_unit(plan)[0]} sent per rank per step",
    ] + [f"note: {n}" for n in plan.notes]


def _plain_table(hdr: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(hdr)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(hdr), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def format_plan(plan: Plan) -> str:
    """The whole report as plain text."""
    h1, r1 = memory_rows(plan)
    h2, r2 = comm_rows(plan)
    return "\n".join(header_lines(plan) + ["", f"memory per rank ({memory_unit(plan)})", _plain_table(h1, r1, (0, 2)), "",
                                           f"traffic per rank per step ({comm_unit(plan)[0]} sent)",
                                           _plain_table(h2, r2), ""]
                     + footer_lines(plan))


def print_plan(plan: Plan, plain: bool = False, file=None) -> None:
    """Print with rich tables when available (and not ``plain``), else plain text."""
    import sys

    file = file or sys.stdout
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_plan(plan), file=file)
        return
    console = Console(file=file, width=200)
    for line in header_lines(plan):
        console.print(line, highlight=False, soft_wrap=True)
    for title, (hdr, rows), left in ((f"memory per rank ({memory_unit(plan)})", memory_rows(plan), (0, 2)),
                                     (f"traffic per rank per step ({comm_unit(plan)[0]} sent)",
                                      comm_rows(plan), (0,))):
        t = Table(title=title, title_justify="left")
        for i, h in enumerate(hdr):
            t.add_column(h, justify="left" if i in left else "right",
                         overflow="fold", max_width=52 if i == 2 else None)
        for r in rows:
            t.add_row(*r)
        console.print(t)
    for line in footer_lines(plan):
        console.print(line, highlight=False, soft_wrap=True)
