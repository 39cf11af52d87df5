"""The wire layer under the expert-parallel transports: link emulation, traffic accounting,
asynchronous all-to-all stages and the handles that wait for them, and the small on-device
index helpers the plans are built from.

Kept apart from the transports (``transport.py``, ``transport_hierarchical.py``) because it
knows nothing about routing: a ``_Stage`` is one all-to-all over a ``_Group`` with byte counts
split into local / intra-node / inter-node traffic; a ``CommHandle`` drives a transport's
generator of stages and, with a ``LinkModel``, does not return before the modeled transfer
time. Every helper here is device-side (no host reads) unless its docstring says otherwise.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Sequence

import torch
import torch.distributed as dist

from hai_llm.kernels.policy import debug_checks

if TYPE_CHECKING:  # pragma: no cover
    from .transport import Transport

LOCAL, INTRA, INTER = "local", "intra", "inter"  # where a message goes: same rank, same node, other node

# ------------------------------------------------------------------------------ link model
@dataclass(frozen=True)
class LinkModel:
    """Emulated links for simulated ranks.

    ``intra_gbps`` / ``inter_gbps`` are per-GPU bandwidths in GB/s (1e9 bytes/s): NVLink ~160,
    InfiniBand ~50 on H800 (docs/deepseek_v3.md#cluster-and-layout).  One exchange stage costs
    ``latency + max(intra_bytes / intra_bw, inter_bytes / inter_bw)`` (both links run
    concurrently), where the bytes of a class are max(sent, received) by this rank; a dispatch or
    combine costs the sum of its stages (flat: 1, hierarchical: 2, not chunk-pipelined).
    ``wait()`` returns no earlier than ``time_scale * cost`` seconds after the issue: the real
    delay is ``delay_s = (bytes / bw + latency) * time_scale`` (time_scale 1 = real time of the
    modeled hardware; larger values make the tiny CPU payloads visible).
    """

    intra_gbps: float = 160.0
    inter_gbps: float = 50.0
    latency_us: float = 5.0
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        for f in ("intra_gbps", "inter_gbps"):
            if not getattr(self, f) > 0:
                raise ValueError(f"LinkModel.{f} must be > 0, got {getattr(self, f)}")
        if self.latency_us < 0 or self.time_scale < 0:
            raise ValueError("LinkModel.latency_us and time_scale must be >= 0")

    def stage_seconds(self, intra_bytes: float, inter_bytes: float) -> float:
        """Unscaled modeled time of one exchange stage."""
        return self.latency_us * 1e-6 + max(intra_bytes / (self.intra_gbps * 1e9),
                                            inter_bytes / (self.inter_gbps * 1e9))


# ------------------------------------------------------------------------------ statistics
STAT_FIELDS = ("calls", "tokens", "intra_bytes", "inter_bytes", "local_bytes", "intra_copies",
               "inter_copies", "modeled_s")


class CommStats:
    """Cumulative traffic per operation ("dispatch", "combine", "dispatch_bwd", "combine_bwd",
    "meta"): bytes SENT by this rank within its node / across nodes / to itself (not moved),
    token copies (rows of hidden-size payload) sent within / across nodes, source tokens, calls
    and the modeled link time (seconds, unscaled; 0 without a LinkModel)."""

    def __init__(self) -> None:
        self.ops: dict[str, dict[str, float]] = {}

    def reset(self) -> None:
        self.ops = {}

    def add(self, op: str, **values: float) -> None:
        row = self.ops.setdefault(op, dict.fromkeys(STAT_FIELDS, 0))
        for k, v in values.items():
            row[k] += v

    def __getitem__(self, op: str) -> dict[str, float]:
        return dict(self.ops.get(op, dict.fromkeys(STAT_FIELDS, 0)))

    def total(self, field: str, ops: Sequence[str] | None = None) -> float:
        return sum(row[field] for op, row in self.ops.items() if ops is None or op in ops)

    def per_token(self, op: str) -> dict[str, float]:
        row = self[op]
        n = max(row["tokens"], 1)
        return {k: row[k] / n for k in ("intra_bytes", "inter_bytes", "intra_copies", "inter_copies")}

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {op: dict(row) for op, row in self.ops.items()}


# ------------------------------------------------------------------------------ helpers
@dataclass
class _Group:
    """A communicator of the transport: ``members`` are EP ranks in group order, ``kinds``
    says how each member is reached from this rank.  ``pg`` carries payloads, ``count_pg`` (a
    second group over the same ranks) the plan's counts and metadata.  Both are None for a
    one-member group (the exchange is a local copy)."""

    pg: Any
    members: list[int]
    index: int
    kinds: list[str]
    count_pg: Any = None


def _pack(parts: Sequence[torch.Tensor]):
    """Concatenate 2-D tensors of equal row count, byte-wise, into one uint8 [R, bytes]."""
    views = [p.contiguous().view(torch.uint8) for p in parts]
    spec = [(p.dtype, p.shape[1]) for p in parts]
    return (torch.cat(views, 1) if len(views) > 1 else views[0]), spec


def _unpack(buf: torch.Tensor, spec) -> list[torch.Tensor]:
    out, c = [], 0
    for dtype, n in spec:
        nb = n * dtype.itemsize
        out.append(buf[:, c:c + nb].contiguous().view(dtype))
        c += nb
    return out


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


def _count(index: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [n]: sum of ``weights`` (default 1) per value of ``index`` in [0, n).  A
    ``scatter_add_`` into a fixed-size buffer: ``bincount`` would read the maximum on the host."""
    w = torch.ones_like(index, dtype=torch.long) if weights is None else weights.long()
    return torch.zeros(n, dtype=torch.long, device=index.device).scatter_add_(0, index.long(), w)


def _runs(sorted_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``unique(..., return_inverse=True)`` of ascending keys without its host read: (run index
    of each key [n], first-of-its-run flags [n]).  The number of runs is ``first.sum()``, read
    with the plan's other sizes; the unique keys are then ``_run_values``."""
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return torch.cumsum(first, 0) - 1, first


def _run_values(keys: torch.Tensor, run: torch.Tensor, n_runs: int) -> torch.Tensor:
    """[n_runs] the key of each run (every key of a run is equal, so the scatter is exact)."""
    return keys.new_empty(n_runs).scatter_(0, run, keys)


def _check_expert_ids(idx_TK: torch.Tensor, n_experts: int) -> None:
    """Expert ids in [0, n_experts): a host read, so only under HAI_LLM_DEBUG_CHECKS=1."""
    if idx_TK.numel() and debug_checks():
        lo, hi = (int(v) for v in torch.aminmax(idx_TK))
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"expert ids must lie in [0, {n_experts}), got [{lo}, {hi}]: the router "
                             "produced ids outside model.n_routed_experts")


class _Stage:
    """Exchanges issued together; their bytes price one link-model stage."""

    def __init__(self, transport: "Transport", op: str):
        self.transport, self.op = transport, op
        self.works: list[Any] = []
        self.sent = {LOCAL: 0, INTRA: 0, INTER: 0}
        self.recv = {LOCAL: 0, INTRA: 0, INTER: 0}
        self.copies = {LOCAL: 0, INTRA: 0, INTER: 0}

    def a2a(self, group: _Group, send: torch.Tensor, send_splits: list[int], recv_splits: list[int],
            copies: bool = False, plan: bool = False) -> torch.Tensor:
        """Issue one all_to_all_single (``plan``: on the group's count communicator)."""
        recv = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
        row_bytes = math.prod(send.shape[1:]) * send.element_size()
        for j, kind in enumerate(group.kinds):
            self.sent[kind] += send_splits[j] * row_bytes
            self.recv[kind] += recv_splits[j] * row_bytes
            if copies:
                self.copies[kind] += send_splits[j]
        pg = group.count_pg if plan else group.pg
        if pg is None:
            recv.copy_(send)
        else:
            self.works.append(dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits,
                                                     group=pg, async_op=True))
        return recv

    def close(self) -> float:
        """Record the stage's traffic; return its modeled (unscaled) time."""
        link = self.transport.link
        modeled = 0.0
        if link is not None:
            modeled = link.stage_seconds(max(self.sent[INTRA], self.recv[INTRA]),
                                         max(self.sent[INTER], self.recv[INTER]))
        self.transport.stats.add(self.op, intra_bytes=self.sent[INTRA], inter_bytes=self.sent[INTER],
                                 local_bytes=self.sent[LOCAL], intra_copies=self.copies[INTRA],
                                 inter_copies=self.copies[INTER], modeled_s=modeled)
        return modeled

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []


class CommHandle:
    """An in-flight dispatch/combine.  ``wait()`` returns its result (idempotent).

    The first stage is issued on construction; later stages (hierarchical: the intra-node
    forward) are issued inside ``wait()`` once their input has arrived.  With a LinkModel,
    ``wait()`` sleeps until ``issued_at + delay_s`` where ``delay_s = time_scale * modeled_s``,
    so compute done between the issue and the wait hides the emulated transfer.
    """

    def __init__(self, transport: "Transport", gen: Generator):
        self.transport = transport
        self.issued_at = time.perf_counter()
        self.modeled_s = 0.0
        self._gen = gen
        self._done = False
        self._result = None
        self._stage = self._advance(None)

    def _advance(self, _):
        try:
            stage = next(self._gen)
        except StopIteration as stop:
            self._result, self._done = stop.value, True
            return None
        self.modeled_s += stage.close()
        return stage

    @property
    def delay_s(self) -> float:
        link = self.transport.link
        return 0.0 if link is None else link.time_scale * self.modeled_s

    def wait(self):
        while not self._done:
            self._stage.wait()
            self._stage = self._advance(None)
        self._gen = None
        remaining = self.issued_at + self.delay_s - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return self._result
