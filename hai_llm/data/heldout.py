"""The held-out split of a prepared corpus: the validation sequences, the same under every layout.

Why a tail and not a random subset: the training sampler (``SequenceSampler``) tiles the corpus
into windows starting at ``k * seq_len``; cutting the corpus at one token offset and giving the
sampler only the part before it (``SequenceSampler(..., n_tokens=split.train_tokens)``) is the
smallest change that guarantees no training window ever reads a held-out token (the last
training window ends at or before the cut), and the tail is made of whole documents the model
never saw (``hai-llm-prepare`` writes documents in file order), so the loss measures
generalisation rather than memorisation of neighbouring text.

Layout: ``n_sequences = train.eval_batches * train.global_batch`` windows of
``seq_len + extra_tokens`` tokens tile the last ``n_sequences * seq_len + extra_tokens`` tokens
of the corpus, consecutive windows sharing their ``extra_tokens`` tail exactly as training
windows do (every held-out token is a main-head target once). Held-out batch ``b`` is windows
``[b*G, (b+1)*G)`` in corpus order, and data-parallel rank ``r`` of ``w`` takes the contiguous
slice ``[b*G + r*G/w, b*G + (r+1)*G/w)``: the same split of a global batch as training, so the
global batch, and therefore the mean loss, does not depend on the layout. No state, no
randomness: evaluation at step 10 and at step 1000 reads the same tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from hai_llm.data.dataset import TokenDataset, dp_slice


class HeldOutSplit:
    """The last ``n_batches * global_batch`` windows of ``dataset``, served as fixed batches."""

    def __init__(self, dataset: TokenDataset, seq_len: int, extra_tokens: int, global_batch: int,
                 n_batches: int) -> None:
        if n_batches < 1 or global_batch < 1:
            raise ValueError(f"a held-out split needs train.eval_batches >= 1 and train.global_batch >= 1, "
                             f"got {n_batches} and {global_batch}")
        self.dataset = dataset
        self.seq_len = seq_len
        self.extra_tokens = extra_tokens
        self.window = seq_len + extra_tokens
        self.global_batch = global_batch
        self.n_batches = n_batches
        self.n_sequences = n_batches * global_batch
        held = self.n_sequences * seq_len + extra_tokens
        # first held-out token; training windows must end at or before it
        self.start = dataset.n_tokens - held
        if self.start < self.window:
            raise ValueError(
                f"train.eval_batches={n_batches} x train.global_batch={global_batch} held-out sequences of "
                f"{self.window} tokens need {held} tokens plus one training window of {self.window}, but corpus "
                f"{dataset.path} has {dataset.n_tokens}; lower train.eval_batches or prepare more text "
                f"(data.max_bytes / data.sources)")

    @property
    def train_tokens(self) -> int:
        """Tokens ``[0, train_tokens)`` are the training part: pass it to ``SequenceSampler(n_tokens=...)``."""
        return self.start

    def starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of held-out windows ``first .. first+count-1`` (corpus order)."""
        if first < 0 or first + count > self.n_sequences:
            raise IndexError(f"held-out windows {first}..{first + count - 1} outside 0..{self.n_sequences - 1}")
        return self.start + np.arange(first, first + count, dtype=np.int64) * self.seq_len

    def global_batch_at(self, b: int) -> torch.Tensor:
        """All ranks' sequences of held-out batch ``b``: LongTensor ``[global_batch, window]``."""
        return self._gather(b * self.global_batch, self.global_batch)

    def local_batch_at(self, b: int, dp_rank: int = 0, dp_world: int = 1) -> torch.Tensor:
        """Data-parallel rank ``dp_rank``'s slice of held-out batch ``b``: ``[global_batch/dp_world, window]``."""
        if not 0 <= b < self.n_batches:
            raise IndexError(f"held-out batch {b} outside 0..{self.n_batches - 1}")
        # the training batches' split (dataset.dp_slice): the same ranks read the same share
        return self._gather(*dp_slice(b * self.global_batch, self.global_batch, dp_rank, dp_world))

    def _gather(self, first: int, count: int) -> torch.Tensor:
        idx = self.starts(first, count)[:, None] + np.arange(self.window, dtype=np.int64)[None, :]
        return torch.from_numpy(np.asarray(self.dataset.tokens[idx], dtype=np.int64))
