"""The optimizer below every parallel layer: AdamW with storable-in-BF16 moments and parameter
groups (``adamw``), and every training schedule (``schedules``: learning rate, bias update
speed, MTP and balance-loss weights, in steps and tokens consumed). ZeRO-1
(``hai_llm.parallel.zero``) wraps the optimizer; the trainer takes each step's values from a
``TrainingSchedule`` and sets the learning rate with ``set_lr``."""
from .adamw import AdamW, build_optimizer, param_groups, set_lr
from .schedules import LRSchedule, StepValues, TrainingSchedule, lr_at

__all__ = ["AdamW", "build_optimizer", "lr_at", "param_groups", "set_lr", "LRSchedule", "StepValues",
           "TrainingSchedule"]
