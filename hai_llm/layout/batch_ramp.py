"""The batch-size ramp: the global batch of each step as an exact function of tokens consumed.

DeepSeek-V3 (arXiv 2412.19437, section 4.2, "Training Hyper-Parameters") grows the batch from
3072 to 15360 sequences over the first 469B training tokens and keeps 15360 afterwards. The
report gives the end points only; the ramp here is linear in tokens, with the rounding below.

Config (``train``): ``batch_ramp_start`` (sequences at token 0), ``global_batch`` (the end
value), ``batch_ramp_tokens`` (R, tokens over which the batch grows; 0 = no ramp) and
``batch_ramp_multiple`` (q: every ramp value is a multiple of it; 0 = the layout's
granularity g, see below).

The batch of the step that starts after ``T`` tokens were consumed (T counts ``data.seq_len``
tokens per sequence of every earlier step, skipped non-finite steps included, since their data
was consumed) is, in integer arithmetic with no float anywhere::

    B(T) = end                                                  if T >= R
    B(T) = q * ((start + (end - start) * T // R) // q)           otherwise

i.e. the straight line from ``start`` to ``end``, floored to the sequence, then rounded DOWN
to a multiple of q. ``start`` must itself be a multiple of q, so ``start <= B(T) <= end``:
the rounding never goes below the start, the first step runs exactly ``start`` sequences and
every step after ``R`` tokens runs ``end``. The batches are non-decreasing in T.

The granularity g of a layout (:func:`granularity`) is the smallest step between two batches
the layout can run: ``parallel.dp * train.micro_batch`` sequences (every data-parallel rank
gets whole micro-batches of ``train.micro_batch`` sequences), doubled for a schedule that
needs an even number of micro-batches (DualPipe). A schedule's minimum micro-batch count
(1F1B/ZB1P: pp, DualPipe/DualPipeV: 2*pp) is met by every ramp value once it is met by the
start, because the values only grow. ``build_layout`` checks the whole ramp before training
(every multiple of q in [start, end] against the schedule's rules), so a ramp that does not
fit the layout fails at start-up, in one line that names the key to change; nothing is
clamped or adjusted silently at run time.

With ``batch_ramp_multiple = 0`` the batches depend on the layout's granularity (a resume
under another layout continues at the same token count but rounds to the new layout's g);
set q to a common multiple of every layout's g to get the same batches, hence the same data
order and the same losses, under every layout.

Pure Python: nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple


def granularity(dp: int, micro_batch: int, even_micro: bool) -> int:
    """Sequences between two consecutive global batches a layout can run: ``dp`` ranks times
    ``micro_batch`` sequences per micro-batch, times 2 when the schedule needs an even
    micro-batch count (``even_micro``: DualPipe's two directions)."""
    return dp * micro_batch * (2 if even_micro else 1)


@dataclass(frozen=True)
class BatchRamp:
    """``start`` -> ``end`` sequences over ``tokens`` training tokens, multiples of ``multiple``.

    Built by ``hai_llm.layout.build_layout`` from the ``train.batch_ramp_*`` keys (with
    ``multiple`` resolved to the layout's granularity when the key is 0); constructed directly
    only by tests and tools. The constructor checks the arithmetic rules (positive values,
    ``start <= end``, ``start`` a multiple of ``multiple``); the layout checks the schedule's."""

    start: int
    end: int
    tokens: int
    multiple: int

    def __post_init__(self) -> None:
        for name, v in (("start", self.start), ("end", self.end), ("tokens", self.tokens),
                        ("multiple", self.multiple)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"BatchRamp.{name}={v!r} must be an integer >= 1")
        if self.start > self.end:
            raise ValueError(f"BatchRamp start={self.start} exceeds end={self.end}")
        if self.start % self.multiple:
            raise ValueError(f"BatchRamp start={self.start} is not a multiple of {self.multiple}")

    def batch_at(self, tokens_consumed: int) -> int:
        """Global batch (sequences) of the step that starts after ``tokens_consumed`` tokens."""
        if tokens_consumed < 0:
            raise ValueError(f"tokens consumed must be >= 0, got {tokens_consumed}")
        if tokens_consumed >= self.tokens:
            return self.end
        raw = self.start + (self.end - self.start) * tokens_consumed // self.tokens
        return (raw // self.multiple) * self.multiple

    def values(self) -> List[int]:
        """Every batch the ramp can produce, ascending: the multiples of ``multiple`` in
        [start, end) the line crosses, and ``end`` (a superset of those a run visits: a step
        may jump over a value)."""
        out = list(range(self.start, self.end, self.multiple))
        return out + [self.end]

    def steps(self, seq_len: int, tokens_so_far: int = 0) -> Iterator[Tuple[int, int]]:
        """``(tokens consumed before the step, its global batch)`` for every step from
        ``tokens_so_far`` until the ramp ends (the last pair yielded is the last step below
        ``end``; the planner of a long run uses it to count ramp steps)."""
        t = tokens_so_far
        while t < self.tokens:
            b = self.batch_at(t)
            yield t, b
            t += b * seq_len

    def describe(self, seq_len: int) -> str:
        """One line: end points, rounding, and the number of steps the ramp lasts."""
        n = sum(1 for _ in self.steps(seq_len))
        return (f"batch ramp {self.start} -> {self.end} sequences over {self.tokens:,} tokens in "
                f"multiples of {self.multiple} ({n} steps at seq_len {seq_len})")
