"""The largest token id actually stored in a ``tokens.bin``, scanned once and cached beside it.

Why: ``meta.json`` records the largest id ``hai-llm-prepare`` wrote, but it is a claim about
the file, not the file; a ``tokens.bin`` edited or swapped afterwards would otherwise fail as
an IndexError inside the embedding at step 1 (``TokenDataset.check_vocab`` compares the data's
largest id with ``model.vocab_size``). Scanning the file costs about a second per GB, which at
pre-training scale is minutes: it must not happen on every rank of every start. So the result
is cached in a small JSON side file, ``tokens.bin.scan.json``, keyed on the file's size and
modification time (``st_mtime_ns``):

* ``hai-llm-prepare`` writes it with the id it just wrote (no scan at all for a fresh corpus);
* otherwise the first process that needs it scans and writes it: the launcher's preflight
  (``hai_llm.checkpoint.preflight.check_run_folder``, before any rank starts, when
  ``data.path`` is set), else the trainer's main rank before the other ranks open the corpus;
* everyone else reads it. Any change of the file's size or mtime makes the cache stale, and
  the next reader scans again.

The side file is written atomically (a temporary file in the same folder, then ``os.replace``),
so concurrent scanners never leave a torn file: the last rename wins with the same content.
A folder that cannot be written (read-only data) just gets no cache: each check scans again.
A change of ``tokens.bin`` within the file system's timestamp granularity (a few milliseconds
on Linux) of the scan that keeps its size is not seen; re-run ``hai-llm-prepare`` or delete
the side file after editing a corpus by hand.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

SCAN_SUFFIX = ".scan.json"  # tokens.bin -> tokens.bin.scan.json
_CHUNK = 1 << 24  # tokens per read of the scan: 64 MiB of uint32, bounded memory


def scan_file(tokens: Path) -> Path:
    """The side file caching ``tokens``' scan."""
    return tokens.with_name(tokens.name + SCAN_SUFFIX)


def _key(tokens: Path) -> dict:
    st = tokens.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached_max_id(tokens: Path) -> int | None:
    """The cached largest id of ``tokens``, or None when there is no cache or it is stale
    (another size or mtime than the file has now) or unreadable."""
    try:
        d = json.loads(scan_file(tokens).read_text())
        if {k: d.get(k) for k in ("size", "mtime_ns")} == _key(tokens):
            return int(d["max_token_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def record_max_id(tokens: Path, max_id: int) -> None:
    """Cache ``max_id`` for the current state of ``tokens`` (atomic; silently skipped where the
    folder cannot be written: readers then scan)."""
    body = json.dumps({**_key(tokens), "max_token_id": int(max_id)}, sort_keys=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=tokens.parent, prefix=f".{tokens.name}.scan.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
        os.chmod(tmp, 0o644)  # shared like the corpus itself (mkstemp creates 0600)
        os.replace(tmp, scan_file(tokens))
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def max_token_id(tokens: Path, dtype: np.dtype, n_tokens: int) -> int:
    """The largest id in ``tokens`` (``n_tokens`` ids of ``dtype``): the cached value when it
    is current, else one pass over a read-only memory map, which is then cached."""
    tokens = Path(tokens)
    hit = cached_max_id(tokens)
    if hit is not None:
        return hit
    key = _key(tokens)  # the state scanned: a change during the scan leaves the cache stale
    data = np.memmap(tokens, dtype=dtype, mode="r", shape=(n_tokens,))
    largest = max(int(data[i:i + _CHUNK].max()) for i in range(0, n_tokens, _CHUNK))
    if _key(tokens) == key:
        record_max_id(tokens, largest)
    return largest
