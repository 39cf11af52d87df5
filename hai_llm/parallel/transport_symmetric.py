"""The symmetric-memory expert transport (``parallel.transport=symmetric``): inside a node,
rows are written straight into the receiving ranks' buffers by a kernel and read back from
them by a kernel; across nodes it is the hierarchical transport (one copy per target node).

Same public API, plans, canonical order and bit-for-bit results as the flat and hierarchical
transports (``transport.py`` describes them).  It extends :class:`HierarchicalTransport`: the
inter-node stage is unchanged (gloo/NCCL ``all_to_all_single`` between the ranks with the same
local index; with one node it is a local copy that moves nothing), and only the intra-node stage
is replaced:

* dispatch: the forwarding rank runs ``symm_scatter`` (``kernels/symm_a2a.py``), writing each
  stage-2 row (the token's payload bytes: compute-dtype values, or FP8 codes + fp32 tile scales
  under the FP8 recipe, then its routing weight) into the buffer of the rank hosting the expert,
  at row ``offset = exclusive prefix sum over the forwarders before it of the rows they send
  there`` + its index among this forwarder's rows there.  The receiver's buffer then holds
  exactly what the intra-node ``all_to_all_single`` would have delivered, and it sorts it into
  the canonical order like the hierarchical transport;
* combine (and the dispatch's backward): every expert rank writes its outputs into its own
  buffer in that same layout; the forwarding rank runs ``symm_combine``, reading its rows from
  the peers' buffers and summing a token's rows of the node in ascending expert (the canonical
  ``partial[t, n]``), then the partial crosses nodes as in the hierarchical transport.

The per-pair counts behind the offsets are the stage-2 counts of the hierarchical plan,
all-gathered inside the node on the count communicator during ``plan_begin`` and read with the
plan's other sizes in its single ``.tolist()``; the plan's stage-2 metadata rows (what the
receiver sorts by) then travel through the buffer at those offsets, not over gloo.  Write and
read phases are ordered by the buffer's signal pads (``symm_buffer.py``), so a handle's first stage is the writes and its
``wait()`` waits for the peers' signals: the same async handles, byte accounting (identical to
the hierarchical transport's) and link emulation as the other transports.

Backend: the kernels run in Triton for CUDA tensors and as their torch references otherwise
(``use_triton`` forces one; the tests run the Triton kernels under ``TRITON_INTERPRET=1``
against the shared-memory buffers of real rank processes).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.distributed as dist

from hai_llm.kernels.symm_a2a import (SymmKernelConfig, symm_combine, symm_gather, symm_get_blocks, symm_put_blocks,
                                      symm_scatter)

from .a2a_wire import _Group, _offsets, _pack, _Stage, _unpack
from .symm_buffer import DEFAULT_SLOT_BYTES, DEFAULT_SLOTS, SymmBuffer, build_symm_buffer
from .transport import PendingPlan
from .transport_hierarchical import HierarchicalTransport, HierPlan


@dataclass
class SymmPlan(HierPlan):
    s2_dest: torch.Tensor  # [S2] local index of the rank receiving each stage-2 row
    s2_offset: torch.Tensor  # [S2] its row in that rank's buffer
    s2_base: list[int]  # first row of this forwarder's block in each local rank's buffer
    node_recv: list[int]  # rows each local rank of this node receives in stage 2


@dataclass
class _NodeLayout:
    """Stage-2 placement of one plan inside the node (see ``SymmetricTransport._node_layout``)."""

    dest: torch.Tensor  # [S2] local rank receiving each of this forwarder's rows
    offset: torch.Tensor  # [S2] row in that rank's buffer
    base: list[int]  # first row of this forwarder's block in each local rank's buffer
    recv: list[int]  # rows each local rank receives


class _SymmStage(_Stage):
    """A stage-2 exchange through symmetric memory: writes done at issue, ``wait()`` waits for
    every local rank's arrival signal.  Bytes are accounted as the all-to-all they replace."""

    def __init__(self, transport: "SymmetricTransport", op: str, buffer: SymmBuffer):
        super().__init__(transport, op)
        self.buffer = buffer
        self.seq, self.slot = buffer.begin()
        self._arrived = False

    def account(self, group: _Group, send_splits: list[int], recv_splits: list[int], row_bytes: int) -> None:
        for j, kind in enumerate(group.kinds):
            self.sent[kind] += send_splits[j] * row_bytes
            self.recv[kind] += recv_splits[j] * row_bytes
            self.copies[kind] += send_splits[j]

    def wait(self) -> None:
        if not self._arrived:
            self.buffer.wait_arrived(self.seq)
            self._arrived = True


class SymmetricTransport(HierarchicalTransport):
    """Hierarchical across nodes, symmetric memory inside a node (module docstring).

    Tunables: ``kernel`` (:class:`SymmKernelConfig`: rows per program step, programs
    ("channels") per launch), ``n_slots`` (exchanges one rank may have in flight),
    ``slot_bytes`` (CUDA: fixed bytes per slot and rank; CPU buffers grow on demand).
    Collective over the world like the hierarchical transport, and over each node for the
    buffers (CPU: at construction; CUDA: at the first CUDA exchange, which every rank of the node
    reaches together)."""

    kind = "symmetric"

    def __init__(self, ep_group, ep_ranks, gpus_per_node, all_ep_ranks: Sequence[Sequence[int]] | None = None,
                 link=None, use_triton=None, kernel: SymmKernelConfig | None = None,
                 n_slots: int = DEFAULT_SLOTS, slot_bytes: int = DEFAULT_SLOT_BYTES):
        super().__init__(ep_group, ep_ranks, gpus_per_node, all_ep_ranks, link, use_triton)
        self.kernel = kernel or SymmKernelConfig()
        self.n_slots, self.slot_bytes = n_slots, slot_bytes
        self._node_ranks = [self.ep_ranks[m] for m in self.intra.members]
        self._buffers: dict[torch.device, SymmBuffer] = {}
        self._meta_layout: _NodeLayout | None = None  # set only while _end builds a plan
        self._buffers[torch.device("cpu")] = build_symm_buffer(torch.device("cpu"), self.intra.pg,
                                                               self._node_ranks, self.local, n_slots)

    def buffer(self, device: torch.device) -> SymmBuffer:
        """The node's symmetric buffer for tensors on ``device`` (built on first use)."""
        buf = self._buffers.get(device)
        if buf is None:
            buf = self._buffers[device] = build_symm_buffer(device, self.intra.pg, self._node_ranks, self.local,
                                                            self.n_slots, self.slot_bytes)
        return buf

    def close(self) -> None:
        """Release the symmetric buffers (their shared-memory files are already unlinked)."""
        for buf in self._buffers.values():
            buf.close()
        self._buffers.clear()

    # -- plan: the hierarchical plan plus the node's stage-2 count matrix --------------------
    def _begin(self, pend: PendingPlan, idx_TK: torch.Tensor) -> None:
        super()._begin(pend, idx_TK)
        L, s2 = self.ranks_per_node, pend.local["s2_counts"]
        if self.intra.count_pg is None:
            pend.local["s2_matrix"] = [s2]
            return
        out = [torch.empty_like(s2) for _ in range(L)]
        pend.works.append(dist.all_gather(out, s2.contiguous(), group=self.intra.count_pg, async_op=True))
        pend.local["s2_matrix"] = out
        self.stats.add("meta", intra_bytes=(L - 1) * s2.numel() * s2.element_size(),
                       local_bytes=s2.numel() * s2.element_size())

    def _sizes(self, pend: PendingPlan) -> torch.Tensor:
        # [hierarchical sizes | M[f, d] = rows forwarder f sends to local rank d, row-major]
        return torch.cat([super()._sizes(pend)] + [m.view(-1) for m in pend.local["s2_matrix"]])

    def _end(self, pend: PendingPlan, sizes: list[int]) -> SymmPlan:
        L = self.ranks_per_node
        flat_m = sizes[len(sizes) - L * L:]
        M = [flat_m[f * L:(f + 1) * L] for f in range(L)]
        lay = self._node_layout(M, pend.device)
        self._meta_layout = lay  # the hierarchical plan's stage-2 metadata rows take this route
        try:
            plan = super()._end(pend, sizes[:len(sizes) - L * L])
        finally:
            self._meta_layout = None
        if M[self.local] != list(plan.s2_splits) or [M[f][self.local] for f in range(L)] != list(plan.s2_recv_splits):
            raise RuntimeError("symmetric plan: the node's count matrix disagrees with the stage-2 splits")
        return SymmPlan(**{f.name: getattr(plan, f.name) for f in fields(HierPlan)}, s2_dest=lay.dest,
                        s2_offset=lay.offset, s2_base=lay.base, node_recv=lay.recv)

    def _node_layout(self, M: list[list[int]], dev: torch.device) -> _NodeLayout:
        """Where this forwarder's stage-2 rows land: M[f][d] = rows forwarder f sends to local
        rank d; this rank's rows for d start at the exclusive prefix sum over the forwarders
        before it, in its send order (grouped by destination)."""
        L, splits = self.ranks_per_node, M[self.local]
        S2 = sum(splits)
        base = [sum(M[f][d] for f in range(self.local)) for d in range(L)]
        sp = torch.tensor(splits, dtype=torch.long).to(dev, non_blocking=True)
        base_t = torch.tensor(base, dtype=torch.long).to(dev, non_blocking=True)
        dest = torch.arange(L, device=dev).repeat_interleave(sp, output_size=S2)
        offset = torch.arange(S2, device=dev) - _offsets(sp)[dest] + base_t[dest]
        return _NodeLayout(dest, offset, base, [sum(M[f][d] for f in range(L)) for d in range(L)])

    def _exchange(self, group, send, send_splits=None, recv_splits=None):
        """Plan exchanges on the count communicators, except the stage-2 metadata rows of the
        plan being ended (3 int64 per row: expert, source rank, token), which the receivers need
        to sort their rows canonically: those go through the node's symmetric buffer at the
        payload's offsets, without a gloo round trip."""
        lay = self._meta_layout
        if lay is None or group is not self.intra or send_splits is None or group.pg is None:
            return super()._exchange(group, send, send_splits, recv_splits)
        width = send.shape[1] * send.element_size()
        rows = send.contiguous().view(torch.uint8).view(send.shape[0], width)
        buf = self.buffer(send.device)
        seq, slot = buf.begin()
        peers = buf.peers(slot, [n * width for n in lay.recv])
        if self._triton(send):
            symm_scatter(rows, torch.arange(rows.shape[0], device=rows.device), peers, lay.dest, lay.offset, width,
                         **self._kernel_args(send))
        else:
            symm_put_blocks(rows, peers, list(send_splits), lay.base, width)
        buf.arrive(seq)
        buf.wait_arrived(seq)
        n = lay.recv[self.local]
        recv = peers[self.local][:n * width].view(n, width).clone().view(send.dtype)
        buf.done(seq)
        own = send_splits[self.local] * width
        self.stats.add("meta", intra_bytes=sum(send_splits) * width - own, local_bytes=own)
        return recv, []

    # -- data movement ------------------------------------------------------------------------
    def _local_stage(self, op: str, *parts: torch.Tensor | None) -> None:
        """A one-node inter stage: nothing moves; its bytes count as local, like a self-copy."""
        self.stats.add(op, local_bytes=sum(p.numel() * p.element_size() for p in parts if p is not None))

    def _kernel_args(self, t: torch.Tensor) -> dict:
        return {"cfg": self.kernel, "use_triton": self._triton(t)}

    def _scatter(self, plan: SymmPlan, x, slot_aux, quant_fp8, op):
        packed, spec = _pack(self._gather_tokens(x, plan.copy_token, quant_fp8))
        aux1 = slot_aux[plan.row_slot].contiguous() if slot_aux is not None else None
        if self.n_nodes > 1:  # stage 1: one copy per (token, target node), as hierarchical
            st = _Stage(self, op)
            copies = st.a2a(self.inter, packed, plan.copy_splits, plan.copy_recv_splits, copies=True)
            if aux1 is not None:
                aux1 = st.a2a(self.inter, aux1, plan.row_splits, plan.row_recv_splits)
            yield st
        else:
            copies = packed
            self._local_stage(op, packed, aux1)
        # stage 2: the forwarding rank writes each row into the buffer of the expert's rank
        buf = self.buffer(x.device)
        width = copies.shape[1] + (aux1.shape[1] * aux1.element_size() if aux1 is not None else 0)
        sst = _SymmStage(self, op, buf)
        peers = buf.peers(sst.slot, [n * width for n in plan.node_recv])
        if self._triton(x):  # one kernel per part, each row to its (peer, offset)
            kw = self._kernel_args(x)
            symm_scatter(copies, plan.s2_copy, peers, plan.s2_dest, plan.s2_offset, width, 0, **kw)
            if aux1 is not None:
                symm_scatter(aux1, plan.s2_order, peers, plan.s2_dest, plan.s2_offset, width, copies.shape[1],
                             **kw)
        else:  # torch: the rows in send order, then one block copy per peer
            fwd = copies[plan.s2_copy]
            if aux1 is not None:
                fwd = torch.cat([fwd, aux1[plan.s2_order].view(torch.uint8)], 1)
            symm_put_blocks(fwd, peers, plan.s2_splits, plan.s2_base, width)
        if aux1 is not None:
            spec = spec + [(aux1.dtype, aux1.shape[1])]
        buf.arrive(sst.seq)
        sst.account(self.intra, plan.s2_splits, plan.s2_recv_splits, width)
        yield sst
        n_recv = plan.node_recv[self.local]
        recv = peers[self.local][:n_recv * width].view(n_recv, width)
        out = self._finish_rows(_unpack(recv, spec), plan.recv_perm, x.dtype, quant_fp8, slot_aux is not None)
        buf.done(sst.seq)  # every part above is a copy: the slot may be reused
        return out

    def _gather(self, plan: SymmPlan, rows, row_aux, op):
        packed, spec = self._pack_received(plan, rows, row_aux)
        width = packed.shape[1]
        buf = self.buffer(rows.device)
        sst = _SymmStage(self, op, buf)
        peers = buf.peers(sst.slot, [n * width for n in plan.node_recv])
        n_recv = plan.node_recv[self.local]
        # each expert rank exposes its outputs in its own buffer, in the layout it received them
        peers[self.local][:n_recv * width].view(n_recv, width).copy_(packed)
        buf.arrive(sst.seq)
        sst.account(self.intra, plan.s2_recv_splits, plan.s2_splits, width)
        yield sst
        # per-(token, node) partial sums, ascending expert, read from the peers' buffers
        if self._triton(rows):
            kw = self._kernel_args(rows)
            D = rows.shape[1]
            partial = symm_combine(peers, plan.s2_dest, plan.s2_offset, width, rows.dtype, D, plan.s2_copy,
                                   plan.n_fwd_copies, **kw)
            got = None
            if row_aux is not None:
                got = symm_gather(peers, plan.s2_dest, plan.s2_offset, width, D * rows.element_size(),
                                  4 * spec[1][1], **kw).view(torch.float32)
        else:  # torch: one block read per peer, then the same sum as the hierarchical transport
            parts = _unpack(symm_get_blocks(peers, plan.s2_splits, plan.s2_base, width), spec)
            partial = self._sum_rows(parts[0], plan.s2_copy, plan.n_fwd_copies)
            got = parts[1] if row_aux is not None else None
        aux1 = None
        if got is not None:
            aux1 = got.new_empty(got.shape)
            aux1[plan.s2_order] = got
        buf.done(sst.seq)
        if self.n_nodes > 1:  # stage 1 reversed: one partial per (token, node) crosses nodes
            st = _Stage(self, op)
            copies = st.a2a(self.inter, partial, plan.copy_recv_splits, plan.copy_splits, copies=True)
            aux_back = st.a2a(self.inter, aux1, plan.row_recv_splits, plan.row_splits) if aux1 is not None else None
            yield st
        else:
            copies, aux_back = partial, aux1
            self._local_stage(op, partial, aux1)
        return self._token_outputs(plan, copies, aux_back)
