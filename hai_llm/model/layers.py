"""Small building blocks shared by attention, MoE and the transformer: RMSNorm, the
YaRN-extended rotary embedding on DeepSeek's interleaved layout, SwiGLU MLP, and the
selective-recomputation helper.

Shape legend used across ``hai_llm/model``: B batch, S sequence, D model dim, H heads,
R rope dim, E experts, K experts per token, T tokens (B*S flattened), V vocabulary.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .args import ModelArgs


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (the paper keeps norms in high precision)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def _correction_dim(n_rot: float, dim: int, base: float, max_len: int) -> float:
    # the rotary pair index whose wavelength completes n_rot turns over max_len positions
    return dim * math.log(max_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Angular frequencies [R/2] of the decoupled RoPE, YaRN-blended when the context
    is stretched (max_seq_len > original_seq_len).

    YaRN keeps high-frequency pairs (more than beta_fast turns over the original context)
    unchanged, divides low-frequency pairs (fewer than beta_slow turns) by ``rope_factor``,
    and ramps linearly in between.
    """
    dim, base = args.qk_rope_head_dim, args.rope_theta
    # explicit CPU: tables are tiny, and under a meta-device context arange would run
    # through torch's decompositions (slow first call)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    if args.yarn_active:
        low = max(math.floor(_correction_dim(args.beta_fast, dim, base, args.original_seq_len)), 0)
        high = min(math.ceil(_correction_dim(args.beta_slow, dim, base, args.original_seq_len)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
        keep = 1.0 - ramp  # 1 -> extrapolate (unchanged), 0 -> interpolate (divided)
        freqs = freqs / args.rope_factor * (1 - keep) + freqs * keep
    return freqs.float()


def rope_cos_sin(args: ModelArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq_len, R/2] in fp32."""
    freqs = rope_frequencies(args)
    t = torch.arange(args.max_seq_len, device="cpu", dtype=torch.float32)
    ang = torch.outer(t, freqs)
    return ang.cos().to(device), ang.sin().to(device)


class Rope(NamedTuple):
    """What a block needs to know about the positions of its tokens: the rotary tables
    gathered at those positions and the positions themselves (global indices within
    the sequence; contiguous 0..S-1 on one device, two mirrored chunks per rank under
    sequence parallelism)."""
    cos: torch.Tensor  # [S, R/2]
    sin: torch.Tensor  # [S, R/2]
    pos: torch.Tensor  # [S] int64


def rope_at(cos_table: torch.Tensor, sin_table: torch.Tensor, pos_S: torch.Tensor) -> Rope:
    """The :class:`Rope` of positions ``pos_S`` gathered from [max_seq_len, R/2] tables; a
    position beyond the tables is an error, not a silent wrap or an index crash."""
    # Checked where it is free: on CPU. On an accelerator the read would block the host until
    # the device queue drains (every micro-batch); an out-of-range index there trips the
    # device-side bounds assert of the gather instead, and data.seq_len <= max_seq_len is
    # validated with the config before any step.
    if pos_S.device.type == "cpu" and int(pos_S.max()) >= cos_table.shape[0]:
        raise ValueError(f"position {int(pos_S.max())} exceeds model max_seq_len={cos_table.shape[0]}")
    return Rope(cos_table[pos_S], sin_table[pos_S], pos_S)


def apply_rope(x: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the position's angle: the complex
    multiply of DeepSeek's code. x: [B, S, H, R]; cos/sin: [S, R/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos_SR[:, None, :], sin_SR[:, None, :]
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def maybe_recompute(enabled: bool, fn, *args):
    """Run ``fn(*args)`` and, when ``enabled`` under autograd, drop its intermediate
    activations and recompute them in backward (non-reentrant checkpoint)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


@torch.no_grad()
def accumulate_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """p.grad += g (or = g), outside autograd, in p's dtype: how a deferred weight gradient
    (the zero-bubble W step, the FP8 Wgrad) lands on its parameter."""
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)
