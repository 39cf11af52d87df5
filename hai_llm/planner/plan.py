"""The dry run's plan: a whole 4D layout's memory and traffic per rank role, in one process.

``plan_layout(model_args, dims, ...)`` (or ``plan_config(cfg, world_size)`` for a training
config) takes the layout from ``hai_llm.layout.build_layout`` (the same stages, schedule and
micro-batches the trainer runs) and accounts, without allocating a single weight, what every
distinct rank *role* holds and sends. The 2048-GPU DeepSeek-V3 layout (PP16 x DP128, EP64,
DualPipe) takes a few seconds, dominated by building the model once on the meta device.

* **Stages** are ``Layout.stages`` (the one partitioner, ``hai_llm.layout.partition``). Stage 0
  holds the embedding, the last stage the final norm, the head and the MTP modules. Rank r
  holds stage r (1f1b, zb1p); stages r and pp-1-r (dualpipe: both directions, so every stage
  exists twice and the pair's gradients are summed); stages r and 2pp-1-r (dualpipev: no
  duplicates). When a rank runs MTP without holding the embedding (1f1b with pp > 1) it keeps
  a shared copy of it whose gradient is all-reduced with stage 0.
* **Memory per rank** (bytes), what the trainer allocates: P = parameters held (experts
  already / ep; ``units``); the ZeRO-1 shard is summed over the rank's buckets as
  ``ZeroOptimizer`` builds them (reduce group x ndim >= 2 x expert), each ceil(numel / n) with n
  the bucket's reduce group: dp*sp (dense) or edp (experts), DOUBLED for DualPipe (the union
  of both copies' groups, ``PipelineRuntime.spec_of``) and for the embedding tied between pp
  ranks 0 and pp-1 (1f1b / zb1p with MTP)::

      params     4 * P        fp32 parameters (the trainer builds the model in fp32; bf16 / FP8
                              are autocast per GEMM, no resident low-precision copy)
      master     4 * shard    fp32 master weights (ZeroOptimizer's own copy of the shard)
      grads      4 * P        fp32 .grad of every parameter (ZeRO-1 keeps them whole)
      optimizer  2 * b_m * shard   AdamW m and v, b_m = 2 (bf16, the paper) or 4 (fp32,
                              ``optim.moments_dtype``'s default)
      buffers    4 * routing-bias entries
      activations  peak over the schedule of the stashed activations

* **Activations**: a chunk's micro-batch stashes ``T * sum(activation_terms)`` bytes
  (``activations``) from its forward to its weight-gradient step; the peak is taken by walking
  the real schedule's action list, weighting each chunk by its own bytes: 1F1B keeps pp
  micro-batches on rank 0, DualPipe pp+1 chunk-stashes per rank (Table 2 of the report).
* **Communication** per step per rank: ``traffic``.

Output: ``report``; the layout's collective program for the hang detector: ``collectives``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hai_llm.config.schema import Config, DataConfig, ParallelConfig, TrainConfig
from hai_llm.layout import Layout, ParallelDims, build_layout, make_schedule, schedule_class
from hai_llm.model.args import ModelArgs

from .activations import PRECISIONS, activation_terms
from .traffic import CommItem, ep_traffic, rank_comm, shard_size
from .units import Unit, model_units

PAPER_GLOBAL_BATCH = 15360  # sequences per step, DeepSeek-V3 pre-training after the ramp-up


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


def build_stages(stage_layers: list[list[int]], units: tuple[Unit, ...],
                 act: dict[str, float]) -> list[StagePlan]:
    """One ``StagePlan`` per stage of ``stage_layers`` (``Layout.stages``: the split the trainer
    runs). Stage 0 holds the embedding, the last stage the final norm, the head and the MTP
    modules."""
    n_stages = len(stage_layers)
    by_name = {u.name: u for u in units}
    stages = []
    for s, layer_ids in enumerate(stage_layers):
        start, n = (layer_ids[0] if layer_ids else 0), len(layer_ids)
        if list(layer_ids) != list(range(start, start + n)):
            raise ValueError(f"stage {s} layers {layer_ids} are not contiguous")
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
    return stages




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
    # ZeRO-1 buckets in ``ZeroOptimizer`` order: (group kind "dense" | "expert" | "tied", elements)
    buckets: list[tuple[str, int]] = field(default_factory=list)

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
    layout: Layout | None = None  # what build_layout decided (stages, schedule, micro-batches)

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
    the schedule needs (its registry rules: ``fit_n_micro``)."""
    n = max(1, -(-global_batch // (dims.dp * micro_batch)))
    return schedule_class(schedule).fit_n_micro(dims.pp, n) if dims.pp > 1 else n


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


def planning_config(model_args: ModelArgs, dims: ParallelDims, *, seq_len: int, micro_batch: int,
                    n_micro: int, schedule: str, precision: str,
                    stage_layers: list[int] | None = None) -> Config:
    """The training config that runs ``model_args`` on ``dims`` with these batch settings:
    what ``build_layout`` needs to lay it out exactly as the trainer would."""
    return Config(model=model_args, data=DataConfig(seq_len=seq_len),
                  train=TrainConfig(global_batch=n_micro * micro_batch * dims.dp, micro_batch=micro_batch,
                                    precision=precision),
                  parallel=ParallelConfig(nprocs=dims.world_size, pp=dims.pp, dp=dims.dp, sp=dims.sp,
                                          ep=dims.ep, gpus_per_node=dims.gpus_per_node, schedule=schedule,
                                          n_micro=n_micro, stage_layers=list(stage_layers or [])))


def plan_layout(model_args: ModelArgs, dims: ParallelDims, seq_len: int = 4096,
                micro_batch: int = 1, n_micro: int | None = None, schedule: str = "dualpipe",
                precision: str = "fp8", zero1: bool = True, optim_dtype: str = "bf16",
                recompute: str = "selective", fused_ce: bool = True,
                stage_layers: list[int] | None = None) -> Plan:
    """Lay ``model_args`` out over ``dims`` and account memory and traffic per rank role.

    The layout comes from ``build_layout`` (bad layouts raise its ``ValueError`` naming the
    fix), so the stages, schedule and micro-batches are the trainer's. ``n_micro`` defaults to
    ``default_n_micro``; ``stage_layers`` is ``parallel.stage_layers``. No weights are allocated.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch={micro_batch} and seq_len={seq_len} must be >= 1")
    if n_micro is None:
        n_micro = default_n_micro(dims, micro_batch, schedule)
    cfg = planning_config(model_args, dims, seq_len=seq_len, micro_batch=micro_batch, n_micro=n_micro,
                          schedule=schedule, precision=precision, stage_layers=stage_layers)
    return plan_from_layout(build_layout(cfg, dims.world_size), model_args, seq_len=seq_len,
                            precision=precision, zero1=zero1, optim_dtype=optim_dtype,
                            recompute=recompute, fused_ce=fused_ce)


def plan_config(cfg: Config, world_size: int, *, precision: str | None = None, **kwargs) -> Plan:
    """Plan a training config on ``world_size`` ranks exactly as ``hai-llm-train`` lays it out
    (fp32 runs are accounted as bf16; ``kwargs`` as for ``plan_from_layout``)."""
    if precision is None:
        precision = "fp8" if cfg.train.precision == "fp8" else "bf16"
    return plan_from_layout(build_layout(cfg, world_size), cfg.model, seq_len=cfg.data.seq_len,
                            precision=precision, **kwargs)


def plan_from_layout(layout: Layout, model_args: ModelArgs, *, seq_len: int, precision: str = "fp8",
                     zero1: bool = True, optim_dtype: str = "bf16", recompute: str = "selective",
                     fused_ce: bool = True) -> Plan:
    """Account memory and traffic of every pipeline rank of ``layout`` (from ``build_layout``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if optim_dtype not in ("bf16", "fp32"):
        raise ValueError(f"optim_dtype must be 'bf16' (the paper) or 'fp32', got {optim_dtype!r}")
    if seq_len > model_args.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model_args.max_seq_len}: "
                         f"raise max_seq_len (YaRN extension) or shorten seq_len")
    args, dims = model_args, layout.dims
    pp, ep = dims.pp, dims.ep
    micro_batch, n_micro = layout.micro_batch, layout.n_micro
    # without a pipeline, gradient accumulation is 1F1B on one rank: one stash alive at a time
    sched = layout.schedule if layout.schedule is not None else make_schedule("1f1b", 1, n_micro)
    schedule = layout.schedule_name if layout.schedule is not None else "none"
    n_d, n_e = dims.stage_size, dims.edp
    units = model_units(args)
    unit_params = {u.name: u.dense_params + u.expert_params + u.buffers for u in units}
    kinds = sorted({u.kind for u in units})
    terms = {k: activation_terms(args, k, precision=precision, recompute=recompute,
                                 fused_ce=fused_ce, sp=dims.sp) for k in kinds}
    act = {k: sum(v.values()) for k, v in terms.items()}
    n_stages = layout.num_stages
    stages = build_stages(layout.stages, units, act)
    T = micro_batch * seq_len // dims.sp
    ept = ep_traffic(args, dims)
    fp8 = precision == "fp8"
    b_opt = 2 * (2 if optim_dtype == "bf16" else 4)
    copies = 2 if schedule == "dualpipe" and pp > 1 else 1  # DualPipe: both copies share one shard set
    group_size = {"dense": n_d * copies, "expert": n_e * copies, "tied": 2 * n_d}
    by_name = {u.name: u for u in units}
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
        tied = bool(shared) or (r == 0 and has_mtp and pp > 1 and sched.chunks_per_rank == 1)
        buckets = _rank_buckets([by_name[nm] for nm in held_units | set(shared)], ep, tied)
        shard = sum(shard_size(n, group_size[k] if zero1 else 1) for k, n in buckets)
        memory = {
            "params_fp32": 4.0 * P,
            "master_fp32": 4.0 * shard,
            "grads_fp32": 4.0 * P,
            f"adamw_{optim_dtype}": float(b_opt * shard),
            "buffers_fp32": 4.0 * buffers,
            "activations": peak_bytes,
        }
        pp_sends = 0
        for c, m in zip(chunks, mbs):
            nxt, prv = sched.next_of(r, c), sched.prev_of(r, c)
            pp_sends += m * ((nxt is not None and nxt[0] != r) + (prv is not None and prv[0] != r))
        comm = rank_comm(args, dims, dense=dense, expert=expert, zero1=zero1,
                         pair=schedule == "dualpipe" and pp > 1,
                         shared_embed=embed_params if shared else 0,
                         mb_moe=sum(m * s.moe_blocks for m, s in zip(mbs, st)),
                         mb_attn=sum(m * s.attn_blocks for m, s in zip(mbs, st)),
                         pp_sends=pp_sends, T=T, fp8=fp8, ept=ept)
        ranks.append(RankPlan(
            pp_rank=r, stages=[s.index for s in st], chunk_labels=[s.label for s in st],
            shared=shared, micro_batches=mbs, n_layers=sum(s.n_layers for s in st),
            n_moe_blocks=sum(s.moe_blocks for s in st),
            experts_per_moe_layer=args.n_routed_experts // ep if args.n_moe_layers else 0,
            dense_params=dense, expert_params=expert, buffers=buffers,
            act_bytes_per_mb=chunk_bytes, inflight_chunks=peak_n, memory=memory, comm=comm,
            buckets=buckets))

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
                    "top_k": args.n_activated_experts, "n_experts": args.n_routed_experts,
                    "n_mtp_layers": args.n_mtp_layers},
        notes=_notes(schedule, fused_ce, shared_any=any(r.shared for r in ranks)),
        layout=layout)
    return plan


def _unit_order(name: str) -> tuple:
    """``PipelineModel``'s parameter order: embed, layers by id, norm + head, MTP modules."""
    if name == "embed":
        return (0, 0)
    if name.startswith("L"):
        return (1, int(name[1:]))
    return (2, 0) if name == "head" else (3, int(name[3:]))


def _rank_buckets(units: list[Unit], ep: int, tied: bool) -> list[tuple[str, int]]:
    """``ZeroOptimizer``'s buckets of a rank holding ``units``: keyed (group, ndim >= 2) in
    first-appearance order; experts (already / ep) have their own group only when ep > 1."""
    out: dict[tuple[str, bool], int] = {}
    for u in sorted(units, key=lambda u: _unit_order(u.name)):
        for is2d, expert, n in u.param_keys:
            kind = "expert" if expert and ep > 1 else ("tied" if tied and u.kind == "embed" else "dense")
            out[(kind, is2d)] = out.get((kind, is2d), 0) + (n // ep if expert else n)
    return [(k, n) for (k, _), n in out.items()]


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
        "params": "4 B * P (fp32 parameters; bf16 / FP8 are autocast per GEMM)",
        "master": (f"4 B * sum over ZeRO buckets of ceil(numel / n), n = dp*sp = {dims.stage_size} (dense) or "
                   f"edp = {dims.edp} (experts), x2 for DualPipe's union of both copies' groups"
                   if zero1 else "4 B * P (no ZeRO)"),
        "grads": "4 B * P (fp32 .grad, not sharded by ZeRO-1)",
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
        notes.append("dualpipe: every stage exists on two ranks (r and pp-1-r), so params and grads "
                     "are 2x; the master / AdamW shards are NOT: each parameter is reduce-scattered "
                     "over the union of both copies' dp x sp (experts: edp) groups, 2x as many ranks, "
                     "and the all-gather writes the same update into both copies")
    notes.append("params: fp32 (the trainer's model dtype; bf16 / FP8 are autocast per GEMM, no "
                 "resident low-precision copy); master: ZeroOptimizer's fp32 shard; grads: fp32 "
                 ".grad, whole; transient per step: one bucket's fp32 reduce-scatter input at a time")
    if not fused_ce:
        notes.append("fused_ce=False: fp32 log-probabilities V*4 B per token kept per head")
    if shared_any:
        notes.append("1f1b with MTP: the last stage keeps a copy of the embedding (shared with "
                     "stage 0); its gradient is reduce-scattered over the union of both ranks' "
                     "dp x sp groups")
    return notes
