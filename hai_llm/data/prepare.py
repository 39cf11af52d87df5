"""Turn text on disk into a memory-mappable token file that training can sample from.

Training must not tokenize on the fly (it would couple data-loader speed to the tokenizer
and make sample order depend on worker timing), so text is tokenized once, here, into a
prepared directory:

* ``tokens.bin``  -- every document's ids followed by one EOS id, back to back, as raw
  ``uint16`` (vocabularies up to 65,536 ids) or ``uint32``;
* ``offsets.npy`` -- int64, ``n_documents + 1`` entries: document ``i`` (its trailing EOS
  included) is ``tokens[offsets[i]:offsets[i + 1]]``;
* ``meta.json``   -- dtype, counts, tokenizer identity, sources, hashes, and the ``config``
  key that ``ensure_prepared`` compares to decide whether the directory can be reused.

Sources are plain-text files (one file = one document), ``.jsonl`` files (one line = one
document, text under a configurable field) or folders searched recursively with glob
patterns. With no sources, the corpus is the Python standard library's own ``*.py`` files:
real text that exists on every machine this runs on, so tests and smoke runs need no
download. Files are visited in a fixed, sorted order and capped by ``max_bytes``, so the
same inputs always give byte-identical output.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from hai_llm.data.token_scan import record_max_id
from hai_llm.data.tokenizer import Tokenizer, build_tokenizer

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
META_FILE = "meta.json"

# Folder sources without an explicit pattern take these file names.
DEFAULT_PATTERNS: tuple[str, ...] = ("*.txt", "*.md", "*.py", "*.jsonl")
STDLIB_PATTERNS: tuple[str, ...] = ("*.py",)
# ~8 MB of stdlib source tokenizes in a few seconds with the byte tokenizer.
DEFAULT_STDLIB_MAX_BYTES = 8_000_000
# Never descended into: caches, VCS folders (any name starting with "."), and installed
# third-party packages, which live under the stdlib folder but differ per machine.
SKIPPED_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
# Documents are encoded this many text bytes at a time (bounds memory, feeds encode_batch).
_CHUNK_BYTES = 4 << 20


def default_corpus_sources() -> list[str]:
    """The embedded default corpus: the running Python's standard-library folder."""
    stdlib = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(stdlib):
        raise FileNotFoundError(
            f"the Python standard library folder {stdlib} (sysconfig 'stdlib') does not "
            f"exist, so the default corpus is unavailable; pass text sources explicitly"
        )
    return [stdlib]


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id ``0..vocab_size - 1``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size - 1 <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if vocab_size - 1 <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def _as_patterns(pattern: str | Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    if pattern is None:
        return tuple(default)
    if isinstance(pattern, str):
        # "*.py,*.txt" on the command line means two patterns.
        pats = tuple(p.strip() for p in pattern.split(",") if p.strip())
    else:
        pats = tuple(str(p) for p in pattern)
    if not pats:
        raise ValueError(f"pattern {pattern!r} contains no glob; pass e.g. '*.txt' or '*.py,*.md'")
    return pats


def _resolve_request(sources: str | os.PathLike | Sequence[str | os.PathLike] | None,
                     pattern: str | Sequence[str] | None,
                     max_bytes: int | None) -> tuple[list[str], tuple[str, ...], int | None, bool]:
    """Fill in defaults: no sources means the stdlib corpus with its own pattern and cap."""
    is_default = sources is None or (not isinstance(sources, (str, os.PathLike))
                                     and len(sources) == 0)
    if is_default:
        srcs = default_corpus_sources()
        patterns = _as_patterns(pattern, STDLIB_PATTERNS)
        cap = DEFAULT_STDLIB_MAX_BYTES if max_bytes is None else max_bytes
    else:
        raw = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
        srcs = [str(Path(s).expanduser().resolve()) for s in raw]
        patterns = _as_patterns(pattern, DEFAULT_PATTERNS)
        cap = max_bytes
    if cap is not None and cap <= 0:
        raise ValueError(f"max_bytes must be a positive byte count or None (no cap), got {cap}")
    return srcs, patterns, cap, is_default


def _matches(rel_posix: str, patterns: tuple[str, ...]) -> bool:
    # A pattern with a "/" is matched against the path relative to the source folder,
    # otherwise against the file name; case-sensitive so results agree across platforms.
    name = rel_posix.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel_posix if "/" in p else name, p) for p in patterns)


def list_source_files(sources: Sequence[str], patterns: tuple[str, ...]) -> list[Path]:
    """Every file the corpus reads, in the order it is read.

    Sources keep the order given; a folder's files are sorted by relative POSIX path. A
    file named directly is always included (the caller chose it); one reached twice is
    read once, at its first position. (Plain string paths here: pathlib costs ~10x more
    on the thousands of stdlib files, and reuse checks run this on every start.)
    """
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for src in sources:
        root = os.fspath(src)
        if os.path.isfile(root):
            found = [root]
        elif os.path.isdir(root):
            keyed: list[tuple[str, str]] = []
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames
                               if d not in SKIPPED_DIRS and not d.startswith(".")]
                rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
                prefix = "" if rel_dir == "." else rel_dir + "/"
                for fn in filenames:
                    if _matches(prefix + fn, patterns):
                        keyed.append((prefix + fn, os.path.join(dirpath, fn)))
            keyed.sort()
            found = [full for _, full in keyed]
        else:
            raise FileNotFoundError(
                f"corpus source {root} does not exist; pass existing text/.jsonl files or "
                f"folders (or no sources for the Python stdlib default corpus)"
            )
        for full in found:
            try:
                st = os.stat(full)
            except OSError:  # a dangling symlink is not a document
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            out.append(Path(full))
    if not out:
        raise ValueError(
            f"empty corpus: no file under {list(sources)} matches {list(patterns)}; pass a "
            f"different --pattern (e.g. '*.txt,*.jsonl') or other sources"
        )
    return out


def _listing_sha256(files: list[Path]) -> str:
    # Cheap change detector for reuse: names, sizes and modification times, no contents.
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@dataclass
class _ReadStats:
    files_read: int = 0
    files_with_decode_errors: int = 0
    bytes_replaced: int = 0  # undecodable bytes, each replaced (with its invalid run) by U+FFFD
    empty_documents: int = 0


def _decode(raw: bytes, stats: _ReadStats, counted: list[bool]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Invalid bytes become U+FFFD: deterministic, and one bad file (the stdlib keeps a
        # few on purpose for its own tests) must not stop preparation.
        if not counted[0]:
            stats.files_with_decode_errors += 1
            counted[0] = True
        text = raw.decode("utf-8", errors="replace")
        # valid parts round-trip byte for byte, so the bytes replaced are the raw length minus
        # the re-encoded text without the U+FFFDs the decoder inserted (3 bytes each; U+FFFD
        # already present in the source, EF BF BD, is valid and not counted)
        inserted = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
        stats.bytes_replaced += len(raw) - (len(text.encode("utf-8")) - 3 * inserted)
        return text


def iter_documents(files: list[Path], text_field: str, stats: _ReadStats) -> Iterator[str]:
    """Documents in corpus order: a whole text file, or each non-blank ``.jsonl`` line."""
    for f in files:
        stats.files_read += 1
        counted = [False]
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(_decode(line, stats, counted))
                    except ValueError as exc:
                        raise ValueError(f"{f}:{lineno} is not valid JSON: {exc}") from exc
                    if not isinstance(rec, dict) or text_field not in rec:
                        keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                        raise ValueError(
                            f"{f}:{lineno} has no field {text_field!r} (found {keys}); pass "
                            f"text_field= / --text-field naming the field that holds the text"
                        )
                    text = rec[text_field]
                    if not isinstance(text, str):
                        raise ValueError(f"{f}:{lineno} field {text_field!r} is "
                                         f"{type(text).__name__}, expected a string")
                    yield text
        else:
            yield _decode(f.read_bytes(), stats, counted)


def _encode_chunk(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    if hasattr(tok, "encode_array"):
        return [tok.encode_array(t) for t in texts]
    if hasattr(tok, "encode_batch"):
        return [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(texts)]
    return [np.asarray(tok.encode(t), dtype=np.int64) for t in texts]


def _config_key(tok: Tokenizer, sources: list[str], patterns: tuple[str, ...],
                max_bytes: int | None, text_field: str, listing: str) -> dict:
    # Everything that can change the bytes of tokens.bin. Equal keys => reusable output.
    return {
        "format_version": FORMAT_VERSION,
        "sources": list(sources),
        "patterns": list(patterns),
        "max_bytes": max_bytes,
        "text_field": text_field,
        "tokenizer_fingerprint": tok.fingerprint,
        "listing_sha256": listing,
    }


def _atomic_write(out_dir: Path, final_name: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{final_name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; prepared data is meant to be shared
        os.replace(tmp, out_dir / final_name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _prepare(tok: Tokenizer, sources: list[str], patterns: tuple[str, ...],
             max_bytes: int | None, text_field: str, is_default: bool,
             files: list[Path], key: dict, out_dir: Path) -> Path:
    dtype = token_dtype(tok.vocab_size)
    eos = tok.eos_id
    if not 0 <= eos < tok.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has eos_id {eos} outside its vocab_size "
                         f"{tok.vocab_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    # meta.json is the commit marker: it is removed first and written last, so a directory
    # holding meta.json always holds the tokens.bin/offsets.npy that meta.json describes.
    (out_dir / META_FILE).unlink(missing_ok=True)

    stats = _ReadStats()
    doc_lengths: list[int] = []
    # Every document ends in EOS, so the largest id written is at least eos.
    state = {"n_tokens": 0, "max_id": eos, "bytes": 0, "truncated": False}
    hasher = hashlib.sha256()

    def flush(fh, texts: list[str]) -> None:
        if not texts:
            return
        parts = []
        for ids in _encode_chunk(tok, texts):
            if ids.size:
                lo, hi = int(ids.min()), int(ids.max())
                if lo < 0 or hi >= tok.vocab_size:
                    bad = lo if lo < 0 else hi
                    raise ValueError(f"tokenizer {tok.name} produced id {bad} outside its "
                                     f"vocab_size {tok.vocab_size}; the tokenizer file is "
                                     f"inconsistent, use another tokenizer")
                state["max_id"] = max(state["max_id"], hi)
            parts.append(ids.astype(dtype, copy=False))
            parts.append(np.array([eos], dtype=dtype))
            doc_lengths.append(int(ids.size) + 1)
        block = np.concatenate(parts)
        data = block.tobytes()
        hasher.update(data)
        fh.write(data)
        state["n_tokens"] += int(block.size)

    def write_tokens(fh) -> None:
        pending: list[str] = []
        pending_bytes = 0
        for text in iter_documents(files, text_field, stats):
            if not text:
                stats.empty_documents += 1
                continue
            raw = text.encode("utf-8")
            if max_bytes is not None and state["bytes"] + len(raw) > max_bytes:
                # The document that crosses the cap is cut at a character boundary and is
                # the last one read: output is a prefix of the uncapped corpus.
                text = raw[: max_bytes - state["bytes"]].decode("utf-8", errors="ignore")
                raw = text.encode("utf-8")  # a split character is dropped, not counted
                state["truncated"] = True
            if text:
                pending.append(text)
                pending_bytes += len(raw)
                state["bytes"] += len(raw)
            if pending_bytes >= _CHUNK_BYTES:
                flush(fh, pending)
                pending, pending_bytes = [], 0
            if state["truncated"]:
                break
        flush(fh, pending)
        if state["n_tokens"] == 0:
            raise ValueError(
                f"empty corpus: {len(files)} matching file(s) under {sources} hold no text; "
                f"pass sources with content"
            )

    _atomic_write(out_dir, TOKENS_FILE, write_tokens)
    # the largest id just written is the data's: cached as if scanned (data/token_scan.py), so
    # TokenDataset.check_vocab never scans a freshly prepared corpus
    record_max_id(out_dir / TOKENS_FILE, state["max_id"])
    offsets = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(doc_lengths, dtype=np.int64), out=offsets[1:])
    _atomic_write(out_dir, OFFSETS_FILE, lambda fh: np.save(fh, offsets))

    if is_default:
        description = (f"Python {sys.version_info.major}.{sys.version_info.minor} standard "
                       f"library source {list(patterns)}")
    else:
        description = f"{len(sources)} source(s) {list(patterns)}: " + ", ".join(sources)
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "n_tokens": state["n_tokens"],
        "n_documents": len(doc_lengths),
        "n_files": stats.files_read,
        "n_files_matched": len(files),
        "n_files_with_decode_errors": stats.files_with_decode_errors,
        "n_bytes_replaced": stats.bytes_replaced,
        "n_empty_documents_skipped": stats.empty_documents,
        "n_text_bytes": state["bytes"],
        "truncated_at_max_bytes": state["truncated"],
        "vocab_size": tok.vocab_size,
        "max_token_id": state["max_id"],
        "eos_id": eos,
        "bos_id": tok.bos_id,
        "tokenizer": tok.name,
        "source_description": description,
        "content_sha256": hasher.hexdigest(),
        "config": key,
    }
    body = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
    _atomic_write(out_dir, META_FILE, lambda fh: fh.write(body))
    return out_dir


def prepare_corpus(sources: str | os.PathLike | Sequence[str | os.PathLike] | None,
                   out_dir: str | os.PathLike, tokenizer: Tokenizer | str = "byte",
                   pattern: str | Sequence[str] | None = None, max_bytes: int | None = None,
                   text_field: str = "text") -> Path:
    """Tokenize ``sources`` into ``out_dir`` (always re-tokenizes); returns ``out_dir``.

    ``sources=None`` (or ``[]``) is the stdlib default corpus, whose ``max_bytes`` defaults
    to ``DEFAULT_STDLIB_MAX_BYTES``; for explicit sources ``max_bytes=None`` means no cap.
    """
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    srcs, patterns, cap, is_default = _resolve_request(sources, pattern, max_bytes)
    files = list_source_files(srcs, patterns)
    key = _config_key(tok, srcs, patterns, cap, text_field, _listing_sha256(files))
    return _prepare(tok, srcs, patterns, cap, text_field, is_default, files, key,
                    Path(out_dir).expanduser().resolve())


# what TokenDataset reads from meta.json
_META_KEYS = ("format_version", "dtype", "n_tokens", "vocab_size", "max_token_id", "eos_id", "bos_id",
              "content_sha256")


def load_meta(out_dir: str | os.PathLike) -> dict:
    """The ``meta.json`` of a prepared directory, with a clear error if there is none."""
    path = Path(out_dir).expanduser() / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no prepared corpus at {Path(out_dir)} ({META_FILE} missing); run "
            f"`hai-llm-prepare --out {out_dir}` or call ensure_prepared(...) first"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON ({exc}); re-run hai-llm-prepare --out {out_dir} "
                         f"(it rewrites {META_FILE})") from exc
    missing = [k for k in _META_KEYS if k not in meta] if isinstance(meta, dict) else list(_META_KEYS)
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; re-run hai-llm-prepare --out {out_dir}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {meta.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; re-run hai-llm-prepare for {out_dir}"
        )
    return meta


def _is_complete(out_dir: Path, meta: dict) -> bool:
    tokens = out_dir / TOKENS_FILE
    if not tokens.is_file() or not (out_dir / OFFSETS_FILE).is_file():
        return False
    return tokens.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize


def ensure_prepared(sources: str | os.PathLike | Sequence[str | os.PathLike] | None,
                    out_dir: str | os.PathLike, tokenizer: Tokenizer | str = "byte",
                    pattern: str | Sequence[str] | None = None, max_bytes: int | None = None,
                    text_field: str = "text") -> Path:
    """``prepare_corpus`` unless ``out_dir`` already holds the same corpus; returns ``out_dir``.

    "The same" means equal sources, patterns, cap, text field, tokenizer fingerprint and
    file listing (names, sizes, mtimes). In a multi-process job call this on one rank and
    barrier: concurrent preparers write identical bytes, but a reader could meet the
    window in which ``meta.json`` is absent.
    """
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    srcs, patterns, cap, is_default = _resolve_request(sources, pattern, max_bytes)
    files = list_source_files(srcs, patterns)
    key = _config_key(tok, srcs, patterns, cap, text_field, _listing_sha256(files))
    out = Path(out_dir).expanduser().resolve()
    try:
        meta = load_meta(out)
    except (FileNotFoundError, ValueError):
        meta = None
    if meta is not None and meta.get("config") == key and _is_complete(out, meta):
        return out
    return _prepare(tok, srcs, patterns, cap, text_field, is_default, files, key, out)
