"""The optimizer below every parallel layer: AdamW with storable-in-BF16 moments, parameter
groups and the learning-rate schedules (``adamw``). ZeRO-1 (``hai_llm.parallel.zero``) wraps
it; the trainer sets the learning rate with ``lr_at`` / ``set_lr``."""
from .adamw import AdamW, build_optimizer, lr_at, param_groups, set_lr

__all__ = ["AdamW", "build_optimizer", "lr_at", "param_groups", "set_lr"]
