"""The layout authority: one home for every decision that shapes a parallel run.

* ``dims``: ``ParallelDims`` (degrees, rank arithmetic, node and expert rules) and the torch
  process groups it builds (``MeshGroups``);
* ``schedules``: the pipeline schedules as plain data and their one registry (``SCHEDULES``,
  ``make_schedule``), each schedule's rules stated once;
* ``partition``: the one layer partitioner (cost-balanced, or ``parallel.stage_layers``);
* ``layout``: ``build_layout(cfg, world_size) -> Layout``, which validates everything.

Pure Python below ``hai_llm.parallel``: nothing here imports torch at module level.
"""
from .dims import GROUP_NAMES, MeshGroups, ParallelDims
from .layout import TRANSPORTS, Layout, build_layout
from .partition import head_cost, layer_cost, partition_layers
from .schedules import SCHEDULES, PipelineSchedule, make_schedule, schedule_class

__all__ = ["GROUP_NAMES", "MeshGroups", "ParallelDims", "TRANSPORTS", "Layout", "build_layout",
           "head_cost", "layer_cost", "partition_layers", "SCHEDULES", "PipelineSchedule",
           "make_schedule", "schedule_class"]
