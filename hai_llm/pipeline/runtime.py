"""``PipelineRuntime``: the trainer's Runtime for ``parallel.pp > 1`` (pp x dp x sp x ep).

Config keys: ``parallel.pp`` (pipeline ranks), ``parallel.schedule`` (``1f1b`` | ``zb1p`` |
``dualpipe`` | ``dualpipev``), ``parallel.n_micro`` (micro-batches per step and dp rank; 0 =
local batch / ``train.micro_batch``).  Optional, read with ``getattr`` so older configs work:
``parallel.stage_layers`` (layers per stage, default balanced by cost), ``parallel.overlap``
(overlapped F&B pairs, default true), ``parallel.trace_dir`` (write per-rank Chrome traces and
a Gantt chart of every step).  The same three can be passed to the constructor.

What it does on top of :class:`~hai_llm.parallel.runtime.DistributedRuntime`:

* ``prepare_model`` keeps this rank's stages of the full model (:mod:`.stage`), applies
  sequence / expert parallelism to them, routes their GEMMs through the B/W split
  (:mod:`.overlap`) and returns a :class:`~hai_llm.pipeline.stage.PipelineModel` (global
  parameter names; ``moe_layers`` / ``update_expert_bias`` over this rank's MoE layers only).
* ``forward_backward`` runs the schedule over the micro-batches of the rank's batch with the
  :class:`~hai_llm.pipeline.executor.PipelineExecutor` and returns the base Runtime's totals on
  EVERY rank: per-micro-batch ce / MTP and per-(micro-batch, MoE layer) balance values are
  all-reduced over the pp group in one fixed-size ``[n_micro, 2 + n_global_moe]`` tensor (the
  same size on every pipeline rank: a per-stage size would hang, REFERENCE.md sec. 6), then
  combined exactly as ``Transformer.loss`` does, so the logged loss is bit-identical to a single
  process run of the same micro-batches.  ``counts`` are the loads of this rank's own MoE layers.
* ``reduce_metrics``: loss terms averaged over dp x sp; loads summed over every rank holding the
  same stages (DualPipe: both copies, whose micro-batches are disjoint), so each copy applies
  the same bias update.
* ``spec_of``: ZeRO-1 reduce specs.  A parameter held on two pipeline ranks (every parameter of
  DualPipe: stages r and PP-1-r; the embedding of 1F1B/ZB1P with MTP: rank 0 and rank PP-1)
  is reduced over the UNION of both ranks' dp x sp groups (experts: of both edp groups) with
  ``grad_scale = 1/(dp*sp)``: each copy saw only its own micro-batches, the sum over both is
  the full gradient, every element is owned by exactly one rank of the union (so the global
  norm counts it once) and the all-gather writes the same update into both copies.  The union
  groups are created with ``dist.new_group`` on every rank, in the same order.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from hai_llm.config.schema import Config
from hai_llm.parallel.dims import ParallelDims
from hai_llm.parallel.runtime import DistributedRuntime
from hai_llm.parallel.sequence import apply_sequence_parallel
from hai_llm.parallel.zero import ReduceSpec

from .executor import PipelineExecutor
from .overlap import WeightGradStore, install_weight_grad_split
from .schedules import DualPipe, DualPipeV, OneFOneB, PipelineSchedule, ZB1P
from .stage import PipelineModel, build_pipeline_model, partition_layers

SCHEDULES = {"1f1b": OneFOneB, "zb1p": ZB1P, "dualpipe": DualPipe, "dualpipev": DualPipeV}


def n_micro_of(cfg: Config) -> int:
    p, t = cfg.parallel, cfg.train
    return p.n_micro or (t.global_batch // p.dp) // t.micro_batch


def validate_pipeline(cfg: Config, pp: Optional[int] = None,
                      stage_layers: Optional[Sequence[int]] = None) -> PipelineSchedule:
    """Check a pipeline config without any process group; return the schedule.

    Raises ``ValueError`` naming the fix for: unknown schedule, odd pp with DualPipe, too few or
    odd micro-batches, a batch that does not split into the micro-batches, fewer layers than
    stages, bad ``stage_layers``.
    """
    p, t = cfg.parallel, cfg.train
    pp = p.pp if pp is None else pp
    name = str(p.schedule).lower()
    if name not in SCHEDULES:
        raise ValueError(f"parallel.schedule={p.schedule!r} is unknown: use one of {sorted(SCHEDULES)}")
    if pp < 1:
        raise ValueError(f"parallel.pp={pp} must be >= 1")
    if t.global_batch % p.dp:
        raise ValueError(f"train.global_batch={t.global_batch} must be divisible by parallel.dp={p.dp}")
    local = t.global_batch // p.dp
    n_micro = n_micro_of(cfg)
    if n_micro < 1 or local % n_micro:
        raise ValueError(f"the {local} sequences per data-parallel rank do not split into "
                         f"parallel.n_micro={n_micro} equal micro-batches")
    if name in ("1f1b", "zb1p") and n_micro < pp:
        raise ValueError(f"{name} with pp={pp} needs n_micro >= pp = {pp} micro-batches, got {n_micro}: "
                         f"raise train.global_batch or lower train.micro_batch")
    if name == "dualpipe" and pp % 2:
        raise ValueError(f"dualpipe needs an even pp (rank r pairs with rank pp-1-r) but pp={pp}: use "
                         f"pp={pp + 1}{f' or {pp - 1}' if pp > 2 else ''}, or schedule 'dualpipev'")
    if name in ("dualpipe", "dualpipev") and (n_micro < 2 * pp or n_micro % 2):
        need = max(2 * pp, n_micro + n_micro % 2)
        raise ValueError(f"{name} with pp={pp} needs an even number of micro-batches >= 2*pp = {2 * pp}, "
                         f"got n_micro={n_micro}: use n_micro={need} (parallel.n_micro or "
                         f"train.global_batch / dp / train.micro_batch)")
    sched = SCHEDULES[name](pp, n_micro)
    if cfg.model.n_layers < sched.num_stages:
        why = " (dualpipev folds 2*pp stages)" if name == "dualpipev" else ""
        raise ValueError(f"n_layers={cfg.model.n_layers} is fewer than the {sched.num_stages} pipeline "
                         f"stages{why}: every stage needs a layer; lower pp or add layers")
    partition_layers(cfg.model, sched.num_stages, stage_layers or _cfg_stage_layers(cfg))
    return sched


def _cfg_stage_layers(cfg: Config) -> Optional[List[int]]:
    v = cfg.parallel.stage_layers
    return list(v) if v else None


def pipeline_dims(cfg: Config, world_size: int) -> ParallelDims:
    """``dims_from_config`` for pipelines (also accepts ``zb1p``); validates the pipeline."""
    p = cfg.parallel
    dims = ParallelDims(world_size=world_size, pp=p.pp, dp=p.dp, sp=p.sp, ep=p.ep,
                        gpus_per_node=p.gpus_per_node)
    name = str(p.schedule).lower()
    dims.validate_for_model(n_routed_experts=cfg.model.n_routed_experts,
                            n_expert_groups=cfg.model.n_expert_groups, n_layers=cfg.model.n_layers,
                            seq_len=cfg.data.seq_len, n_micro_batches=None,
                            schedule={"zb1p": "1f1b"}.get(name, name) if name in SCHEDULES else None)
    validate_pipeline(cfg, p.pp)
    return dims


class PipelineRuntime(DistributedRuntime):
    supports_pipeline = True

    def __init__(self, cfg: Config, dims: ParallelDims, *, overlap: Optional[bool] = None,
                 stage_layers: Optional[Sequence[int]] = None, trace_dir: Optional[str] = None,
                 link=None):
        self.stage_layers = list(stage_layers) if stage_layers else _cfg_stage_layers(cfg)
        self.schedule = validate_pipeline(cfg, dims.pp, self.stage_layers)
        super().__init__(cfg, dims)
        self.overlap = cfg.parallel.overlap if overlap is None else overlap
        self.trace_dir = trace_dir if trace_dir is not None else (cfg.parallel.trace_dir or None)
        self.link = link
        self.n_micro = self.schedule.n_micro
        self.pp_rank = self.coords["pp"]
        c = self.coords
        self.peers = [dims.rank_of(q, c["dp"], c["sp"]) for q in range(dims.pp)]
        self.pp_group = self.mesh.group("pp")
        self.executor: Optional[PipelineExecutor] = None
        self.transport = None
        self._build_copy_groups()

    # -- process groups of duplicated parameters -------------------------------------------
    def _build_copy_groups(self) -> None:
        """Union groups of the dp x sp (and edp) groups of two pipeline ranks holding the same
        parameters.  Collective: every rank creates every group, in the same order."""
        d = self.dims
        stage_ranks = d.group_ranks("dp_sp")
        edp = d.group_ranks("edp")  # ordered (stage, ep coordinate)
        self.copy_dense = None  # (group, ranks) every parameter of this rank is reduced over
        self.copy_edp: dict = {}  # ep coordinate -> (group, ranks)
        self.tied_embed = None
        if isinstance(self.schedule, DualPipe):
            for p in range(d.pp // 2):
                q = d.pp - 1 - p
                ranks = sorted(stage_ranks[p] + stage_ranks[q])
                g = dist.new_group(ranks)
                mine = self.pp_rank in (p, q)
                if mine:
                    self.copy_dense = (g, ranks)
                if d.ep > 1:
                    for k in range(d.ep):
                        er = sorted(edp[p * d.ep + k] + edp[q * d.ep + k])
                        ge = dist.new_group(er)
                        if mine:
                            self.copy_edp[k] = (ge, er)
        elif self.cfg.model.n_mtp_layers > 0 and d.pp > 1 and self.schedule.chunks_per_rank == 1:
            ranks = sorted(stage_ranks[0] + stage_ranks[d.pp - 1])
            g = dist.new_group(ranks)
            if self.pp_rank in (0, d.pp - 1):
                self.tied_embed = (g, ranks)

    # -- model -----------------------------------------------------------------------------
    def prepare_model(self, model) -> PipelineModel:
        pm = build_pipeline_model(model, self.schedule, self.pp_rank, self.stage_layers)
        apply_sequence_parallel(pm, self.mesh.group("sp"), self.dims.sp)
        if self.dims.ep > 1:
            from hai_llm.parallel.expert import apply_expert_parallel

            self.transport = apply_expert_parallel(pm, self.mesh, transport=self.cfg.parallel.transport,
                                                   link=self.link,
                                                   fp8_dispatch=self.cfg.train.precision == "fp8")
        store = WeightGradStore()
        install_weight_grad_split(pm, store)
        act_dtype = next(pm.parameters()).dtype
        self.executor = PipelineExecutor(pm, self.schedule, self.pp_rank, self.peers, act_dtype=act_dtype,
                                         overlap=self.overlap, trace=self.trace_dir is not None, store=store)
        self.model = pm
        return pm

    # -- ZeRO-1 specs ----------------------------------------------------------------------
    def spec_of(self, name: str, p: torch.Tensor) -> ReduceSpec:
        scale = 1.0 / self.n_dp_sp
        expert = ".experts." in name and self.dims.ep > 1
        if self.copy_dense is not None:
            if expert:
                E_local, k = p.shape[0], self.coords["ep"]
                g, ranks = self.copy_edp[k]
                peers = [(self.copy_edp[j][1], j * E_local) for j in range(self.dims.ep)]
                return ReduceSpec(group=g, ranks=ranks, grad_scale=scale, row_offset=k * E_local,
                                  global_rows=E_local * self.dims.ep, peer_slices=peers)
            g, ranks = self.copy_dense
            return ReduceSpec(group=g, ranks=ranks, grad_scale=scale)
        if self.tied_embed is not None and name == "embed.weight":
            g, ranks = self.tied_embed
            return ReduceSpec(group=g, ranks=ranks, grad_scale=scale)
        return super().spec_of(name, p)

    # -- the step --------------------------------------------------------------------------
    def forward_backward(self, model: PipelineModel, batch: torch.Tensor, n_micro: int, autocast) -> dict:
        if self.executor is None or model is not self.model:
            raise RuntimeError("PipelineRuntime.forward_backward needs the model returned by its prepare_model")
        if batch.shape[0] % self.n_micro:
            raise ValueError(f"batch of {batch.shape[0]} sequences does not split into {self.n_micro} micro-batches")
        mbs = list(batch.chunk(self.n_micro))
        args = model.args
        pos = self.positions(batch.shape[1] - 1 - args.n_mtp_layers, batch.device)
        st = self.executor.run(mbs, pos, autocast)
        self.last_stats = st
        G = model.n_global_moe
        V = torch.zeros(self.n_micro, 2 + G, dtype=torch.float64)
        for mb, v in st.ce.items():
            V[mb, 0] = float(v)
            V[mb, 1] = float(st.mtp[mb])
        for (mb, gi), v in st.balance.items():
            V[mb, 2 + gi] = float(v)
        if self.dims.pp > 1:
            dist.all_reduce(V, group=self.pp_group)
        totals = {"loss": 0.0, "ce": 0.0, "mtp": 0.0, "balance": 0.0}
        Vf = V.to(torch.float32)
        for mb in range(self.n_micro):  # the arithmetic of Transformer.loss, term for term
            ce, mtp = Vf[mb, 0], Vf[mb, 1]
            bal = ce.new_zeros(())
            for gi in range(G):
                bal = bal + Vf[mb, 2 + gi]
            loss = ce + args.mtp_lambda * mtp + bal
            for k, v in (("loss", loss), ("ce", ce), ("mtp", mtp), ("balance", bal)):
                totals[k] += float(v) / self.n_micro
        totals["counts"] = st.counts
        if self.trace_dir is not None:
            self.write_trace(self.trace_dir)
        return totals

    def reduce_metrics(self, totals: dict) -> dict:
        out = dict(totals)
        if self.n_dp_sp > 1:
            keys = ["loss", "ce", "mtp", "balance"]
            vec = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(vec, group=self.mesh.group("dp_sp"))
            out.update({k: float(v) / self.n_dp_sp for k, v in zip(keys, vec)})
        counts = totals["counts"]
        if counts is not None:
            group = self.copy_dense[0] if self.copy_dense is not None else \
                (self.mesh.group("dp_sp") if self.n_dp_sp > 1 else None)
            if group is not None:
                counts = counts.clone()
                dist.all_reduce(counts, group=group)
        out["counts"] = counts
        return out

    # -- traces ----------------------------------------------------------------------------
    def write_trace(self, out_dir) -> Optional[Path]:
        """Chrome trace of this rank's last step, and (on the first rank of the pp group) a
        Gantt PNG of all pipeline ranks.  Collective over the pp group."""
        from .gantt import save_gantt

        out = Path(out_dir)
        ex = self.executor
        f = self.coords["dp_sp"]
        ex.chrome_trace(out / f"trace_pp{self.pp_rank}_dpsp{f}.json")
        spans: List = [None] * self.dims.pp
        dist.all_gather_object(spans, ex.spans, group=self.pp_group)
        if self.pp_rank == 0:
            flat = [s for rank_spans in spans for s in rank_spans]
            t0 = min(s.start for s in flat)
            flat = [type(s)(s.rank, s.name, s.kind, s.start - t0, s.end - t0, s.direction) for s in flat]
            return save_gantt(flat, out / f"gantt_dpsp{f}.png",
                              title=f"{self.schedule.name} pp={self.dims.pp} n_micro={self.n_micro} "
                                    f"overlap={self.overlap} (wall clock, s)")
        return None
