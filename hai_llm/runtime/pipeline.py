"""``PipelineRuntime``: the trainer's Runtime for ``parallel.pp > 1`` (pp x dp x sp x ep).

Config keys: ``parallel.pp`` (pipeline ranks), ``parallel.schedule`` (``1f1b`` | ``zb1p`` |
``dualpipe`` | ``dualpipev``), ``parallel.n_micro`` (micro-batches per step and dp rank; 0 =
local batch / ``train.micro_batch``), ``parallel.stage_layers`` (layers per stage, default
balanced by cost): all read through ``hai_llm.layout.build_layout``, whose ``Layout`` holds the
schedule object, the stage partition and the micro-batch count.  ``parallel.overlap``
(overlapped F&B pairs, default true) and ``parallel.trace_dir`` (write per-rank Chrome traces
and a Gantt chart of every step) can also be passed to the constructor.

What it does on top of :class:`~hai_llm.runtime.mesh.MeshRuntime`:

* ``prepare_model`` calls ``parallelize``: this rank's stages of the full model
  (``Layout.stages``), sequence / expert parallelism on them, the B/W split of their GEMMs;
  the result is a :class:`~hai_llm.pipeline.stage.PipelineModel` (global parameter names;
  ``moe_layers`` / ``update_expert_bias`` over this rank's MoE layers only).
* ``forward_backward`` runs the schedule over the micro-batches of the rank's batch with the
  :class:`~hai_llm.pipeline.executor.PipelineExecutor` and returns the base Runtime's totals on
  EVERY rank: per-micro-batch ce / MTP and per-(micro-batch, MoE layer) balance values are
  all-reduced over the pp group in one fixed-size ``[n_micro, 2 + n_global_moe]`` float64 tensor
  on the model's device (the same size on every pipeline rank: a per-stage size would hang,
  docs/deepseek_v3.md#failure-modes), then combined exactly as
  ``Transformer.loss`` does, so the logged loss is bit-identical to a single process run of the
  same micro-batches; nothing is read back to the host (the trainer reads once per step).
  ``counts`` are the loads of this rank's own MoE layers.
  The micro-batch count is the step's (a batch-size ramp changes it): the schedule of each
  distinct count comes from the layout (``Runtime.layout_for``) and gets its own executor,
  built at its first step and kept (same model, weight-gradient store and P2P groups: every
  count a layout accepts uses the same channels, which the executor checks).
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
* P2P groups: one 2-rank group per DIRECTION of every pair of pipeline ranks that exchange
  messages (the pairs come from the schedule's ``comm_plan``, ``executor.p2p_channels``), for
  every pp group of the mesh, created once on every rank in one order; the executor sends each
  message on the group of its direction and ``prepare_model`` opens them in that order
  (``PipelineExecutor.connect``).  Why: one NCCL communicator per pair, shared by both
  directions, deadlocks every schedule (``hai_llm.pipeline.nccl_replay``, docs/pipeline.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from hai_llm.config.schema import Config
from hai_llm.layout import Layout
from hai_llm.model.moe import expert_parameter_names
from hai_llm.model.transformer import total_loss
from hai_llm.parallel.zero import ReduceSpec
from hai_llm.pipeline.executor import PipelineExecutor
from hai_llm.pipeline.groups import build_pipeline_groups
from hai_llm.pipeline.stage import PipelineModel

from .base import TERMS, divisor, with_terms
from .mesh import MeshRuntime, reduce_totals
from .parallelize import parallelize


class PipelineRuntime(MeshRuntime):
    """``layout``: from ``build_layout(cfg, world_size)`` (built from the process group when
    not given); ``link``: link emulation for the EP transport (benchmarks)."""

    supports_pipeline = True

    def __init__(self, cfg: Config, layout: Optional[Layout] = None, *, overlap: Optional[bool] = None,
                 trace_dir: Optional[str] = None, link=None, timing: Optional[bool] = None):
        super().__init__(cfg, layout)
        if self.layout.schedule is None:
            raise ValueError("PipelineRuntime needs parallel.pp > 1; MeshRuntime runs pp == 1")
        self.schedule = self.layout.schedule
        dims = self.dims
        self.overlap = cfg.parallel.overlap if overlap is None else overlap
        self.trace_dir = trace_dir if trace_dir is not None else (cfg.parallel.trace_dir or None)
        self.link = link
        self.timing = timing  # step_s / comm_wait_s (None: executor default, off on CUDA)
        self.n_micro = self.schedule.n_micro
        self.pp_rank = self.coords["pp"]
        c = self.coords
        self.peers = [dims.rank_of(q, c["dp"], c["sp"]) for q in range(dims.pp)]
        self.pp_group = self.mesh.group("pp")
        self.executor: Optional[PipelineExecutor] = None  # the executor of the full batch (layout.n_micro)
        self.executors: Dict[int, PipelineExecutor] = {}  # every micro-batch count run so far
        self.last_executor: Optional[PipelineExecutor] = None  # the one of the last step (traces)
        self.transport = None
        # P2P channels (one per direction) and the DualPipe / tied-embedding union groups
        g = build_pipeline_groups(dims, self.schedule, self.rank, cfg.model.n_mtp_layers)
        self.p2p_groups, self.copy_dense, self.copy_edp, self.tied_embed = \
            g.p2p_groups, g.copy_dense, g.copy_edp, g.tied_embed

    # -- model -----------------------------------------------------------------------------
    def prepare_model(self, model, device=None) -> PipelineModel:
        done = parallelize(model, self.layout, self.cfg, self.mesh, link=self.link, device=device)
        pm, store, self.transport = done.model, done.store, done.transport
        self.expert_names = expert_parameter_names(pm)
        act_dtype = next(pm.parameters()).dtype
        self.executor = PipelineExecutor(pm, self.schedule, self.pp_rank, self.peers, act_dtype=act_dtype,
                                         overlap=self.overlap, trace=self.trace_dir is not None, store=store,
                                         groups=self.p2p_groups, timing=self.timing)
        self.executor.connect()  # opens the P2P communicators in one global order (NCCL: lazy, blocking)
        self.executors = {self.n_micro: self.executor}
        self.model = pm
        return pm

    def executor_for(self, n_micro: int) -> PipelineExecutor:
        """The executor of a step with ``n_micro`` micro-batches per rank: the schedule of
        ``layout_for(n_micro * micro_batch * dp)``, built once per count and kept."""
        if self.executor is None:
            raise RuntimeError("PipelineRuntime.executor_for needs prepare_model first")
        if n_micro not in self.executors:
            sched = self.layout_for(n_micro * self.layout.micro_batch * self.dims.dp).schedule
            ex = self.executor
            # same store and P2P groups (already opened by connect: every count of a layout
            # uses the same channels; the constructor raises if one were missing)
            self.executors[n_micro] = PipelineExecutor(
                ex.model, sched, self.pp_rank, self.peers, act_dtype=ex.act_dtype, overlap=self.overlap,
                trace=ex.trace, store=ex.store, groups=self.p2p_groups, timing=self.timing)
        return self.executors[n_micro]

    # -- ZeRO-1 specs ----------------------------------------------------------------------
    def spec_of(self, name: str, p: torch.Tensor) -> ReduceSpec:
        scale = 1.0 / self.n_dp_sp
        expert = name in self.expert_names and self.dims.ep > 1
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
        if batch.shape[0] % n_micro:
            raise ValueError(f"batch of {batch.shape[0]} sequences does not split into {n_micro} micro-batches")
        ex = self.executor_for(n_micro)
        mbs = list(batch.chunk(n_micro))
        args = model.args
        pos = self.positions(batch.shape[1] - 1 - args.n_mtp_layers, batch.device)
        st = ex.run(mbs, pos, autocast)
        self.last_stats, self.last_executor = st, ex
        totals = self._totals(model, st, batch.device, n_micro)
        if self.trace_dir is not None:
            self.write_trace(self.trace_dir)
        return totals

    def evaluate(self, model: PipelineModel, batch: torch.Tensor, n_micro: int, autocast) -> dict:
        """Validation: the schedule's forwards only (``PipelineExecutor.run(forward_only=True)``)
        under ``no_grad``, the terms gathered and combined as ``forward_backward`` does, so the
        value is the one a single process computes; no trace, ``last_stats`` untouched."""
        if self.executor is None or model is not self.model:
            raise RuntimeError("PipelineRuntime.evaluate needs the model returned by its prepare_model")
        if batch.shape[0] % n_micro:
            raise ValueError(f"batch of {batch.shape[0]} sequences does not split into {n_micro} micro-batches")
        pos = self.positions(batch.shape[1] - 1 - model.args.n_mtp_layers, batch.device)
        with torch.no_grad():
            st = self.executor_for(n_micro).run(list(batch.chunk(n_micro)), pos, autocast, forward_only=True)
            return self._totals(model, st, batch.device, n_micro)

    def _totals(self, model: PipelineModel, st, dev, n_micro: Optional[int] = None) -> dict:
        """The base Runtime's totals from this rank's ``StepStats`` of ``n_micro`` micro-batches
        (default: the layout's), on every rank (collective over the pp group)."""
        args = model.args
        n_micro = self.n_micro if n_micro is None else n_micro
        G = model.n_global_moe
        # [n_micro, 2 + G] float64 on the model's device (NCCL takes no CPU tensors): ce, mtp and
        # the balance term of every (micro-batch, global MoE layer); each rank writes the terms it
        # computed (device-to-device copies, no host read), zeros elsewhere
        V = torch.zeros(n_micro, 2 + G, dtype=torch.float64, device=dev)
        for mb, v in st.ce.items():
            V[mb, 0] = v.detach()
            V[mb, 1] = st.mtp[mb].detach()
        for (mb, gi), v in st.balance.items():
            V[mb, 2 + gi] = v.detach()
        if self.dims.pp > 1:
            dist.all_reduce(V, group=self.pp_group)
        Vf = V.to(torch.float32)
        # the model's own objective on the gathered terms, for all micro-batches at once: the same
        # elementwise float32 operations Transformer.loss runs on one micro-batch's scalars
        ce, mtp = Vf[:, 0], Vf[:, 1]
        loss, bal = total_loss(ce, mtp, [Vf[:, 2 + gi] for gi in range(G)], args.mtp_lambda)
        per_mb = torch.stack([loss, ce, mtp, bal.expand(n_micro)], dim=1).double()  # TERMS order
        terms = torch.zeros(len(TERMS), dtype=torch.float64, device=dev)
        n = divisor(n_micro, dev)
        for mb in range(n_micro):  # summed in micro-batch order, as the base runtime does
            terms += per_mb[mb] / n
        return with_terms(terms, st.counts)

    def reduce_metrics(self, totals: dict) -> dict:
        dp_sp = self.mesh.group("dp_sp") if self.n_dp_sp > 1 else None
        # loads: summed over every rank holding the same stages (DualPipe: both copies)
        counts_group = self.copy_dense[0] if self.copy_dense is not None else dp_sp
        return reduce_totals(totals, dp_sp, self.n_dp_sp, counts_group)

    # -- traces ----------------------------------------------------------------------------
    def write_trace(self, out_dir) -> Optional[Path]:
        """Chrome trace of this rank's last step, and (on the first rank of the pp group) a
        Gantt PNG of all pipeline ranks.  Collective over the pp group."""
        from hai_llm.pipeline.gantt import save_gantt

        out = Path(out_dir)
        ex = self.last_executor or self.executor
        f = self.coords["dp_sp"]
        ex.chrome_trace(out / f"trace_pp{self.pp_rank}_dpsp{f}.json")
        spans: List = [None] * self.dims.pp
        dist.all_gather_object(spans, ex.spans, group=self.pp_group)
        if self.pp_rank == 0:
            flat = [s for rank_spans in spans for s in rank_spans]
            t0 = min(s.start for s in flat)
            flat = [type(s)(s.rank, s.name, s.kind, s.start - t0, s.end - t0, s.direction) for s in flat]
            return save_gantt(flat, out / f"gantt_dpsp{f}.png",
                              title=f"{self.schedule.name} pp={self.dims.pp} n_micro={ex.n_micro} "
                                    f"overlap={self.overlap} (wall clock, s)")
        return None
