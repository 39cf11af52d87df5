"""Sequence parallelism for MLA: each rank holds 2 of the 2*sp chunks of every sequence
and attention exchanges only the compressed KV latent.

Layout: a sequence of S tokens is cut into 2*sp chunks of S/(2*sp); rank r holds chunk r
and its mirror 2*sp-1-r. Under a causal mask the work of a query grows with its
position, so pairing an early chunk with a late one gives every rank the same attention
cost (the "zigzag" layout).

Attention: queries stay local. Each rank computes the latent of its tokens (kv_lora_rank
numbers + the shared rope key: 576 per token for DeepSeek-V3, instead of 128 heads x
(192 + 128) for expanded K/V), all-gathers the latents and their positions over the
sp group, expands K/V locally with wkv_b and attends with a mask built from global
positions (query position >= key position). The all-gather's backward is a
reduce-scatter (sum) of the latent gradient, so each rank's latent receives the
gradient of every rank's queries.

Routing statistics of the sequence-wise balance loss are summed over the sp group (see
hai_llm.model.moe.sequence_balance_loss). The loss of each rank is a mean over its own
tokens; all ranks hold equally many, so the mean over ranks that the dense-gradient
average computes is the one-device loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from hai_llm.parallel.comm import all_gather_single, reduce_scatter_single
from torch import nn

from hai_llm.model.attention import MLA
from hai_llm.model.layers import Rope
from hai_llm.model.moe import MoE


def sp_positions(seq_len: int, sp: int, sp_rank: int, device=None) -> torch.Tensor:
    """Global positions held by ``sp_rank``: chunk r then chunk 2*sp-1-r."""
    if seq_len % (2 * sp):
        raise ValueError(f"data.seq_len={seq_len} must be divisible by 2*sp={2 * sp} for sequence "
                         f"parallelism; pick seq_len a multiple of {2 * sp}")
    c = seq_len // (2 * sp)
    a = torch.arange(sp_rank * c, (sp_rank + 1) * c, device=device)
    b = torch.arange((2 * sp - 1 - sp_rank) * c, (2 * sp - sp_rank) * c, device=device)
    return torch.cat([a, b])


class _GatherSeq(torch.autograd.Function):
    """[B, L, C] on each rank -> [B, sp*L, C] in rank order; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x_BLC: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        xt = x_BLC.transpose(0, 1).contiguous()  # [L, B, C]: gather along the leading dim
        out = xt.new_empty((world * xt.shape[0],) + tuple(xt.shape[1:]))
        all_gather_single(out, xt, group=group)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, g_BLC: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        gt = g_BLC.transpose(0, 1).contiguous()
        out = gt.new_empty((gt.shape[0] // world,) + tuple(gt.shape[1:]))
        reduce_scatter_single(out, gt, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.transpose(0, 1), None


def gather_sequence(x_BLC: torch.Tensor, group) -> torch.Tensor:
    return _GatherSeq.apply(x_BLC, group)


class SequenceParallelMLA(MLA):
    """MLA whose keys/values come from the latents of every rank of ``sp_group``.
    Installed by class swap (parameter names unchanged, so checkpoints are unaffected)."""

    sp_group = None

    def forward(self, x_BSD: torch.Tensor, rope: Rope) -> torch.Tensor:
        q_nope, q_pe = self.query(x_BSD, rope)
        lat_all = gather_sequence(self.latent(x_BSD, rope), self.sp_group)
        world = dist.get_world_size(self.sp_group)
        pos_all = rope.pos.new_empty(world * rope.pos.numel())
        all_gather_single(pos_all, rope.pos.contiguous(), group=self.sp_group)
        k, v = self.expand_kv(lat_all)
        mask = rope.pos[:, None] >= pos_all[None, :]  # [S_local, L]: True = may attend
        return self.wo(self.core(torch.cat([q_nope, q_pe], dim=-1), k, v, attn_mask=mask))


def _sum_over(group):
    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t
    return reduce


def apply_sequence_parallel(model: nn.Module, sp_group, sp: int) -> nn.Module:
    """Make every MLA gather latents over ``sp_group`` and every MoE sum its
    sequence-level routing statistics over it. A no-op for sp == 1."""
    if sp == 1:
        return model
    for m in model.modules():
        if isinstance(m, MLA):
            m.__class__ = SequenceParallelMLA
            m.sp_group = sp_group
        elif isinstance(m, MoE):
            m.seq_reducer = _sum_over(sp_group)
            m.seq_world = sp
    return model
