"""Multi-head latent attention (MLA) of DeepSeek-V2/V3, single device.

Queries go through a low-rank bottleneck (wq_a -> q_norm -> wq_b); keys and values are
jointly compressed into a kv_lora_rank latent plus ONE rope key shared by all heads
(wkv_a), normalised (kv_norm) and expanded per head (wkv_b). Only latent + k_pe (576
numbers per token for the 671B model) need to cross ranks for sequence parallelism, so
the expansion is a separate method that the parallel code can call after gathering.

With ``recompute='selective'`` the norms and the up-projections (q_norm + wq_b,
kv_norm + wkv_b) are recomputed in backward, as the paper does: the large per-head
tensors are then not kept for backward, only the small latents.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .layers import RMSNorm, Rope, apply_rope, maybe_recompute


class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.n_heads = args.n_heads
        self.qk_nope = args.qk_nope_head_dim
        self.qk_rope = args.qk_rope_head_dim
        self.v_dim = args.v_head_dim
        self.kv_rank = args.kv_lora_rank
        self.selective = args.recompute == "selective"
        qk_dim = args.qk_head_dim
        if args.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, args.n_heads * qk_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
            self.wq_b = nn.Linear(args.q_lora_rank, args.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, args.norm_eps)
        self.wkv_b = nn.Linear(args.kv_lora_rank, args.n_heads * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.wo = nn.Linear(args.n_heads * args.v_head_dim, args.dim, bias=False)
        self.softmax_scale = args.softmax_scale

    # -- pieces (sequence parallelism calls them separately) ----------------------------
    def _q_up(self, q_lat: torch.Tensor) -> torch.Tensor:
        return self.wq_b(self.q_norm(q_lat))

    def query(self, x_BSD: torch.Tensor, rope: Rope):
        """Per-head query split into (q_nope [B,S,H,dn], q_pe [B,S,H,R]) with RoPE applied."""
        B, S, _ = x_BSD.shape
        if self.args.q_lora_rank == 0:
            q = self.wq(x_BSD)
        else:
            q = maybe_recompute(self.selective, self._q_up, self.wq_a(x_BSD))
        q = q.view(B, S, self.n_heads, self.qk_nope + self.qk_rope)
        q_nope, q_pe = q.split([self.qk_nope, self.qk_rope], dim=-1)
        return q_nope, apply_rope(q_pe, rope.cos, rope.sin)

    def latent(self, x_BSD: torch.Tensor, rope: Rope) -> torch.Tensor:
        """The compressed KV of each token: [B, S, kv_lora_rank + R] = [latent | rope'd k_pe]."""
        kv = self.wkv_a(x_BSD)
        lat, k_pe = kv.split([self.kv_rank, self.qk_rope], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), rope.cos, rope.sin).squeeze(2)
        return torch.cat([lat, k_pe], dim=-1)

    def _kv_up(self, lat: torch.Tensor) -> torch.Tensor:
        return self.wkv_b(self.kv_norm(lat))

    def expand_kv(self, latent_BLC: torch.Tensor):
        """Expand latents [B, L, C] into per-head keys [B, L, H, dn+R] and values [B, L, H, dv]."""
        B, L, _ = latent_BLC.shape
        lat, k_pe = latent_BLC.split([self.kv_rank, self.qk_rope], dim=-1)
        kv = maybe_recompute(self.selective, self._kv_up, lat)
        kv = kv.view(B, L, self.n_heads, self.qk_nope + self.v_dim)
        k_nope, v = kv.split([self.qk_nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, L, self.n_heads, self.qk_rope)], dim=-1)
        return k, v

    def core(self, q_BSHC, k_BLHC, v_BLHV, attn_mask=None, is_causal=True) -> torch.Tensor:
        """softmax(q.k * scale) v with a causal (or explicit boolean) mask -> [B, S, H*dv]."""
        q, k, v = (t.transpose(1, 2) for t in (q_BSHC, k_BLHC, v_BLHV))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=is_causal and attn_mask is None,
                                           scale=self.softmax_scale)
        B, _, S, _ = o.shape
        return o.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim)

    def forward(self, x_BSD: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Causal attention over the tokens of x, which must be contiguous positions
        (sequence parallelism replaces this method, see hai_llm.parallel.sequence)."""
        q_nope, q_pe = self.query(x_BSD, rope)
        k, v = self.expand_kv(self.latent(x_BSD, rope))
        o = self.core(torch.cat([q_nope, q_pe], dim=-1), k, v)
        return self.wo(o)
