"""Tokenizers behind one small interface, so data preparation never depends on which one.

Two implementations exist:

* ``ByteTokenizer`` -- the offline default. Ids 0..255 are the UTF-8 bytes of the text and
  three special tokens follow (BOS 256, EOS 257, PAD 258), so it needs no file, no network
  and round-trips every string exactly.
* ``HFTokenizer`` -- a Hugging Face ``tokenizers`` ``tokenizer.json`` file loaded by path.
  DeepSeek-V3 ships its tokenizer in exactly this format, so the real vocabulary is one
  command-line argument away.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eos_id``, ``bos_id``, a human-readable ``name`` and a ``fingerprint`` that changes
whenever the mapping from text to ids could change (data preparation keys its cache on it).
``build_tokenizer("byte" | "path/to/tokenizer.json")`` picks one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    """What data preparation and evaluation need from a tokenizer."""

    @property
    def name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS/EOS/PAD as 256/257/258.

    Encoding never emits a special id: a document that contains the literal text
    ``<|eos|>`` is encoded as its bytes, so document boundaries are only ever the EOS ids
    that data preparation inserts itself.
    """

    SPECIAL_TOKENS: tuple[str, ...] = ("<|bos|>", "<|eos|>", "<|pad|>")

    @property
    def name(self) -> str:
        return "byte"

    @property
    def fingerprint(self) -> str:
        # Bump the suffix if the id layout ever changes: prepared corpora keyed on the old
        # fingerprint are then re-tokenized instead of silently reused.
        return "byte-utf8-v1"

    @property
    def bos_id(self) -> int:
        return 256

    @property
    def eos_id(self) -> int:
        return 257

    @property
    def pad_id(self) -> int:
        return 258

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as a uint8 array without building a Python list (fast path for prepare)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # Consecutive byte ids are decoded together so that a multi-byte character is never
        # split; a special id either vanishes or is rendered as its text form.
        pieces: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(
                    f"id {i} is outside the byte tokenizer's vocabulary 0..{self.vocab_size - 1}"
                )
            if run:
                pieces.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if not skip_special_tokens:
                pieces.append(self.SPECIAL_TOKENS[i - 256])
        if run:
            pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)


# Names tried, in order, when neither the caller nor a sibling tokenizer_config.json says
# which added token ends (or begins) a document. DeepSeek's use fullwidth bars (U+FF5C)
# and the SentencePiece space (U+2581).
_EOS_CANDIDATES = (
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
)
_BOS_CANDIDATES = (
    "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
    "<|begin_of_text|>",
    "<s>",
    "<bos>",
    "<|bos|>",
)


class HFTokenizer:
    """A Hugging Face ``tokenizers`` ``tokenizer.json`` file, loaded with ``Tokenizer.from_file``.

    ``encode`` never adds the file's own BOS/EOS template (``add_special_tokens=False``) and,
    where the library supports it, never turns special-token text inside a document into a
    special id: document boundaries are inserted by data preparation alone.
    """

    def __init__(self, path: str | Path, eos_token: str | None = None,
                 bos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _HFTok

        self._path = Path(path).expanduser().resolve()
        if not self._path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {self._path} does not exist; pass the path of an existing "
                f"Hugging Face tokenizer.json, or 'byte' for the built-in byte tokenizer"
            )
        self._fingerprint = "hf-sha256-" + hashlib.sha256(self._path.read_bytes()).hexdigest()
        try:
            self._tok = _HFTok.from_file(str(self._path))
        except Exception as exc:  # the library raises a bare Exception on malformed files
            raise ValueError(f"{self._path} is not a valid Hugging Face tokenizer.json: {exc}; "
                             f"pass a tokenizer.json saved by the tokenizers library, or "
                             f"'byte'") from exc
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ValueError(f"tokenizer file {self._path} has an empty vocabulary")
        # Ids may have gaps (added tokens placed after a hole), so the size a model's
        # embedding needs is the largest id + 1, not the number of entries.
        self._vocab_size = max(vocab.values()) + 1
        config = self._sibling_config()
        self._eos_id = self._resolve_special(eos_token, config.get("eos_token"), _EOS_CANDIDATES)
        if self._eos_id is None:
            raise ValueError(
                f"cannot tell which token ends a document in {self._path}: none of "
                f"{list(_EOS_CANDIDATES)} is in its vocabulary and no tokenizer_config.json "
                f"next to it names an eos_token; construct HFTokenizer(path, eos_token=...)"
            )
        bos = self._resolve_special(bos_token, config.get("bos_token"), _BOS_CANDIDATES)
        # A vocabulary without a BOS token (GPT-2 style) uses its EOS token for both roles.
        self._bos_id = self._eos_id if bos is None else bos

    def _sibling_config(self) -> dict:
        cfg = self._path.with_name("tokenizer_config.json")
        if not cfg.is_file():
            return {}
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {cfg} (next to the tokenizer file): {exc}") from exc
        return data if isinstance(data, dict) else {}

    def _resolve_special(self, explicit: str | None, configured: object,
                         candidates: Sequence[str]) -> int | None:
        if explicit is not None:
            tid = self._tok.token_to_id(explicit)
            if tid is None:
                raise ValueError(f"token {explicit!r} is not in the vocabulary of {self._path}")
            return tid
        if isinstance(configured, dict):  # AddedToken serialised as {"content": ...}
            configured = configured.get("content")
        if isinstance(configured, str):
            tid = self._tok.token_to_id(configured)
            if tid is not None:
                return tid
        for cand in candidates:
            tid = self._tok.token_to_id(cand)
            if tid is not None:
                return tid
        return None

    @property
    def name(self) -> str:
        return str(self._path)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once; the library parallelises this across cores."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def build_tokenizer(name_or_path: str | Path) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> ``ByteTokenizer``; a ``.json`` file (or a folder holding
    ``tokenizer.json``) -> ``HFTokenizer``."""
    spec = str(name_or_path)
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    elif path.suffix != ".json":
        raise ValueError(
            f"unknown tokenizer {spec!r}: pass 'byte' for the built-in byte tokenizer or the "
            f"path of a Hugging Face tokenizer.json file"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} does not exist; pass the path of an existing Hugging Face "
            f"tokenizer.json (e.g. DeepSeek-V3's), or 'byte' for the built-in byte tokenizer"
        )
    return HFTokenizer(path)
