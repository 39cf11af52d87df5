"""``parallelize``: the one function that turns a built model into this rank's share of a layout.

Every runtime's ``prepare_model`` is a call to it (a single process too, with the layout of a
world of one), so the transformations and their order exist once. The model arrives on the
META device (``build_model(args)``: shapes only, no storage) and every structural step below is
a class swap, a choice of modules or a slice of meta tensors, so nothing is allocated until the
last step, which materialises exactly the parameters this rank keeps. The full fp32 model never
exists on any rank (the 671B model's pipeline stage would not fit). A model that is already
materialised (tests, benchmarks) goes through the same steps; step 6 then does nothing.

1. **FP8 module swap** (``train.precision == "fp8"``): ``hai_llm.fp8.convert_to_fp8`` swaps
   ``nn.Linear`` / ``GroupedExperts`` for the FP8 classes. First, because the later steps keep
   module objects (the stage split) or swap classes and slice weights of whatever classes they
   find (expert parallelism, the weight-gradient split), and the FP8 dispatch flag it sets on
   every MoE must exist before the dispatcher is installed.
2. **Stage split** (``pp > 1``): ``hai_llm.pipeline.stage.build_pipeline_model`` keeps the
   stages ``Layout.stages`` gives this pipeline rank, under their global names. Before the
   parallel steps, so they only touch modules this rank keeps.
3. **Sequence parallelism** (``sp > 1``): ``SequenceParallelMLA`` and the routing-statistics
   hooks over the sp group.
4. **Expert parallelism** (``ep > 1``): the routed experts are sliced over the EP group (on meta:
   the slice is a meta tensor of the local shape, recorded as ``ep_slice``) and the dispatcher
   (flat or hierarchical transport, FP8 payload under the FP8 recipe) installed. The optimizer
   must be built after this (the expert parameters are new tensors).
5. **Weight-gradient split** (``pp > 1``): GEMMs hand their weight gradient to a
   ``WeightGradStore`` so the schedule can run it in a later ``W`` step.
6. **Materialise and initialise** (when ``device`` is given and parameters are still on meta):
   ``materialize`` gives the kept parameters and buffers storage on ``device`` and
   ``init_parameters`` fills them from (``train.seed``, global name, global expert row), so each
   value equals the same element of ``build_model(args, device, seed)``: the single-process model
   and every layout start from the same weights. Last, because only then is it known which
   parameters (stages) and which expert rows (EP slice) this rank keeps, and because every
   earlier step works on meta tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from hai_llm.config.schema import Config
from hai_llm.layout import Layout, MeshGroups
from hai_llm.model.transformer import init_parameters, materialize


@dataclass
class Parallelized:
    """What ``parallelize`` produced: the model this rank trains, the EP transport (None
    without expert parallelism) and the pipeline's weight-gradient store (None without a
    pipeline)."""

    model: nn.Module
    transport: Any = None
    store: Any = None


def parallelize(model: nn.Module, layout: Layout, cfg: Config, mesh: Optional[MeshGroups] = None, *,
                link=None, device: Optional[torch.device | str] = None, seed: Optional[int] = None) -> Parallelized:
    """Apply ``layout`` to ``model`` (a full model built identically on every rank, normally on
    the meta device), in the fixed order of the module docstring. ``mesh``: this rank's process
    groups (``ParallelDims.build_mesh``); required unless the layout is a single rank. ``link``: an
    optional link-emulation model for the EP transport (benchmarks). ``device``: where to
    materialise a meta model's kept parameters (None: leave them on meta, e.g. for a dry run);
    ``seed``: their initialisation seed (default ``train.seed``)."""
    if mesh is None and layout.world_size > 1:
        raise ValueError(f"parallelize needs the process groups (mesh) of a {layout.world_size}-rank layout")
    out = Parallelized(model)
    # 1. FP8 module swap
    if cfg.train.precision == "fp8":
        from hai_llm.fp8 import convert_to_fp8

        out.model = convert_to_fp8(out.model)
    if mesh is not None:
        _structure(out, layout, cfg, mesh, link)
    # 6. materialise and initialise what this rank keeps
    if device is not None and any(p.is_meta for p in out.model.parameters()):
        materialize(out.model, device)
        init_parameters(out.model, cfg.model, cfg.train.seed if seed is None else seed)
    return out


def _structure(out: Parallelized, layout: Layout, cfg: Config, mesh: MeshGroups, link) -> None:
    """Steps 2-5 (module docstring) on ``out`` in place."""
    rank = layout.coords(mesh.global_rank)
    # 2. stage split
    if layout.schedule is not None:
        from hai_llm.pipeline.stage import build_pipeline_model

        out.model = build_pipeline_model(out.model, layout.schedule, rank["pp"], layout.stages)
    # 3. sequence parallelism
    if layout.sp > 1:
        from hai_llm.parallel.sequence import apply_sequence_parallel

        apply_sequence_parallel(out.model, mesh.group("sp"), layout.sp)
    # 4. expert parallelism
    if layout.ep > 1:
        from hai_llm.parallel.expert import apply_expert_parallel
        from hai_llm.parallel.transport import SymmSizing

        # under the FP8 recipe the dispatch payload crosses the links in FP8 (power-of-2 scales
        # per 128 channels), as in the paper; combine stays in the compute dtype
        out.transport = apply_expert_parallel(out.model, mesh, transport=layout.transport, link=link,
                                              fp8_dispatch=cfg.train.precision == "fp8",
                                              symm=SymmSizing.from_config(cfg.parallel))
    # 5. weight-gradient split
    if layout.schedule is not None:
        from hai_llm.pipeline.wgrad_split import WeightGradStore, split_weight_grads

        out.store = WeightGradStore()
        split_weight_grads(out.model, out.store)
