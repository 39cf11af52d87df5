"""Data pipeline: tokenizers, one-off corpus preparation into memory-mapped token files,
and the deterministic data-parallel sampler that training draws batches from.

Typical use::

    from hai_llm.data import ensure_prepared, TokenDataset, SequenceSampler
    path = ensure_prepared(None, "data_cache/stdlib")          # stdlib corpus, byte tokenizer
    ds = TokenDataset(path); ds.check_vocab(model_args.vocab_size)
    sampler = SequenceSampler(ds, seq_len=512, global_batch=64, dp_rank=r, dp_world=w)
    batch = sampler.next_batch()                                 # [64 // w, 513] int64
"""
from hai_llm.data.dataset import SequenceSampler, TokenDataset, split_batch, window_order
from hai_llm.data.prepare import (
    DEFAULT_PATTERNS,
    DEFAULT_STDLIB_MAX_BYTES,
    default_corpus_sources,
    ensure_prepared,
    list_source_files,
    load_meta,
    prepare_corpus,
    token_dtype,
)
from hai_llm.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "DEFAULT_PATTERNS",
    "DEFAULT_STDLIB_MAX_BYTES",
    "HFTokenizer",
    "SequenceSampler",
    "TokenDataset",
    "Tokenizer",
    "build_tokenizer",
    "default_corpus_sources",
    "ensure_prepared",
    "list_source_files",
    "load_meta",
    "prepare_corpus",
    "split_batch",
    "token_dtype",
    "window_order",
]
