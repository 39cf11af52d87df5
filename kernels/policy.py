"""Run-time policies shared by the kernel wrappers: backend by device, debug checks, autotuning.

* **Backend** (``resolve_use_triton``): every wrapper takes ``use_triton``; ``None`` (the default)
  means "Triton exactly when the data is on CUDA", so a CUDA run never lands on a torch reference
  by accident and a CPU run uses the references unless a caller forces the Triton kernels (which
  then need ``TRITON_INTERPRET=1``, as in the kernel tests).
* **Debug checks** (``debug_checks``): value checks that would read device memory on the host
  (index ranges, group sizes summing to the row count) are a device synchronisation each on a GPU.
  They run only when a wrapper is called with ``check=True`` or the environment has
  ``HAI_LLM_DEBUG_CHECKS=1``; shape, dtype and device checks always run (they are free).
* **Autotuning** (``autotune_enabled``): the FP8 GEMMs launch one deterministic config chosen from
  the shape by default; ``HAI_LLM_AUTOTUNE=1`` times the whole config list instead (once per shape
  and process, cached on disk by Triton when the installed version supports ``cache_results``).

All three are read at call time, not import time, so tests and scripts can flip them with
``monkeypatch.setenv``.
"""
from __future__ import annotations

import inspect
import os

import torch
import triton

DEBUG_CHECKS_ENV = "HAI_LLM_DEBUG_CHECKS"
AUTOTUNE_ENV = "HAI_LLM_AUTOTUNE"

__all__ = ["AUTOTUNE_ENV", "DEBUG_CHECKS_ENV", "autotune", "autotune_enabled", "debug_checks",
           "resolve_use_triton"]


def resolve_use_triton(use_triton: bool | None, t: torch.Tensor) -> bool:
    """``use_triton`` if given, else True exactly when ``t`` is a CUDA tensor."""
    return t.is_cuda if use_triton is None else bool(use_triton)


def debug_checks(check: bool | None = None) -> bool:
    """Whether to run the value checks that cost a host read: ``check`` if given, else
    ``HAI_LLM_DEBUG_CHECKS=1`` in the environment (off by default, on every device)."""
    if check is not None:
        return bool(check)
    return os.environ.get(DEBUG_CHECKS_ENV, "") == "1"


def autotune_enabled() -> bool:
    """True when ``HAI_LLM_AUTOTUNE=1``: time every config instead of the shape heuristic."""
    return os.environ.get(AUTOTUNE_ENV, "") == "1"


# Triton >= 3.2 can persist autotuning results next to its compiled kernels (TRITON_CACHE_DIR):
# later processes (other ranks once one has finished, later runs) reuse the choice.
_AUTOTUNE_CACHE_KW = ({"cache_results": True}
                      if "cache_results" in inspect.signature(triton.autotune).parameters else {})


def autotune(configs, key):
    """``triton.autotune`` with the on-disk result cache when this Triton has it."""
    return triton.autotune(configs, key=key, **_AUTOTUNE_CACHE_KW)
