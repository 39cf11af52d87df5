"""The training loop (``trainer``), the CPU-side EMA (``ema``) and metrics logging (``metrics``).
The loop talks to a layout only through ``hai_llm.runtime.Runtime``."""
