"""Incremental decoding of the model with MLA's latent cache and the absorbed up-projection.

The model's own ``forward`` stays the training path (expand every cached latent into per-head
keys and values, then attend). Here, for generation, ``wkv_b`` is absorbed into the two sides of
attention, as DeepSeek's inference code does with ``attn_impl="absorb"`` (deepseek-ai/DeepSeek-V3
``inference/model.py``, ``MLA.forward``): with ``W_k[h]`` ``[dn, C]`` and ``W_v[h]`` ``[dv, C]`` the
key and value rows of ``wkv_b`` for head h and ``c_t = kv_norm(latent_t)`` the cached latent,

    q_nope[h] . k_nope[h, t] = q_nope[h] . (W_k[h] c_t) = (W_k[h]^T q_nope[h]) . c_t
    sum_t p[h, t] v[h, t]    = sum_t p[h, t] W_v[h] c_t = W_v[h] (sum_t p[h, t] c_t)

so the query is projected into the latent space once (``q_lat = W_k^T q_nope``, ``[H, C]`` per
token), scores are ``q_lat . c_t + q_pe . k_pe_t`` against the cache directly, and the weighted
latent sum is projected to the value space once per query. Nothing per head and per cached token
is ever materialised: the cache stays ``kv_lora_rank + qk_rope_head_dim`` numbers per token.

Everything else reuses the model's modules and pieces: ``MLA.query`` (low-rank query, RoPE),
``MLA.latent`` (``wkv_a``, RoPE on ``k_pe``), ``kv_norm``, the ``wkv_b`` and ``wo`` weights,
``softmax_scale`` (YaRN's mscale included), ``Block.attn_norm`` / ``Block.ffn_part`` (dense FFN or
MoE), ``Transformer.embed`` / ``norm`` / ``head`` / ``rope`` and ``MTPModule.input_proj`` / ``norm``.
"""
from __future__ import annotations

import torch

from hai_llm.model.attention import MLA
from hai_llm.model.layers import Rope
from hai_llm.model.transformer import Block, Transformer

from .kv_cache import LatentCache


def absorbed_attention(mla: MLA, x_BSD: torch.Tensor, rope: Rope, cache: LatentCache, layer: int,
                       start: int) -> torch.Tensor:
    """MLA of tokens at positions ``start .. start+S-1`` (``x`` already ``attn_norm``-ed) over every
    cached token before them and themselves: writes their latents into ``cache`` layer ``layer``
    and returns ``wo(attention)`` ``[B, S, dim]``, what ``mla(x, rope)`` returns on the whole prefix."""
    B, S, _ = x_BSD.shape
    H, dn, dv, C = mla.n_heads, mla.qk_nope, mla.v_dim, mla.kv_rank
    q_nope, q_pe = mla.query(x_BSD, rope)  # [B, S, H, dn], [B, S, H, R]
    lat, k_pe = mla.latent(x_BSD, rope).split([C, mla.qk_rope], dim=-1)
    end = cache.write(layer, start, mla.kv_norm(lat), k_pe)
    kv, pe = cache.read(layer, end)  # [B, T, C], [B, T, R]
    w = mla.wkv_b.weight.view(H, dn + dv, C)
    q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w[:, :dn])
    scores = (torch.einsum("bshc,btc->bsht", q_lat, kv) +
              torch.einsum("bshr,btr->bsht", q_pe, pe)) * mla.softmax_scale
    # causal: the query at position start+s sees cached positions 0 .. start+s
    allowed = torch.arange(end, device=x_BSD.device)[None, :] <= (start + torch.arange(S, device=x_BSD.device))[:, None]
    scores = scores.masked_fill(~allowed[None, :, None, :], float("-inf"))
    # softmax in fp32 at least (bf16 activations: as DeepSeek's code; fp64 stays fp64)
    p = scores.softmax(dim=-1, dtype=torch.promote_types(x_BSD.dtype, torch.float32)).to(x_BSD.dtype)
    o = torch.einsum("bshc,hdc->bshd", torch.einsum("bsht,btc->bshc", p, kv), w[:, dn:])
    return mla.wo(o.reshape(B, S, H * dv))


class CachedDecoder:
    """The model run incrementally over a :class:`LatentCache` (one row per sequence of the batch).

    ``main(tokens, start)`` runs the main model on the tokens at positions ``start ..`` and returns
    their normed final states (what the head and MTP depth 1 read); ``mtp(depth, h, tokens, start)``
    runs MTP module ``depth`` (1-based) at the same positions from the previous depth's normed states
    ``h`` and the tokens ``depth`` places ahead, returning its normed states. Entries written past
    what the caller later treats as committed are simply rewritten by the next call at those
    positions (speculative decoding's rollback)."""

    def __init__(self, model: Transformer, batch: int, max_len: int) -> None:
        if max_len > model.args.max_seq_len:
            raise ValueError(f"{max_len} tokens exceed the model's max_seq_len={model.args.max_seq_len}; "
                             f"generate fewer tokens or use a shorter prompt")
        self.model = model
        p = next(model.parameters())
        self.cache = LatentCache.for_model(model.args, batch, max_len, dtype=p.dtype, device=p.device)

    def _rope(self, start: int, n: int) -> Rope:
        return self.model.rope(torch.arange(start, start + n, device=self.model.rope_cos.device))

    def _block(self, block: Block, layer: int, x: torch.Tensor, rope: Rope, start: int) -> torch.Tensor:
        h = x + absorbed_attention(block.attn, block.attn_norm(x), rope, self.cache, layer, start)
        return block.ffn_part(h)

    @torch.no_grad()
    def main(self, tokens_BS: torch.Tensor, start: int) -> torch.Tensor:
        m = self.model
        rope = self._rope(start, tokens_BS.shape[1])
        h = m.embed(tokens_BS)
        for i, block in enumerate(m.layers):
            h = self._block(block, i, h, rope, start)
        m.pop_moe_stats()  # routing statistics are a training concern: leave none behind
        return m.norm(h)

    @torch.no_grad()
    def mtp(self, depth: int, h_BSD: torch.Tensor, ahead_BS: torch.Tensor, start: int) -> torch.Tensor:
        m = self.model
        mod = m.mtp[depth - 1]
        rope = self._rope(start, ahead_BS.shape[1])
        x = mod.input_proj(h_BSD, m.embed(ahead_BS))
        out = mod.norm(self._block(mod.block, m.args.n_layers + depth - 1, x, rope, start))
        m.pop_moe_stats()
        return out

    def logits(self, h_BSD: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the shared head from normed states."""
        with torch.no_grad():
            return self.model.head(h_BSD).float()
