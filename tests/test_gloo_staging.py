"""The gloo staging shim (``hai_llm.parallel.gloo_staging``) on CPU ranks: it changes nothing
but where the bytes sit.

The shim exists for simulated ranks on one GPU (gloo lacks reduce-scatter, all-to-all and P2P
on CUDA tensors). Here it runs with its predicate forced to "stage everything", so CPU tensors
go through fresh CPU buffers exactly as CUDA tensors would go through host buffers, and:

* a dp2 x ep2 step (ZeRO-1, expert all-to-alls) and a pp2 DualPipe step (P2P, overlapped
  F&B) on 2 gloo ranks give bit-identical losses, grad norms and gradients to the same steps
  without the shim, and so does the step after a save and a resume (DCP) through it. Bit-exact is legitimate: the same shapes run the same ops in the same
  order on the same values (staging only copies), so nothing can round differently;
* every wrapped op (the collectives, P2P and their async forms the project calls, plus the
  rest of torch's list) returns the same results as without the shim, and the step's own ops
  are counted as having gone through it;
* an asynchronous op's ``StagedWork`` leaves the caller's tensors untouched until ``wait()``
  (or an ``is_completed()`` that returns True, or its future), even when gloo has finished;
* it nests with ``CollectiveRecorder`` in either order (same records), refuses an
  out-of-order restore, and restoring leaves ``torch.distributed`` exactly as it was.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hai_llm.parallel.gloo_staging import wants_staging
from hai_llm.parallel.spawn import run_ranks
from helpers import layout_config

MODEL = ["n_layers=2", "n_dense_layers=1"]  # one dense and one MoE block: every path, least compute
WRAPPED_BY_STEP = {
    "dp2-ep2": {"all_to_all_single", "reduce_scatter_single", "all_gather_single", "all_reduce"},
    "pp2-dualpipe": {"isend", "irecv", "send", "recv", "all_reduce", "reduce_scatter_single", "all_gather_single"},
}


def _always(t: torch.Tensor) -> bool:
    return True


# ------------------------------------------------------------------------------ training steps
def step_rank(rank: int, world: int, cases: dict) -> dict:
    """One optimizer step of each case without and with the shim (losses, norms, full
    gradients), a save, a resume in a fresh trainer and its step (loss), and the shim's
    per-op call counts."""
    import contextlib

    from hai_llm.layout import build_layout
    from hai_llm.parallel.gloo_staging import GlooStaging
    from hai_llm.runtime import build_runtime
    from hai_llm.train.trainer import Trainer
    from helpers import run_steps

    out = {}
    for name, cfg in cases.items():
        for staged in (False, True):
            shim = GlooStaging(_always) if staged else contextlib.nullcontext()
            run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
                cfg.train, out_dir=f"{cfg.train.out_dir}-{'staged' if staged else 'plain'}"))
            with shim:
                tr = Trainer(run_cfg, runtime=build_runtime(run_cfg, build_layout(run_cfg, world)))
                res = run_steps(tr, 1)
                tr.save()  # DCP through the shim, then a fresh trainer resumes it and steps on
                cfg2 = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, steps=2, resume=True))
                tr2 = Trainer(cfg2, runtime=build_runtime(cfg2, build_layout(cfg2, world)))
                resumed = (tr2.step, tr2.train_step().loss)
            out[(name, staged)] = {"losses": res["losses"], "norms": res["norms"], "grads": res["grads"],
                                   "resumed": resumed, "calls": dict(shim.calls) if staged else {}}
    return out


@pytest.mark.dist
def test_steps_through_the_shim_are_bit_identical(corpus_dir, tmp_path):
    def cfg(name, **parallel):
        return layout_config(str(corpus_dir), str(tmp_path / name), steps=1, model_overrides=MODEL,
                             parallel=dict(nprocs=2, **parallel), global_batch=4)

    cases = {"dp2-ep2": cfg("ep", dp=2, ep=2), "pp2-dualpipe": cfg("pp", pp=2, schedule="dualpipe")}
    for rank, res in enumerate(run_ranks(step_rank, 2, cases, timeout=300)):
        for name in cases:
            plain, staged = res[(name, False)], res[(name, True)]
            assert staged["losses"] == plain["losses"] and staged["norms"] == plain["norms"], (name, rank)
            assert staged["resumed"] == plain["resumed"] and plain["resumed"][0] == 1, (name, rank)
            assert plain["grads"].keys() == staged["grads"].keys()
            for p, g in plain["grads"].items():
                assert torch.equal(staged["grads"][p], g), (name, rank, p)
            assert WRAPPED_BY_STEP[name] <= set(staged["calls"]), (name, rank, staged["calls"])


# ------------------------------------------------------------------------------ every op
def _every_op(rank: int, world: int) -> dict:
    """Each wrapped op once (as ``dist.<name>`` at call time, the way hai_llm calls them) on
    rank-dependent values; returns the outputs by op (the tensors the op wrote)."""
    import torch.distributed as dist

    x = torch.arange(4.0) + 10 * rank
    peer = 1 - rank
    halves = [x[:2].clone(), x[2:].clone()]
    z = torch.zeros
    o = {"all_reduce": x.clone(), "all_reduce_coalesced": [x.clone(), 2 * x[:3]],
         "all_gather": [z(4) for _ in range(world)], "all_gather_single": z(4 * world),
         "all_gather_into_tensor": z(4 * world), "all_gather_coalesced": [[z(4)] for _ in range(world)],
         "reduce_scatter": z(2), "reduce_scatter_single": z(2), "reduce_scatter_tensor": z(2),
         "all_to_all_single": z(4), "all_to_all": [z(2), z(2)], "broadcast": x.clone(), "reduce": x.clone(),
         "gather": [z(4) for _ in range(world)] if rank == 0 else None, "scatter": z(2),
         "send/recv": z(4), "isend/irecv": z(4), "all_reduce async": x.clone(), "batch_isend_irecv": z(4)}
    dist.all_reduce(o["all_reduce"])
    dist.all_reduce_coalesced(o["all_reduce_coalesced"])
    dist.all_gather(o["all_gather"], x)
    dist.all_gather_single(o["all_gather_single"], x)
    dist.all_gather_into_tensor(o["all_gather_into_tensor"], x)
    dist.all_gather_coalesced(o["all_gather_coalesced"], [x])
    dist.reduce_scatter(o["reduce_scatter"], halves)
    dist.reduce_scatter_single(o["reduce_scatter_single"], x)
    dist.reduce_scatter_tensor(o["reduce_scatter_tensor"], x)
    splits = [1, 3] if rank == 0 else [3, 1]  # uneven: rank r gets in_splits[peer][r] rows from peer
    dist.all_to_all_single(o["all_to_all_single"], x, splits, splits)
    dist.all_to_all(o["all_to_all"], halves)
    dist.broadcast(o["broadcast"], src=1)
    dist.reduce(o["reduce"], dst=0)
    if rank != 0:
        o["reduce"] = None  # what gloo leaves on a non-root is unspecified
    dist.gather(x, o["gather"], dst=0)
    dist.scatter(o["scatter"], halves if rank == 0 else None, src=0)
    for sender in (0, 1):
        if rank == sender:
            dist.send(x, dst=peer)
        else:
            dist.recv(o["send/recv"], src=peer)
    for w in [dist.isend(x, dst=peer), dist.irecv(o["isend/irecv"], src=peer)]:
        w.wait()
    dist.all_reduce(o["all_reduce async"], async_op=True).wait()
    batch = [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, o["batch_isend_irecv"], peer)]
    for w in dist.batch_isend_irecv(batch):
        w.wait()
    dist.barrier()
    return o


def _patchable():
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from hai_llm.parallel.gloo_staging import _ROLES

    return {(m.__name__, n): getattr(m, n) for m in (dist, c10d) for n in list(_ROLES) + ["batch_isend_irecv"]
            if hasattr(m, n)}


def ops_rank(rank: int, world: int) -> dict:
    import time
    import warnings

    import torch.distributed as dist

    from hai_llm.parallel.collective_trace import CollectiveRecorder
    from hai_llm.parallel.gloo_staging import _ROLES, GlooStaging, StagedWork

    warnings.simplefilter("ignore")  # deprecated names (reduce_scatter_tensor...) are wrapped too
    before = _patchable()
    plain = _every_op(rank, world)
    with GlooStaging(_always) as s_all:
        staged = _every_op(rank, world)
    # default predicate: CPU tensors pass through untouched, counted but not staged
    with GlooStaging() as s_default:
        _every_op(rank, world)

    # asynchronous ops: nothing reaches the caller's tensor before the wrapper is waited on
    x = torch.arange(4.0) + 10 * rank
    with GlooStaging(_always):
        t = x.clone()
        w = dist.all_reduce(t, async_op=True)
        while not w.gloo_work.is_completed():  # gloo is done with the CPU buffer... (polling
            time.sleep(0.001)  # does not consume the work; a second wait() on a gloo recv would hang)
        untouched_ar = torch.equal(t, x)  # ...the caller's tensor is not
        completed = w.is_completed()  # a poller that sees True reads the result
        ar = (isinstance(w, StagedWork), w.wait(), w.result()[0] is t, t.clone())
        recv = torch.full((4,), -1.0)
        if rank == 0:
            dist.send(x, dst=1)
            dist.barrier()
            untouched_recv = True
        else:
            wr = dist.irecv(recv, src=0)
            dist.barrier()  # the send has completed
            untouched_recv = bool((recv == -1).all())
            wr.wait()
        t2 = x.clone()
        fut_val = dist.all_reduce(t2, async_op=True).get_future().wait()
        fut = (fut_val[0] is t2, t2.clone())

    # nesting with the recorder, both orders; the records agree
    def traced(outer_first: bool):
        s, rec = GlooStaging(_always), CollectiveRecorder()
        first, second = (s, rec) if outer_first else (rec, s)
        with first, second:
            t = x.clone()
            dist.all_reduce(t)
            a2a = torch.zeros(4)
            dist.all_to_all_single(a2a, x)
            r = torch.zeros(4)
            works = [dist.isend(x, dst=1 - rank), dist.irecv(r, src=1 - rank)]
            for w in works:
                w.wait()
        recs = [(r_.op, r_.shapes, r_.dtype, r_.peer) for r_ in rec.traces[rank]]
        return recs, dict(s.calls), [t, a2a, r]

    rec_a, calls_a, vals_a = traced(True)
    rec_b, calls_b, vals_b = traced(False)

    # out-of-order restore is refused and changes nothing
    s = GlooStaging(_always).install()
    staged_fn = dist.all_reduce
    rec = CollectiveRecorder().__enter__()
    recorded_fn = dist.all_reduce
    try:
        s.restore()
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    unchanged = dist.all_reduce is recorded_fn and recorded_fn.__wrapped__ is staged_fn
    rec.__exit__(None, None, None)
    s.restore()

    after = _patchable()
    return {"plain": plain, "staged": staged, "calls": dict(s_all.calls), "staged_ops": dict(s_all.staged),
            "calls_default": dict(s_default.calls), "staged_default": dict(s_default.staged),
            "calls_first": calls_a, "wrapped": sorted(_ROLES),
            "untouched_ar": untouched_ar, "completed": completed, "ar": ar, "untouched_recv": untouched_recv,
            "recv": recv, "fut": fut, "rec_a": rec_a, "rec_b": rec_b, "calls_b": calls_b,
            "vals_a": vals_a, "vals_b": vals_b, "refused": refused, "unchanged": unchanged,
            "restored": before.keys() == after.keys() and all(before[k] is after[k] for k in before)}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


@pytest.mark.dist
def test_every_op_async_work_recorder_and_restore():
    for rank, r in enumerate(run_ranks(ops_rank, 2, timeout=120)):
        x = torch.arange(4.0) + 10 * rank
        total = torch.arange(4.0) * 2 + 10
        for op, v in r["plain"].items():
            assert _same(r["staged"][op], v), (rank, op, v, r["staged"][op])
        assert torch.equal(r["plain"]["all_reduce"], total)  # the comparison is not vacuous
        # every wrapped op went through the shim and staged (counted once, under its own name)...
        assert r["calls"] == r["staged_ops"] and set(r["calls"]) == set(r["wrapped"]), set(r["wrapped"]) ^ set(r["calls"])
        # ...while with the default predicate CPU tensors are seen but not staged
        assert r["calls_default"] == r["calls"] and r["staged_default"] == {}
        assert r["untouched_ar"] and r["completed"], r
        is_work, waited, result_is_caller, value = r["ar"]
        assert is_work and waited and result_is_caller and torch.equal(value, total)
        assert r["untouched_recv"] and (rank == 0 or torch.equal(r["recv"], torch.arange(4.0)))
        assert r["fut"][0] and torch.equal(r["fut"][1], total)
        assert r["rec_a"] == r["rec_b"] and [op for op, *_ in r["rec_a"]] == ["all_reduce", "all_to_all_single",
                                                                               "isend", "irecv"], r["rec_a"]
        assert r["calls_first"] == r["calls_b"] == {"all_reduce": 1, "all_to_all_single": 1, "isend": 1, "irecv": 1}
        assert _same(r["vals_a"], r["vals_b"]) and torch.equal(r["vals_a"][0], total)
        assert torch.equal(r["vals_a"][2], torch.arange(4.0) + 10 * (1 - rank)) and not torch.equal(r["vals_a"][2], x)
        assert "cannot restore GlooStaging" in r["refused"] and r["unchanged"], r["refused"]
        assert r["restored"]


def test_only_simulated_gloo_ranks_on_cuda_are_staged():
    assert wants_staging("cuda", "gloo", simulated=True, cuda_available=True)
    assert wants_staging("auto", "gloo", simulated=True, cuda_available=True)
    assert not wants_staging("auto", "gloo", simulated=True, cuda_available=False)
    assert not wants_staging("cpu", "gloo", simulated=True, cuda_available=True)
    assert not wants_staging("cuda", "nccl", simulated=False, cuda_available=True)  # torchrun on GPUs
    assert not wants_staging("cuda", "gloo", simulated=False, cuda_available=True)  # torchrun, not ours to pin
