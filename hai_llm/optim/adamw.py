"""AdamW with storable-in-BF16 moments and the parameter grouping (no weight decay on norms,
routing bias never optimized); the learning-rate schedules are in ``schedules``.

torch.optim.AdamW keeps moments in the parameter dtype; the paper keeps fp32 master
weights with BF16 moments, so this optimizer casts moments explicitly. Its state_dict
has the standard torch layout, so torch.distributed.checkpoint can save and reshard it.

Memory: the update runs over slices of at most ``chunk`` elements, in place on the moments and
the parameter, with two chunk-sized fp32 scratch buffers (four with BF16 moments: their fp32
working copies). The arithmetic is elementwise, so slicing does not change a bit of the result,
and the scratch no longer grows with the parameter: the ZeRO master shard of a large model
used to need 2 (fp32 moments) or 4 (BF16 moments) shard-sized fp32 temporaries per step
(``benchmarks/bench_memory.py --opt``, docs/perf.md).
"""
from __future__ import annotations

import torch
from torch import nn

from hai_llm.config.schema import OptimConfig


class AdamW(torch.optim.Optimizer):
    """Decoupled weight decay Adam (Loshchilov & Hutter) with moments in ``moments_dtype``;
    the update itself is computed in fp32, ``chunk`` elements at a time (module docstring)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                 moments_dtype: torch.dtype = torch.float32, chunk: int = 1 << 22):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.moments_dtype = moments_dtype
        self.chunk = chunk
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    # the step count stays on the host (explicitly: never the default device), so
                    # reading it is no device synchronisation
                    st["step"] = torch.zeros((), dtype=torch.float32, device="cpu")
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                st["step"] += 1
                self._update(p, st, group, st["step"].item())
        return None

    def _update(self, p: torch.Tensor, st: dict, group: dict, t: float) -> None:
        """One AdamW step of ``p``, slice by slice. Per element, the same operations in the same
        order as the whole-tensor form (so the same bits):

            m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2        (moments, in fp32)
            p = p (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps)  bc_i = 1 - b_i^t
        """
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        if not (p.is_contiguous() and st["exp_avg"].is_contiguous() and st["exp_avg_sq"].is_contiguous()):
            raise ValueError("AdamW updates parameters in place slice by slice: make the parameter contiguous")
        # the gradient: a view, or a copy when autograd gave it another layout (values unchanged)
        flat = [p.view(-1), p.grad.reshape(-1), st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)]
        n = flat[0].numel()
        size = min(n, self.chunk)
        f32 = dict(dtype=torch.float32, device=p.device)
        denom_buf, upd_buf = torch.empty(size, **f32), torch.empty(size, **f32)
        cast_m = st["exp_avg"].dtype != torch.float32  # BF16 moments: fp32 working copies
        m_buf = torch.empty(size, **f32) if cast_m else None
        v_buf = torch.empty(size, **f32) if cast_m else None
        for lo in range(0, n, size):
            hi = min(lo + size, n)
            k = hi - lo
            pw, g, m_st, v_st = (x[lo:hi] for x in flat)
            g = g.float()
            m = m_buf[:k].copy_(m_st) if cast_m else m_st  # fp32 moments: updated in place
            v = v_buf[:k].copy_(v_st) if cast_m else v_st
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if cast_m:
                m_st.copy_(m)
                v_st.copy_(v)
            # bias-corrected update: lr * m_hat / (sqrt(v_hat) + eps)
            denom = torch.div(v, bc2, out=denom_buf[:k]).sqrt_().add_(eps)
            upd = torch.div(m, bc1, out=upd_buf[:k]).div_(denom)
            pf = pw.float()
            if wd:
                pf.mul_(1 - lr * wd)
            pf.add_(upd, alpha=-lr)
            if pf.data_ptr() != pw.data_ptr():
                pw.copy_(pf)


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


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
