"""Triton kernels (installed as ``hai_llm.kernels``): each file holds a ``@triton.jit`` kernel, a validating wrapper and a pure-torch ``*_ref``.

``policy`` holds the run-time choices shared by the wrappers: backend by device
(``use_triton=None``), host-reading debug checks (``HAI_LLM_DEBUG_CHECKS``) and autotuning
(``HAI_LLM_AUTOTUNE``); see docs/fp8.md.
"""
