"""FP8 mixed-precision training (DeepSeek-V3's recipe, docs/deepseek_v3.md) as a module swap.

``convert_to_fp8(model)`` is applied to a built model (the trainer does it right after
``build_model`` when ``train.precision=fp8``, before any parallelization):

* every ``nn.Linear`` of the attention projections (``wq``, ``wq_a``, ``wq_b``, ``wkv_a``,
  ``wkv_b``, ``wo``), the dense FFNs and shared experts (``w1``, ``w2``, ``w3``) and the MTP
  projection ``eh_proj`` becomes an :class:`Fp8Linear` (class swap: same parameters, names and
  state_dict keys);
* every ``GroupedExperts`` becomes an :class:`Fp8GroupedExperts`;
* the embedding, the output ``head``, the MoE ``gate``, the norms and the attention core
  (softmax(QK^T)V) stay in the model's precision; master weights stay fp32.

See docs/fp8.md for the recipe, what is cached and the measured accuracy and memory.
"""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Iterable

from torch import nn

from hai_llm.model.moe import GroupedExperts

from .experts import Fp8GroupedExperts, expert_weight_quant, fp8_grouped_swiglu
from .linear import Fp8Linear, fp8_linear

__all__ = ["FP8_LINEAR_NAMES", "Fp8GroupedExperts", "Fp8Linear",
           "convert_to_fp8", "expert_weight_quant", "fp8_grouped_swiglu", "fp8_linear",
           "fp8_modules"]

# Leaf attribute names of the Linears that run in FP8 (the head is an nn.Linear too: never).
FP8_LINEAR_NAMES = frozenset({"wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo",  # MLA projections
                              "w1", "w2", "w3",  # dense FFN and shared experts (MLP)
                              "eh_proj"})  # MTP: concat(emb, h) -> dim


def _skipped(name: str, skip: Iterable[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch(name, pat) or fnmatch(leaf, pat) for pat in skip)


def convert_to_fp8(model: nn.Module, use_triton: bool | None = None,
                   skip: Iterable[str] = (), pow2_scale: bool = True) -> nn.Module:
    """Swap, in place, the FP8-eligible modules of ``model`` and return it.

    use_triton: True / False force the Triton kernels / the torch references; None (default)
        decides per call: Triton when the parameters are on CUDA, else the torch references
        (which round to real E4M3 through torch.float8_e4m3fn, so CPU runs have FP8 numerics).
    skip: fnmatch patterns on qualified module names (or leaf names) to keep in high precision,
        e.g. ``("mtp.*",)`` or ``("layers.0.*", "eh_proj")``.
    pow2_scale: power-of-two tile scales for the activations cached for backward (the input of
        every Fp8Linear and of the routed experts), which makes their 1x128 -> 128x1 re-tiling for
        Wgrad exact up to E4M3 underflow (see ``linear.py``).

    Also marks every MoE layer ``fp8_dispatch = True`` (and its expert-parallel dispatcher, if one
    is attached and has an ``fp8_dispatch`` attribute) so that the all-to-all dispatch payload can
    be sent in FP8. Idempotent: converting twice changes nothing.
    """
    skip = tuple(skip)
    for name, mod in list(model.named_modules()):
        if not name or _skipped(name, skip):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Linear) and leaf in FP8_LINEAR_NAMES:
            Fp8Linear.convert_(mod, use_triton=use_triton, pow2_scale=pow2_scale)
        elif isinstance(mod, GroupedExperts):
            Fp8GroupedExperts.convert_(mod, use_triton=use_triton, pow2_scale=pow2_scale)
        if hasattr(mod, "dispatcher") and hasattr(mod, "experts"):  # a MoE layer
            mod.fp8_dispatch = True
            disp = getattr(mod, "dispatcher", None)
            if disp is not None and hasattr(disp, "fp8_dispatch"):
                disp.fp8_dispatch = True
    return model


def fp8_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules that run in FP8."""
    return [n for n, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8GroupedExperts))]
