"""The runtime interface between the training loop and a layout, and the single-process runtime.

The loop (``hai_llm.train.trainer.Trainer``) is written once for every layout. What differs
between layouts (where the model's parts live, how a step is scheduled over pipeline stages,
how gradients are reduced and the optimizer state sharded, how the loss and the expert load
are summed across ranks) lives behind :class:`Runtime`. Three implement it:
:class:`SingleProcessRuntime` (here: the reference every parallel layout is tested against),
``hai_llm.runtime.mesh.MeshRuntime`` (dp x sp x ep) and
``hai_llm.runtime.pipeline.PipelineRuntime`` (pp x dp x sp x ep). All of them take their
layout from ``hai_llm.layout.build_layout`` and build their model with
``hai_llm.runtime.parallelize.parallelize``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
from torch import nn

from hai_llm.config.schema import Config
from hai_llm.layout import Layout, build_layout
from hai_llm.parallel.zero import ReduceSpec, ZeroOptimizer

from .parallelize import parallelize


class Runtime(ABC):
    """What a layout supplies to the training loop.

    ``layout``: the run's ``Layout`` (micro-batch counts, degrees). ``is_main`` / ``dp_rank`` /
    ``dp_world``: who logs, and which share of the data this rank reads. ``spec_of(name, p)``:
    where a parameter's gradient is reduced (ZeRO-1 ``ReduceSpec``; None: this rank alone) and
    ``world_group`` the group of the global gradient norm.
    """

    cfg: Config
    layout: Layout
    is_main: bool = True
    dp_rank: int = 0
    dp_world: int = 1
    spec_of: Optional[Callable[[str, torch.Tensor], ReduceSpec]] = None
    world_group = None

    def __init__(self, cfg: Config, layout: Layout) -> None:
        self.cfg = cfg
        self.layout = layout
        # global batch -> its step layout (layout_for), filled along a batch-size ramp
        self._step_layouts: dict[int, Layout] = {}

    @abstractmethod
    def prepare_model(self, model: nn.Module, device=None) -> nn.Module:
        """This rank's part of ``model`` (built identically on every rank, normally on the meta
        device), parallelized; a meta model's kept parameters are materialised on ``device``."""

    def layout_for(self, global_batch: int) -> Layout:
        """The layout of a step of ``global_batch`` sequences (``Layout.for_batch``: its
        micro-batch count and schedule), built once per distinct batch of a batch-size ramp and
        kept for the run (a ramp has at most (end - start) / multiple + 1 of them)."""
        if global_batch not in self._step_layouts:
            self._step_layouts[global_batch] = self.layout.for_batch(global_batch)
        return self._step_layouts[global_batch]

    def positions(self, seq_len: int, device) -> torch.Tensor | None:
        """Positions of the window this rank computes (None: all of them)."""
        return None

    def forward_backward(self, model: nn.Module, batch: torch.Tensor, n_micro: int, autocast) -> dict:
        """Run all micro-batches of this rank's batch; return summed (already 1/n_micro
        weighted) loss terms and expert counts, ON THE MODEL'S DEVICE (no host read here).
        ``n_micro`` is the step's count (``layout_for(step's global batch).n_micro``: it
        changes along a batch-size ramp); the loss is the mean over the step's micro-batches.

        ``terms``: float64 [len(TERMS)] = sum over micro-batches of float64(term) / n_micro, in
        micro-batch order: the same IEEE operations as the former per-micro-batch
        ``float(term) / n_micro`` accumulated in a Python float, so the logged loss keeps its
        bits. Each name of ``TERMS`` is also a 0-dim view of it. ``counts``: [L, E] tokens per
        expert, summed over micro-batches (None without MoE layers)."""
        return self._micro_batches(model, batch, n_micro, autocast, backward=True)

    def evaluate(self, model: nn.Module, batch: torch.Tensor, n_micro: int, autocast) -> dict:
        """The loss terms of ``batch`` without gradients (validation): the same micro-batches,
        per-micro-batch terms and 1/n_micro sums as ``forward_backward``, whose totals
        ``reduce_metrics`` then averages over the ranks exactly as in training. A training step
        sees nothing of it: no gradient, no routing statistics left in the model (the forward
        pops them), no bias update, no random numbers drawn. Under ``no_grad`` the sequence-wise
        balance loss is not computed (``balance`` is 0 and ``loss`` = ce + lambda * mtp)."""
        with torch.no_grad():
            return self._micro_batches(model, batch, n_micro, autocast, backward=False)

    def _micro_batches(self, model: nn.Module, batch: torch.Tensor, n_micro: int, autocast,
                       backward: bool) -> dict:
        terms = torch.zeros(len(TERMS), dtype=torch.float64, device=batch.device)
        n = divisor(n_micro, batch.device)
        counts = None
        pos = self.positions(batch.shape[1] - 1 - model.args.n_mtp_layers, batch.device)
        for mb in batch.chunk(n_micro):
            with autocast():
                out = model.loss(mb, pos)
            if backward:
                (out.loss / n_micro).backward()
            terms += torch.stack([getattr(out, k).detach().double() for k in TERMS]) / n
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
        return with_terms(terms, counts)

    def reduce_metrics(self, totals: dict) -> dict:
        """Average loss terms and sum expert counts over the ranks sharing a step (device
        tensors in, device tensors out: the collectives run on the model's device)."""
        return totals

    def build_optimizer(self, model: nn.Module, cfg: Config) -> ZeroOptimizer:
        o = cfg.optim
        return ZeroOptimizer(model, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             moments_dtype=torch.bfloat16 if o.moments_dtype == "bfloat16" else torch.float32,
                             spec_of=self.spec_of, world_group=self.world_group)


TERMS = ("loss", "ce", "mtp", "balance")  # the loss terms of a step, in ``totals["terms"]`` order


def divisor(n: int, device) -> torch.Tensor:
    """``n`` as a float64 0-dim tensor on ``device``, the divisor of the loss terms: CUDA divides
    by a Python (CPU) scalar as a multiplication by its reciprocal, which is not IEEE division and
    would change the logged loss's last bit; a device tensor divisor is a true division everywhere."""
    return torch.full((), n, dtype=torch.float64, device=device)


def with_terms(terms: torch.Tensor, counts: torch.Tensor | None) -> dict:
    """``totals`` of ``Runtime.forward_backward``: the float64 ``terms`` vector, a 0-dim view of
    it under each name of ``TERMS``, and ``counts``."""
    out = {k: terms[i] for i, k in enumerate(TERMS)}
    out.update(terms=terms, counts=counts)
    return out


class SingleProcessRuntime(Runtime):
    """One process, no parallelism: the layout of a world of one (FP8 swap only)."""

    def __init__(self, cfg: Config):
        super().__init__(cfg, build_layout(cfg, 1))

    def prepare_model(self, model: nn.Module, device=None) -> nn.Module:
        return parallelize(model, self.layout, self.cfg, device=device).model
