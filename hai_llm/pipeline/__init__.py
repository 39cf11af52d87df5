"""Pipeline parallelism: the simulator and Gantt charts of the schedules (``simulator``,
``gantt``; the schedules themselves are data in ``hai_llm.layout.schedules``), cutting a model
into stages (``stage``), the piecewise / overlapped forward-backward (``overlap``), the P2P
executor (``executor``). The trainer runtime is ``hai_llm.runtime.pipeline.PipelineRuntime``.
See docs/pipeline.md.

Names are imported lazily so that importing one submodule does not pull in the others.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "check_schedule": "simulator", "simulate": "simulator",
    "StageModule": "stage", "PipelineModel": "stage", "build_pipeline_model": "stage",
    "PipelineExecutor": "executor", "WeightGradStore": "wgrad_split",
    "split_weight_grads": "wgrad_split",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
