"""Triton kernels (installed as ``hai_llm.kernels``): each file holds a ``@triton.jit`` kernel, a validating wrapper and a pure-torch ``*_ref``."""
