"""Inference from trained checkpoints: one process, MLA's latent KV cache with the absorbed
up-projection, optional MTP speculative decoding (docs/sampling.md).

* ``kv_cache``: ``LatentCache``, kv_lora_rank + qk_rope_head_dim numbers per token and layer;
* ``absorbed``: ``absorbed_attention`` and ``CachedDecoder``, the model run incrementally;
* ``sampling``: greedy / temperature / top-k / top-p;
* ``generate``: ``generate`` (cached, optionally speculative) and ``generate_uncached`` (reference);
* ``load``: ``load_run``, a run folder's model, checkpoint and tokenizer.

Sits above ``model``, ``config``, ``checkpoint`` and ``data``; nothing below imports it.
"""
from .absorbed import CachedDecoder, absorbed_attention
from .generate import Generation, generate, generate_uncached
from .kv_cache import LatentCache
from .load import LoadedRun, find_run, load_run
from .sampling import SamplingConfig

__all__ = ["CachedDecoder", "Generation", "LatentCache", "LoadedRun", "SamplingConfig", "absorbed_attention",
           "find_run", "generate", "generate_uncached", "load_run"]
