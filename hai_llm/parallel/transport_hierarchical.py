"""The hierarchical (DeepEP-style) expert-parallel transport: a token crosses the inter-node
link once per target node, to the rank of that node with the same local index, which forwards
it inside the node; the combine pre-sums a token's rows of one node on that forwarding rank.

Same public API, canonical order and bit-for-bit results as the flat transport
(``transport.py``, whose module docstring describes both and the two-phase plan); this file
holds only what differs: the two-stage plan (``HierPlan``) and its scatter/gather generators.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from hai_llm.kernels.policy import debug_checks

from .a2a_wire import _count, _Group, _inverse, _offsets, _pack, _run_values, _runs, _Stage, _unpack
from .transport import _TOKEN_BITS, PendingPlan, Transport, _all_groups, _Plan, count_communicator

@dataclass
class HierPlan(_Plan):
    # stage 1 (inter-node group: same local index on every node; member index = node)
    copy_splits: list[int]
    copy_recv_splits: list[int]
    row_slot: torch.Tensor  # [R1] slot of each stage-1 row, ordered (node, token, expert)
    row_splits: list[int]
    row_recv_splits: list[int]
    # forwarding rank: stage 2 (intra-node group; member index = local index)
    n_fwd_copies: int
    s2_order: torch.Tensor  # stage-2 send row i is received stage-1 row s2_order[i]
    s2_copy: torch.Tensor  # received copy of each stage-2 send row
    s2_splits: list[int]
    s2_recv_splits: list[int]

    def inter_copies_per_token(self) -> torch.Tensor:
        return self.remote_nodes_per_token()


class HierarchicalTransport(Transport):
    """DeepEP-style two-stage transport.

    Dispatch: a token goes ONCE to each node holding one of its experts, to the rank with the
    same local index as its source (inter-node group), together with the routing rows of that
    node's experts; the forwarding rank then sends one row per expert to the rank hosting it
    (intra-node group).  Combine mirrors it: expert rows return inside the node, the forwarding
    rank sums them (ascending expert) into one partial per (token, node), and only that partial
    crosses nodes back.  A token's own node is reached through a self-copy (no traffic).

    Groups are created with ``dist.new_group`` on EVERY rank of the world, for every EP group in
    ``all_ep_ranks`` in the same order, so the constructor must be called collectively.
    """

    kind = "hierarchical"

    def __init__(self, ep_group, ep_ranks, gpus_per_node, all_ep_ranks: Sequence[Sequence[int]] | None = None,
                 link=None, use_triton=None):
        super().__init__(ep_group, ep_ranks, gpus_per_node, link, use_triton)
        N = self.n_nodes
        if self.ep_size % N:
            raise ValueError(f"EP group {self.ep_ranks} spans {N} nodes unevenly (gpus_per_node="
                             f"{gpus_per_node}): the hierarchical transport needs equal ranks per node")
        L = self.ep_size // N
        self.ranks_per_node = L
        self.local = self.ep_rank % L
        all_ep_ranks = _all_groups(self.ep_ranks, all_ep_ranks)
        for g in all_ep_ranks:
            nodes = [r // gpus_per_node for r in g]
            ok = len(g) == self.ep_size and all(nodes[i] == nodes[(i // L) * L] for i in range(len(g))) \
                and len(set(nodes)) == N
            if not ok:
                raise ValueError(f"EP group {g} is not {N} node-contiguous blocks of {L} ranks "
                                 f"(gpus_per_node={gpus_per_node})")
        inter_pg = intra_pg = (None, None)
        for g in all_ep_ranks:  # identical order on every rank: payload group, then its count group
            for l in range(L):
                ranks = [g[n * L + l] for n in range(N)]
                pgs = (dist.new_group(ranks) if N > 1 else None, count_communicator(ranks))
                if g == self.ep_ranks and l == self.local:
                    inter_pg = pgs
            for n in range(N):
                ranks = g[n * L:(n + 1) * L]
                pgs = (dist.new_group(ranks) if L > 1 else None, count_communicator(ranks))
                if g == self.ep_ranks and n == self.node:
                    intra_pg = pgs
        inter_members = [n * L + self.local for n in range(N)]
        intra_members = [self.node * L + l for l in range(L)]
        self.inter = _Group(inter_pg[0], inter_members, self.node, self._kinds(inter_members), inter_pg[1])
        self.intra = _Group(intra_pg[0], intra_members, self.local, self._kinds(intra_members), intra_pg[1])

    def _begin(self, pend: PendingPlan, idx_TK: torch.Tensor) -> None:
        P, N, L, El, T, K = self.ep_size, self.n_nodes, self.ranks_per_node, pend.experts_per_rank, \
            pend.n_tokens, pend.topk
        dev = idx_TK.device
        expert = idx_TK.reshape(-1).long()
        token = torch.arange(T * K, device=dev) // K
        dest = expert // El  # EP rank hosting the expert; its node is dest // L (node-contiguous blocks)
        node = dest // L
        # stage-1 rows ordered (target node, token, expert): a (node, token) copy is a run of rows
        row_slot = torch.argsort((node * T + token) * pend.n_experts + expert)
        r_node, r_tok, r_exp = node[row_slot], token[row_slot], expert[row_slot]
        ckey = r_node * T + r_tok
        row_copy, first = _runs(ckey)
        copy_counts, row_counts = _count(r_node, N, first), _count(r_node, N)
        # per target node: [copies, rows, rows for each local rank there (its stage-2 splits)]
        fwd = _count(dest, P).view(N, L)
        rc, works = self._exchange(self.inter, torch.cat([copy_counts[:, None], row_counts[:, None], fwd], 1))
        rc = rc.view(N, 2 + L)
        # as forwarding rank: rows this rank sends to each local rank, then what each sends it
        self._wait_all(works)  # CUDA: the count stream waits (see _count_stream)
        s2_counts = rc[:, 2:].sum(0)
        s2_recv, works = self._exchange(self.intra, s2_counts.view(L, 1))
        pend.works += works
        pend.local.update(row_slot=row_slot, r_node=r_node, r_tok=r_tok, r_exp=r_exp, ckey=ckey,
                          row_copy=row_copy, copy_counts=copy_counts, row_counts=row_counts, rc=rc,
                          s2_counts=s2_counts, s2_recv=s2_recv)

    def _sizes(self, pend: PendingPlan) -> torch.Tensor:
        # [copy splits N | row splits N | copy recv N | row recv N | stage-2 splits L | recv L]
        loc = pend.local
        return torch.cat([loc["copy_counts"], loc["row_counts"], loc["rc"][:, 0], loc["rc"][:, 1],
                          loc["s2_counts"], loc["s2_recv"].view(-1)])

    def _end(self, pend: PendingPlan, sizes: list[int]) -> HierPlan:
        P, N, L, El, T = self.ep_size, self.n_nodes, self.ranks_per_node, pend.experts_per_rank, pend.n_tokens
        loc, dev = pend.local, pend.device
        cut = [0, N, 2 * N, 3 * N, 4 * N, 4 * N + L, 4 * N + 2 * L]
        copy_splits, row_splits, copy_recv_splits, row_recv_splits, s2_splits, s2_recv_splits = \
            (sizes[a:b] for a, b in zip(cut[:-1], cut[1:]))
        r_node, rc = loc["r_node"], loc["rc"]
        meta1 = torch.stack([loc["r_exp"], loc["row_copy"] - _offsets(loc["copy_counts"])[r_node],
                             loc["r_tok"]], 1)
        rmeta1, works = self._exchange(self.inter, meta1, row_splits, row_recv_splits)
        self._wait_all(works)
        # forwarding rank: route each received row to the rank hosting its expert
        src_node = torch.arange(N, device=dev).repeat_interleave(rc[:, 1], output_size=sum(row_recv_splits))
        fw_copy = _offsets(rc[:, 0])[src_node] + rmeta1[:, 1]
        src_rank = src_node * L + self.local
        e2, t2 = rmeta1[:, 0], rmeta1[:, 2]
        # ascending expert, so grouped by destination local rank: s2_splits rows each
        s2_order = torch.argsort(((e2 * P + src_rank) << _TOKEN_BITS) + t2)
        if debug_checks():  # the source-side stage-2 counts match the rows (a host read: debug only)
            dest = (e2 // El - self.node * L)
            if not torch.equal(_count(dest, L), loc["s2_counts"]):
                raise RuntimeError("hierarchical plan: stage-2 counts disagree with the forwarded rows")
        meta2 = torch.stack([e2 % El, src_rank, t2], 1)[s2_order]
        rmeta2, works = self._exchange(self.intra, meta2, s2_splits, s2_recv_splits)
        self._wait_all(works)
        recv_perm = torch.argsort(((rmeta2[:, 0] * P + rmeta2[:, 1]) << _TOKEN_BITS) + rmeta2[:, 2])
        keys = _run_values(loc["ckey"], loc["row_copy"], sum(copy_splits))
        copy_node, copy_token = (keys // T, keys % T) if T else (keys, keys)
        return HierPlan(n_tokens=T, topk=pend.topk, n_experts=pend.n_experts, experts_per_rank=El,
                        recv_perm=recv_perm, recv_inv=_inverse(recv_perm),
                        local_counts=_count(rmeta2[:, 0], El),
                        copy_token=copy_token, copy_node=copy_node, my_node=self.node,
                        copy_splits=copy_splits, copy_recv_splits=copy_recv_splits,
                        row_slot=loc["row_slot"], row_splits=row_splits, row_recv_splits=row_recv_splits,
                        n_fwd_copies=sum(copy_recv_splits), s2_order=s2_order, s2_copy=fw_copy[s2_order],
                        s2_splits=s2_splits, s2_recv_splits=s2_recv_splits)

    def _scatter(self, plan: HierPlan, x, slot_aux, quant_fp8, op):
        # stage 1: one copy per (token, target node) over the inter-node group
        packed, spec = _pack(self._gather_tokens(x, plan.copy_token, quant_fp8))
        st = _Stage(self, op)
        copies = st.a2a(self.inter, packed, plan.copy_splits, plan.copy_recv_splits, copies=True)
        aux1 = None
        if slot_aux is not None:
            aux1 = st.a2a(self.inter, slot_aux[plan.row_slot].contiguous(), plan.row_splits,
                          plan.row_recv_splits)
        yield st
        # stage 2: forward the received bytes (FP8 stays FP8) to the ranks hosting the experts
        fwd = [copies[plan.s2_copy]]
        if aux1 is not None:
            fwd.append(aux1[plan.s2_order].view(torch.uint8))
        st = _Stage(self, op)
        recv = st.a2a(self.intra, torch.cat(fwd, 1) if len(fwd) > 1 else fwd[0], plan.s2_splits,
                      plan.s2_recv_splits, copies=True)
        yield st
        if slot_aux is not None:
            spec = spec + [(slot_aux.dtype, slot_aux.shape[1])]
        return self._finish_rows(_unpack(recv, spec), plan.recv_perm, x.dtype, quant_fp8,
                                 slot_aux is not None)

    def _gather(self, plan: HierPlan, rows, row_aux, op):
        # stage 2 reversed: expert rows back to the forwarding rank of their (token, node)
        packed, spec = self._pack_received(plan, rows, row_aux)
        st = _Stage(self, op)
        back = st.a2a(self.intra, packed, plan.s2_recv_splits, plan.s2_splits, copies=True)
        yield st
        parts = _unpack(back, spec)
        # per-(token, node) partial sums, ascending expert, before crossing nodes
        partial = self._sum_rows(parts[0], plan.s2_copy, plan.n_fwd_copies)
        st = _Stage(self, op)
        copies = st.a2a(self.inter, partial, plan.copy_recv_splits, plan.copy_splits, copies=True)
        aux_back = None
        if row_aux is not None:
            aux1 = parts[1].new_empty(parts[1].shape)
            aux1[plan.s2_order] = parts[1]
            aux_back = st.a2a(self.inter, aux1, plan.row_recv_splits, plan.row_splits)
        yield st
        return self._token_outputs(plan, copies, aux_back)

    def _token_outputs(self, plan: HierPlan, copies, aux_back):
        """The combine's last step, shared with the symmetric transport: sum the (token, node)
        partials that came back into one row per token (ascending node, the canonical order), and
        put the returned per-slot aux values back in (token, k) order."""
        out = self._sum_rows(copies, plan.copy_token, plan.n_tokens)
        aux = None
        if aux_back is not None:
            aux = aux_back.new_zeros(plan.n_tokens * plan.topk, aux_back.shape[1])
            aux[plan.row_slot] = aux_back
        return out, aux
