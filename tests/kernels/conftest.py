"""Shared setup of the kernel tests.

* Triton: on a machine without a CUDA device the kernels run on the CPU interpreter
  (``TRITON_INTERPRET=1``); with a CUDA device nothing is set, so the kernels compile for real and
  the tests put their tensors on ``cuda`` (each test module's ``DEVICE``). Triton decides between
  compiling and interpreting when a kernel is decorated, i.e. when the kernel module is imported,
  so the variable is set here, before any test module imports a kernel. An explicit
  TRITON_INTERPRET in the environment is left as it is.
* ``host_reads``: a fixture counting the tensor-to-host reads a block of code issues
  (``.item()``, ``.tolist()``, ``int()``/``float()``/``bool()`` of a tensor, ``nonzero``,
  ``unique``, ``bincount``, ``.cpu()``), each of which is a device synchronisation on a GPU. On
  the CPU they cost nothing, which is why the hot paths are held to zero by counting them here.
* ``gpu_nan_semantics``: a fixture giving the interpreter the NaN semantics of compiled GPU code
  for ``tl.max``/``tl.min`` and ``tl.maximum``/``tl.minimum``: PTX ``max.f32``/``min.f32`` return
  the non-NaN operand (NaN only when both are NaN), so a kernel that relies on ``tl.max`` to carry
  a NaN passes on an interpreter that propagates it and fails on the GPU. The NaN tests run under
  it, so they fail on such a kernel here too (``test_fp8_quant.py`` proves the fixture bites).
"""
import collections
import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero",
            "unique", "bincount", "cpu")
_FUNCTIONS = ("nonzero", "unique", "bincount")


def _nan_dropping(reduce_op):
    """``np.fmax``/``np.fmin`` as a reduction: NaN lanes are skipped (an all-NaN slice gives NaN,
    as on the GPU, and no numpy warning)."""
    return lambda data, axis=None, keepdims=False: reduce_op.reduce(data, axis=axis, keepdims=keepdims)


@pytest.fixture
def gpu_nan_semantics(monkeypatch):
    """Interpreted kernels get the GPU's NaN-dropping max/min (compiled kernels have it natively:
    then nothing is patched). Patched: the builder's ``maxnumf``/``minnumf`` (what ``tl.maximum``
    / ``tl.minimum`` emit with the default ``propagate_nan=NONE``; ``ALL`` keeps propagating, as on
    the GPU) and the ``tl.max``/``tl.min`` reductions (no index: those are the argmax paths)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield False
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    monkeypatch.setattr(builder, "create_maxnumf", lambda self, a, b: self.binary_op(a, b, np.fmax))
    monkeypatch.setattr(builder, "create_minnumf", lambda self, a, b: self.binary_op(a, b, np.fmin))
    apply_impl = interp.ReduceOps.apply_impl

    def nan_dropping_apply_impl(self, input):
        if self.combine_fn is tl.standard._elementwise_max:
            return self.min_max(input[0], val_reduce_op=_nan_dropping(np.fmax))
        if self.combine_fn is tl.standard._elementwise_min:
            return self.min_max(input[0], val_reduce_op=_nan_dropping(np.fmin))
        return apply_impl(self, input)

    monkeypatch.setattr(interp.ReduceOps, "apply_impl", nan_dropping_apply_impl)
    yield True


@pytest.fixture
def host_reads(monkeypatch):
    """``with host_reads() as reads: ...`` -> ``reads`` is a Counter of host-read calls by name."""

    @contextlib.contextmanager
    def count():
        calls = collections.Counter()
        active = [True]

        def wrap(name, fn):
            def counted(*args, **kwargs):
                if active[0]:
                    calls[name] += 1
                return fn(*args, **kwargs)
            return counted

        with monkeypatch.context() as m:
            for name in _METHODS:
                m.setattr(torch.Tensor, name, wrap(f"Tensor.{name}", getattr(torch.Tensor, name)))
            for name in _FUNCTIONS:
                m.setattr(torch, name, wrap(f"torch.{name}", getattr(torch, name)))
            try:
                yield calls
            finally:
                active[0] = False

    return count
