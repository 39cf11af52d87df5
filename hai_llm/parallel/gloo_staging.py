"""Gloo collectives on GPU tensors by staging them through host memory: a whole parallel
layout debugged with simulated ranks on a one-GPU workstation.

Simulated ranks (``parallel.nprocs``, ``hai_llm.parallel.spawn.run_ranks``) talk over gloo.
Gloo implements some collectives for CUDA tensors (all_reduce, broadcast) but not the ones a
parallel step lives on: ``reduce_scatter_single`` (ZeRO-1), ``all_to_all_single`` (expert
dispatch / combine) and point-to-point (the pipeline) fail on CUDA tensors. ``GlooStaging``
patches the ``torch.distributed`` functions the project calls so that every tensor argument
for which ``predicate(t)`` holds (default: not on the CPU) is *staged*:

* inputs are copied into a fresh CPU buffer when the call is issued (a synchronising
  device-to-host copy: the values the caller has queued so far are the ones sent);
* outputs get a fresh CPU buffer (in-out tensors such as all_reduce's: a copy);
* the original gloo function runs on the buffers;
* results are copied back into the caller's tensors: at return for a blocking call, at
  ``wait()`` for an asynchronous one (``async_op=True``, ``isend`` / ``irecv``), which returns
  a :class:`StagedWork` holding the buffers until then.

Everything else, return values included, is what gloo does on CPU tensors, so a step through
the shim computes exactly what the same step on CPU ranks computes. Each rank holds its own
copy of the model on the shared GPU; only communication goes through the host. It is a
debugging aid (every collective costs a device synchronisation), not a fast path.

Object collectives (``all_gather_object``, ``broadcast_object_list``...) are not wrapped: on
gloo torch builds their tensors on the CPU. ``barrier`` has no tensors. ``batch_isend_irecv``
is not wrapped either: on gloo torch runs it as one ``P2POp.op(...)`` call per entry, so P2POps
built with ``dist.isend`` / ``dist.irecv`` while the shim is installed are staged by those.

Composition with ``hai_llm.parallel.collective_trace.CollectiveRecorder`` (which patches the
same functions): install the staging first, the recorder inside it::

    with GlooStaging(), CollectiveRecorder() as rec:   # recorder outermost in the call chain
        ...

The recorder then wraps the staged functions: it records the caller's own (device) tensors,
exactly what NCCL would be handed, and ``batch_isend_irecv`` (which the recorder re-routes to
the functions it wrapped) still reaches the staging. The reverse nesting also works for every
wrapped function (the recorder sees the CPU buffers: same shapes and dtypes, and a ``Record``
holds no device) but bypasses the staging inside ``batch_isend_irecv``. Either way the two
must be undone in reverse order, as nested ``with`` blocks do; :meth:`GlooStaging.restore`
refuses (one clear error, nothing changed) when something patched on top of it is still
installed.

Functions bound before installing (``from torch.distributed import all_reduce``) are not
seen; hai_llm looks them up at call time (``hai_llm.parallel.comm``). The launcher installs the
staging for the lifetime of a simulated rank whose ``train.device`` resolves to CUDA
(``launch/ranks.py``, :func:`simulated_rank_staging`); under torchrun with NCCL nothing changes.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# op -> {argument: role}. "in": read by the op (staged as a copy, never copied back); "out":
# written by the op (staged as an empty buffer, copied back); "inout": both (all_reduce,
# broadcast: the root's value goes out, everyone's comes back). Lists (of lists) of tensors
# are staged element by element. "out" buffers start empty: every one of these ops writes its
# whole output on every member of the group (non-members return before staging, see _call).
_ROLES: dict[str, dict[str, str]] = {
    "all_reduce": {"tensor": "inout"},
    "all_reduce_coalesced": {"tensors": "inout"},
    "all_gather": {"tensor_list": "out", "tensor": "in"},
    "all_gather_single": {"output_tensor": "out", "input_tensor": "in"},
    "all_gather_into_tensor": {"output_tensor": "out", "input_tensor": "in"},
    "all_gather_coalesced": {"output_tensor_lists": "out", "input_tensor_list": "in"},
    "reduce_scatter": {"output": "out", "input_list": "in"},
    "reduce_scatter_single": {"output": "out", "input": "in"},
    "reduce_scatter_tensor": {"output": "out", "input": "in"},
    "all_to_all_single": {"output": "out", "input": "in"},
    "all_to_all": {"output_tensor_list": "out", "input_tensor_list": "in"},
    "broadcast": {"tensor": "inout"},
    "reduce": {"tensor": "inout"},  # gloo may leave partial sums on non-roots: copied back as gloo left them
    "gather": {"tensor": "in", "gather_list": "out"},
    "scatter": {"tensor": "out", "scatter_list": "in"},
    "send": {"tensor": "in"},
    "isend": {"tensor": "in"},
    "recv": {"tensor": "out"},
    "irecv": {"tensor": "out"},
}
_ALWAYS_ASYNC = frozenset({"isend", "irecv"})  # return a Work without an async_op argument


def off_host(t: torch.Tensor) -> bool:
    """The default predicate: tensors gloo cannot take as they are (not CPU; meta tensors,
    which hold no data, are left to fail in torch as they would without the shim)."""
    return t.device.type not in ("cpu", "meta")


def _copy_back(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    # through ``.data``: gloo and NCCL write a collective's output without bumping the
    # tensor's autograd version counter, and so does the shim (a bump would make autograd
    # reject a staged tensor that a native run accepts)
    for dst, buf in pairs:
        dst.data.copy_(buf)


class StagedWork(dist.Work):
    """The Work of an asynchronous staged op. Results reach the caller's tensors when the op
    is known complete: at ``wait()``, at the first ``is_completed()`` that returns True, or
    when the future of ``get_future()`` completes; until then the caller's outputs are
    untouched (as on NCCL, reading them before ``wait()`` is a bug). The CPU buffers live
    until then (gloo reads and writes them in the background)."""

    def __init__(self, work: dist.Work, copies: list, buffers: list, outputs: list):
        super().__init__()
        self._work = work
        self._copies = copies
        self._buffers = buffers
        self._outputs = outputs
        self._lock = threading.Lock()  # get_future's callback runs on a gloo thread
        self._done = False

    @property
    def gloo_work(self) -> dist.Work:
        """The gloo Work on the CPU buffers, for polling (``is_completed()`` copies nothing
        back). Do not ``wait()`` on it: a gloo receive waited twice blocks forever."""
        return self._work

    def _finish(self) -> None:
        with self._lock:
            if not self._done:
                _copy_back(self._copies)
                self._copies, self._buffers, self._done = [], [], True

    def wait(self, timeout=None) -> bool:
        if not self._done:
            # raises on failure or timeout, and then nothing is copied back
            self._work.wait() if timeout is None else self._work.wait(timeout)
            self._finish()
        return True

    def synchronize(self) -> None:
        self.wait()

    def is_completed(self) -> bool:
        if not self._done and self._work.is_completed():
            self._finish()
        return self._done

    def is_success(self) -> bool:
        return self._work.is_success()

    def exception(self):
        return self._work.exception()

    def source_rank(self) -> int:
        return self._work.source_rank()

    def result(self) -> list[torch.Tensor]:
        """The caller's output tensors, after waiting (gloo's own ``result()`` would hold the
        CPU buffers)."""
        self.wait()
        return list(self._outputs)

    def get_future(self) -> torch.futures.Future:
        def done(_fut):
            self._finish()
            return list(self._outputs)

        return self._work.get_future().then(done)


class GlooStaging:
    """Context manager (or ``install()`` / ``restore()``) staging the tensors of every
    ``torch.distributed`` collective and P2P call through CPU buffers; see the module doc.

    ``predicate(t)`` says which tensors to stage (default :func:`off_host`; tests pass
    ``lambda t: True`` to push CPU tensors through fresh buffers). ``calls[op]`` counts the
    calls that went through the shim, ``staged[op]`` those that staged at least one tensor.
    Holds no state outside the instance: restoring puts back exactly the functions it found.
    """

    def __init__(self, predicate: Callable[[torch.Tensor], bool] = off_host):
        self.predicate = predicate
        self.calls: dict[str, int] = {}
        self.staged: dict[str, int] = {}
        self._saved: list[tuple[Any, str, Callable, Callable]] = []  # (module, name, original, wrapper)
        self._inside = threading.local()  # depth of staged calls on this thread (see _call)

    # -- installing ---------------------------------------------------------------------
    def install(self) -> "GlooStaging":
        if self._saved:
            raise RuntimeError("this GlooStaging is already installed")
        for name, roles in _ROLES.items():
            orig = getattr(c10d, name, None)
            if orig is None:  # not in this torch release
                continue
            wrapper = self._wrap(name, orig, roles)
            for mod in (c10d, dist):
                if getattr(mod, name, None) is orig:
                    self._saved.append((mod, name, orig, wrapper))
                    setattr(mod, name, wrapper)
        return self

    def restore(self) -> None:
        """Put the original functions back. Refuses, changing nothing, while a later patch of
        the same functions (a CollectiveRecorder entered after this) is still installed."""
        on_top = sorted({f"{mod.__name__}.{name}" for mod, name, _, wrapper in self._saved
                         if getattr(mod, name) is not wrapper})
        if on_top:
            raise RuntimeError(f"cannot restore GlooStaging: {on_top[0]} (and {len(on_top) - 1} more) was patched "
                               f"after it and is still patched; undo that first (nest the with blocks)")
        for mod, name, orig, _ in reversed(self._saved):
            setattr(mod, name, orig)
        self._saved.clear()

    def __enter__(self) -> "GlooStaging":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    # -- staging ------------------------------------------------------------------------
    def _wrap(self, name: str, orig: Callable, roles: dict[str, str]) -> Callable:
        sig = inspect.signature(orig)

        @functools.wraps(orig)  # __wrapped__: inspect.signature (the recorder binds with it) sees torch's
        def staged(*args, **kwargs):
            return self._call(name, orig, sig, roles, args, kwargs)

        return staged

    def _call(self, name, orig, sig, roles, args, kwargs):
        # a call torch makes from inside a wrapped one (reduce_scatter_tensor ->
        # reduce_scatter_single, send -> isend) already has the outer call's buffers: it passes
        # through, and each call is counted once, at the outermost level
        if getattr(self._inside, "depth", 0):
            return orig(*args, **kwargs)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return orig(*args, **kwargs)  # torch raises its own error
        self.calls[name] = self.calls.get(name, 0) + 1
        if c10d._rank_not_in_group(bound.arguments.get("group")):
            return self._run(orig, args, kwargs)  # torch returns at once; outputs must stay untouched
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (caller's tensor, CPU buffer) to copy back
        buffers: list[torch.Tensor] = []  # every CPU buffer: alive until the op completes
        for arg, role in roles.items():
            if arg in bound.arguments:
                bound.arguments[arg] = self._stage(bound.arguments[arg], role, copies, buffers)
        if not buffers:
            return self._run(orig, args, kwargs)
        self.staged[name] = self.staged.get(name, 0) + 1
        result = self._run(orig, bound.args, bound.kwargs)
        if (name in _ALWAYS_ASYNC or bound.arguments.get("async_op")) and result is not None:
            return StagedWork(result, copies, buffers, [dst for dst, _ in copies])
        _copy_back(copies)
        return result

    def _run(self, orig: Callable, args, kwargs):
        self._inside.depth = 1
        try:
            return orig(*args, **kwargs)
        finally:
            self._inside.depth = 0

    def _stage(self, value, role: str, copies: list, buffers: list):
        if isinstance(value, (list, tuple)):
            return type(value)(self._stage(v, role, copies, buffers) for v in value)
        if not isinstance(value, torch.Tensor) or not self.predicate(value):
            return value
        # same strides for dense tensors; a view with gaps becomes contiguous (so gloo's
        # "tensors must be contiguous" check cannot fire through the shim)
        buf = torch.empty_like(value, device="cpu")
        if role != "out":
            buf.copy_(value.detach())  # device -> host: waits for the work queued on it so far
        buffers.append(buf)
        if role != "in":
            copies.append((value, buf))
        return buf


# ------------------------------------------------------------------------- the launcher's hook
def wants_staging(device_setting: str, backend: str | None, simulated: bool, cuda_available: bool) -> bool:
    """Simulated ranks (``run_ranks``) on gloo whose ``train.device`` (auto | cpu | cuda)
    resolves to CUDA. Not torchrun: its ranks use NCCL on GPUs, each on its own device."""
    return simulated and backend == "gloo" and device_setting != "cpu" and cuda_available


@contextlib.contextmanager
def simulated_rank_staging(device_setting: str) -> Iterator[GlooStaging | None]:
    """What ``launch/ranks.py`` wraps a rank's training in. When :func:`wants_staging`: every
    simulated rank uses ``cuda:0`` (one GPU shared by all ranks; without ``set_device``
    DeviceMesh would pick ``cuda:LOCAL_RANK``) and its collectives are staged through the
    host (yields the :class:`GlooStaging`); otherwise nothing changes (yields None)."""
    backend = dist.get_backend() if dist.is_initialized() else None
    if not wants_staging(device_setting, backend, bool(os.environ.get("HAI_LLM_SIMULATED")),
                         torch.cuda.is_available()):
        yield None
        return
    torch.cuda.set_device(0)
    with GlooStaging() as staging:
        yield staging
