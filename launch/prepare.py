"""``hai-llm-prepare``: tokenize a corpus once into a memory-mapped directory for training.

Training reads only prepared directories (``tokens.bin`` + ``offsets.npy`` + ``meta.json``,
see ``hai_llm.data.prepare``), so this command is the one place text meets a tokenizer.
With no SOURCES it prepares the built-in offline corpus, the Python standard library's
source files, capped at a few MB. An up-to-date directory is reused unless ``--force``.

Examples::

    hai-llm-prepare --out data_cache/stdlib
    hai-llm-prepare --out data_cache/web --tokenizer /models/DeepSeek-V3/tokenizer.json \\
        --pattern '*.jsonl' --text-field content shards/
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from hai_llm.data.prepare import (
    DEFAULT_PATTERNS,
    DEFAULT_STDLIB_MAX_BYTES,
    ensure_prepared,
    load_meta,
    prepare_corpus,
)
from hai_llm.data.dataset import TokenDataset
from hai_llm.data.tokenizer import Tokenizer, build_tokenizer

# meta.json fields repeated by --json (the full file stays in DIR/meta.json).
_SUMMARY_FIELDS = ("n_tokens", "n_documents", "n_files", "n_text_bytes", "truncated_at_max_bytes",
                   "n_files_with_decode_errors",
                   "vocab_size", "dtype", "tokenizer", "source_description", "content_sha256")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hai-llm-prepare",
        description="Tokenize text / .jsonl files or folders into a memory-mapped token file.",
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="text or .jsonl files, or folders searched recursively "
                        "(none: the Python standard library's *.py files)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory to write tokens.bin, offsets.npy and meta.json into")
    p.add_argument("--tokenizer", default="byte", metavar="byte|PATH.json",
                   help="'byte' (default, offline) or a Hugging Face tokenizer.json path")
    p.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help=f"cap on text bytes read (default: {DEFAULT_STDLIB_MAX_BYTES} for the "
                        f"stdlib corpus, no cap for explicit sources)")
    p.add_argument("--pattern", default=None, metavar="GLOB",
                   help=f"comma-separated file-name globs for folders (default: "
                        f"{','.join(DEFAULT_PATTERNS)}; '*.py' for the stdlib corpus)")
    p.add_argument("--text-field", default="text", metavar="F",
                   help="JSON field holding the text in .jsonl files (default: text)")
    p.add_argument("--force", action="store_true",
                   help="re-tokenize even if DIR already holds the same corpus")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="also print the first N tokens decoded, to eyeball the result")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object instead of text")
    return p


def _sample_text(out, tok: Tokenizer, n: int) -> str:
    # Decoded from the written file, not from the source text: this shows what training sees.
    ids = TokenDataset(out).tokens[:n].tolist()
    return tok.decode(ids)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        tok = build_tokenizer(args.tokenizer)
        run = prepare_corpus if args.force else ensure_prepared
        out = run(args.sources or None, args.out, tok, pattern=args.pattern,
                  max_bytes=args.max_bytes, text_field=args.text_field)
        meta = load_meta(out)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"hai-llm-prepare: error: {exc}\n")
    elapsed = time.perf_counter() - t0
    if args.show < 0:
        parser.exit(2, f"hai-llm-prepare: error: --show must be >= 0, got {args.show}\n")
    sample = _sample_text(out, tok, args.show) if args.show else None
    if args.json:
        summary = {k: meta[k] for k in _SUMMARY_FIELDS}
        summary["n_bytes_replaced"] = meta.get("n_bytes_replaced")  # absent in folders prepared before it existed
        summary.update(out=str(out), seconds=round(elapsed, 3))
        if sample is not None:
            summary["sample"] = sample
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(f"n_tokens:  {meta['n_tokens']}")
    print(f"files:     {meta['n_files']} ({meta['n_documents']} documents, "
          f"{meta['n_text_bytes']} text bytes"
          f"{', truncated at max_bytes' if meta['truncated_at_max_bytes'] else ''})")
    print(f"tokenizer: {meta['tokenizer']} (vocab_size {meta['vocab_size']}, {meta['dtype']})")
    if meta.get("n_files_with_decode_errors"):
        print(f"replaced:  {meta.get('n_bytes_replaced', '?')} undecodable bytes in "
              f"{meta['n_files_with_decode_errors']} file(s) by U+FFFD (not valid UTF-8)")
    print(f"source:    {meta['source_description']}")
    print(f"out:       {out}")
    print(f"time:      {elapsed:.2f}s")
    if sample is not None:
        print(f"first {args.show} tokens:")
        print(sample)
    return 0

if __name__ == "__main__":
    sys.exit(main())
