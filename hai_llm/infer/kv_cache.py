"""MLA's compressed KV cache: per token and layer, the normalised latent and the roped key.

Why only these: multi-head latent attention derives every head's key and value from one
``kv_lora_rank`` latent (``wkv_a`` then ``kv_norm``, expanded by ``wkv_b``) plus ONE rotary key
``k_pe`` of ``qk_rope_head_dim`` numbers shared by all heads; the DeepSeek-V3 report (arXiv
2412.19437, section 2.1.1) notes that only these two vectors need caching during generation
(docs/deepseek_v3.md, "MLA (multi-head latent attention)"). Caching them, and
not the expanded keys and values, costs ``kv_lora_rank + qk_rope_head_dim`` numbers per token
per layer: 512 + 64 = 576 for the 671B model instead of 128 heads x (192 + 128) = 40960
(71x less). The up-projection is absorbed into the query and the output instead
(``hai_llm.infer.absorbed``), as DeepSeek's inference code does with ``attn_impl="absorb"``.

The cache stores ``kv_norm(latent)`` (the norm applied once, when a token is written, as
DeepSeek's ``kv_cache`` does) and ``k_pe`` after RoPE at the token's position. It keeps no
length: a writer says where it writes (``start``) and a reader how far it reads (``end``), so
rolling back rejected speculative tokens is just writing their positions again later.
Layers are numbered ``0..n_layers-1`` for the main model, then one per MTP depth.
"""
from __future__ import annotations

import torch


class LatentCache:
    """``kv[layer]``: ``[B, max_len, kv_lora_rank]`` normalised latents; ``pe[layer]``:
    ``[B, max_len, qk_rope_head_dim]`` roped keys. Nothing else is stored."""

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if n_layers < 1 or batch < 1 or max_len < 1:
            raise ValueError(f"a latent cache needs n_layers, batch, max_len >= 1, got {n_layers}, {batch}, {max_len}")
        self.max_len = max_len
        self.kv = torch.zeros(n_layers, batch, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(n_layers, batch, max_len, qk_rope_head_dim, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, args, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> "LatentCache":
        """One layer per transformer block of ``args`` (a ``ModelArgs``) and per MTP depth."""
        return cls(args.n_layers + args.n_mtp_layers, batch, max_len, args.kv_lora_rank, args.qk_rope_head_dim,
                   dtype, device)

    @property
    def numbers_per_token_per_layer(self) -> int:
        return self.kv.shape[-1] + self.pe.shape[-1]

    def write(self, layer: int, start: int, kv_BSC: torch.Tensor, pe_BSR: torch.Tensor) -> int:
        """Store the tokens at positions ``start .. start+S-1`` of ``layer``; returns ``start + S``."""
        end = start + kv_BSC.shape[1]
        if end > self.max_len:
            raise ValueError(f"position {end - 1} is beyond the cache of {self.max_len} tokens; generate fewer "
                             f"tokens (--max-new-tokens) or a shorter prompt")
        self.kv[layer, :, start:end] = kv_BSC
        self.pe[layer, :, start:end] = pe_BSR
        return end

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and roped keys of positions ``0 .. end-1`` of ``layer`` (views)."""
        return self.kv[layer, :, :end], self.pe[layer, :, :end]
