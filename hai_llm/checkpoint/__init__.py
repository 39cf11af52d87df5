"""Training checkpoints: ``store`` (atomic save / load through torch.distributed.checkpoint into
safetensors files plus a JSON trainer state, the ``latest`` pointer, pruning, the resolved config
and JSON summaries), ``safe_load`` (reading without running code, older pickle checkpoints
included), ``preflight`` (the run folder and the checkpoint to resume, checked before any rank
starts) and ``zero_state`` (the ZeRO-1 optimizer's master weights and moments in per-parameter
global coordinates, so a run resumes under any layout). Hugging Face interop is a separate
package, ``hai_llm.interop``."""
