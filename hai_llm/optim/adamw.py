"""AdamW with storable-in-BF16 moments, the paper's learning-rate schedules, and the
parameter grouping (no weight decay on norms, routing bias never optimized).

torch.optim.AdamW keeps moments in the parameter dtype; the paper keeps fp32 master
weights with BF16 moments, so this optimizer casts moments explicitly. Its state_dict
has the standard torch layout, so torch.distributed.checkpoint can save and reshard it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from hai_llm.config.schema import OptimConfig


class AdamW(torch.optim.Optimizer):
    """Decoupled weight decay Adam (Loshchilov & Hutter) with moments in ``moments_dtype``;
    the update itself is computed in fp32."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                 moments_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.moments_dtype = moments_dtype
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                st["step"] += 1
                t = st["step"].item()
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                # bias-corrected update: lr * m_hat / (sqrt(v_hat) + eps)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                upd = (m / (1 - b1 ** t)).div_(denom)
                pf = p.float()
                if wd:
                    pf.mul_(1 - lr * wd)
                pf.add_(upd, alpha=-lr)
                if pf.data_ptr() != p.data_ptr():
                    p.copy_(pf)
        return None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norm weights) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    dt = torch.bfloat16 if cfg.moments_dtype == "bfloat16" else torch.float32
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                 weight_decay=cfg.weight_decay, moments_dtype=dt)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based). A pure function of the step,
    so resuming needs no scheduler state."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    start = cfg.warmup_steps if cfg.schedule == "cosine" else max(cfg.warmup_steps, int(cfg.decay_start * total_steps))
    if step < start:
        return cfg.lr
    span = max(1, total_steps - start)
    frac = min(1.0, (step - start) / span)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * frac))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
