"""Runtimes: what a layout supplies to the training loop, between ``hai_llm.pipeline`` and
``hai_llm.train``.

* ``base``: the ``Runtime`` interface and ``SingleProcessRuntime``;
* ``parallelize``: ``parallelize(model, layout, cfg, mesh)``, the one place that applies FP8,
  the stage split, sequence and expert parallelism and the weight-gradient split, in order;
* ``mesh``: ``MeshRuntime`` (data x sequence x expert parallelism);
* ``pipeline``: ``PipelineRuntime`` (adds pipeline parallelism).

``build_runtime(cfg, layout)`` picks the runtime a layout needs.
"""
from __future__ import annotations

from typing import Optional

from hai_llm.config.schema import Config
from hai_llm.layout import Layout, build_layout

from .base import Runtime, SingleProcessRuntime
from .parallelize import Parallelized, parallelize


def build_runtime(cfg: Config, layout: Optional[Layout] = None) -> Runtime:
    """The runtime of ``layout``: ``SingleProcessRuntime`` without a process group,
    ``PipelineRuntime`` for pp > 1, ``MeshRuntime`` otherwise (``layout`` defaults to the
    layout of ``cfg`` on the initialized process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if layout is not None and layout.world_size > 1:
            raise RuntimeError(f"a {layout.world_size}-rank layout needs an initialized process group")
        return SingleProcessRuntime(cfg)
    if layout is None:
        layout = build_layout(cfg, dist.get_world_size())
    if layout.pp > 1:
        from .pipeline import PipelineRuntime

        return PipelineRuntime(cfg, layout)
    from .mesh import MeshRuntime

    return MeshRuntime(cfg, layout)


__all__ = ["Runtime", "SingleProcessRuntime", "Parallelized", "parallelize", "build_runtime"]
