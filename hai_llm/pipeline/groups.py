"""The process groups a pipeline layout needs beyond the mesh, built in one place.

Two kinds, both collective (every rank of the world calls ``dist.new_group`` for every group,
in the same order, and keeps its own):

* **P2P channels**: one 2-rank group per direction of every pair of pipeline ranks that
  exchange messages (``executor.p2p_channels``), for every pp group of the mesh. Sharing one
  communicator between both directions deadlocks under NCCL's in-order execution
  (``nccl_replay``).
* **Copy groups**: a parameter held by two pipeline ranks (every parameter under DualPipe:
  stages r and pp-1-r; the embedding of 1F1B/ZB1P with MTP: ranks 0 and pp-1) is reduced by
  ZeRO-1 over the UNION of both ranks' dp x sp groups (experts: of both edp groups), so both
  copies receive the same update.

``PipelineRuntime`` builds its groups with :func:`build_pipeline_groups`, and the planner's
collective prediction calls the same function, so the two cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch.distributed as dist

from hai_llm.layout.dims import ParallelDims
from hai_llm.layout.schedules import DualPipe, PipelineSchedule

from .executor import p2p_channels

GroupAndRanks = Tuple[Any, list]


@dataclass
class PipelineGroups:
    """This rank's pipeline groups. ``p2p_groups``: channel -> 2-rank group (the executor's
    ``groups``); ``copy_dense``: (group, ranks) every parameter is reduced over under DualPipe;
    ``copy_edp``: ep coordinate -> (group, ranks) of the experts under DualPipe;
    ``tied_embed``: (group, ranks) of the embedding shared by the first and last rank."""

    p2p_groups: Dict[Any, Any] = field(default_factory=dict)
    copy_dense: Optional[GroupAndRanks] = None
    copy_edp: Dict[int, GroupAndRanks] = field(default_factory=dict)
    tied_embed: Optional[GroupAndRanks] = None


def build_pipeline_groups(dims: ParallelDims, schedule: PipelineSchedule, rank: int,
                          n_mtp_layers: int) -> PipelineGroups:
    """The pipeline groups of global ``rank`` (copy groups first, then the P2P channels).
    Collective over the world."""
    out = PipelineGroups()
    pp_rank = dims.coords(rank)["pp"]
    stage_ranks = dims.group_ranks("dp_sp")
    edp = dims.group_ranks("edp")  # ordered (stage, ep coordinate)
    if isinstance(schedule, DualPipe):
        for p in range(dims.pp // 2):
            q = dims.pp - 1 - p
            ranks = sorted(stage_ranks[p] + stage_ranks[q])
            g = dist.new_group(ranks)
            mine = pp_rank in (p, q)
            if mine:
                out.copy_dense = (g, ranks)
            if dims.ep > 1:
                for k in range(dims.ep):
                    er = sorted(edp[p * dims.ep + k] + edp[q * dims.ep + k])
                    ge = dist.new_group(er)
                    if mine:
                        out.copy_edp[k] = (ge, er)
    elif n_mtp_layers > 0 and dims.pp > 1 and schedule.chunks_per_rank == 1:
        ranks = sorted(stage_ranks[0] + stage_ranks[dims.pp - 1])
        g = dist.new_group(ranks)
        if pp_rank in (0, dims.pp - 1):
            out.tied_embed = (g, ranks)
    mine_pp = dims.group_of("pp", rank)
    for channel, (src, dst) in p2p_channels(schedule):
        for ranks in dims.group_ranks("pp"):
            g = dist.new_group(sorted((ranks[src], ranks[dst])))
            if ranks == mine_pp and pp_rank in (src, dst):
                out.p2p_groups[channel] = g
    return out
