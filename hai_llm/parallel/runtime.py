"""The multi-rank runtime of the trainer: applies the parallel layout to a built model
and supplies the hooks of hai_llm.train.trainer.Runtime for it.

Data parallel x sequence parallel (x expert parallel folded over them): every rank of a
stage builds the same model from the same seed; sequence parallelism swaps the
attention, expert parallelism slices the experts; the dp ranks read disjoint samples,
the sp ranks of one dp index read the same samples and compute their own positions.
Gradients and optimizer state go through ZeRO-1 (zero.py) with one reduce spec per
parameter: dense -> the stage's dp x sp group, experts -> their edp replicas, both scaled
by 1/(dp*sp). Loss terms are averaged and expert loads summed over dp x sp, so the
logged loss and the aux-loss-free bias update are those of the global batch, identical
on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from hai_llm.config.schema import Config
from hai_llm.parallel.dims import ParallelDims
from hai_llm.parallel.sequence import apply_sequence_parallel, sp_positions
from hai_llm.parallel.zero import ReduceSpec
from hai_llm.train.trainer import Runtime


def dims_from_config(cfg: Config, world_size: int) -> ParallelDims:
    p = cfg.parallel
    dims = ParallelDims(world_size=world_size, pp=p.pp, dp=p.dp, sp=p.sp, ep=p.ep, gpus_per_node=p.gpus_per_node)
    local = cfg.train.global_batch // p.dp
    n_micro = p.n_micro or local // cfg.train.micro_batch
    dims.validate_for_model(n_routed_experts=cfg.model.n_routed_experts, n_expert_groups=cfg.model.n_expert_groups,
                            n_layers=cfg.model.n_layers, seq_len=cfg.data.seq_len,
                            n_micro_batches=n_micro if p.pp > 1 else None,
                            schedule=p.schedule if p.pp > 1 else None)
    return dims


class DistributedRuntime(Runtime):
    supports_pipeline = False

    def __init__(self, cfg: Config, dims: ParallelDims):
        if not dist.is_initialized():
            raise RuntimeError("DistributedRuntime needs an initialized process group (torchrun or run_ranks)")
        if dims.pp > 1 and not self.supports_pipeline:
            raise ValueError("parallel.pp > 1 runs through hai_llm.pipeline.runtime.PipelineRuntime; "
                             "DistributedRuntime covers dp x sp x ep")
        self.cfg = cfg
        self.dims = dims
        self.mesh = dims.build_mesh("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
        self.rank = dist.get_rank()
        c = dims.coords(self.rank)
        self.coords = c
        self.is_main = self.rank == 0
        self.dp_rank, self.dp_world = c["dp"], dims.dp
        self.world_group = dist.group.WORLD
        self.n_dp_sp = dims.dp * dims.sp

    # -- model -----------------------------------------------------------------------------
    def prepare_model(self, model):
        apply_sequence_parallel(model, self.mesh.group("sp"), self.dims.sp)
        if self.dims.ep > 1:
            from hai_llm.parallel.expert import apply_expert_parallel

            # under the FP8 recipe the dispatch payload crosses the links in FP8 (power-of-2
            # scales per 128 channels), as in the paper; combine stays in the compute dtype
            apply_expert_parallel(model, self.mesh, transport=self.cfg.parallel.transport,
                                  fp8_dispatch=self.cfg.train.precision == "fp8")
        return model

    def positions(self, seq_len: int, device):
        if self.dims.sp == 1:
            return None
        return sp_positions(seq_len, self.dims.sp, self.coords["sp"], device=device)

    # -- ZeRO-1 specs ----------------------------------------------------------------------
    def spec_of(self, name: str, p: torch.Tensor) -> ReduceSpec:
        scale = 1.0 / self.n_dp_sp
        if ".experts." in name and self.dims.ep > 1:
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
        keys = ["loss", "ce", "mtp", "balance"]
        vec = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(vec, group=self.mesh.group("dp_sp"))
        out = {k: float(v) / self.n_dp_sp for k, v in zip(keys, vec)}
        counts = totals["counts"]
        if counts is not None:
            counts = counts.clone()
            dist.all_reduce(counts, group=self.mesh.group("dp_sp"))
            # every sp rank of a sequence counted its own tokens: the sum is the global load
        out["counts"] = counts
        return out
