"""Cutting a built model into pipeline stages that keep their global parameter names.

Every rank builds the same full :class:`~hai_llm.model.transformer.Transformer` from the same
seed (cheap at the scales we simulate; on meta it costs nothing), then keeps only the modules
of the stages its schedule gives it.  The kept modules are the SAME objects as in the full
model, so their parameters are already initialised and no weight is copied.

Naming.  A :class:`StageModule` (one per local chunk) and the rank's :class:`PipelineModel`
container register the kept modules under the names the full model uses: ``embed``,
``layers`` (a ``ModuleDict`` keyed by the global layer index), ``norm``, ``head`` and ``mtp``
(keyed by depth), so ``named_parameters()`` yields ``layers.5.attn.wq_a.weight``,
``embed.weight``, ``mtp.0.eh_proj.weight``... exactly as in the full model.  Checkpoints,
ZeRO reduce specs and the test that stitches gradients of all ranks rely on that.

Placement (``stage_of`` of the schedule):

* a first stage (data enters) holds ``embed`` and its layers;
* a last stage (loss) holds its layers, ``norm``, ``head`` and the MTP modules; MTP also
  reads the embedding, so the last stage holds ``embed`` too.  When the same rank also holds a
  first stage (DualPipe: rank 0 and rank PP-1 hold both ends; DualPipeV: rank 0), it is the
  same module object: one tensor, one gradient.  With 1F1B / ZB1P the last rank keeps its own
  copy of the embedding (Megatron's tied-embedding arrangement); its gradient is summed with
  rank 0's by a ZeRO reduce spec over both ranks' data-parallel groups
  (``hai_llm.runtime.pipeline``).
* DualPipe: rank r holds stage r (chunk 0) and stage PP-1-r (chunk 1), so every parameter
  lives on two ranks (r and PP-1-r) whose gradients are summed the same way.
* DualPipeV: rank r holds stages r and 2PP-1-r of 2PP stages; nothing is duplicated.

Parameter order.  ``PipelineModel`` registers its modules in the full model's order
(embedding, layers ascending, norm, head, MTP).  Two ranks holding the same stages (DualPipe's
pairs) therefore list the same parameters in the same order, which ZeRO needs to build
identical buckets for a reduce-scatter over both.

Layer split.  The layers of every stage come from the layout (``Layout.stages``, made by the
one partitioner ``hai_llm.layout.partition.partition_layers``: cost-balanced, or
``parallel.stage_layers``), so the planner's dry run describes exactly this split.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from hai_llm.layout.partition import partition_layers
from hai_llm.model.layers import Rope, rope_at
from hai_llm.model.moe import MoE, MoEStats, pop_moe_stats, update_expert_bias
from hai_llm.model.transformer import Transformer


# ------------------------------------------------------------------------------ modules
class StageModule(nn.Module):
    """The modules of one pipeline stage, registered under their global names.

    ``embed`` is present on a first stage and on a last stage with MTP (shared with the rank's
    first stage when it has one); ``norm``/``head``/``mtp`` on a last stage.  Computation is
    driven piece by piece by :mod:`hai_llm.pipeline.overlap`; ``forward`` is a plain
    sequential reference (hidden states of a non-last stage, loss terms of a last stage).
    """

    def __init__(self, full: Transformer, stage: int, num_stages: int, layer_ids: Sequence[int]):
        super().__init__()
        self.stage = stage
        self.num_stages = num_stages
        self.is_first = stage == 0
        self.is_last = stage == num_stages - 1
        self.layer_ids = list(layer_ids)
        self.args = full.args
        if self.is_first or (self.is_last and full.args.n_mtp_layers > 0):
            self.embed = full.embed
        self.layers = nn.ModuleDict({str(i): full.layers[i] for i in self.layer_ids})
        if self.is_last:
            self.norm = full.norm
            self.head = full.head
            self.mtp = nn.ModuleDict({str(k): m for k, m in enumerate(full.mtp)})

    def blocks(self):
        return [self.layers[str(i)] for i in self.layer_ids]

    def extra_repr(self) -> str:
        return f"stage={self.stage}/{self.num_stages}, layers={self.layer_ids}"


class PipelineModel(nn.Module):
    """What the trainer holds on a pipeline rank: the rank's stage modules under global names.

    Supports what the trainer, ZeRO, the EMA and checkpoints use: ``named_parameters``,
    ``named_buffers`` / ``state_dict`` (global FQNs), ``moe_layers`` (global order: layers
    ascending, then MTP), ``update_expert_bias`` (rows follow ``moe_layers``), ``args``.
    ``stages[c]`` is the :class:`StageModule` of local chunk ``c`` (not registered as a child,
    so names are not duplicated).  There is no ``loss``: a step runs through the runtime's
    ``forward_backward``.
    """

    def __init__(self, full: Transformer, stages: Sequence[StageModule]):
        super().__init__()
        self.args = full.args
        if any(hasattr(s, "embed") for s in stages):
            self.embed = full.embed
        ids = sorted({i for s in stages for i in s.layer_ids})
        self.layers = nn.ModuleDict({str(i): full.layers[i] for i in ids})
        if any(s.is_last for s in stages):
            self.norm = full.norm
            self.head = full.head
            self.mtp = nn.ModuleDict({str(k): m for k, m in enumerate(full.mtp)})
        self.register_buffer("rope_cos", full.rope_cos, persistent=False)
        self.register_buffer("rope_sin", full.rope_sin, persistent=False)
        self.stages = list(stages)  # a plain list: the stage modules are not registered twice
        # global index (Transformer.moe_layers order) of each of this rank's MoE modules
        gidx = {id(m): i for i, m in enumerate(full.moe_layers())}
        self.moe_global_index = [gidx[id(m)] for m in self.moe_layers()]
        self.n_global_moe = len(gidx)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def rope(self, pos_S: torch.Tensor) -> Rope:
        return rope_at(self.rope_cos, self.rope_sin, pos_S)  # the full model's tables and check

    def pop_moe_stats(self) -> list[MoEStats]:
        return pop_moe_stats(self.moe_layers())

    def update_expert_bias(self, load_LE: torch.Tensor, gamma: float | None = None) -> None:
        """Aux-loss-free bias step for this rank's MoE layers; ``load_LE`` rows follow
        ``moe_layers()`` and must count the whole global batch (every copy of the stage)."""
        update_expert_bias(self.moe_layers(), load_LE,
                           self.args.bias_update_speed if gamma is None else gamma)

    def loss(self, *a, **k):
        raise RuntimeError("a PipelineModel holds only some stages: run steps through "
                           "PipelineRuntime.forward_backward")

    def forward(self, *a, **k):
        raise RuntimeError("a PipelineModel holds only some stages: run steps through "
                           "PipelineRuntime.forward_backward")


def build_pipeline_model(full: Transformer, schedule, rank: int,
                         stages: Optional[Sequence[Sequence[int]]] = None) -> PipelineModel:
    """The :class:`PipelineModel` of pipeline rank ``rank`` under ``schedule`` (a
    ``hai_llm.layout.schedules.PipelineSchedule``); other modules of ``full`` are dropped
    when the caller releases it.

    ``stages[s]``: the global layer indices of stage ``s`` (``Layout.stages``; default: the
    cost-balanced split of ``hai_llm.layout.partition``)."""
    parts = [list(s) for s in stages] if stages is not None else \
        partition_layers(full.args, schedule.num_stages)
    if len(parts) != schedule.num_stages:
        raise ValueError(f"{len(parts)} stage layer lists for a schedule of {schedule.num_stages} stages")
    stages = []
    for chunk in range(schedule.chunks_per_rank):
        s = schedule.stage_of(rank, chunk)
        stages.append(StageModule(full, s, schedule.num_stages, parts[s]))
    return PipelineModel(full, stages)
