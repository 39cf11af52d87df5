"""``MeshRuntime``: the trainer's Runtime for data x sequence x expert parallelism (pp == 1).

Every rank of a stage builds the same model from the same seed; ``parallelize`` swaps the
attention for sequence parallelism and slices the experts for expert parallelism; the dp
ranks read disjoint samples, the sp ranks of one dp index read the same samples and compute
their own positions. Gradients and optimizer state go through ZeRO-1
(``hai_llm.parallel.zero``) with one reduce spec per parameter: dense -> the stage's dp x sp
group, experts (``hai_llm.model.moe.expert_parameter_names``) -> their edp replicas, both
scaled by 1/(dp*sp). Loss terms are averaged and expert loads summed over dp x sp, so the
logged loss and the aux-loss-free bias update are those of the global batch, identical on
every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from hai_llm.config.schema import Config
from hai_llm.layout import Layout, build_layout
from hai_llm.model.moe import expert_parameter_names
from hai_llm.parallel.sequence import sp_positions
from hai_llm.parallel.zero import ReduceSpec

from .base import Runtime, divisor, with_terms
from .parallelize import parallelize


class MeshRuntime(Runtime):
    """``layout``: from ``build_layout(cfg, world_size)`` (built here from the process group
    when not given)."""

    supports_pipeline = False

    def __init__(self, cfg: Config, layout: Optional[Layout] = None):
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__} needs an initialized process group (torchrun or run_ranks)")
        layout = layout if layout is not None else build_layout(cfg, dist.get_world_size())
        if layout.pp > 1 and not self.supports_pipeline:
            raise ValueError("parallel.pp > 1 runs through hai_llm.runtime.pipeline.PipelineRuntime; "
                             "MeshRuntime covers dp x sp x ep")
        super().__init__(cfg, layout)
        self.dims = dims = layout.dims
        self.mesh = dims.build_mesh("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
        self.rank = dist.get_rank()
        c = dims.coords(self.rank)
        self.coords = c
        self.is_main = self.rank == 0
        self.dp_rank, self.dp_world = c["dp"], dims.dp
        self.world_group = dist.group.WORLD
        self.n_dp_sp = dims.dp * dims.sp
        self.expert_names: set[str] = set()

    # -- model -----------------------------------------------------------------------------
    def prepare_model(self, model, device=None):
        model = parallelize(model, self.layout, self.cfg, self.mesh, device=device).model
        self.expert_names = expert_parameter_names(model)
        return model

    def positions(self, seq_len: int, device):
        if self.dims.sp == 1:
            return None
        return sp_positions(seq_len, self.dims.sp, self.coords["sp"], device=device)

    # -- ZeRO-1 specs ----------------------------------------------------------------------
    def spec_of(self, name: str, p: torch.Tensor) -> ReduceSpec:
        scale = 1.0 / self.n_dp_sp
        if name in self.expert_names and self.dims.ep > 1:
            E_local = p.shape[0]
            ep_rank, stage = self.coords["ep"], self.coords["pp"]
            edp_groups = [g for g in self.dims.group_ranks("edp")
                          if self.dims.coords(g[0])["pp"] == stage]
            peers = [(g, self.dims.coords(g[0])["ep"] * E_local) for g in edp_groups]
            return ReduceSpec(group=self.mesh.group("edp") if self.dims.edp > 1 else None,
                              ranks=self.mesh.ranks("edp"), grad_scale=scale, row_offset=ep_rank * E_local,
                              global_rows=E_local * self.dims.ep, peer_slices=peers)
        return ReduceSpec(group=self.mesh.group("dp_sp") if self.n_dp_sp > 1 else None,
                          ranks=self.mesh.ranks("dp_sp"), grad_scale=scale)

    # -- metrics / load --------------------------------------------------------------------
    def reduce_metrics(self, totals: dict) -> dict:
        if self.n_dp_sp == 1:
            return totals
        return reduce_totals(totals, self.mesh.group("dp_sp"), self.n_dp_sp, self.mesh.group("dp_sp"))


def reduce_totals(totals: dict, terms_group, n_terms: int, counts_group) -> dict:
    """Loss terms all-reduced over ``terms_group`` and divided by ``n_terms`` (its size; None
    group: left as they are), expert loads summed over ``counts_group`` (None: left as they are).
    Everything stays on the device of ``totals`` (NCCL takes no CPU tensors) and in float64, so
    the mean is the same IEEE sum and division as the former host-side one."""
    terms, counts = totals["terms"], totals["counts"]
    if terms_group is not None:
        terms = terms.clone()
        dist.all_reduce(terms, group=terms_group)
        terms /= divisor(n_terms, terms.device)
    if counts is not None and counts_group is not None:
        counts = counts.clone()
        dist.all_reduce(counts, group=counts_group)
        # every sp rank of a sequence counted its own tokens: the sum is the global load
    return with_terms(terms, counts)
