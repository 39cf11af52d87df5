"""Read a prepared token file and cut it into deterministic, resumable, data-parallel batches.

``TokenDataset`` memory-maps ``tokens.bin`` (nothing is loaded up front, so a corpus far
larger than RAM costs nothing to open) and validates it against ``meta.json``.

``SequenceSampler`` defines ONE global order of training samples as a pure function of
(corpus, seq_len, extra_tokens, seed):

* the corpus is tiled into windows starting at ``k * seq_len``; each window holds
  ``seq_len + extra_tokens`` tokens (inputs plus the targets one step ahead and, with
  multi-token prediction of depth D, ``extra_tokens = 1 + D`` so depth-D targets exist).
  Input spans never overlap and consecutive windows share only their ``extra_tokens``
  tail, so within an epoch every token is a main-head target exactly once (up to the
  ragged end of the corpus);
* epoch ``e`` visits the windows in the permutation drawn from ``SeedSequence([seed, e])``
  (a fresh shuffle per epoch; two-word entropy so that (seed, epoch) pairs never collide
  the way ``seed + epoch`` would);
* global sample ``g`` is window ``perm_{g // n_windows}[g % n_windows]``.

The global batch for step ``s`` is samples ``[s*G, (s+1)*G)``; data-parallel rank ``r`` of
``w`` takes the contiguous slice ``[s*G + r*G/w, s*G + (r+1)*G/w)``. With a batch that changes
per step (the batch-size ramp: ``next_batch(G_s)``) step ``s`` starts at ``G_0 + ... + G_{s-1}``
instead of ``s*G``. The only state is the
number of global samples consumed, which is identical on every rank: resuming from it
neither repeats nor skips a sample, even if the next run uses a different dp world size.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hai_llm.data.prepare import META_FILE, OFFSETS_FILE, TOKENS_FILE, load_meta
from hai_llm.data.token_scan import max_token_id


class TokenDataset:
    """A prepared directory (``tokens.bin`` + ``offsets.npy`` + ``meta.json``), memory-mapped."""

    def __init__(self, path: str | os.PathLike) -> None:
        p = Path(path).expanduser()
        # Accept the directory itself or any of its three files.
        if p.name in (TOKENS_FILE, OFFSETS_FILE, META_FILE) and p.is_file():
            p = p.parent
        self.path = p.resolve()
        self.meta = load_meta(self.path)
        self.dtype = np.dtype(self.meta["dtype"])
        tokens = self.path / TOKENS_FILE
        if not tokens.is_file():
            raise FileNotFoundError(f"{tokens} is missing although {META_FILE} exists; "
                                    f"re-run hai-llm-prepare --out {self.path}")
        n = int(self.meta["n_tokens"])
        size = tokens.stat().st_size
        if n <= 0 or size != n * self.dtype.itemsize:
            raise ValueError(
                f"{tokens} holds {size} bytes but {META_FILE} promises {n} {self.dtype.name} "
                f"tokens ({n * self.dtype.itemsize} bytes); the directory is damaged, re-run "
                f"hai-llm-prepare --out {self.path}"
            )
        # Read-only map: samplers in several processes share the page cache, none can write.
        self.tokens = np.memmap(tokens, dtype=self.dtype, mode="r", shape=(n,))

    # -- metadata -------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer that produced the file."""
        return int(self.meta["vocab_size"])

    @property
    def max_token_id(self) -> int:
        return int(self.meta["max_token_id"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def bos_id(self) -> int:
        return int(self.meta["bos_id"])

    @property
    def content_sha256(self) -> str:
        return str(self.meta["content_sha256"])

    def __len__(self) -> int:
        return self.n_tokens

    # -- documents ------------------------------------------------------------------------
    @cached_property
    def offsets(self) -> np.ndarray:
        """int64 ``[n_documents + 1]``; document i is ``tokens[offsets[i]:offsets[i+1]]``."""
        path = self.path / OFFSETS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; re-run hai-llm-prepare --out {self.path}")
        off = np.load(path, mmap_mode="r")
        if off.ndim != 1 or len(off) < 2 or int(off[0]) != 0 or int(off[-1]) != self.n_tokens:
            raise ValueError(f"{path} does not describe {self.n_tokens} tokens; re-run "
                             f"hai-llm-prepare --out {self.path}")
        return off

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``, its trailing EOS included."""
        if not 0 <= i < self.n_documents:
            raise IndexError(f"document {i} out of range 0..{self.n_documents - 1}")
        return np.asarray(self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])])

    # -- validation -----------------------------------------------------------------------
    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise ``ValueError`` unless every id the tokenizer can emit fits the model's embedding.

        A model vocabulary larger than the tokenizer's is fine (DeepSeek-V3 pads 128,815
        tokenizer ids to 129,280 embedding rows); a smaller one would index out of range.
        """
        if self.max_token_id >= model_vocab_size or self.vocab_size > model_vocab_size:
            raise ValueError(
                f"tokenizer vocab ({self.vocab_size} ids, largest id in this corpus "
                f"{self.max_token_id}, tokenizer {self.meta.get('tokenizer')!r}) does not fit "
                f"model vocab_size {model_vocab_size}; set model.vocab_size >= "
                f"{self.vocab_size} or prepare {self.path} with the model's tokenizer"
            )
        # meta.json is a claim; the data is the truth (a file edited or swapped after preparing
        # would otherwise fail as an IndexError inside the embedding at step 1). Scanned once,
        # cached next to tokens.bin (hai_llm/data/token_scan.py)
        largest = self.data_max_token_id()
        if largest >= model_vocab_size:
            raise ValueError(
                f"{self.path / TOKENS_FILE} holds token id {largest} but model.vocab_size is "
                f"{model_vocab_size} (its {META_FILE} claims the largest id is {self.max_token_id}): "
                f"re-run hai-llm-prepare --out {self.path} if the file was damaged, or set "
                f"model.vocab_size > {largest}"
            )

    def data_max_token_id(self) -> int:
        """The largest id actually in ``tokens.bin``: the cached scan when it is current (same
        size and mtime), else one pass over the file (about a second per GB), then cached in
        ``tokens.bin.scan.json`` (hai_llm/data/token_scan.py)."""
        return max_token_id(self.path / TOKENS_FILE, self.dtype, self.n_tokens)


def dp_slice(first: int, global_batch: int, dp_rank: int, dp_world: int) -> tuple[int, int]:
    """``(first sample, count)`` of data-parallel rank ``dp_rank``'s share of a global batch of
    ``global_batch`` samples starting at sample ``first``: the contiguous slice
    ``[first + r*G/w, first + (r+1)*G/w)``. The one split rule of training batches
    (``SequenceSampler``) and held-out batches (``HeldOutSplit``), so both split a global batch
    the same way under every layout."""
    if global_batch < 1 or global_batch % dp_world:
        raise ValueError(f"a global batch of {global_batch} sequences does not split over the {dp_world} "
                         f"data-parallel ranks; use a multiple of {dp_world}")
    local = global_batch // dp_world
    return first + dp_rank * local, local


def window_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation of window indices ``0..n_windows-1`` visited in ``epoch`` (pure)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(n_windows)


class SequenceSampler:
    """Deterministic, data-parallel, resumable batches of ``seq_len + extra_tokens`` tokens."""

    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch: int,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0,
                 extra_tokens: int = 1, n_tokens: int | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if extra_tokens < 1:
            raise ValueError(f"extra_tokens must be >= 1 (1 + MTP depth), got {extra_tokens}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"need 0 <= dp_rank < dp_world, got dp_rank={dp_rank} "
                             f"dp_world={dp_world}")
        if global_batch % dp_world:
            raise ValueError(
                f"global_batch {global_batch} is not divisible by the data-parallel world size "
                f"{dp_world}; choose a global batch that is a multiple of {dp_world}"
            )
        self.dataset = dataset
        self.seq_len = seq_len
        self.extra_tokens = extra_tokens
        self.window = seq_len + extra_tokens
        self.global_batch = global_batch
        self.local_batch = global_batch // dp_world
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.seed = seed
        # Windows start at k * seq_len and must end inside the corpus, or inside its first
        # ``n_tokens`` tokens: the tail past them is a held-out split (hai_llm/data/heldout.py)
        limit = dataset.n_tokens if n_tokens is None else min(n_tokens, dataset.n_tokens)
        self.n_windows = max(0, (limit - extra_tokens) // seq_len)
        if self.n_windows < 1:
            raise ValueError(
                f"corpus {dataset.path} has {dataset.n_tokens} tokens, fewer than one window of "
                f"seq_len + extra_tokens = {self.window}; lower seq_len or prepare more text "
                f"(raise max_bytes / add sources)"
            )
        self.samples_consumed = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    # -- position ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.samples_consumed // self.n_windows

    @property
    def step(self) -> int:
        """Steps of the constructor's batch consumed (a batch ramp counts in samples instead)."""
        return self.samples_consumed // self.global_batch

    def _order(self, epoch: int) -> np.ndarray:
        # One epoch's permutation is cached: batches almost always stay within one epoch.
        if epoch != self._perm_epoch:
            self._perm = window_order(self.n_windows, self.seed, epoch)
            self._perm_epoch = epoch
        return self._perm

    def sample_starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of global samples ``first .. first+count-1`` (pure)."""
        g = np.arange(first, first + count, dtype=np.int64)
        epochs, pos = np.divmod(g, self.n_windows)
        starts = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            starts[sel] = self._order(int(e))[pos[sel]] * self.seq_len
        return starts

    def _gather(self, first: int, count: int) -> torch.Tensor:
        starts = self.sample_starts(first, count)
        idx = starts[:, None] + np.arange(self.window, dtype=np.int64)[None, :]
        return torch.from_numpy(np.asarray(self.dataset.tokens[idx], dtype=np.int64))

    def global_batch_at(self, step: int) -> torch.Tensor:
        """All ranks' samples of ``step`` of a constant batch (pure): ``[global_batch, window]``
        (steps of a batch ramp: ``global_samples(first, count)``)."""
        return self._gather(step * self.global_batch, self.global_batch)

    def local_batch_at(self, step: int) -> torch.Tensor:
        """This rank's slice of ``global_batch_at(step)`` (pure): ``[local_batch, window]``."""
        return self._gather(*dp_slice(step * self.global_batch, self.global_batch, self.dp_rank, self.dp_world))

    def next_batch(self, global_batch: int | None = None) -> torch.Tensor:
        """This rank's next ``[global_batch // dp_world, seq_len + extra_tokens]`` LongTensor;
        advances the shared position by ``global_batch`` samples (default: the constructor's).

        A per-step ``global_batch`` (the batch-size ramp, ``hai_llm.layout.batch_ramp``) keeps
        the position exact: step ``s`` takes global samples ``[P_s, P_s + G_s)`` with
        ``P_s = G_0 + ... + G_{s-1}``, rank ``r`` the slice ``[P_s + r*G_s/w, P_s + (r+1)*G_s/w)``,
        so the union over ranks and steps is the sample order without gap or repeat, whatever
        the batches, and ``samples_consumed`` (the checkpointed position) is ``P_{s+1}``."""
        g = self.global_batch if global_batch is None else global_batch
        out = self._gather(*dp_slice(self.samples_consumed, g, self.dp_rank, self.dp_world))
        self.samples_consumed += g
        return out

    def global_samples(self, first: int, count: int) -> torch.Tensor:
        """Global samples ``first .. first+count-1`` of the order (pure): ``[count, window]``."""
        return self._gather(first, count)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position plus the fields that define the order (identical on every rank)."""
        return {
            "samples_consumed": self.samples_consumed,
            "epoch": self.epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "extra_tokens": self.extra_tokens,
            "n_windows": self.n_windows,
            "content_sha256": self.dataset.content_sha256,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; refuses if the sample order would differ.

        ``global_batch`` and the dp world size may change between runs: the position is
        counted in samples, so the next sample is still the first one not yet consumed.
        """
        for name in ("seed", "seq_len", "extra_tokens", "n_windows", "content_sha256"):
            mine = self.state_dict()[name]
            if state.get(name) != mine:
                raise ValueError(
                    f"sampler state was saved with {name}={state.get(name)!r} but this sampler "
                    f"has {name}={mine!r}; resume with the same corpus, seq_len, extra_tokens "
                    f"and seed (and held-out split: train.eval_every on or off, train.eval_batches), "
                    f"or start the data order afresh"
                )
        consumed = int(state["samples_consumed"])
        if consumed < 0 or int(state.get("epoch", consumed // self.n_windows)) != \
                consumed // self.n_windows:
            raise ValueError(f"inconsistent sampler state: samples_consumed={consumed}, "
                             f"epoch={state.get('epoch')} with {self.n_windows} windows/epoch")
        self.samples_consumed = consumed


def split_batch(batch: torch.Tensor, seq_len: int, depth: int = 0) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """``(inputs, targets)`` of a sampler batch: inputs are tokens ``[0, seq_len)``, targets
    for prediction depth ``depth`` (0 = next token, k = the k-th MTP module) are tokens
    ``[1 + depth, 1 + depth + seq_len)``."""
    if depth < 0 or batch.shape[-1] < seq_len + 1 + depth:
        raise ValueError(f"a batch of width {batch.shape[-1]} has no depth-{depth} targets for "
                         f"seq_len {seq_len}; build the sampler with extra_tokens >= {1 + depth}")
    return batch[..., :seq_len], batch[..., 1 + depth:1 + depth + seq_len]
