"""Host reads of device memory inside DualPipe's overlapped F&B with expert parallelism,
counted piece by piece.

Why: on a GPU every read of a tensor's value on the host (``.item()``, ``.tolist()``,
``int(t)`` / ``float(t)`` / ``bool(t)``, ``nonzero``, ``unique``, ``bincount``,
``repeat_interleave`` without ``output_size``, boolean-mask indexing, ``masked_select``,
``torch.equal``, a copy to the host: ``.cpu()``, ``.to("cpu")``, ``copy_`` into a host tensor)
blocks the CPU until everything queued before it has run: inside an overlapped
F&B pair that is the other micro-batch's compute and the all-to-all in flight, so the overlap is
lost.  A CPU run cannot see the stall, but it can count the reads.  The budget
(docs/expert_parallel.md, "Two-phase plan"): exactly ONE read per dispatch (its plan's sizes),
in the launch step that runs right after the other micro-batch's next backward piece is queued,
and none in any other forward, backward or weight-gradient piece.

How: :class:`HostReadCensus` is a ``TorchFunctionMode`` that records the reads above, attributed
to the region (piece) it is in.  The autograd engine runs a backward with function modes
suspended, so while the mode runs a ``backward`` call it switches on class-level wrappers of the
same entry points (``_wrapped_reads``).  Regions come from the pipeline's tracer protocol
(``hai_llm.pipeline.overlap``: a tracer with ``region(name, kind)``): the executor's tracer is
replaced by :class:`CensusTracer`, which also marks each schedule action.

One 2-rank gloo spawn (dp2 x ep2, the cheapest layout with ep > 1) runs both parts:

* a single EP MoE layer driven stage by stage (route, begin, launch, expert compute + combine,
  combine wait, backward), for the flat and both hierarchical node layouts, plus the debug-check
  flag both ways; this part fails on a plan that reads sizes while beginning the dispatch;
* one real DualPipeV step (pp1: both chunks on each rank, the V turn local, FB pairs overlapped
  piece by piece) of the tiny model with expert parallelism, flat and hierarchical.

Token gathers and sums run the Triton kernels (the GPU path; the CPU interpreter here): the torch
reference combine reads its loop count on the host by design and never runs on a GPU.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hai_llm.parallel.spawn import run_ranks

CFG = ["n_activated_experts=3", "n_expert_groups=2", "n_limited_groups=2"]
N_MICRO = 4
_ALWAYS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "argwhere",
           "unique", "unique_consecutive", "bincount", "masked_select", "equal", "allclose", "numpy",
           "cpu"}
_TENSOR_METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero",
                   "unique", "unique_consecutive", "bincount", "masked_select", "repeat_interleave",
                   "__getitem__", "__setitem__", "numpy", "cpu", "to", "copy_")
_TORCH_FUNCS = ("nonzero", "argwhere", "unique", "unique_consecutive", "bincount", "masked_select",
                "repeat_interleave", "equal", "allclose")


# ------------------------------------------------------------------------------ the census
def _has_bool_index(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(_has_bool_index(i) for i in index)
    return False


def _names_cpu(target) -> bool:
    """``.to``'s target names the host: "cpu" (str or device) or a host tensor."""
    if isinstance(target, torch.Tensor):
        return target.device.type == "cpu"
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


def read_kind(name: str, args: tuple, kwargs: dict):
    """The host read a torch call makes (None for none): ``name`` is the function's name,
    ``args`` start with the tensor it is called on. Copies to the host count as reads whatever
    the source's device, like the other methods (on a CPU run ``.cpu()`` is a no-op, on a GPU it
    waits for the tensor), except non-blocking ones (into pinned memory they queue, and the read
    that later uses the bytes is what waits). ``copy_`` counts only from another device into a
    host tensor: a same-device copy is no read, and a CPU run cannot tell the two apart."""
    if name in _ALWAYS:
        return name
    if name in ("to", "copy_") and kwargs.get("non_blocking", False):
        return None
    if name == "to" and (any(_names_cpu(a) for a in args[1:2]) or _names_cpu(kwargs.get("device"))
                         or _names_cpu(kwargs.get("other"))):
        return "to cpu"
    if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        dst, src = args[0], args[1]
        if dst.device.type == "cpu" and src.device.type != "cpu":
            return "copy_ to host"
    if name == "repeat_interleave":  # tensor repeats: the output size is read unless given
        reps = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
        if isinstance(reps, torch.Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave"
    if name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_bool_index(args[1]):
        return f"bool-mask {name}"
    return None


class HostReadCensus(TorchFunctionMode):
    """Records ``(region, read)`` for every host read issued while active."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple[str, str]] = []
        self.region = "outside"

    def note(self, name, args, kwargs) -> None:
        kind = read_kind(name, args, kwargs or {})
        if kind is not None:
            self.log.append((self.region, kind))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        self.note(name, args, kwargs)
        if name == "backward":  # the engine runs with modes suspended: count through wrappers
            with _wrapped_reads(self):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def _wrapped_reads(census: HostReadCensus):
    """Class-level wrappers of the read entry points (Tensor methods, torch functions)."""
    saved = []

    def wrap(owner, name):
        orig = getattr(owner, name)
        own = name in vars(owner)

        def wrapper(*args, **kwargs):
            census.note(name, args, kwargs)
            return orig(*args, **kwargs)

        saved.append((owner, name, orig, own))
        setattr(owner, name, wrapper)

    for n in _TENSOR_METHODS:
        wrap(torch.Tensor, n)
    for n in _TORCH_FUNCS:
        wrap(torch, n)
    try:
        yield
    finally:
        for owner, name, orig, own in reversed(saved):
            if own:
                setattr(owner, name, orig)
            else:
                delattr(owner, name)


@contextmanager
def region(census: HostReadCensus, name: str):
    prev, census.region = census.region, name
    try:
        yield
    finally:
        census.region = prev


def reads_by_region(census: HostReadCensus, names) -> dict[str, list[str]]:
    out = {n: [] for n in names}
    for r, kind in census.log:
        out.setdefault(r, []).append(kind)
    return out


# ------------------------------------------------------------------------------ rank code
def _args(n_layers=None):
    from hai_llm.config.load import load_model_args

    extra = [] if n_layers is None else [f"n_layers={n_layers}", "n_dense_layers=1"]
    return load_model_args("tiny", CFG + extra)


def _layer_census(rank, transport):
    """One EP MoE layer, stage by stage; {phase: reads}."""
    from hai_llm.model.moe import MoE
    from hai_llm.parallel.expert import apply_expert_parallel

    args = _args()
    torch.manual_seed(3)
    moe = MoE(args)
    moe.reset_parameters(0.2)
    apply_expert_parallel(moe, None, transport=transport)
    d = moe.dispatcher
    x = torch.randn(1, 24, args.dim, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    phases = ("route", "begin", "launch", "expert", "combine", "backward")
    census = HostReadCensus()
    with census:
        with region(census, "route"):
            r = moe.route(x)
        with region(census, "begin"):
            h = d.dispatch_async(r.x_TD, r.weights_TK, r.idx_TK)
        with region(census, "launch"):
            getattr(h, "launch", lambda: None)()  # the payload launch (older handles: none)
        with region(census, "expert"):
            batch = h.wait()
            c = d.combine_async(d.compute(batch, moe.experts), batch)
        with region(census, "combine"):
            y = moe.merge(c.wait(), moe.shared(r.x_TD), r.shape)
        with region(census, "backward"):
            y.square().sum().backward()
    return reads_by_region(census, phases)


def _debug_checks(rank, transport):
    """HAI_LLM_DEBUG_CHECKS: off -> the begin phase reads nothing; on -> it checks the expert
    ids (a read) and rejects an out-of-range id before any collective is issued."""
    from hai_llm.parallel.expert import ExpertParallelDispatcher

    E = 8
    d = ExpertParallelDispatcher(transport, E)
    x, w = torch.randn(4, 64), torch.rand(4, 2)
    good = torch.tensor([[0, 5], [1, 7], [6, 2], [3, 4]])
    out = {}
    for flag in ("0", "1"):
        os.environ["HAI_LLM_DEBUG_CHECKS"] = flag
        census = HostReadCensus()
        with census, region(census, "begin"):
            h = d.dispatch_async(x, w, good)
        h.wait()  # keep the ranks' collectives paired
        out[f"begin_reads_{flag}"] = len(census.log)
    try:  # (without the flag an out-of-range id is undefined behaviour, like an index error)
        d.dispatch_async(x, w, good.clone().fill_(E))
        out["rejected"] = None
    except ValueError as e:
        out["rejected"] = str(e)
    del os.environ["HAI_LLM_DEBUG_CHECKS"]
    return out


class _Regions:
    """Mixin for the executor's tracer: every region and action in order, reads per region."""

    census: HostReadCensus

    def region(self, name, kind):
        self.order.append((kind, name))
        return region(self.census, name)

    def action(self, act, t0, t1):
        super().action(act, t0, t1)
        self.order.append(("action", str(act)))


def _pipeline_census(rank, kind):
    """One DualPipeV step (pp1, both chunks on this rank) with EP over the 2 ranks."""
    import hai_llm.pipeline.executor as executor
    from hai_llm.layout.schedules import DualPipeV
    from hai_llm.model.moe import MoE
    from hai_llm.model.transformer import Transformer
    from hai_llm.parallel.expert import apply_expert_parallel
    from hai_llm.pipeline.stage import build_pipeline_model
    from hai_llm.pipeline.wgrad_split import WeightGradStore, split_weight_grads

    args = _args(n_layers=4)
    full = Transformer(args)
    full.init_weights(0)
    sched = DualPipeV(1, N_MICRO)
    pm = build_pipeline_model(full, sched, 0)
    apply_expert_parallel(pm, None, transport=kind, gpus_per_node=1, use_triton=True)
    store = WeightGradStore()
    split_weight_grads(pm, store)
    census = HostReadCensus()
    order: list = []

    class CensusTracer(_Regions, executor._Tracer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.census, self.order = census, order

    tokens = torch.randint(0, args.vocab_size, (N_MICRO, 16 + 1 + args.n_mtp_layers),
                           generator=torch.Generator().manual_seed(11 + rank))
    ex = executor.PipelineExecutor(pm, sched, 0, [rank], overlap=True, trace=True, store=store)
    real, executor._Tracer = executor._Tracer, CensusTracer
    try:
        with census:
            ex.run(list(tokens.chunk(N_MICRO)), None)
    finally:
        executor._Tracer = real
    n_moe = sum(isinstance(m, MoE) for m in pm.modules())
    return {"order": order, "reads": reads_by_region(census, [n for _, n in order]),
            "dispatches": n_moe * N_MICRO}


def _part(fn, *args):
    """A part's result, or the one-line error it raised (every rank raises alike, so the
    later parts still pair their collectives): each test then fails on its own part."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported by the test of this part
        return {"error": f"{type(e).__name__}: {e}"}


def _triton_choice():
    from hai_llm.parallel.transport import build_transport

    cpu = torch.zeros(2, 2)
    return (build_transport("flat", None, [0, 1], 1)._triton(cpu),
            build_transport("flat", None, [0, 1], 1, use_triton=True)._triton(cpu))


def _worker(rank, world):
    from hai_llm.parallel.transport import build_transport

    res = {"layer": {}}
    for name, kind, gpn in (("flat", "flat", 1), ("hier-2x1", "hierarchical", 1),
                            ("hier-1x2", "hierarchical", 2)):
        t = build_transport(kind, None, [0, 1], gpn, use_triton=True)
        res["layer"][name] = _part(_layer_census, rank, t)
    res["debug"] = _part(_debug_checks, rank, build_transport("hierarchical", None, [0, 1], 1))
    res["triton_choice"] = _part(_triton_choice)
    res["pipeline"] = {kind: _part(_pipeline_census, rank, kind) for kind in ("flat", "hierarchical")}
    return res


@pytest.fixture(scope="module")
def ranks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # the spawned ranks run the Triton kernels interpreted
        return run_ranks(_worker, 2, timeout=600)


# ------------------------------------------------------------------------------ tests
def test_read_kind_classifies_reads():
    t, m = torch.arange(4), torch.tensor([True, False, True, False])
    census = HostReadCensus()
    with census:
        int(t[0]), bool(t[1]), t.tolist(), torch.unique(t), t[m], t.nonzero()
        t.repeat_interleave(t), t.repeat_interleave(t, output_size=6), t.repeat_interleave(2)
        t[t > 1] = 0
        t.cpu(), t.to("cpu"), t.to(device="cpu"), t.to(torch.device("cpu"), torch.float64)
        t.cumsum(0), t[torch.tensor([0, 2])], t.to(torch.float32), t.to("meta")  # not reads
        t.to("cpu", non_blocking=True), t.clone().copy_(t)  # not reads (queued / same device)
    kinds = [k for _, k in census.log]
    assert kinds == ["__int__", "__bool__", "tolist", "unique", "bool-mask __getitem__", "nonzero",
                     "repeat_interleave", "bool-mask __setitem__", "cpu", "to cpu", "to cpu",
                     "to cpu"], kinds
    # copy_ from a device tensor into a host one (no device here: read_kind on a meta source)
    src = torch.empty(4, device="meta")
    assert read_kind("copy_", (t, src), {}) == "copy_ to host"
    assert read_kind("copy_", (t, src), {"non_blocking": True}) is None
    assert read_kind("copy_", (src, t), {}) is None  # host -> device: queued, no read


@pytest.mark.dist
def test_single_layer_one_read_per_dispatch(ranks):
    """The budget on one EP layer: the dispatch's single read (its plan's sizes, one
    ``tolist``) is in the launch, nothing is read while routing, beginning the dispatch,
    computing, combining or in the backward (which re-uses the plan)."""
    for rank, r in enumerate(ranks):
        for name, reads in r["layer"].items():
            assert reads["launch"] == ["tolist"], (rank, name, reads)
            others = {k: v for k, v in reads.items() if k != "launch" and v}
            assert not others, (rank, name, others)


@pytest.mark.dist
def test_debug_checks_only_behind_the_flag(ranks):
    for r in ranks:
        d = r["debug"]
        assert d["begin_reads_0"] == 0 and d["begin_reads_1"] > 0, d
        assert d["rejected"] is not None and "expert ids must lie in [0, 8)" in d["rejected"], d


@pytest.mark.dist
def test_transport_picks_triton_by_device(ranks):
    for r in ranks:
        # None -> the torch reference for CPU tensors (Triton for CUDA ones); True still wins
        assert r["triton_choice"] == (False, True)


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
def test_dualpipe_fb_pieces_read_only_in_launches(ranks, kind):
    """A real overlapped DualPipeV step: one read per dispatch, each in a launch step; inside an
    F&B pair the launch directly follows a backward piece of the other micro-batch; every
    forward, backward and W piece reads nothing."""
    for rank, r in enumerate(ranks):
        res = r["pipeline"][kind]
        order, reads = res["order"], res["reads"]
        # (reads between pieces, e.g. the CPU-only rope range check while building the
        # pieces, are outside the F&B overlap and not budgeted here)
        launches = [n for k, n in order if k == "L"]
        assert len(launches) == res["dispatches"], (rank, len(launches), res["dispatches"])
        for k, n in order:
            if k == "L":
                assert reads[n] == ["tolist"], (rank, n, reads[n])
            elif k != "action":
                assert reads[n] == [], (rank, n, reads[n])
        # placement: inside each FB pair, a launch comes right after a B piece (the other
        # micro-batch's work is queued) unless that backward half has already finished
        n_fb_launches = 0
        for act, regions in _split_actions(order):
            if not act.startswith("FB"):
                continue
            b_left = sum(k == "B" for k, _ in regions)
            for i, (k, n) in enumerate(regions):
                if k == "B":
                    b_left -= 1
                if k == "L":
                    n_fb_launches += 1
                    before = regions[i - 1][0] if i else None
                    assert before == "B" or b_left == 0, (rank, act, regions[max(0, i - 2):i + 1])
        assert n_fb_launches > 0


def _split_actions(order):
    """[(action, its regions in order)]: the executor reports an action after it ran."""
    out, cur = [], []
    for k, n in order:
        if k == "action":
            out.append((n, cur))
            cur = []
        else:
            cur.append((k, n))
    return out
