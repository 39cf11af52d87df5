"""ZeRO-1: AdamW whose fp32 master weights and moments are sharded over the ranks that
hold the same parameters, with layout-independent checkpoints.

Why our own (docs/design.md): torch's ZeroRedundancyOptimizer shards whole parameters
over one group and knows nothing of experts, and DeepSpeed's stage 1 owns the training
loop and its process groups. Here every parameter belongs to a *reduce group*: dense
parameters to the dp x sp ranks of their pipeline stage, expert parameters (already
sliced by expert parallelism) to their expert-data-parallel replicas. Per reduce group
and weight-decay class, gradients are flattened into one bucket, reduce-scattered so that
each rank receives the summed gradient of its 1/W slice, scaled, clipped by the global
norm, stepped with AdamW, and the updated slices are all-gathered back into the params.

Gradient scale: the training loss is the mean over all dp*sp ranks of each rank's local
mean, so every gradient is (1/(dp*sp)) * sum over ranks of local gradients. For dense
params that sum runs over the dense group; for experts the all-to-all backward already
summed the contributions of every rank of the EP group into the expert's owner, and the
edp reduction sums the replicas: the factor is still 1/(dp*sp), NOT 1/edp (the "EP
gradients off by exactly ep x" bug, docs/expert_parallel.md).

Global gradient norm: every element of every bucket is owned by exactly one rank in its
reduce group, reduce groups of different experts or stages are disjoint, so the sum of
squares of the owned slices all-reduced over the world counts each parameter once. It stays
on the buckets' device (NCCL takes no CPU tensors) and is returned as a device tensor: the
trainer reads it back together with the loss, once per step.

Checkpoints: for parameter ``fqn`` the master weights and both moments are saved as 1-D
views of the parameter's *global* flattened tensor (experts: all E experts), each rank
contributing the range it owns, as ShardedTensors whose global metadata is computed
arithmetically (no collective). The saved form does not depend on dp, sp, ep or the
bucket layout, so a checkpoint loads under any other layout, or in one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from torch import nn

from hai_llm.optim.adamw import AdamW
from hai_llm.parallel.comm import all_gather_single, reduce_scatter_single


@dataclass
class ReduceSpec:
    """Where a parameter's gradient is reduced and how its slice sits in the global tensor."""
    group: object | None  # process group (None = this rank alone)
    ranks: list[int]  # global ranks of the reduce group, in group order
    grad_scale: float  # multiplies the summed gradient
    # experts: the rank's rows start at this offset along dim 0 of the global tensor;
    # ``ep_rank_offsets`` lists (reduce-group ranks, row offset) of every EP rank holding
    # a slice, so each rank can describe the whole global tensor's sharding
    row_offset: int = 0
    global_rows: int | None = None
    peer_slices: list[tuple[list[int], int]] = field(default_factory=list)


@dataclass
class _Bucket:
    spec: ReduceSpec
    decay: bool
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    shard: int  # elements per rank
    rank: int  # index of this rank in spec.ranks
    master: torch.Tensor  # fp32 [shard], a leaf the inner AdamW steps

    @property
    def world(self) -> int:
        return len(self.spec.ranks)


class ZeroOptimizer:
    """AdamW over ZeRO-1 shards. ``specs(name, param) -> ReduceSpec`` assigns every
    parameter to its reduce group (``None`` for a single-process run)."""

    def __init__(self, model: nn.Module, lr: float, betas, eps: float, weight_decay: float,
                 moments_dtype: torch.dtype, spec_of=None, world_group=None, chunk: int = 1 << 22):
        self.model = model
        self.world_group = world_group
        self.chunk = chunk  # elements per slice of the norm's float64 copies and of AdamW's scratch
        spec_of = spec_of or (lambda n, p: ReduceSpec(group=None, ranks=[0], grad_scale=1.0))
        keyed: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
        specs: dict[tuple, ReduceSpec] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            spec = spec_of(name, p)
            key = (tuple(spec.ranks), spec.grad_scale, p.ndim >= 2, spec.global_rows is not None)
            keyed.setdefault(key, []).append((name, p))
            specs[key] = spec
        self.buckets: list[_Bucket] = []
        for key, items in keyed.items():
            spec = specs[key]
            names = [n for n, _ in items]
            params = [p for _, p in items]
            offsets, total = [], 0
            for p in params:
                offsets.append(total)
                total += p.numel()
            W = len(spec.ranks)
            shard = -(-total // W)
            me = spec.ranks.index(dist.get_rank()) if spec.group is not None else 0
            # the fp32 master shard: elements [me * shard, (me + 1) * shard) of the bucket,
            # copied straight from the parameters that overlap it (no full-size flat copy)
            lo_me = me * shard
            master = torch.zeros(shard, dtype=torch.float32, device=params[0].device)
            for p, o in zip(params, offsets):
                lo, hi = max(o, lo_me), min(o + p.numel(), lo_me + shard)
                if lo < hi:
                    master[lo - lo_me:hi - lo_me] = p.detach().reshape(-1)[lo - o:hi - o]
            self.buckets.append(_Bucket(spec, key[2], names, params, offsets, total, shard, me, master))
        groups = [{"params": [b.master], "weight_decay": weight_decay if b.decay else 0.0} for b in self.buckets]
        self.inner = AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                           moments_dtype=moments_dtype, chunk=chunk)
        self.device = self.buckets[0].master.device if self.buckets else torch.device("cpu")

    # -- torch.optim-like surface --------------------------------------------------------
    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)
        for b in self.buckets:
            b.master.grad = None

    # -- the step, in three phases so the trainer can decide in between ---------------------
    def reduce_gradients(self) -> torch.Tensor:
        """Reduce-scatter every bucket's gradient into ``master.grad``; returns the global
        gradient norm (over all ranks, each element counted once) as a float64 0-dim tensor on
        the buckets' device. No host read here: the trainer reads it together with the loss,
        once per step.

        Memory per bucket: the full-size fp32 input of the reduce-scatter (written once, no
        zero-fill of what the gradients overwrite) and the shard-sized result, both transient:
        freed when the step is over, so the caching allocator hands the same blocks to the next
        step's activations instead of holding them through forward and backward. The squared
        norm is summed in float64 over ``chunk``-element slices (the float64 copy is
        chunk-sized, not 8 bytes per shard element); one slice (shards up to ``chunk``
        elements) is exactly the former whole-shard expression."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in self.buckets:
            flat = torch.empty(b.shard * b.world, dtype=torch.float32, device=b.master.device)
            for p, o in zip(b.params, b.offsets):
                dst = flat[o:o + p.numel()]
                if p.grad is not None:
                    dst.view(p.shape).copy_(p.grad.detach())
                else:
                    dst.zero_()
            flat[b.numel:].zero_()  # padding up to world * shard
            if b.spec.group is not None and b.world > 1:
                g = torch.empty(b.shard, dtype=torch.float32, device=flat.device)
                reduce_scatter_single(g, flat, op=dist.ReduceOp.SUM, group=b.spec.group)
                del flat
            else:
                g = flat
            g.mul_(b.spec.grad_scale)
            b.master.grad = g
            sq += _sum_sq(g, self.chunk)
        if self.world_group is not None:
            dist.all_reduce(sq, group=self.world_group)
        return sq.sqrt()

    def clip(self, norm: float, max_norm: float) -> None:
        """Scale the gradients by ``max_norm / (norm + 1e-6)`` when ``norm`` (the host value of
        ``reduce_gradients``' result) exceeds ``max_norm``."""
        norm = float(norm)
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for b in self.buckets:
                b.master.grad.mul_(scale)

    def step(self) -> None:
        self.inner.step()
        self.broadcast_params()

    @torch.no_grad()
    def broadcast_params(self) -> None:
        """All-gather the updated shards and write them into the model's parameters."""
        for b in self.buckets:
            if b.spec.group is not None and b.world > 1:
                full = torch.empty(b.shard * b.world, dtype=torch.float32, device=b.master.device)
                all_gather_single(full, b.master.detach(), group=b.spec.group)
            else:
                full = b.master.detach()
            for p, o in zip(b.params, b.offsets):
                p.copy_(full[o:o + p.numel()].view_as(p))

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state: fp32 master shards and both moments."""
        total = 0
        for b in self.buckets:
            for t in self._state_tensors(b).values():
                total += t.numel() * t.element_size()
        return total

    @torch.no_grad()
    def gather_full_grads(self) -> dict[str, torch.Tensor]:
        """{param name: its full reduced gradient (this rank's slice for experts)}, from
        the shards left by ``reduce_gradients`` (for tests and debugging: it all-gathers)."""
        out = {}
        for b in self.buckets:
            if b.spec.group is not None and b.world > 1:
                full = torch.empty(b.shard * b.world, dtype=torch.float32, device=b.master.device)
                all_gather_single(full, b.master.grad.contiguous(), group=b.spec.group)
            else:
                full = b.master.grad
            for n, p, o in zip(b.names, b.params, b.offsets):
                out[n] = full[o:o + p.numel()].view_as(p).clone()
        return out

    def expert_row_offsets(self) -> dict[str, tuple[int, int]]:
        """{expert param name: (row offset, global rows)} for stitching EP slices."""
        return {n: (b.spec.row_offset, b.spec.global_rows) for b in self.buckets if b.spec.global_rows is not None
                for n in b.names}

    # -- checkpoint ------------------------------------------------------------------------
    def _state_tensors(self, b: _Bucket) -> dict[str, torch.Tensor]:
        st = self.inner.state.get(b.master, {})
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(b.master, dtype=self.inner.moments_dtype)
            st["exp_avg_sq"] = torch.zeros_like(b.master, dtype=self.inner.moments_dtype)
            st["step"] = torch.zeros((), dtype=torch.float32, device="cpu")  # host-side, as AdamW's
            self.inner.state[b.master] = st
        return {"master": b.master, "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}

    def sharded_state(self) -> dict:
        """{"<kind>.<fqn>": 1-D tensor view of the owned range} plus the step count, in a
        form ``hai_llm.checkpoint.zero_state`` turns into DCP-ready sharded tensors."""
        out = {}
        for b in self.buckets:
            tensors = self._state_tensors(b)
            for piece in owned_pieces(b):
                for kind, t in tensors.items():
                    out[f"{kind}.{piece.name}"] = (t[piece.bucket_lo:piece.bucket_hi], piece)
        steps = [float(st["step"]) for st in self.inner.state.values() if "step" in st]
        out["step"] = max(steps) if steps else 0.0
        return out

    def set_step(self, step: float) -> None:
        for b in self.buckets:
            self._state_tensors(b)
            self.inner.state[b.master]["step"].fill_(step)


def _sum_sq(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum(x.double() ** 2) as a float64 0-dim tensor, ``chunk`` elements at a time (one float64
    slice copy alive at once); a single slice is the whole-tensor expression itself."""
    if x.numel() <= chunk:
        return x.double().pow_(2).sum()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for part in x.split(chunk):
        total += part.double().pow_(2).sum()
    return total


# ------------------------------------------------------------------ ownership of global ranges
@dataclass
class ShardPiece:
    """One parameter's part of a bucket shard, in bucket, global and parameter coordinates."""

    name: str
    bucket_lo: int  # range inside this rank's master shard
    bucket_hi: int
    global_lo: int  # range inside the parameter's global flattened tensor
    global_hi: int
    global_numel: int
    param_lo: int  # range inside the local parameter, flattened
    param_hi: int


def _elems_per_row(p: torch.Tensor) -> int:
    return p.numel() // p.shape[0] if p.ndim else 1


def _pieces_for(b, j: int, row_offset: int) -> list[ShardPiece]:
    """Pieces owned by reduce-group member j of bucket b, for the slice at row_offset."""
    lo_j, hi_j = j * b.shard, (j + 1) * b.shard
    out = []
    for name, p, o in zip(b.names, b.params, b.offsets):
        lo, hi = max(o, lo_j), min(o + p.numel(), hi_j)
        if lo >= hi:
            continue
        epr = _elems_per_row(p)
        rows = b.spec.global_rows or (p.shape[0] if p.ndim else 1)
        base = row_offset * epr
        out.append(ShardPiece(name, lo - lo_j, hi - lo_j, base + lo - o, base + hi - o,
                              rows * epr if p.ndim else 1, lo - o, hi - o))
    return out


def owned_pieces(b) -> list[ShardPiece]:
    """The pieces of bucket ``b`` this rank owns (its reduce-scattered slice)."""
    return _pieces_for(b, b.rank, b.spec.row_offset)


def global_layout(b) -> dict[str, list[tuple[int, int, int]]]:
    """fqn -> [(global_lo, global_hi, owner_global_rank)] over every rank holding it."""
    peers = b.spec.peer_slices or [(b.spec.ranks, b.spec.row_offset)]
    out: dict[str, list[tuple[int, int, int]]] = {}
    for ranks, row_offset in peers:
        for j, r in enumerate(ranks):
            for pc in _pieces_for(b, j, row_offset):
                out.setdefault(pc.name, []).append((pc.global_lo, pc.global_hi, r))
    return out
