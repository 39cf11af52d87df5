"""Expert parallelism: expert placement, the MoE dispatcher hook and its autograd.

``apply_expert_parallel(model, groups, ...)`` turns a BUILT, initialised full model (every rank
built from the same seed, so identical weights) into an expert-parallel one:

* every ``MoE.experts`` keeps only the rows ``[ep_rank * E/ep, (ep_rank + 1) * E/ep)`` of its
  stacked w1/w2/w3 (new ``nn.Parameter``s holding the slice); the gate and the shared experts stay
  replicated;
* ``MoE.dispatcher`` is set to an :class:`ExpertParallelDispatcher`, which sends each
  (token, chosen expert) pair to the rank holding the expert, runs the local grouped GEMM and
  brings the weighted outputs back in token order.

Where the routing weights are applied: they travel WITH the dispatched rows (4 bytes per
(token, expert) next to a hidden-size payload) and are applied on the expert rank,
``y_w = w * expert(x)`` in fp32 rounded to the compute dtype.  The hierarchical transport needs
them there anyway (the forwarding rank sums a token's weighted outputs of one node before they
cross nodes); doing the same in the flat transport keeps the two bit-identical, and the gradient of
the weights is the plain autograd of that product on the expert rank, which then travels back
with the dispatch's backward.  See ``hai_llm/parallel/transport.py`` for the canonical
summation order.

Host reads: a dispatch reads device memory on the host exactly once, in ``plan_end`` (all the
sizes of its plan in one ``.tolist()``, see ``hai_llm/parallel/transport.py``).
``dispatch_async`` only begins the plan (the count exchange goes out on its own communicator);
``DispatchHandle.launch()`` ends it and issues the payload.  A pipeline calls ``launch`` once the
other micro-batch's next backward piece is queued (``Tape.defer``), so the host never waits for
that work; ``wait()`` launches a handle still pending, so plain callers need not know.

Autograd: the dispatch and the combine are each a pair of ``autograd.Function``s, *start*
(issues the asynchronous exchange; for the dispatch: at launch) and *wait* (returns its
result).  In backward the *wait* node issues the reverse exchange (dispatch <-> combine shaped)
and the *start* node waits for it, so autograd can run independent work in between.  With ``fp8_dispatch`` the forward dispatch payload
is FP8 (1x128 tiles, power-of-2 scales, dequantised on the receiver) while every backward exchange
and the combine stay in the compute dtype (straight-through: the quantisation is treated as the
identity for gradients).

Gradient bookkeeping (the source of the classic "off by exactly ep" bug): with a loss that is the
mean over ranks of per-rank mean losses, every gradient is ``(1/W) * sum over ranks of local
grads`` (W = ranks sharing the batch, dp x sp).  A rank's local expert gradient already contains
the contributions of the tokens of all ranks of its EP group (through the all-to-all backward),
so: dense grads -> all_reduce(SUM) over dp_sp / W; expert grads -> all_reduce(SUM) over edp / W.
The trainer does it through ZeRO-1 reduce specs (``hai_llm.parallel.zero``, scale 1/W for both).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from hai_llm.model.moe import GroupedExperts, MoE

from .transport import LinkModel, PendingPlan, SymmSizing, Transport, _Plan, build_transport

EXPERT_PARAM_NAMES = ("w1", "w2", "w3")


# ------------------------------------------------------------------------------ autograd
class _Op:
    """State shared by a start/wait pair: the plan (or, for a dispatch not launched yet, the
    pending plan and the payload to send), the in-flight handles."""

    __slots__ = ("transport", "plan", "fp8", "fwd", "bwd", "pending", "payload")

    def __init__(self, transport: Transport, plan: _Plan | None, fp8: bool = False,
                 pending: PendingPlan | None = None):
        self.transport, self.plan, self.fp8, self.pending = transport, plan, fp8, pending
        self.fwd = self.bwd = self.payload = None

    def launch(self) -> None:
        """End the pending plan (the dispatch's one host read) and issue the payload exchange;
        a no-op once launched."""
        if self.pending is None:
            return
        with torch.no_grad():
            self.plan = self.transport.plan_end(self.pending)
            x_TD, w_slots = self.payload
            self.fwd = self.transport.scatter_async(self.plan, x_TD, w_slots, quant_fp8=self.fp8,
                                                    op="dispatch")
        self.pending = self.payload = None


class _DispatchStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: _Op, x_TD, w_slots):
        # the payload is issued by op.launch(), after the plan's sizes are read
        op.payload = (x_TD.detach(), w_slots.detach())
        ctx.op = op
        return x_TD.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token):
        op = ctx.op
        grad_x, grad_w = op.bwd.wait()
        op.bwd = None
        return None, grad_x, grad_w


class _DispatchWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: _Op, token):
        op.launch()
        rows, w_rows = op.fwd.wait()
        op.fwd = None
        ctx.op = op
        ctx.token_meta = (token.dtype, token.device)
        return rows, w_rows

    @staticmethod
    def backward(ctx, grad_rows, grad_w_rows):
        op = ctx.op
        op.bwd = op.transport.gather_async(op.plan, grad_rows.contiguous(), grad_w_rows.contiguous(),
                                           op="dispatch_bwd")
        dtype, device = ctx.token_meta
        return None, torch.zeros(0, dtype=dtype, device=device)


class _CombineStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: _Op, y_RD):
        op.fwd = op.transport.gather_async(op.plan, y_RD.detach(), None, op="combine")
        ctx.op = op
        return y_RD.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token):
        op = ctx.op
        grad_rows, _ = op.bwd.wait()
        op.bwd = None
        return None, grad_rows


class _CombineWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: _Op, token):
        out, _ = op.fwd.wait()
        op.fwd = None
        ctx.op = op
        ctx.token_meta = (token.dtype, token.device)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        op = ctx.op
        op.bwd = op.transport.scatter_async(op.plan, grad_out.contiguous(), None, quant_fp8=False,
                                            op="combine_bwd")
        dtype, device = ctx.token_meta
        return None, torch.zeros(0, dtype=dtype, device=device)


# ------------------------------------------------------------------------------ dispatcher
@dataclass
class ExpertBatch:
    """What a rank's local experts process: rows sorted by (local expert, source rank, token)."""

    x: torch.Tensor  # [R, D] compute dtype (dequantised when the dispatch was FP8)
    weights: torch.Tensor  # [R] fp32 routing weight of each row
    counts: torch.Tensor  # [E_local] rows per local expert
    plan: _Plan
    dtype: torch.dtype


class DispatchHandle:
    """A dispatch whose plan has begun; ``launch()`` ends the plan (its one host read) and
    issues the payload, ``wait()`` -> :class:`ExpertBatch` (differentiable; launches first if
    still pending).

    ``token`` is the autograd link between the issuing and the waiting side: an empty tensor
    whose backward waits for the reverse exchange. A caller that cuts its graph between the
    two (a pipeline piece boundary: ``token.detach().requires_grad_()``) passes the leaf it
    made to ``wait(token=leaf)`` so the wait hangs off its own graph."""

    def __init__(self, op: _Op, token: torch.Tensor, dtype: torch.dtype):
        self._op, self._token, self._dtype = op, token, dtype
        self._batch: ExpertBatch | None = None

    @property
    def comm(self):
        """The payload's transport-level CommHandle (launches the dispatch if still pending)."""
        self.launch()
        return self._op.fwd

    @property
    def token(self) -> torch.Tensor:
        return self._token

    @property
    def launched(self) -> bool:
        return self._op.pending is None

    def launch(self) -> None:
        self._op.launch()

    def wait(self, token: torch.Tensor | None = None) -> ExpertBatch:
        if self._batch is None:
            rows, w_rows = _DispatchWait.apply(self._op, self._token if token is None else token)
            self._batch = ExpertBatch(rows, w_rows.view(-1), self._op.plan.local_counts, self._op.plan,
                                      self._dtype)
        return self._batch


class CombineHandle:
    """In-flight combine; ``wait()`` -> [T, D] routed output in original token order.
    ``token`` / ``wait(token=...)`` as for :class:`DispatchHandle`."""

    def __init__(self, op: _Op, token: torch.Tensor):
        self._op, self._token = op, token
        self._out: torch.Tensor | None = None

    @property
    def comm(self):
        return self._op.fwd

    @property
    def token(self) -> torch.Tensor:
        return self._token

    def wait(self, token: torch.Tensor | None = None) -> torch.Tensor:
        if self._out is None:
            self._out = _CombineWait.apply(self._op, self._token if token is None else token)
        return self._out


class ExpertParallelDispatcher:
    """The ``MoE.dispatcher`` hook: ``(x_TD, weights_TK, idx_TK, experts) -> y_TD``.

    The three stages are public for a pipeline that overlaps them with another micro-batch:
    ``h = d.dispatch_async(x, w, idx)`` ... ``b = h.wait()``; ``y = d.compute(b, experts)``;
    ``c = d.combine_async(y, b)`` ... ``out = c.wait()``.  Calling the dispatcher does
    dispatch_async + wait, compute, combine_async + wait.  ``dispatch_async`` begins the plan
    (count exchange issued, nothing read on the host); ``h.launch()`` (or ``h.wait()``) ends it
    with the dispatch's single host read and issues the payload.  Every rank of the EP group
    must begin, launch, wait and combine in the same order.
    """

    def __init__(self, transport: Transport, n_experts: int, fp8_dispatch: bool = False):
        if n_experts % transport.ep_size:
            raise ValueError(f"n_routed_experts={n_experts} is not divisible by ep={transport.ep_size}")
        self.transport = transport
        self.n_experts = n_experts
        self.fp8_dispatch = fp8_dispatch

    def dispatch_async(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, idx_TK: torch.Tensor) -> DispatchHandle:
        pending = self.transport.plan_begin(idx_TK, self.n_experts)
        op = _Op(self.transport, None, self.fp8_dispatch, pending)
        w_slots = weights_TK.reshape(-1, 1).float()
        token = _DispatchStart.apply(op, x_TD, w_slots)
        return DispatchHandle(op, token, x_TD.dtype)

    def compute(self, batch: ExpertBatch, experts: GroupedExperts) -> torch.Tensor:
        """Weighted expert outputs ``w * expert(x)`` [R, D] (fp32 product, compute dtype)."""
        if experts.n_experts != batch.counts.numel():
            raise ValueError(f"experts hold {experts.n_experts} experts but the plan has "
                             f"{batch.counts.numel()} per rank: was apply_expert_parallel run?")
        if batch.x.shape[0] == 0:  # keep the graph connected so every rank runs the backward exchanges
            return (batch.x.float() * batch.weights[:, None]).to(batch.dtype)
        y = experts(batch.x, batch.counts)
        return (y.float() * batch.weights[:, None]).to(batch.dtype)

    def combine_async(self, y_RD: torch.Tensor, batch: ExpertBatch) -> CombineHandle:
        op = _Op(self.transport, batch.plan)
        token = _CombineStart.apply(op, y_RD)
        return CombineHandle(op, token)

    def __call__(self, x_TD, weights_TK, idx_TK, experts) -> torch.Tensor:
        batch = self.dispatch_async(x_TD, weights_TK, idx_TK).wait()
        return self.combine_async(self.compute(batch, experts), batch).wait()


# ------------------------------------------------------------------------------ placement
@dataclass(frozen=True)
class ExpertSlice:
    """Marks a GroupedExperts as holding rows [offset, offset + n_local) of n_global experts."""

    n_global: int
    offset: int
    n_local: int
    ep_rank: int
    ep_size: int
    ep_group: Any = None


def _resolve(groups, ep_rank, ep_size, gpus_per_node, all_ep_ranks):
    """(ep_group, ep_ranks, ep_rank, gpus_per_node, all_ep_ranks) from MeshGroups or a group."""
    from hai_llm.layout.dims import MeshGroups

    if isinstance(groups, MeshGroups):
        ep_group = groups.group("ep")
        ep_ranks = groups.ranks("ep")
        rank = groups.rank("ep")
        gpn = gpus_per_node or groups.dims.gpus_per_node
        all_ranks = all_ep_ranks or groups.dims.group_ranks("ep")
    else:
        ep_group = groups
        pg = groups if groups is not None else dist.group.WORLD
        size = dist.get_world_size(pg)
        ep_ranks = [dist.get_global_rank(pg, i) for i in range(size)] if groups is not None \
            else list(range(size))
        rank = dist.get_rank(pg)
        gpn = gpus_per_node or len(ep_ranks)  # default: the EP group is one node
        all_ranks = all_ep_ranks
    if ep_rank is not None and ep_rank != rank:
        raise ValueError(f"ep_rank={ep_rank} but this rank is {rank} in its EP group")
    if ep_size is not None and ep_size != len(ep_ranks):
        raise ValueError(f"ep_size={ep_size} but the EP group has {len(ep_ranks)} ranks")
    return ep_group, ep_ranks, rank, gpn, all_ranks


def apply_expert_parallel(model: nn.Module, groups=None, ep_rank: int | None = None,
                          ep_size: int | None = None, *, transport: str | Transport = "flat",
                          gpus_per_node: int | None = None, all_ep_ranks=None,
                          link: LinkModel | None = None, use_triton: bool | None = None,
                          fp8_dispatch: bool = False, symm: SymmSizing | None = None) -> Transport:
    """Shard the routed experts of every MoE layer over the EP group and install the dispatcher.

    ``groups``: a ``MeshGroups`` (uses its "ep" group, EP rank, node size and the layout of all EP
    groups) or a process group (None = the world).  ``ep_rank``/``ep_size`` are checked against
    it when given.  ``transport``: "flat", "hierarchical" or a ready :class:`Transport` (shared by
    all layers).  ``gpus_per_node`` defines (virtual) nodes: global rank // gpus_per_node;
    default the mesh's value, or the whole EP group on one node.  ``use_triton``: None = the
    Triton kernels for CUDA tensors and the torch references otherwise (True/False force one).
    ``symm``: sizing of the symmetric transport (``SymmSizing.from_config(cfg.parallel)``).
    Collective: every rank of the world must call it (a transport creates process groups: count
    communicators, and the hierarchical stage groups).  Build optimizers
    AFTER this call (the expert parameters are new tensors).  Returns the transport (its
    ``stats`` hold the traffic counters).
    """
    ep_group, ep_ranks, rank, gpn, all_ranks = _resolve(groups, ep_rank, ep_size, gpus_per_node, all_ep_ranks)
    P = len(ep_ranks)
    if isinstance(transport, Transport):
        tp = transport
        if tp.ep_ranks != ep_ranks:
            raise ValueError(f"transport is for EP group {tp.ep_ranks}, not {ep_ranks}")
    else:
        tp = build_transport(transport, ep_group, ep_ranks, gpn, all_ranks, link, use_triton, symm)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        ex = moe.experts
        if getattr(ex, "ep_slice", None) is not None:
            raise ValueError("apply_expert_parallel was already applied to this model")
        E = ex.n_experts
        # on the meta device the slice is a meta tensor of the local shape: parallelize then
        # materialises and initialises only these rows (by global row, from ep_slice.offset)
        if E % P:
            raise ValueError(f"n_routed_experts={E} is not divisible by ep={P}")
        El = E // P
        lo = rank * El
        for name in EXPERT_PARAM_NAMES:
            p = getattr(ex, name)
            setattr(ex, name, nn.Parameter(p.detach()[lo:lo + El].clone(), requires_grad=p.requires_grad))
        ex.ep_slice = ExpertSlice(E, lo, El, rank, P, ep_group)
        moe.dispatcher = ExpertParallelDispatcher(tp, E, fp8_dispatch)
    return tp


def set_expert_transport(model: nn.Module, transport: Transport, fp8_dispatch: bool | None = None) -> None:
    """Swap the transport (and optionally the FP8 flag) of every EP dispatcher of ``model``."""
    for moe in model.modules():
        if isinstance(moe, MoE) and isinstance(moe.dispatcher, ExpertParallelDispatcher):
            moe.dispatcher.transport = transport
            if fp8_dispatch is not None:
                moe.dispatcher.fp8_dispatch = fp8_dispatch


def _expert_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, ExpertSlice]]:
    for mname, mod in model.named_modules():
        sl = getattr(mod, "ep_slice", None)
        if isinstance(mod, GroupedExperts) and sl is not None:
            for pname in EXPERT_PARAM_NAMES:
                yield (f"{mname}.{pname}" if mname else pname), getattr(mod, pname), sl


def expert_param_slices(model: nn.Module) -> dict[str, tuple[tuple[int, ...], int]]:
    """{fqn: (global_shape, row_offset)}: the local tensor is rows
    [row_offset, row_offset + local_shape[0]) of a global tensor of ``global_shape``."""
    return {name: ((sl.n_global,) + tuple(p.shape[1:]), sl.offset) for name, p, sl in _expert_params(model)}
