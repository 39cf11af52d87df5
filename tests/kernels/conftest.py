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
