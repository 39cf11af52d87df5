"""Check that every rank issues its collectives in the same order: the hang detector.

A collective only completes when every member of its group issues it, with the same shape
and dtype, in the same position of that group's sequence; point-to-point messages are
matched per (sender, receiver) pair in posting order (NCCL has no tags). Overlap code
(DualPipe, the MoE all-to-all, ZeRO bucketing) makes it easy to issue them in a
rank-dependent order, which hangs only at scale (docs/deepseek_v3.md#failure-modes). This module finds
those bugs from recorded traces, without running the job:

* ``CollectiveRecorder`` patches the ``torch.distributed`` collective and P2P functions so
  every call is recorded as a ``Record`` (issuing rank, op, the group's global ranks, tensor
  shapes, dtype, root / peer, split count) in issue order, and still executed: real on gloo or
  NCCL, a no-op under the fake backend. Calls that torch makes internally (e.g.
  ``reduce_scatter_tensor`` -> ``reduce_scatter_single``) are recorded once, at the outermost
  call.
* ``check_consistent(traces)`` compares, for every group, the sequence each member issued on
  it (op, shapes, dtype, reduce op, root; for ``all_to_all_single`` only op, dtype, split
  count and row shape, since per-rank row counts legitimately differ) and, for every P2P link
  src -> dst, the sends of src against the receives dst posts from src. It returns a
  ``ConsistencyReport`` or raises ``CollectiveMismatch`` naming the first mismatch: group,
  position in that group's sequence, rank A's op vs rank B's op.

Without processes
-----------------
Under torch's fake process group (``init_process_group("fake", store=FakeStore(), rank=r,
world_size=W)``) every collective returns at once, so one process can run rank 0's program,
tear the group down, run rank 1's, and so on: ``simulate_ranks(fn, W)`` does exactly that and
returns the traces, and a deliberately inconsistent program is reported instead of hanging.
The planner uses it to check a whole layout's step with real shapes on meta tensors
(``hai_llm.planner.collectives``).

Always on: the flight recorder
------------------------------
``CollectiveRing`` is the same recorder with a bounded memory: the last ``capacity``
collectives of this process, each with its sequence number, and the one it is blocked in
right now (with since when). Every rank of a real run keeps one (``hai_llm.parallel.spawn``
for simulated ranks, ``hai_llm.launch.ranks`` under torchrun); ``hai_llm.parallel.watchdog``
prints it when a collective times out, so the rank that issued something else, or nothing,
is visible at once. A ``CollectiveRecorder`` may be entered while a ring is active (it
stacks on top; each records a call once, at its own outermost call); the reverse is not
needed and refused like two recorders.

This is the project's one patch of a library, entered and left like a context manager; torch's
own flight recorder cannot replace it on gloo (no P2P entries, no completion times) or on the
fake backend (no entries), docs/design.md ("The one sanctioned wrapper of torch.distributed").

Limits: functions bound before patching (``from torch.distributed import all_reduce``; our
own code looks them up at call time, see ``hai_llm.parallel.comm``) and functional
collectives (``torch.distributed._functional_collectives``, used by DTensor) are not seen. Groups are identified by their rank tuples, so two communicators over the same
ranks (``build_mesh`` keeps ``ep`` separate from ``dp_sp`` even when they coincide) are
checked as one ordered sequence: stricter than NCCL needs, never laxer.
"""
from __future__ import annotations

import collections
import inspect
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# op -> how to read its arguments. tensors: argument names whose tensors (or lists of tensors)
# are recorded; root: (global-rank arg, group-rank arg); reduce: name of the ReduceOp argument.
_SPECS: dict[str, dict[str, Any]] = {
    "all_reduce": {"tensors": ("tensor",), "reduce": "op"},
    "all_gather_single": {"tensors": ("output_tensor", "input_tensor")},
    "all_gather_into_tensor": {"tensors": ("output_tensor", "input_tensor")},
    "reduce_scatter_single": {"tensors": ("output", "input"), "reduce": "op"},
    "reduce_scatter_tensor": {"tensors": ("output", "input"), "reduce": "op"},
    "all_to_all_single": {"tensors": ("output", "input"), "splits": ("output_split_sizes", "input_split_sizes")},
    "all_to_all": {"tensors": ("output_tensor_list", "input_tensor_list")},
    "all_gather": {"tensors": ("tensor_list", "tensor")},
    "reduce_scatter": {"tensors": ("output", "input_list"), "reduce": "op"},
    "all_reduce_coalesced": {"tensors": ("tensors",), "reduce": "op"},
    "all_gather_coalesced": {"tensors": ("output_tensor_lists", "input_tensor_list")},
    "broadcast": {"tensors": ("tensor",), "root": ("src", "group_src")},
    "reduce": {"tensors": ("tensor",), "root": ("dst", "group_dst"), "reduce": "op"},
    "gather": {"tensors": ("tensor",), "root": ("dst", "group_dst")},
    "scatter": {"tensors": ("tensor",), "root": ("src", "group_src")},
    "barrier": {"tensors": ()},
    "monitored_barrier": {"tensors": ()},
    "all_gather_object": {"objects": "object_list"},
    "broadcast_object_list": {"objects": "object_list", "root": ("src", "group_src")},
    "gather_object": {"objects": None, "root": ("dst", "group_dst")},
    "scatter_object_list": {"objects": "scatter_object_output_list", "root": ("src", "group_src")},
    "send": {"tensors": ("tensor",), "p2p": "send", "root": ("dst", "group_dst")},
    "isend": {"tensors": ("tensor",), "p2p": "send", "root": ("dst", "group_dst")},
    "recv": {"tensors": ("tensor",), "p2p": "recv", "root": ("src", "group_src")},
    "irecv": {"tensors": ("tensor",), "p2p": "recv", "root": ("src", "group_src")},
    "send_object_list": {"objects": "object_list", "p2p": "send", "root": ("dst", "group_dst")},
    "recv_object_list": {"objects": "object_list", "p2p": "recv", "root": ("src", "group_src")},
}
# names that are the same collective on the wire
_KIND = {"all_gather_into_tensor": "all_gather_single", "reduce_scatter_tensor": "reduce_scatter_single",
         "monitored_barrier": "barrier", "isend": "send", "irecv": "recv",
         "send_object_list": "send", "recv_object_list": "recv"}
_ROOTED = {"broadcast", "reduce", "gather", "scatter", "broadcast_object_list", "gather_object",
           "scatter_object_list"}


@dataclass(frozen=True)
class Record:
    """One collective or P2P call as issued by one rank."""

    rank: int  # global rank that issued it
    index: int  # position in that rank's trace
    op: str  # the torch.distributed function called
    group: tuple[int, ...]  # global ranks of the group (the whole world for group=None)
    shapes: tuple[tuple[int, ...], ...] = ()
    dtype: str | None = None
    peer: int | None = None  # P2P peer or collective root, as a global rank
    splits: int | None = None  # all_to_all_single: number of split entries (None: equal split)
    reduce_op: str | None = None
    count: int | None = None  # object collectives: list length
    batched: bool = False  # issued through batch_isend_irecv
    devices: tuple[str, ...] = ()  # device of each tensor argument (NCCL takes only the rank's GPU)

    @property
    def kind(self) -> str:
        return _KIND.get(self.op, self.op)

    @property
    def is_p2p(self) -> bool:
        return self.kind in ("send", "recv")

    def signature(self) -> tuple:
        """What every member of the group must agree on for this position."""
        k = self.kind
        if k == "all_to_all_single":  # row counts differ per rank; row shape and split count may not
            return (k, self.dtype, self.splits, tuple(s[1:] for s in self.shapes))
        if k == "all_to_all":
            return (k, self.dtype, len(self.shapes), tuple(s[1:] for s in self.shapes))
        if k in ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list"):
            return (k, self.peer)
        if k in ("gather", "scatter"):  # only the root passes the list
            return (k, self.shapes[:1], self.dtype, self.peer)
        if k in ("send", "recv"):
            return (self.shapes, self.dtype, self.count)
        return (k, self.shapes, self.dtype, self.reduce_op, self.peer)

    def describe(self) -> str:
        bits = []
        if self.shapes:
            bits.append(", ".join(str(tuple(s)) for s in self.shapes))
        if self.dtype:
            bits.append(self.dtype.replace("torch.", ""))
        if self.splits is not None:
            bits.append(f"{self.splits} splits")
        if self.reduce_op:
            bits.append(self.reduce_op)
        if self.count is not None:
            bits.append(f"{self.count} objects")
        if self.peer is not None:
            bits.append(("to " if self.kind == "send" else "from " if self.kind == "recv" else "root ")
                        + str(self.peer))
        return f"{self.op}({'; '.join(bits)}) [rank {self.rank} op #{self.index}]"


class CollectiveRecorder:
    """Context manager recording every ``torch.distributed`` collective and P2P call.

    ``traces[rank]`` is the list of ``Record`` issued by global rank ``rank`` (the rank at call
    time, so one recorder can follow several fake ranks simulated one after another). The
    calls still execute. Only one recorder can be active at a time.
    """

    def __init__(self) -> None:
        self.traces: dict[int, list[Record]] = {}
        self._saved: list[tuple[Any, str, Any]] = []
        self._group_ranks: dict[Any, tuple[int, ...]] = {}
        self._issued: dict[int, int] = {}  # rank -> records issued so far (the next index)
        self._red_names: dict[Any, str] = {}  # ReduceOp -> its name (str() of one is slow)
        # per recorder and thread: >0 inside a call this recorder already recorded (torch's
        # own nested calls are not recorded again; a stacked recorder keeps its own count)
        self._guard = threading.local()

    def _new_trace(self) -> list[Record]:
        return []

    def _red_name(self, op) -> str:
        try:
            name = self._red_names.get(op)
        except TypeError:  # unhashable (a premul-sum op)
            return _red_name(op)
        if name is None:
            name = self._red_names[op] = _red_name(op)
        return name

    def _started(self, rec: Record) -> None:
        """Called right before the recorded call runs (the ring notes it as in flight)."""

    def _finished(self, rec: Record, failed: bool) -> None:
        """Called when the recorded call returned (``failed`` False) or raised."""

    # -- patching ---------------------------------------------------------------------
    def __enter__(self) -> "CollectiveRecorder":
        # the patched torch.distributed itself says whether a recorder is active (no registry);
        # a recorder may stack on a flight-recorder ring, nothing else stacks
        active = {getattr(getattr(dist, n, None), "_collective_recorder", None) for n in _SPECS} - {None}
        if active and (isinstance(self, CollectiveRing) or not all(isinstance(a, CollectiveRing) for a in active)):
            raise RuntimeError("a CollectiveRecorder is already active")
        originals = {}
        for name in list(_SPECS) + ["batch_isend_irecv"]:
            orig = getattr(c10d, name, None)
            if orig is None:
                continue
            originals[name] = orig
            wrapper = self._wrap_batch(orig) if name == "batch_isend_irecv" else self._wrap(name, orig)
            wrapper._collective_recorder = self
            for mod in (c10d, dist):
                if getattr(mod, name, None) is orig:
                    self._saved.append((mod, name, orig))
                    setattr(mod, name, wrapper)
        self._originals = originals
        return self

    def __exit__(self, *exc) -> None:
        for mod, name, orig in reversed(self._saved):
            setattr(mod, name, orig)
        self._saved.clear()

    def _wrap(self, name: str, orig: Callable) -> Callable:
        bind = _binder(inspect.signature(orig))
        spec = _SPECS[name]
        guard = self._guard

        def wrapper(*args, **kwargs):
            if getattr(guard, "depth", 0):
                return orig(*args, **kwargs)
            guard.depth = 1
            rec = None
            try:
                arguments = bind(args, kwargs)
                if arguments is not None:  # else let torch raise its own error
                    rec = self._record(name, spec, arguments)
                out = orig(*args, **kwargs)
            except BaseException:
                if rec is not None:
                    self._finished(rec, failed=True)
                raise
            finally:
                guard.depth = 0
            if rec is not None:
                self._finished(rec, failed=False)
            return out

        wrapper.__wrapped__ = orig
        wrapper.__name__ = name
        return wrapper

    def _wrap_batch(self, orig: Callable) -> Callable:
        guard = self._guard

        def batch_isend_irecv(p2p_op_list):
            if getattr(guard, "depth", 0):
                return orig(p2p_op_list)
            guard.depth = 1
            saved_ops = [p.op for p in p2p_op_list]
            try:
                send_fns = {self._originals["isend"], getattr(c10d, "isend")}
                for p in p2p_op_list:
                    is_send = p.op in send_fns or getattr(p.op, "__name__", "") in ("isend", "send")
                    self._record("isend" if is_send else "irecv", _SPECS["isend" if is_send else "irecv"],
                                 {"tensor": p.tensor, "group": p.group, "dst": p.peer, "src": p.peer,
                                  "group_dst": None, "group_src": None}, batched=True)
                    # run torch's own implementation with its own functions (it compares
                    # ``op.op is isend`` against the module globals)
                    p.op = self._originals["isend"] if is_send else self._originals["irecv"]
                patched = [(n, getattr(c10d, n)) for n in ("isend", "irecv")]
                for n, _ in patched:
                    setattr(c10d, n, self._originals[n])
                try:
                    return orig(p2p_op_list)
                finally:
                    for n, fn in patched:
                        setattr(c10d, n, fn)
            finally:
                for p, op in zip(p2p_op_list, saved_ops):
                    p.op = op
                guard.depth = 0

        batch_isend_irecv.__wrapped__ = orig
        return batch_isend_irecv

    # -- recording --------------------------------------------------------------------
    def _ranks_of(self, group) -> tuple[int, ...] | None:
        if group is None:
            group = c10d._get_default_group()
        if group is dist.GroupMember.NON_GROUP_MEMBER:
            return None
        if group not in self._group_ranks:
            self._group_ranks[group] = tuple(dist.get_process_group_ranks(group))
        return self._group_ranks[group]

    def _record(self, name: str, spec: dict, a: dict, batched: bool = False) -> Record | None:
        group = self._ranks_of(a.get("group"))
        if group is None:  # not a member: torch returns without communicating
            return None
        shapes: list[tuple[int, ...]] = []
        devices: list[str] = []
        dtype = None
        for arg in spec.get("tensors", ()):
            v = a.get(arg)
            items = v if isinstance(v, (list, tuple)) else [v]
            for t in items:
                if isinstance(t, (list, tuple)):  # list of lists (all_gather_coalesced)
                    items2 = t
                else:
                    items2 = [t]
                for tt in items2:
                    if isinstance(tt, torch.Tensor):
                        shapes.append(tuple(tt.shape))
                        devices.append(str(tt.device))
                        dtype = dtype or str(tt.dtype)
        peer = None
        if "root" in spec:
            g_arg, grp_arg = spec["root"]
            if a.get(g_arg) is not None:
                peer = int(a[g_arg])
            elif a.get(grp_arg) is not None:
                peer = group[int(a[grp_arg])]
        splits = None
        if "splits" in spec:
            out_s, in_s = (a.get(n) for n in spec["splits"])
            lens = {len(s) for s in (out_s, in_s) if s is not None}
            splits = max(lens) if lens else None
        count = None
        obj = spec.get("objects")
        if obj and isinstance(a.get(obj), (list, tuple)):
            count = len(a[obj])
        red = a.get(spec["reduce"]) if "reduce" in spec else None
        rank = dist.get_rank()
        trace = self.traces.get(rank)
        if trace is None:
            trace = self.traces[rank] = self._new_trace()
        index = self._issued.get(rank, 0)
        self._issued[rank] = index + 1
        rec = Record(rank=rank, index=index, op=name, group=group, shapes=tuple(shapes), dtype=dtype, peer=peer,
                     splits=splits, reduce_op=None if red is None else self._red_name(red), count=count,
                     batched=batched, devices=tuple(devices))
        trace.append(rec)
        self._started(rec)
        return rec


class CollectiveRing(CollectiveRecorder):
    """The flight recorder: the last ``capacity`` collectives this process issued (``last()``,
    oldest first, ``Record.index`` = sequence number since the ring was entered) and the call
    it is inside right now (``in_flight()``: the record and how long it has been running).

    Cheap enough to stay on for a whole run: one bounded deque append and two clock reads per
    collective, next to a network operation. Calls that return at once (``async_op=True``,
    ``isend``/``irecv``) are in flight only while torch posts them; a hang shows up at the
    ``wait()`` or at the next blocking collective, which the ring names.
    """

    def __init__(self, capacity: int = 32) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"CollectiveRing capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._current: tuple[Record, float] | None = None  # (record, monotonic start); main thread's
        self._failed: tuple[Record, float] | None = None  # the last call that raised, after how long

    def _new_trace(self) -> collections.deque:
        return collections.deque(maxlen=self.capacity)

    def _started(self, rec: Record) -> None:
        self._current = (rec, time.monotonic())

    def _finished(self, rec: Record, failed: bool) -> None:
        cur = self._current
        if cur is not None and cur[0] is rec:
            self._current = None
            if failed:
                self._failed = (rec, time.monotonic() - cur[1])

    def last(self) -> list[Record]:
        """The recorded collectives of this process, oldest first (at most ``capacity``)."""
        return [r for trace in list(self.traces.values()) for r in list(trace)]

    def in_flight(self) -> tuple[Record, float] | None:
        """(the call this process is blocked in, seconds since it started), or None."""
        cur = self._current
        return None if cur is None else (cur[0], time.monotonic() - cur[1])

    def report(self, rank: int | None = None, n: int = 8) -> str:
        """A few lines for a human: this rank's last ``n`` collectives, the blocked one marked."""
        recs = self.last()[-n:]
        cur = self.in_flight()
        who = f"rank {rank}" if rank is not None else "this process"
        if not recs:
            return f"{who}: issued no collective yet"
        lines = [f"{who}: last {len(recs)} collectives (oldest first; #sequence op(shapes; dtype; ...) on group):"]
        for r in recs:
            mark = ""
            if cur is not None and cur[0] is r:
                mark = f"   <-- blocked here for {cur[1]:.1f} s"
            elif self._failed is not None and self._failed[0] is r:
                mark = f"   <-- failed here after {self._failed[1]:.1f} s"
            lines.append(f"  #{r.index} {r.describe().rsplit(' [', 1)[0]} on group {_short(r.group)}{mark}")
        return "\n".join(lines)


def _binder(sig: inspect.Signature) -> Callable[[tuple, dict], dict | None]:
    """``bind(args, kwargs)`` -> {parameter: value} with defaults applied, or None when the
    call does not fit the signature. The usual case (plain parameters, no ``*args``) is a
    dict built from precomputed names, several times cheaper than ``Signature.bind`` plus
    ``apply_defaults``, which matters for a recorder that stays on for a whole run."""
    params = list(sig.parameters.values())
    plain = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    required = {p.name for p in params if p.default is p.empty}

    def slow(args: tuple, kwargs: dict) -> dict | None:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        return bound.arguments

    def fast(args: tuple, kwargs: dict) -> dict | None:
        if len(args) > len(positional):
            return None
        a = dict(defaults)
        a.update(zip(positional, args))
        for k, v in kwargs.items():
            if k not in sig.parameters or k in positional[:len(args)]:
                return None
            a[k] = v
        return a if required <= a.keys() else None

    return fast if plain else slow


def _red_name(op) -> str:
    s = str(op)
    return s.split(".")[-1] if "." in s else s


# ------------------------------------------------------------------------- checking
@dataclass
class Mismatch:
    kind: str  # "collective" | "p2p"
    group: tuple[int, ...]  # the group (collective) or (src, dst) (p2p)
    position: int  # index in the group's / link's sequence
    rank_a: int
    rank_b: int
    op_a: Record | None
    op_b: Record | None
    comm: tuple[int, ...] | None = None  # p2p: the communicator's ranks

    @property
    def issue_index(self) -> int:
        idx = [r.index for r in (self.op_a, self.op_b) if r is not None]
        return min(idx) if idx else 0

    def __str__(self) -> str:
        if self.kind == "p2p" and self.op_a is not None and self.op_a.peer is None:
            return (f"rank {self.rank_a} posted {self.op_a.describe()} from ANY source: it cannot be "
                    f"matched to a sender statically (and NCCL has no wildcard receive)")
        a = self.op_a.describe() if self.op_a else "nothing (its sequence ended)"
        b = self.op_b.describe() if self.op_b else "nothing (its sequence ended)"
        if self.kind == "p2p":
            return (f"P2P mismatch on link {self.rank_a} -> {self.rank_b} (group {_short(self.comm)}) "
                    f"at message #{self.position}: rank {self.rank_a} sends {a} but rank "
                    f"{self.rank_b} posts {b}")
        return (f"collective mismatch on group {_short(self.group)} at position {self.position} of "
                f"that group's sequence: rank {self.rank_a} issued {a} but rank {self.rank_b} issued {b}")


def _short(ranks: tuple[int, ...] | None, n: int = 8) -> str:
    if ranks is None:
        return "?"
    if len(ranks) <= n:
        return str(tuple(ranks))
    return f"({', '.join(map(str, ranks[:4]))}, ..., {ranks[-1]}; {len(ranks)} ranks)"


@dataclass
class ConsistencyReport:
    ok: bool
    mismatches: list[Mismatch] = field(default_factory=list)
    n_ranks: int = 0
    n_records: int = 0
    n_groups: int = 0
    n_links: int = 0

    @property
    def first(self) -> Mismatch | None:
        return self.mismatches[0] if self.mismatches else None

    def __str__(self) -> str:
        head = (f"{self.n_records} records from {self.n_ranks} ranks on {self.n_groups} groups and "
                f"{self.n_links} P2P links: ")
        if self.ok:
            return head + "consistent"
        lines = [head + f"{len(self.mismatches)} mismatch(es); first:", "  " + str(self.mismatches[0])]
        lines += ["  also: " + str(m) for m in self.mismatches[1:4]]
        return "\n".join(lines)


class CollectiveMismatch(ValueError):
    def __init__(self, report: ConsistencyReport):
        super().__init__(str(report))
        self.report = report


def check_consistent(traces: dict[int, list[Record]], raise_on_error: bool = True) -> ConsistencyReport:
    """Check that every group saw the same op sequence from all its (traced) members and that
    every P2P link's sends and receives pair up in order.

    Members of a group that are absent from ``traces`` are not compared (partial traces are
    allowed); a traced member that issued fewer ops on a group than another is a mismatch.
    Mismatches are sorted by where they first occur in the issuing ranks' traces; the first
    is the one a real run would hang on (or silently mispair) first.
    """
    by_group: dict[tuple[int, ...], dict[int, list[Record]]] = {}
    sends: dict[tuple[int, int, tuple[int, ...]], list[Record]] = {}
    recvs: dict[tuple[int, int, tuple[int, ...]], list[Record]] = {}
    mismatches: list[Mismatch] = []
    n_records = 0
    for rank, recs in traces.items():
        for rec in recs:
            n_records += 1
            if rec.is_p2p:
                if rec.peer is None:
                    mismatches.append(Mismatch("p2p", (rank,), 0, rank, rank, rec, None, rec.group))
                    continue
                key = (rank, rec.peer, rec.group) if rec.kind == "send" else (rec.peer, rank, rec.group)
                (sends if rec.kind == "send" else recvs).setdefault(key, []).append(rec)
            else:
                by_group.setdefault(rec.group, {}).setdefault(rank, []).append(rec)
    for group, seqs in by_group.items():
        members = [r for r in group if r in traces]
        ref = members[0]
        ref_seq = seqs.get(ref, [])
        for m in members[1:]:
            seq = seqs.get(m, [])
            for i in range(max(len(ref_seq), len(seq))):
                a = ref_seq[i] if i < len(ref_seq) else None
                b = seq[i] if i < len(seq) else None
                if a is None or b is None or a.signature() != b.signature():
                    mismatches.append(Mismatch("collective", group, i, ref, m, a, b))
                    break
    links = set(sends) | set(recvs)
    for key in links:
        src, dst, comm = key
        if src not in traces or dst not in traces:
            continue
        s, r = sends.get(key, []), recvs.get(key, [])
        for i in range(max(len(s), len(r))):
            a = s[i] if i < len(s) else None
            b = r[i] if i < len(r) else None
            if a is None or b is None or a.signature() != b.signature():
                mismatches.append(Mismatch("p2p", (src, dst), i, src, dst, a, b, comm))
                break
    mismatches.sort(key=lambda m: (m.issue_index, m.kind, m.group))
    report = ConsistencyReport(ok=not mismatches, mismatches=mismatches, n_ranks=len(traces),
                               n_records=n_records, n_groups=len(by_group), n_links=len(links))
    if mismatches and raise_on_error:
        raise CollectiveMismatch(report)
    return report


# ------------------------------------------------------------------------- fake-pg simulation
def simulate_ranks(fn: Callable, world: int, *args: Any, ranks: Iterable[int] | None = None,
                   **kwargs: Any) -> dict[int, list[Record]]:
    """Run ``fn(rank, world, *args, **kwargs)`` for each rank in turn, in THIS process, under
    torch's fake process group, and return the recorded traces. Fake collectives return at
    once, so an inconsistent program yields traces (for ``check_consistent``) instead of a
    hang. Needs a process without an initialized process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("simulate_ranks needs a process without an initialized process group")
    traces: dict[int, list[Record]] = {}
    hook = sys.excepthook  # init_process_group chains a "[rankN]" prefix onto it each time
    for r in (range(world) if ranks is None else ranks):
        dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=world)
        try:
            with CollectiveRecorder() as rec:
                try:
                    fn(r, world, *args, **kwargs)
                except Exception as e:
                    raise RuntimeError(f"simulated rank {r} failed: {type(e).__name__}: {e}") from e
            traces[r] = rec.traces.get(r, [])
        finally:
            dist.destroy_process_group()
            sys.excepthook = hook
    return traces
