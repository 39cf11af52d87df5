"""Check that every rank issues its collectives in the same order: the hang detector.

A collective only completes when every member of its group issues it, with the same shape
and dtype, in the same position of that group's sequence; point-to-point messages are
matched per (sender, receiver) pair in posting order (NCCL has no tags). Overlap code
(DualPipe, the MoE all-to-all, ZeRO bucketing) makes it easy to issue them in a
rank-dependent order, which hangs only at scale (REFERENCE.md sec. 6). This module finds
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

Validating a whole layout without processes
-------------------------------------------
Under torch's fake process group (``init_process_group("fake", store=FakeStore(), rank=r,
world_size=W)``) every collective returns at once, so one process can run rank 0's program,
tear the group down, run rank 1's, and so on: ``simulate_ranks(fn, W)`` does exactly that and
returns the traces, and a deliberately inconsistent program is reported instead of hanging.
With meta tensors nothing is allocated either, so the 2048-GPU DeepSeek-V3 layout can be
validated with real shapes: ``validate_plan_collectives(plan, ranks)`` runs ``layout_step``
(one training step's collectives in the order the layout issues them: the schedule's P2P
plan, per MoE layer the EP count exchange, dispatch and combine all-to-alls, the SP latent
all-gathers, then ZeRO-1 reduce-scatter / DualPipe pair all-reduce / all-gather, the global
grad-norm and loss all-reduces) for a sample of ranks chosen so that every group kind has
several members present (``sample_ranks``). Each simulated rank costs about the time of
``ParallelDims.build_mesh`` (~0.1 s at 2048 ranks) plus its program. Members that were not
simulated are simply not compared.

Limits: functions bound before patching (``from torch.distributed import all_reduce``) and
functional collectives (``torch.distributed._functional_collectives``, used by DTensor) are
not seen. Groups are identified by their rank tuples, so two communicators over the same
ranks (``build_mesh`` keeps ``ep`` separate from ``dp_sp`` even when they coincide) are
checked as one ordered sequence: stricter than NCCL needs, never laxer.
"""
from __future__ import annotations

import inspect
import sys
import threading
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


class _Guard(threading.local):
    depth = 0


_guard = _Guard()
_active: list["CollectiveRecorder"] = []


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

    # -- patching ---------------------------------------------------------------------
    def __enter__(self) -> "CollectiveRecorder":
        if _active:
            raise RuntimeError("a CollectiveRecorder is already active")
        _active.append(self)
        originals = {}
        for name in list(_SPECS) + ["batch_isend_irecv"]:
            orig = getattr(c10d, name, None)
            if orig is None:
                continue
            originals[name] = orig
            wrapper = self._wrap_batch(orig) if name == "batch_isend_irecv" else self._wrap(name, orig)
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
        _active.remove(self)

    def _wrap(self, name: str, orig: Callable) -> Callable:
        sig = inspect.signature(orig)
        spec = _SPECS[name]

        def wrapper(*args, **kwargs):
            if _guard.depth:
                return orig(*args, **kwargs)
            _guard.depth += 1
            try:
                try:
                    bound = sig.bind(*args, **kwargs)
                except TypeError:
                    bound = None  # let torch raise its own error
                if bound is not None:
                    bound.apply_defaults()
                    self._record(name, spec, bound.arguments)
                return orig(*args, **kwargs)
            finally:
                _guard.depth -= 1

        wrapper.__wrapped__ = orig
        wrapper.__name__ = name
        return wrapper

    def _wrap_batch(self, orig: Callable) -> Callable:
        def batch_isend_irecv(p2p_op_list):
            if _guard.depth:
                return orig(p2p_op_list)
            _guard.depth += 1
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
                _guard.depth -= 1

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

    def _record(self, name: str, spec: dict, a: dict, batched: bool = False) -> None:
        group = self._ranks_of(a.get("group"))
        if group is None:  # not a member: torch returns without communicating
            return
        shapes: list[tuple[int, ...]] = []
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
        trace = self.traces.setdefault(rank, [])
        trace.append(Record(rank=rank, index=len(trace), op=name, group=group, shapes=tuple(shapes),
                            dtype=dtype, peer=peer, splits=splits,
                            reduce_op=None if red is None else _red_name(red), count=count,
                            batched=batched))


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


# ------------------------------------------------------------------------- a layout's step
@dataclass(frozen=True)
class StepSpec:
    """The collectives-relevant facts of a layout (picklable, so spawned ranks can get it).

    ``blocks[p][c]``: per pp rank p and local chunk c, one bool per attention block (True if its
    FFN is MoE). ``dense_params`` / ``expert_params``: per pp rank, what it holds (experts
    already / ep). ``device="meta"`` uses real sizes without memory (fake backend only).
    ``bug`` injects a known class of ordering bug for tests: "stage_sized_allreduce" (the loss
    all-reduce over pp uses a tensor sized by the stage's MoE layers), "swap_zero" (dp_sp index 1
    all-gathers before it reduce-scatters), "p2p_shape" (pp rank 0 sends a short activation),
    "skip_a2a" (EP index 1 skips the count exchange of its last MoE layer).
    """

    world_size: int
    pp: int
    dp: int
    sp: int
    ep: int
    gpus_per_node: int
    schedule: str
    n_micro: int
    blocks: tuple[tuple[tuple[bool, ...], ...], ...]
    dense_params: tuple[int, ...]
    expert_params: tuple[int, ...]
    tokens: int
    dim: int
    latent: int
    top_k: int
    n_experts: int
    device: str = "cpu"
    bug: str | None = None

    @classmethod
    def from_plan(cls, plan, device: str = "meta", bug: str | None = None) -> "StepSpec":
        """The step of a ``hai_llm.parallel.dryrun.Plan`` with its real sizes."""
        d = plan.dims
        blocks = tuple(tuple(tuple(plan.stages[i].moe_flags) for i in rp.stages) for rp in plan.ranks)
        info = plan.shape_info
        return cls(world_size=d.world_size, pp=d.pp, dp=d.dp, sp=d.sp, ep=d.ep,
                   gpus_per_node=d.gpus_per_node, schedule=plan.schedule, n_micro=plan.n_micro,
                   blocks=blocks, dense_params=tuple(r.dense_params for r in plan.ranks),
                   expert_params=tuple(r.expert_params for r in plan.ranks),
                   tokens=plan.tokens_per_micro_batch, dim=info["dim"], latent=info["latent"],
                   top_k=info["top_k"], n_experts=info["n_experts"], device=device, bug=bug)


_SCHEDULES: dict = {}


def _schedule(name: str, pp: int, n_micro: int):
    """The pipeline schedule (with its P2P plan), built once per process."""
    from hai_llm.parallel.dryrun import make_schedule

    key = (name, pp, n_micro)
    if key not in _SCHEDULES:
        _SCHEDULES[key] = make_schedule(name, pp, n_micro)
    return _SCHEDULES[key]


def _reduce_scatter(output, input, group=None):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group)


def _all_gather(output, input, group=None):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group)


def _split(src: int, dst: int, mb: int, layer: int, base: int) -> int:
    """Deterministic uneven all-to-all row counts every rank can compute (real routing exchanges
    them first: the count all-to-all that precedes every dispatch)."""
    return max(0, base + (src * 7 + dst * 3 + mb * 5 + layer * 11) % 5 - 2)


def layout_step(rank: int, world: int, spec: StepSpec) -> None:
    """Issue one training step's collectives of ``spec`` as rank ``rank`` (see module doc)."""
    from hai_llm.parallel.dims import ParallelDims
    dims = ParallelDims(world_size=spec.world_size, pp=spec.pp, dp=spec.dp, sp=spec.sp, ep=spec.ep,
                        gpus_per_node=spec.gpus_per_node)
    if world != dims.world_size:
        raise ValueError(f"spec is for {dims.world_size} ranks, got world={world}")
    mg = dims.build_mesh("cpu")
    c = dims.coords(rank)
    p = c["pp"]
    sched = _schedule(spec.schedule, spec.pp, spec.n_micro)
    pair_group = None
    if spec.schedule == "dualpipe" and spec.pp > 1:  # ranks r and pp-1-r hold the same stages
        S = dims.stage_size
        pairs = [[q * S + f, (spec.pp - 1 - q) * S + f] for q in range(spec.pp // 2) for f in range(S)]
        pair_group, _ = dist.new_subgroups_by_enumeration(pairs)
    meta = spec.device == "meta"
    dev = torch.device(spec.device)
    f_disp = torch.float8_e4m3fn if meta else torch.float32  # FP8 dispatch on the wire
    f_act = torch.bfloat16 if meta else torch.float32
    T, D, ep, sp = spec.tokens, spec.dim, dims.ep, dims.sp
    pp_ranks = dims.group_of("pp", rank)
    g_pp, g_ep, g_sp = mg.group("pp"), mg.group("ep"), mg.group("sp")
    g_dense, g_edp = mg.group("dp_sp"), mg.group("edp")
    me = c["ep"]
    base = max(1, T * spec.top_k // max(ep, 1))

    def empty(*shape, dtype=f_act):
        return torch.zeros(*shape, dtype=dtype, device=dev) if not meta else \
            torch.empty(*shape, dtype=dtype, device=dev)

    def moe(mb: int, layer: int, backward: bool) -> None:
        if ep == 1:
            return
        send = [_split(me, j, mb, layer, base) for j in range(ep)]
        recv = [_split(j, me, mb, layer, base) for j in range(ep)]
        if not backward:
            skip = spec.bug == "skip_a2a" and me == 1 and layer == last_moe
            if not skip:  # routing counts first, as a real dispatch does
                dist.all_to_all_single(empty(ep, dtype=torch.int64), empty(ep, dtype=torch.int64), group=g_ep)
            dist.all_to_all_single(empty(sum(recv), D, dtype=f_disp), empty(sum(send), D, dtype=f_disp),
                                   recv, send, group=g_ep)  # dispatch (FP8)
            dist.all_to_all_single(empty(sum(send), D), empty(sum(recv), D), send, recv, group=g_ep)  # combine
        else:
            dist.all_to_all_single(empty(sum(recv), D, dtype=f_disp), empty(sum(send), D, dtype=f_disp),
                                   recv, send, group=g_ep)  # combine-grad toward the experts
            dist.all_to_all_single(empty(sum(send), D), empty(sum(recv), D), send, recv, group=g_ep)  # dispatch-grad

    def chunk_pass(chunk: int, mb: int, backward: bool) -> None:
        flags = spec.blocks[p][chunk]
        order = range(len(flags) - 1, -1, -1) if backward else range(len(flags))
        for i in order:
            layer = chunk * 1000 + i
            if backward and flags[i]:
                moe(mb, layer, True)
            if sp > 1:
                if backward:  # gradient of the gathered latents back to their owners
                    _reduce_scatter(empty(T, spec.latent), empty(sp * T, spec.latent), group=g_sp)
                else:
                    _all_gather(empty(sp * T, spec.latent), empty(T, spec.latent), group=g_sp)
            if not backward and flags[i]:
                moe(mb, layer, False)

    all_moe = [chunk * 1000 + i for chunk, fl in enumerate(spec.blocks[p]) for i, m in enumerate(fl) if m]
    last_moe = all_moe[-1] if all_moe else -1
    plan = sched.comm_plan(p)
    posted: dict = {}
    pending = []
    for idx, act in enumerate(sched.actions(p)):
        comm = plan[idx]
        for msg in comm.posts:
            buf = empty(T, D)
            posted[msg] = dist.irecv(buf, src=pp_ranks[msg.src], group=g_pp)
        for msg in comm.recvs:
            posted.pop(msg).wait()
        for kind, mb, chunk in act.parts():
            if kind in ("F", "B"):
                chunk_pass(chunk, mb, backward=kind == "B")
        for msg in comm.sends:
            rows = T - 1 if (spec.bug == "p2p_shape" and p == 0 and c["dp_sp"] == 0 and msg.mb == 1) else T
            pending.append(dist.isend(empty(rows, D), dst=pp_ranks[msg.dst], group=g_pp))
    for w in pending:
        w.wait()
    # loss bookkeeping over the pipeline: one number per stage (the bug: sized by the stage)
    n_loss = 1 + (sum(sum(fl) for fl in spec.blocks[p]) if spec.bug == "stage_sized_allreduce" else 0)
    if spec.pp > 1:
        dist.all_reduce(empty(n_loss, dtype=torch.float32), group=g_pp)
    # ZeRO-1: reduce-scatter grads, DualPipe pair sum of the shard, global norm, all-gather
    n_d, n_e = dims.stage_size, dims.edp
    sh_d = -(-spec.dense_params[p] // n_d)
    sh_e = -(-spec.expert_params[p] // n_e) if spec.expert_params[p] else 0
    steps = []
    if n_d > 1:
        steps.append(lambda: _reduce_scatter(empty(sh_d, dtype=torch.float32),
                                                        empty(sh_d * n_d, dtype=torch.float32), group=g_dense))
    if sh_e and n_e > 1:
        steps.append(lambda: _reduce_scatter(empty(sh_e, dtype=torch.float32),
                                                        empty(sh_e * n_e, dtype=torch.float32), group=g_edp))
    if pair_group is not None:
        steps.append(lambda: dist.all_reduce(empty(sh_d + sh_e, dtype=torch.float32), group=pair_group))
    steps.append(lambda: dist.all_reduce(empty(1, dtype=torch.float32)))  # global grad norm
    gathers = []
    if n_d > 1:
        gathers.append(lambda: _all_gather(empty(sh_d * n_d), empty(sh_d), group=g_dense))
    if sh_e and n_e > 1:
        gathers.append(lambda: _all_gather(empty(sh_e * n_e), empty(sh_e), group=g_edp))
    if spec.bug == "swap_zero" and c["dp_sp"] == 1 and n_d > 1:
        gathers[0]()
        for s in steps:
            s()
        for g in gathers[1:]:
            g()
    else:
        for s in steps + gathers:
            s()


def sample_ranks(dims, rank: int = 0, full_groups: bool = False) -> list[int]:
    """Ranks to simulate for ``validate_plan_collectives``.

    Default (quick): ``rank``'s whole pp column (every stage, so every P2P link and the
    DualPipe pairs are present) plus one more member of each of its other groups (ep, edp,
    dp, sp), so that every group kind is compared between at least two ranks: 18 ranks for
    the 2048-GPU layout. ``full_groups=True`` takes every member of rank's pp, ep and edp
    groups (81 ranks there).
    """
    out = set(dims.group_of("pp", rank))
    for name in ("ep", "edp", "dp", "sp"):
        g = dims.group_of(name, rank)
        if full_groups and name in ("ep", "edp"):
            out.update(g)
        else:
            out.update([x for x in g if x != rank][:1])
    return sorted(out)


def validate_plan_collectives(plan, ranks: Iterable[int] | None = None) -> ConsistencyReport:
    """Simulate ``layout_step`` of ``plan`` (real sizes, meta tensors, fake backend) for
    ``ranks`` (default ``sample_ranks(plan.dims)``) and check the traces."""
    spec = StepSpec.from_plan(plan, device="meta")
    ranks = sample_ranks(plan.dims) if ranks is None else list(ranks)
    traces = simulate_ranks(layout_step, plan.dims.world_size, spec, ranks=ranks)
    return check_consistent(traces, raise_on_error=False)


def traced_layout_step(rank: int, world: int, spec: StepSpec) -> list[Record]:
    """``run_ranks`` target: ``layout_step`` under a ``CollectiveRecorder`` on a real process
    group; returns this rank's trace (compare with ``simulate_ranks`` of the same spec)."""
    with CollectiveRecorder() as rec:
        layout_step(rank, world, spec)
    return rec.traces.get(rank, [])
