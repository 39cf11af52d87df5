"""Expert-parallel all-to-all transports: flat (one all_to_all over the EP group) and
hierarchical (DeepEP-style: across nodes once per target node, then forwarded inside the node).

Both transports implement the same two data movements on a routing ``plan``:

* ``scatter_async(plan, x_TD, slot_aux)`` ("dispatch-shaped"): every (token, chosen expert) pair
  becomes one row on the rank that holds the expert, in the CANONICAL receive order
  (local expert, source EP rank, source token); ``slot_aux`` carries per-(token, k) fp32 columns
  (the routing weights) alongside.  Used by the forward dispatch and by the combine's backward.
* ``gather_async(plan, rows_RD, row_aux)`` ("combine-shaped"): the inverse movement, SUMMING the
  rows of a token in the canonical order below; per-row aux columns come back to their
  (token, k) slot unsummed.  Used by the forward combine and by the dispatch's backward.

Canonical summation order (both transports, forward combine and dispatch backward alike)::

    partial[t, n] = 0 + rows of token t on node n, in ascending expert id   (fp32, rounded to the
                                                                             payload dtype)
    out[t]        = 0 + partial[t, n] over the nodes n it visited, ascending (fp32, rounded)

The hierarchical transport computes ``partial`` on the forwarding rank of node n (so a token
crosses back over the inter-node link once per node); the flat transport receives every row on
the source rank and computes the same two levels there.  Expert batches are sorted into the same
canonical order on the receiver, so expert outputs, partial sums and therefore the whole forward
and backward are bit-identical between the two transports.

Plans are built in two phases so that a dispatch costs the host ONE read of device memory,
placed where it does not stall an overlapped pipeline (docs/expert_parallel.md, "Two-phase plan"):

* ``plan_begin(idx_TK, n_experts)`` computes this rank's send order on the device and ISSUES the
  count exchange asynchronously on the transport's COUNT communicators (a second process group
  over the same ranks as each payload group, so a count exchange never queues behind a payload
  already in flight); nothing is read on the host.
* ``plan_end(pending)`` gathers every data-dependent size of the plan (split lists, number of
  (node, token) copies, forwarded rows) into one small int64 tensor, reads it with a single
  ``.tolist()`` and builds the rest on the device with those sizes known (no ``unique``,
  ``nonzero``, ``bincount``, boolean masks or ``repeat_interleave`` without ``output_size``).
  The hierarchical plan's metadata rows (3 int64 per row and stage) also travel on the count
  communicators.  On CUDA the sizes are assembled and copied to pinned host memory on a side
  stream that waits only for the count exchange, so the read does not wait for queued compute.

``plan(idx_TK, n_experts)`` is both phases back to back.  Payloads move with ``async_op=True`` and
``wait()`` on the returned :class:`CommHandle` yields the result.  Every payload exchange is
recorded in :class:`CommStats` (bytes within and across nodes, token copies) and, with a
:class:`LinkModel`, ``wait()`` does not return before the modeled transfer time since the issue
has elapsed.  Token gathers and sums use the Triton kernels for CUDA tensors and the torch
references otherwise (``use_triton`` True/False forces one).  Value checks that cost a host read
(expert ids in range) run only with ``HAI_LLM_DEBUG_CHECKS=1`` (``hai_llm.kernels.policy``).
"""
from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from hai_llm.kernels.moe_permute import dequantize_ref, permute, routing_to_send_order, unpermute_combine
from hai_llm.kernels.policy import resolve_use_triton

from .a2a_wire import (INTER, INTRA, LOCAL, CommHandle, CommStats, LinkModel, _check_expert_ids, _count,
                       _Group, _inverse, _pack, _run_values, _runs, _Stage, _unpack)
from hai_llm.layout.layout import TRANSPORTS

FP8_BLOCK = 128  # 1x128 activation tiles, one power-of-2 scale each (docs/deepseek_v3.md#fp8-recipe)
_TOKEN_BITS = 32  # canonical key = ((local_expert * ep + src_rank) << 32) + src_token


# ------------------------------------------------------------------------------ plans
@dataclass
class _Plan:
    n_tokens: int
    topk: int
    n_experts: int
    experts_per_rank: int
    recv_perm: torch.Tensor  # canonical[i] = received[recv_perm[i]]
    recv_inv: torch.Tensor
    local_counts: torch.Tensor  # [experts_per_rank] rows per local expert (canonical order)
    copy_token: torch.Tensor  # [C] token of each (node, token) copy, ordered (node, token)
    copy_node: torch.Tensor  # [C]
    my_node: int

    @property
    def n_recv(self) -> int:
        return int(self.recv_perm.numel())

    def remote_nodes_per_token(self) -> torch.Tensor:
        """[T] number of OTHER nodes each token has experts on."""
        return _count(self.copy_token, self.n_tokens, self.copy_node != self.my_node)

    def nodes_per_token(self) -> torch.Tensor:
        return _count(self.copy_token, self.n_tokens)


@dataclass
class FlatPlan(_Plan):
    send_token: torch.Tensor  # [R] token of each send row (rows by expert, then token)
    send_slot: torch.Tensor  # [R] flat routing slot t*K+k of each send row
    send_splits: list[int]
    recv_splits: list[int]
    row_copy: torch.Tensor  # [R] copy index of each send row
    row_node: torch.Tensor  # [R] node of each send row's expert

    def inter_copies_per_token(self) -> torch.Tensor:
        return _count(self.send_token, self.n_tokens, self.row_node != self.my_node)


@dataclass
class PendingPlan:
    """A plan between ``plan_begin`` and ``plan_end``: this rank's send order as device tensors
    (``local``, transport-specific) and the count exchange in flight (``works``).  On CUDA the
    sizes are already queued for the host: ``host`` (pinned) is valid once ``event`` fired."""

    n_tokens: int
    topk: int
    n_experts: int
    experts_per_rank: int
    device: torch.device
    local: dict[str, Any]
    works: list[Any] = field(default_factory=list)
    host: torch.Tensor | None = None
    event: Any = None
    ended: bool = False


# ------------------------------------------------------------------------------ transports
class Transport(abc.ABC):
    """Common part: EP layout, node map, stats, link model, token gather/combine primitives.

    ``ep_ranks``: global ranks of this rank's EP group in EP order.  EP rank ``p`` hosts experts
    ``[p * E/ep, (p+1) * E/ep)``; its node is ``global_rank // gpus_per_node`` (virtual nodes for
    simulated ranks), renumbered 0.. in EP order.  ``use_triton``: None (default) = the Triton
    kernels for CUDA tensors, the torch references otherwise; True / False force one.
    """

    kind = "base"

    def __init__(self, ep_group, ep_ranks: Sequence[int], gpus_per_node: int,
                 link: LinkModel | None = None, use_triton: bool | None = None):
        if not dist.is_initialized():
            raise RuntimeError("expert-parallel transports need torch.distributed initialised")
        if gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
        self.ep_group = ep_group
        self.ep_ranks = list(ep_ranks)
        self.ep_size = len(self.ep_ranks)
        self.global_rank = dist.get_rank()
        if self.global_rank not in self.ep_ranks:
            raise ValueError(f"rank {self.global_rank} is not in its EP group {self.ep_ranks}")
        self.ep_rank = self.ep_ranks.index(self.global_rank)
        self.gpus_per_node = gpus_per_node
        raw = [g // gpus_per_node for g in self.ep_ranks]
        order = list(dict.fromkeys(raw))
        self.node_of_rank = [order.index(n) for n in raw]
        self.n_nodes = len(order)
        self.node = self.node_of_rank[self.ep_rank]
        self.link = link
        self.use_triton = use_triton
        self.stats = CommStats()
        self._side_streams: dict[torch.device, Any] = {}  # CUDA: the count stream per device

    def _kinds(self, members: Sequence[int]) -> list[str]:
        return [LOCAL if m == self.ep_rank else INTRA if self.node_of_rank[m] == self.node else INTER
                for m in members]

    # -- plan exchanges (counts, metadata) on the count communicators -----------------------
    def _exchange(self, group: _Group, send: torch.Tensor, send_splits=None, recv_splits=None):
        """All-to-all of int64 plan rows on ``group``'s count communicator, asynchronous:
        (recv, works).  Equal splits along dim 0 when none are given; bytes go to ``meta``."""
        if send_splits is None:
            n = send.shape[0] // len(group.members)
            send_splits = recv_splits = [n] * len(group.members)
        st = _Stage(self, "meta")
        recv = st.a2a(group, send.contiguous(), list(send_splits), list(recv_splits), plan=True)
        self.stats.add("meta", intra_bytes=st.sent[INTRA], inter_bytes=st.sent[INTER],
                       local_bytes=st.sent[LOCAL])
        return recv, st.works

    @staticmethod
    def _wait_all(works) -> None:
        for w in works:
            w.wait()

    @contextmanager
    def _count_stream(self, device: torch.device) -> Iterator[None]:
        """Where ``plan_begin`` waits for its count exchanges.  CUDA: a side stream (one per
        device) that first waits for the compute stream's queue so far (the routing it reads),
        so waiting for the counts holds up neither the host nor the compute stream.  Elsewhere
        nothing: a gloo wait blocks this thread, and the sizes are built in ``plan_end``."""
        if device.type != "cuda":
            yield
            return
        side = self._side_streams.get(device)
        if side is None:
            side = self._side_streams[device] = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            yield

    def _queue_sizes(self, pend: PendingPlan) -> None:
        """Inside ``_count_stream``: on CUDA, once the counts land, build the sizes and copy them
        to pinned host memory (``pend.event`` marks the copy done); elsewhere nothing."""
        if pend.device.type != "cuda":
            return
        self._wait_all(pend.works)  # the side stream waits, not the host
        sizes = self._sizes(pend)
        pend.host = torch.empty(sizes.shape, dtype=sizes.dtype, device="cpu", pin_memory=True)
        pend.host.copy_(sizes, non_blocking=True)
        pend.event = torch.cuda.Event()
        pend.event.record()

    def _read_sizes(self, pend: PendingPlan) -> list[int]:
        """THE host read of a dispatch: every data-dependent size of the plan, one ``.tolist()``."""
        if pend.ended:
            raise RuntimeError("plan_end was already called for this pending plan")
        pend.ended = True
        if pend.event is not None:
            pend.event.synchronize()
            torch.cuda.current_stream(pend.device).wait_event(pend.event)
            return pend.host.tolist()
        self._wait_all(pend.works)
        return self._sizes(pend).tolist()

    # -- local data movement (Triton or torch reference) ----------------------------------
    def _triton(self, t: torch.Tensor) -> bool:
        """Triton for CUDA tensors, the torch reference otherwise, unless use_triton was given."""
        return resolve_use_triton(self.use_triton, t)

    def _gather_tokens(self, x_TD: torch.Tensor, index: torch.Tensor, quant_fp8: bool) -> list[torch.Tensor]:
        """Rows x[index] in send order; with quant_fp8 the FP8 bytes plus per-tile scales."""
        if quant_fp8:
            q, scales = permute(x_TD, index, quant_fp8=True, block=FP8_BLOCK, use_triton=self._triton(x_TD))
            return [q, scales]
        return [permute(x_TD, index, use_triton=self._triton(x_TD))]

    def _rows(self, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if t.dtype in (torch.float32, torch.bfloat16, torch.float16) and t.dim() == 2 and t.shape[1] > 0:
            return permute(t, index, use_triton=self._triton(t))
        return t[index]

    def _sum_rows(self, y: torch.Tensor, dst: torch.Tensor, n_out: int) -> torch.Tensor:
        """out[i] = 0 + sum of rows r with dst[r] == i in ascending r (fp32, rounded to y's dtype)."""
        ones = torch.ones(y.shape[0], dtype=torch.float32, device=y.device)
        return unpermute_combine(y, dst, ones, n_out, use_triton=self._triton(y))

    def _pack_received(self, plan: _Plan, rows: torch.Tensor, row_aux: torch.Tensor | None):
        """Expert rows (and their aux columns) back in the order they were received, packed
        into one buffer: the first movement of every combine-shaped gather."""
        parts = [self._rows(rows, plan.recv_inv)]
        if row_aux is not None:
            parts.append(row_aux[plan.recv_inv])
        return _pack(parts)

    @staticmethod
    def _finish_rows(parts: list[torch.Tensor], perm: torch.Tensor, dtype: torch.dtype,
                     quant_fp8: bool, has_aux: bool):
        """Received packed parts -> (rows [R, D] in dtype, aux [R, A] | None), canonical order."""
        parts = [p[perm] for p in parts]
        if quant_fp8:
            rows = dequantize_ref(parts[0], parts[1], FP8_BLOCK).to(dtype)
            rest = parts[2:]
        else:
            rows, rest = parts[0], parts[1:]
        return rows, (rest[0] if has_aux else None)

    # -- public API ----------------------------------------------------------------------
    def plan_begin(self, idx_TK: torch.Tensor, n_experts: int) -> PendingPlan:
        """Phase 1 (no host read): this rank's send order on the device; the count exchange is
        issued asynchronously on the count communicator(s).  Collective: every EP rank calls
        plan_begin / plan_end in the same order."""
        if not isinstance(idx_TK, torch.Tensor) or idx_TK.dim() != 2:
            raise ValueError(f"idx_TK must be a [tokens, k] tensor of expert ids, got "
                             f"{getattr(idx_TK, 'shape', type(idx_TK))}")
        if n_experts % self.ep_size:
            raise ValueError(f"n_experts={n_experts} is not divisible by the EP size {self.ep_size}")
        _check_expert_ids(idx_TK, n_experts)
        T, K = idx_TK.shape
        pend = PendingPlan(T, K, n_experts, n_experts // self.ep_size, idx_TK.device, {})
        with self._count_stream(idx_TK.device):
            if idx_TK.is_cuda:  # read on the side stream: keep its memory until that stream is done
                idx_TK.record_stream(torch.cuda.current_stream(idx_TK.device))
            self._begin(pend, idx_TK)
            self._queue_sizes(pend)
        return pend

    def plan_end(self, pend: PendingPlan) -> _Plan:
        """Phase 2: waits for the counts, reads all sizes with ONE ``.tolist()`` and builds the
        send/receive layout on the device (hierarchical: also exchanges the metadata rows)."""
        return self._end(pend, self._read_sizes(pend))

    def plan(self, idx_TK: torch.Tensor, n_experts: int) -> _Plan:
        """Both phases back to back: the send/receive layout of one routing decision."""
        return self.plan_end(self.plan_begin(idx_TK, n_experts))

    @abc.abstractmethod
    def _begin(self, pend: PendingPlan, idx_TK: torch.Tensor) -> None:
        """Fill ``pend.local`` from the routing [T, K] and issue the count exchange(s)
        into ``pend.works`` (runs inside ``_count_stream``)."""

    @abc.abstractmethod
    def _sizes(self, pend: PendingPlan) -> torch.Tensor:
        """The int64 [n] of every data-dependent size, once the counts have landed."""

    @abc.abstractmethod
    def _end(self, pend: PendingPlan, sizes: list[int]) -> _Plan:
        """The plan from ``pend`` and the sizes read on the host."""

    def scatter_async(self, plan: _Plan, x_TD: torch.Tensor, slot_aux: torch.Tensor | None = None,
                      quant_fp8: bool = False, op: str = "dispatch") -> CommHandle:
        """Dispatch-shaped movement; ``wait()`` -> (rows [R, D] in x's dtype, aux [R, A] | None)."""
        if slot_aux is not None and slot_aux.shape[0] != plan.n_tokens * plan.topk:
            raise ValueError(f"slot_aux needs one row per (token, k) slot = {plan.n_tokens * plan.topk}, "
                             f"got {slot_aux.shape[0]}")
        self.stats.add(op, calls=1, tokens=plan.n_tokens)
        return CommHandle(self, self._scatter(plan, x_TD, slot_aux, quant_fp8, op))

    def gather_async(self, plan: _Plan, rows_RD: torch.Tensor, row_aux: torch.Tensor | None = None,
                     op: str = "combine") -> CommHandle:
        """Combine-shaped movement; ``wait()`` -> (out [T, D], slot aux [T*K, A] | None)."""
        if rows_RD.shape[0] != plan.n_recv:
            raise ValueError(f"gather needs the {plan.n_recv} rows this rank received, got {rows_RD.shape[0]}")
        self.stats.add(op, calls=1, tokens=plan.n_tokens)
        return CommHandle(self, self._gather(plan, rows_RD, row_aux, op))

    @abc.abstractmethod
    def _scatter(self, plan, x, slot_aux, quant_fp8, op):
        """Generator issuing the dispatch-shaped collectives (see CommHandle)."""

    @abc.abstractmethod
    def _gather(self, plan, rows, row_aux, op):
        """Generator issuing the combine-shaped collectives (see CommHandle)."""


class FlatTransport(Transport):
    """One all_to_all_single over the EP group: a token goes once per chosen expert."""

    kind = "flat"

    def __init__(self, ep_group, ep_ranks, gpus_per_node, link=None, use_triton=None,
                 all_ep_ranks: Sequence[Sequence[int]] | None = None):
        """``all_ep_ranks``: every EP group of the world (default: the world cut into contiguous
        EP-sized blocks, the ``ParallelDims`` layout); a count communicator is created for each,
        in that order, on every rank, so the constructor is collective over the world."""
        super().__init__(ep_group, ep_ranks, gpus_per_node, link, use_triton)
        members = list(range(self.ep_size))
        pg = None if self.ep_size == 1 else (ep_group if ep_group is not None else dist.group.WORLD)
        groups = _all_groups(self.ep_ranks, all_ep_ranks)
        count_pg = None
        for g in groups:  # identical order on every rank
            cpg = count_communicator(g)
            if g == self.ep_ranks:
                count_pg = cpg
        self.group = _Group(pg, members, self.ep_rank, self._kinds(members), count_pg)
        self._node_maps: dict[torch.device, torch.Tensor] = {}

    def _node_map(self, device: torch.device) -> torch.Tensor:
        """node_of_rank on ``device`` (cached; a non-blocking copy, no stream synchronisation)."""
        m = self._node_maps.get(device)
        if m is None:
            m = self._node_maps[device] = torch.tensor(self.node_of_rank, device="cpu").to(device, non_blocking=True)
        return m

    def _begin(self, pend: PendingPlan, idx_TK: torch.Tensor) -> None:
        P, El, T = self.ep_size, pend.experts_per_rank, pend.n_tokens
        so = routing_to_send_order(idx_TK, pend.n_experts, El, check=False)  # checked in plan_begin
        row_node = self._node_map(idx_TK.device)[idx_TK.reshape(-1).long()[so.order] // El]
        # (node, token) copies: sorted keys, their runs = unique(..., return_inverse) on device
        keys, order = torch.sort(row_node * T + so.src_index)
        run, first = _runs(keys)
        row_copy = torch.empty_like(run)
        row_copy[order] = run
        recv_counts, works = self._exchange(self.group, so.expert_counts.view(P, El))
        pend.works += works
        pend.local.update(so=so, row_node=row_node, keys=keys, run=run, first=first, row_copy=row_copy,
                          recv_counts=recv_counts)

    def _sizes(self, pend: PendingPlan) -> torch.Tensor:
        # [send splits P | receive splits P | number of (node, token) copies]
        loc, P = pend.local, self.ep_size
        return torch.cat([loc["so"].rank_counts, loc["recv_counts"].view(P, -1).sum(1),
                          loc["first"].sum().view(1)])

    def _end(self, pend: PendingPlan, sizes: list[int]) -> FlatPlan:
        P, El, T, K = self.ep_size, pend.experts_per_rank, pend.n_tokens, pend.topk
        loc, dev = pend.local, pend.device
        send_splits, recv_splits, n_copies = sizes[:P], sizes[P:2 * P], sizes[2 * P]
        so, rc = loc["so"], loc["recv_counts"].view(P, El)
        n_recv = sum(recv_splits)
        # received rows come ordered (source, local expert, token): sort to (expert, source, token)
        le = torch.arange(El, device=dev).repeat(P).repeat_interleave(rc.reshape(-1), output_size=n_recv)
        src = torch.arange(P, device=dev).repeat_interleave(rc.sum(1), output_size=n_recv)
        recv_perm = torch.argsort(le * P + src, stable=True)
        keys = _run_values(loc["keys"], loc["run"], n_copies)
        return FlatPlan(n_tokens=T, topk=K, n_experts=pend.n_experts, experts_per_rank=El,
                        recv_perm=recv_perm, recv_inv=_inverse(recv_perm), local_counts=rc.sum(0),
                        copy_token=keys % T if T else keys, copy_node=keys // T if T else keys,
                        my_node=self.node, send_token=so.src_index, send_slot=so.order,
                        send_splits=send_splits, recv_splits=recv_splits, row_copy=loc["row_copy"],
                        row_node=loc["row_node"])

    def _scatter(self, plan: FlatPlan, x, slot_aux, quant_fp8, op):
        parts = self._gather_tokens(x, plan.send_token, quant_fp8)
        if slot_aux is not None:
            parts.append(slot_aux[plan.send_slot])
        packed, spec = _pack(parts)
        st = _Stage(self, op)
        recv = st.a2a(self.group, packed, plan.send_splits, plan.recv_splits, copies=True)
        yield st
        return self._finish_rows(_unpack(recv, spec), plan.recv_perm, x.dtype, quant_fp8,
                                 slot_aux is not None)

    def _gather(self, plan: FlatPlan, rows, row_aux, op):
        packed, spec = self._pack_received(plan, rows, row_aux)
        st = _Stage(self, op)
        back = st.a2a(self.group, packed, plan.recv_splits, plan.send_splits, copies=True)
        yield st
        parts = _unpack(back, spec)
        partial = self._sum_rows(parts[0], plan.row_copy, int(plan.copy_token.numel()))
        out = self._sum_rows(partial, plan.copy_token, plan.n_tokens)
        aux = None
        if row_aux is not None:
            aux = parts[1].new_zeros(plan.n_tokens * plan.topk, parts[1].shape[1])
            aux[plan.send_slot] = parts[1]
        return out, aux


def count_communicator(ranks: Sequence[int]):
    """A count communicator over ``ranks`` (None for one rank): a second process group over the
    same ranks as a payload group, so a count exchange never queues behind a payload in flight.
    ``dist.new_group``: every rank of the world calls it, for every group, in the same order."""
    return dist.new_group(list(ranks)) if len(ranks) > 1 else None


def _all_groups(ep_ranks: Sequence[int], all_ep_ranks: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """Every EP group of the world (default: contiguous EP-sized blocks); must hold ``ep_ranks``."""
    if all_ep_ranks is None:
        world, P = dist.get_world_size(), len(ep_ranks)
        if world % P:
            raise ValueError("pass all_ep_ranks: the world is not a whole number of EP groups")
        all_ep_ranks = [range(s, s + P) for s in range(0, world, P)]
    groups = [list(g) for g in all_ep_ranks]
    if list(ep_ranks) not in groups:
        raise ValueError(f"all_ep_ranks {groups} does not contain this rank's EP group {list(ep_ranks)}: "
                         "pass every EP group of the world as all_ep_ranks")
    return groups


@dataclass(frozen=True)
class SymmSizing:
    """Sizing of the symmetric transport, from ``parallel.symm_slot_mb`` (fixed CUDA bytes per
    exchange slot and rank, in MiB), ``parallel.symm_slots`` (exchanges in flight per rank) and
    ``parallel.symm_programs`` (programs per kernel launch, 0 = one per row block);
    docs/expert_parallel.md "Tunables" gives the values for a DeepSeek-V3 layer.  The defaults
    are the config's."""

    slot_mb: int = 64
    slots: int = 8
    programs: int = 0

    @classmethod
    def from_config(cls, parallel: Any) -> "SymmSizing":
        """From a ``ParallelConfig`` (validate_config has checked the ranges)."""
        return cls(parallel.symm_slot_mb, parallel.symm_slots, parallel.symm_programs)


def build_transport(kind: str, ep_group, ep_ranks: Sequence[int], gpus_per_node: int,
                    all_ep_ranks: Sequence[Sequence[int]] | None = None, link: LinkModel | None = None,
                    use_triton: bool | None = None, symm: SymmSizing | None = None) -> Transport:
    """A transport for this rank's EP group.  Collective over the world: both kinds create count
    communicators (hierarchical: also its stage groups) for every EP group of ``all_ep_ranks``
    (default: the world cut into contiguous EP-sized blocks, the ``ParallelDims`` layout).
    ``use_triton=None``: Triton kernels for CUDA tensors, torch references otherwise.
    ``symm``: buffer and kernel sizing of the symmetric transport (ignored by the others)."""
    if kind == "flat":
        return FlatTransport(ep_group, ep_ranks, gpus_per_node, link, use_triton, all_ep_ranks)
    if kind == "hierarchical":
        # the hierarchical transport builds on this module's base classes: imported here
        from .transport_hierarchical import HierarchicalTransport

        return HierarchicalTransport(ep_group, ep_ranks, gpus_per_node, all_ep_ranks, link, use_triton)
    if kind == "symmetric":
        from hai_llm.kernels.symm_a2a import SymmKernelConfig

        from .transport_symmetric import SymmetricTransport  # hierarchical across nodes, kernels inside

        sz = symm or SymmSizing()
        return SymmetricTransport(ep_group, ep_ranks, gpus_per_node, all_ep_ranks, link, use_triton,
                                  kernel=SymmKernelConfig(channels=sz.programs), n_slots=sz.slots,
                                  slot_bytes=sz.slot_mb << 20)
    raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")
