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
  (``hai_llm.pipeline.runtime``).
* DualPipe: rank r holds stage r (chunk 0) and stage PP-1-r (chunk 1), so every parameter
  lives on two ranks (r and PP-1-r) whose gradients are summed the same way.
* DualPipeV: rank r holds stages r and 2PP-1-r of 2PP stages; nothing is duplicated.

Parameter order.  ``PipelineModel`` registers its modules in the full model's order
(embedding, layers ascending, norm, head, MTP).  Two ranks holding the same stages (DualPipe's
pairs) therefore list the same parameters in the same order, which ZeRO needs to build
identical buckets for a reduce-scatter over both.

Layer split.  ``partition_layers`` takes user counts (``parallel.stage_layers`` /
``PipelineRuntime(stage_layers=...)``) or balances an estimate of the forward cost of every
stage: 2 x activated parameters per token for each layer (MoE layers: attention, gate, shared
experts and the K routed experts a token visits), plus the output head (and the MTP modules,
each a block, a projection and another pass through the head) on the last stage.  The
embedding is a lookup and costs nothing.  A contiguous split minimising the most expensive
stage is found by dynamic programming; every stage gets at least one layer.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from hai_llm.model.args import ModelArgs
from hai_llm.model.layers import Rope
from hai_llm.model.moe import MoE, MoEStats
from hai_llm.model.transformer import Transformer


# ------------------------------------------------------------------------------ costs
def _attn_params(a: ModelArgs) -> int:
    qk = a.qk_head_dim
    q = a.dim * a.n_heads * qk if a.q_lora_rank == 0 else \
        a.dim * a.q_lora_rank + a.q_lora_rank * a.n_heads * qk
    kv = a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + \
        a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + a.n_heads * a.v_head_dim * a.dim


def layer_cost(args: ModelArgs, layer_id: int) -> float:
    """Forward FLOPs per token of one block (2 x activated matmul parameters)."""
    ffn = 3 * args.dim * args.inter_dim
    if args.is_moe_layer(layer_id):
        ffn = 3 * args.dim * args.moe_inter_dim * (args.n_activated_experts + args.n_shared_experts) \
            + args.n_routed_experts * args.dim
    return 2.0 * (_attn_params(args) + ffn)


def head_cost(args: ModelArgs) -> float:
    """Extra forward FLOPs per token of a last stage: head, and each MTP module (projection,
    block, another pass through the head)."""
    head = 2.0 * args.dim * args.vocab_size
    mtp = args.n_mtp_layers * (head + 2.0 * 2 * args.dim * args.dim + layer_cost(args, args.n_layers))
    return head + mtp


def partition_layers(args: ModelArgs, num_stages: int,
                     counts: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Global layer indices of each of ``num_stages`` stages (contiguous, in order).

    ``counts``: user-given layers per stage (must sum to ``n_layers``, each >= 1); otherwise
    the split minimising the most expensive stage under ``layer_cost`` / ``head_cost``.
    """
    L = args.n_layers
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if L < num_stages:
        raise ValueError(f"n_layers={L} is fewer than the {num_stages} pipeline stages: every stage "
                         f"needs at least one layer; lower pp, use another schedule or add layers")
    if counts:
        counts = [int(c) for c in counts]
        if len(counts) != num_stages or sum(counts) != L or min(counts) < 1:
            raise ValueError(f"stage_layers={counts} must list {num_stages} counts >= 1 summing to "
                             f"n_layers={L}")
    else:
        counts = _balanced_counts(args, num_stages)
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def _balanced_counts(args: ModelArgs, S: int) -> List[int]:
    L = args.n_layers
    cost = [layer_cost(args, i) for i in range(L)]
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    tail = head_cost(args)
    inf = float("inf")
    # best[s][i]: minimal max-stage cost placing layers [0, i) on stages [0, s)
    best = [[inf] * (L + 1) for _ in range(S + 1)]
    cut = [[0] * (L + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    for s in range(1, S + 1):
        for i in range(s, L - (S - s) + 1):
            for j in range(s - 1, i):
                c = prefix[i] - prefix[j] + (tail if s == S else 0.0)
                v = max(best[s - 1][j], c)
                if v < best[s][i] - 1e-9:  # first (shortest earlier stage) on ties
                    best[s][i], cut[s][i] = v, j
    counts, i = [], L
    for s in range(S, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


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
        object.__setattr__(self, "stages", list(stages))
        # global index (Transformer.moe_layers order) of each of this rank's MoE modules
        gidx = {id(m): i for i, m in enumerate(full.moe_layers())}
        self.moe_global_index = [gidx[id(m)] for m in self.moe_layers()]
        self.n_global_moe = len(gidx)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def rope(self, pos_S: torch.Tensor) -> Rope:
        return Transformer.rope(self, pos_S)  # same tables and bound check as the full model

    def pop_moe_stats(self) -> list[MoEStats]:
        return Transformer.pop_moe_stats(self)

    @torch.no_grad()
    def update_expert_bias(self, load_LE: torch.Tensor, gamma: float | None = None) -> None:
        """Aux-loss-free bias step for this rank's MoE layers; ``load_LE`` rows follow
        ``moe_layers()`` and must count the whole global batch (every copy of the stage)."""
        Transformer.update_expert_bias(self, load_LE, gamma)

    def loss(self, *a, **k):
        raise RuntimeError("a PipelineModel holds only some stages: run steps through "
                           "PipelineRuntime.forward_backward")

    def forward(self, *a, **k):
        raise RuntimeError("a PipelineModel holds only some stages: run steps through "
                           "PipelineRuntime.forward_backward")


def build_pipeline_model(full: Transformer, schedule, rank: int,
                         stage_layers: Optional[Sequence[int]] = None) -> PipelineModel:
    """The :class:`PipelineModel` of pipeline rank ``rank`` under ``schedule`` (a
    ``hai_llm.pipeline.schedules.PipelineSchedule``); other modules of ``full`` are dropped
    when the caller releases it."""
    parts = partition_layers(full.args, schedule.num_stages, stage_layers)
    stages = []
    for chunk in range(schedule.chunks_per_rank):
        s = schedule.stage_of(rank, chunk)
        stages.append(StageModule(full, s, schedule.num_stages, parts[s]))
    return PipelineModel(full, stages)
