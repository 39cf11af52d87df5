"""Pipeline parallelism: schedules as data (``schedules``), their simulator and Gantt charts
(``simulator``, ``gantt``), stage partitioning (``stage``), the piecewise / overlapped
forward-backward (``overlap``), the P2P executor (``executor``) and the trainer runtime
(``runtime.PipelineRuntime``).  See docs/pipeline.md.

Names are imported lazily so that ``import hai_llm.pipeline.schedules`` stays torch-free.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Action": "schedules", "OneFOneB": "schedules", "ZB1P": "schedules", "DualPipe": "schedules",
    "DualPipeV": "schedules", "check_schedule": "simulator", "simulate": "simulator",
    "StageModule": "stage", "PipelineModel": "stage", "build_pipeline_model": "stage",
    "partition_layers": "stage", "PipelineExecutor": "executor", "record_collectives": "executor",
    "check_collective_order": "executor", "WeightGradStore": "overlap",
    "install_weight_grad_split": "overlap", "PipelineRuntime": "runtime",
    "validate_pipeline": "runtime", "pipeline_dims": "runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
