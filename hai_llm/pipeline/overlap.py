"""Running a stage's forward pieces and their backwards, alone or as DualPipe's overlapped
forward & backward pair (the report's "F&B", Figure 4).

A stage's forward for one micro-batch is a list of :class:`Piece` s (built by
:mod:`.stage_pieces` from the model's own pieces: per block an ``attn`` piece that ends by
issuing the MoE dispatch and an ``mlp`` piece that ends by issuing the combine). A
:class:`Tape` runs them and remembers what each piece's backward needs.

Autograd boundaries.  Every tensor a piece hands to a later piece crosses as a detached leaf
(``t.detach().requires_grad_()``), so each piece has its own autograd graph and its backward
can run on its own: ``torch.autograd.backward(piece outputs, their leaves' grads)``.  Running
the pieces' backwards in reverse order computes exactly the chain rule of the whole stage
(a leaf read by several pieces accumulates all their contributions before its producer's
backward runs).  The asynchronous all-to-alls of ``hai_llm.parallel.expert`` are pairs of
autograd functions (start / wait) whose backwards issue / wait the reverse exchange, so the
dispatch backward is issued at the end of an ``mlp`` backward piece and waited at the start of
the ``attn`` backward piece: communication stays in flight between pieces in both directions.

Weight gradients.  Backward pieces run inside ``WeightGradStore.collect`` so the deferred
weight-gradient GEMMs of the split modules (:mod:`.wgrad_split`) come back as closures: the
executor runs them at once (``BW``), later (``W``), or right after each piece (``FB``).

Overlapped pair.  :func:`run_overlapped` interleaves the forward pieces of one micro-batch with
the backward pieces (each followed at once by its weight-gradient closures) of another, aligned
by slot, so in the steady state of a block pair the order is the report's
``MLP(B) MLP(W) MLP(F) ATTN(B) ATTN(W) ATTN(F)``: the dispatch issued by ``ATTN(F)`` is in
flight during ``MLP(B) MLP(W)``, the combine-backward issued by ``ATTN(B)`` during
``ATTN(W) ATTN(F)``, the dispatch-backward issued by ``MLP(B)`` during ``MLP(W) MLP(F)`` and the
combine issued by ``MLP(F)`` during ``ATTN(B) ATTN(W)``.  The pipeline send of the forward
output leaves as soon as the forward half ends (``on_forward_done``), before the backward half
finishes.  Every rank of an expert-parallel group runs the same program, so collectives are
issued in the same order everywhere.

Deferred launches.  A forward piece may register work with ``Tape.defer`` that must not run
inside it: the MoE dispatch's launch, which reads the plan's sizes on the host (one read per
dispatch, ``hai_llm.parallel.transport``) and on a GPU would block until everything queued
before it has run.  :func:`run_overlapped` runs a forward tape's deferred launches right after
the other micro-batch's next backward piece is queued (before that piece's W), so the read
waits only for the count exchange; otherwise they run right before the next forward piece.

Tracer protocol.  ``tracer.piece(name, kind, t0, t1)`` records each finished piece (kinds F, B,
W and L for launches); a tracer that also has ``region(name, kind)`` (a context manager) gets
it entered around each of them, e.g. to attribute host reads to pieces
(``tests/test_host_syncs.py``).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .wgrad_split import WeightGradStore, run_closures


def _region(tracer, name: str, kind: str):
    """The tracer's ``region(name, kind)`` context around a piece, if it has one."""
    region = getattr(tracer, "region", None)
    return region(name, kind) if region is not None else nullcontext()


def run_weights(sink: list, label: str, piece: Piece, tracer=None) -> None:
    """Run a backward piece's deferred weight-gradient closures as the ``W`` piece."""
    t0 = time.time()
    with _region(tracer, f"W{label}.{piece.name}", "W"):
        run_closures(sink)
    if tracer is not None and sink:
        tracer.piece(f"W{label}.{piece.name}", "W", t0, time.time())


# ====================================================================== pieces and tapes
@dataclass
class Piece:
    """One step of a stage's forward: ``fn(env, tape) -> {name: value}``; ``slot`` is
    ``attn`` / ``mlp`` / ``other`` (for traces)."""

    name: str
    slot: str
    fn: Callable[[dict, "Tape"], dict]


@dataclass
class _Record:
    piece: Piece
    outs: List[Tuple[torch.Tensor, torch.Tensor]]  # (graph output, detached leaf)
    losses: List[Tuple[torch.Tensor, torch.Tensor]]  # (scalar, its gradient)


class Tape:
    """Forward pieces of one (micro-batch, chunk) and what their backwards need.

    ``env`` maps names to values: tensors crossing pieces are detached leaves.  ``input`` is the
    stage's input leaf (None on a first stage), ``output`` its output leaf after the forward
    (None on a last stage).  ``metrics``/``stats`` collect loss values and MoE statistics.
    """

    def __init__(self, pieces: Sequence[Piece], env: dict, tracer=None, label: str = ""):
        self.pieces = list(pieces)
        self.env = env
        self.input: Optional[torch.Tensor] = env.get("h")
        self.output: Optional[torch.Tensor] = None
        self.records: List[_Record] = []
        self.metrics: Dict[str, torch.Tensor] = {}
        self.balance: Dict[int, torch.Tensor] = {}  # global MoE index -> balance value
        self.counts: Dict[int, torch.Tensor] = {}  # local MoE index -> counts
        self.tracer = tracer
        self.label = label
        self._pending_losses: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._launches: List[Tuple[str, Callable[[], None]]] = []

    def add_loss(self, t: torch.Tensor, grad: torch.Tensor) -> None:
        """A scalar whose gradient is ``grad`` (already includes the 1/n_micro weight)."""
        self._pending_losses.append((t, grad))

    def defer(self, name: str, launch: Callable[[], None]) -> None:
        """Register ``launch`` (idempotent) to run after the current forward piece: by
        :func:`run_overlapped` right after the other micro-batch's next backward piece is
        queued, at the latest right before this tape's next forward piece."""
        self._launches.append((name, launch))

    def run_launches(self) -> None:
        """Run the deferred launches registered so far, in order (the ``L`` pieces)."""
        while self._launches:
            name, launch = self._launches.pop(0)
            t0 = time.time()
            with _region(self.tracer, f"L{self.label}.{name}", "L"):
                launch()
            if self.tracer is not None:
                self.tracer.piece(f"L{self.label}.{name}", "L", t0, time.time())

    # -- forward ------------------------------------------------------------------------
    def forward_steps(self) -> Iterator[Piece]:
        for piece in self.pieces:
            self.run_launches()
            t0 = time.time()
            with _region(self.tracer, f"F{self.label}.{piece.name}", "F"):
                outs = piece.fn(self.env, self)
            rec = _Record(piece, [], self._pending_losses)
            self._pending_losses = []
            for k, v in outs.items():
                if isinstance(v, torch.Tensor) and v.requires_grad:
                    leaf = v.detach().requires_grad_()
                    rec.outs.append((v, leaf))
                    self.env[k] = leaf
                else:
                    self.env[k] = v
            self.records.append(rec)
            if self.tracer is not None:
                self.tracer.piece(f"F{self.label}.{piece.name}", "F", t0, time.time())
            yield piece
        self.run_launches()
        self.output = self.env.get("h") if "out" not in self.env else None

    def run_forward(self) -> None:
        for _ in self.forward_steps():
            pass

    # -- backward -----------------------------------------------------------------------
    def backward_steps(self, grad_output: Optional[torch.Tensor], store: WeightGradStore
                       ) -> Iterator[Tuple[Piece, list]]:
        """Backward of the pieces in reverse order; yields (piece, its deferred W closures)."""
        if grad_output is not None:
            if self.output is None:
                raise RuntimeError("received an output gradient for a stage without output")
            self.output.grad = grad_output
        while self.records:
            rec = self.records.pop()
            t0 = time.time()
            tensors, grads = [], []
            for out, leaf in rec.outs:
                if leaf.grad is not None:
                    tensors.append(out)
                    grads.append(leaf.grad)
            for t, g in rec.losses:
                tensors.append(t)
                grads.append(g)
            sink: list = []
            if tensors:
                with store.collect(sink), _region(self.tracer, f"B{self.label}.{rec.piece.name}", "B"):
                    torch.autograd.backward(tensors, grads)
            rec.outs.clear()
            rec.losses.clear()
            if self.tracer is not None:
                self.tracer.piece(f"B{self.label}.{rec.piece.name}", "B", t0, time.time())
            yield rec.piece, sink
        self.env = {}

    def input_grad(self) -> Optional[torch.Tensor]:
        if self.input is None:
            return None
        g = self.input.grad
        return torch.zeros_like(self.input) if g is None else g


def run_overlapped(f_tape: Tape, b_tape: Tape, b_grad: Callable[[], Optional[torch.Tensor]],
                   store: WeightGradStore, on_forward_done: Callable[[], None],
                   tracer=None, fwd_ctx: Callable = nullcontext) -> None:
    """Forward of ``f_tape`` interleaved with the full backward (B then W per piece) of
    ``b_tape``, slot-aligned as in Figure 4 of the report.

    After each forward piece, backward pieces (each followed by its W) run up to and including
    one of the same slot as the NEXT forward piece, then that forward piece runs: with
    ``attn``/``mlp`` pieces alternating this yields ``MLP(B) MLP(W) MLP(F) ATTN(B) ATTN(W)
    ATTN(F)``; ``other`` pieces (embedding tail, head, stage output) take one backward piece.
    ``b_grad`` is called right before the first backward piece (its receive stays in flight
    during the first forward piece); ``on_forward_done`` right after the last forward piece
    (the pipeline send of the forward output).  ``fwd_ctx()`` (autocast) wraps each forward
    piece only: backward pieces run outside it.  The forward tape's deferred launches (the
    dispatch all-to-alls its last piece began) run right after each backward piece, before
    that piece's W: the other micro-batch's work is queued by then."""
    f_it = f_tape.forward_steps()
    b_it = None
    f_done = b_done = False

    def step_f():
        nonlocal f_done
        try:
            with fwd_ctx():
                next(f_it)
        except StopIteration:
            f_done = True
            on_forward_done()

    def step_b() -> Optional[Piece]:
        nonlocal b_it, b_done
        if b_it is None:
            b_it = b_tape.backward_steps(b_grad(), store)
        try:
            piece, sink = next(b_it)
        except StopIteration:
            b_done = True
            return None
        f_tape.run_launches()
        run_weights(sink, b_tape.label, piece, tracer)
        return piece

    step_f()
    while not (f_done and b_done):
        nxt = f_tape.pieces[len(f_tape.records)].slot if len(f_tape.records) < len(f_tape.pieces) else None
        while not b_done:
            piece = step_b()
            if piece is None or nxt is None or nxt == "other" or piece.slot == nxt:
                break
        if not f_done:
            step_f()


def run_sequential(f_tape: Tape, b_tape: Tape, b_grad: Callable[[], Optional[torch.Tensor]],
                   store: WeightGradStore, on_forward_done: Callable[[], None],
                   tracer=None, fwd_ctx: Callable = nullcontext) -> None:
    """The same pair without overlap: whole forward, then whole backward (W after each piece,
    as in the overlapped path, so both accumulate weight gradients in the same order)."""
    with fwd_ctx():
        f_tape.run_forward()
    on_forward_done()
    for piece, sink in b_tape.backward_steps(b_grad(), store):
        run_weights(sink, b_tape.label, piece, tracer)


