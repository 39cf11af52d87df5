"""Training checkpoints: ``store`` (atomic torch.distributed.checkpoint save / load, the
``latest`` pointer, pruning, the resolved config and JSON summaries) and ``zero_state`` (the
ZeRO-1 optimizer's master weights and moments in per-parameter global coordinates, so a run
resumes under any layout). Hugging Face interop is a separate package, ``hai_llm.interop``."""
