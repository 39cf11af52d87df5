"""The zero-bubble B/W split as a module swap: GEMMs whose weight gradient waits for a W step.

ZeroBubble pipelines (and DualPipe) split a backward into the input-gradient part ``B``, which
the previous stage is waiting for, and the weight-gradient part ``W``, which nobody waits for
and can fill a bubble later. Autograd computes both in one pass, so the split needs GEMMs
whose backward returns the input gradient at once and hands the weight-gradient GEMM, as a
closure over (input, grad_output), to a :class:`WeightGradStore`.

:func:`split_weight_grads` swaps the class of every plain ``nn.Linear`` to
:class:`WgradSplitLinear` and of every plain ``GroupedExperts`` to
:class:`WgradSplitGroupedExperts` (same parameters, names and state_dict keys, like the FP8
swap), and hands the store to any module that declares its own ``wgrad_store`` hook (the FP8
modules run their own autograd and defer their Wgrad GEMMs through it). Without an open sink
the store runs a closure at once, so a plain ``loss.backward()`` is unaffected.

Small parameters (RMSNorm weights, the router's gate, the embedding) still get their
gradients in ``B``: negligible work, and exact either way.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hai_llm.model.layers import accumulate_grad
from hai_llm.model.moe import GroupedExperts, grouped_mm, grouped_mm_prepared, grouped_operands, pad_columns


class WeightGradStore:
    """Collects deferred weight-gradient closures while a sink is open; runs them at once
    otherwise.  One per executor (no module-level state)."""

    def __init__(self) -> None:
        self._sink: Optional[list] = None

    def defer(self, fn: Callable[[], None]) -> None:
        if self._sink is None:
            with torch.no_grad():
                fn()
        else:
            self._sink.append(fn)

    @contextmanager
    def collect(self, sink: list):
        prev, self._sink = self._sink, sink
        try:
            yield sink
        finally:
            self._sink = prev


@torch.no_grad()
def run_closures(closures: Sequence[Callable[[], None]]) -> None:
    """Run deferred weight-gradient closures (no autograd graph: their inputs are saved
    activations that may require grad)."""
    for fn in closures:
        fn()


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class _LinearFn(torch.autograd.Function):
    """y = x W^T (+ b) with the weight-gradient GEMM deferred to the store.

    Autocast is resolved here (the cast dtype is an argument) because a custom Function is
    opaque to autocast: the same casts F.linear would get under autocast are applied by hand."""

    @staticmethod
    def forward(ctx, x, weight, bias, store, cast):
        dev = x.device.type
        with torch.autocast(dev, enabled=False):
            xc = x.to(cast) if cast is not None else x
            wc = weight.to(cast) if cast is not None else weight
            bc = None if bias is None else (bias.to(cast) if cast is not None else bias)
            y = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        ctx.params = (weight, bias)
        ctx.store = store
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, wc = ctx.saved_tensors
        weight, bias = ctx.params
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g2.mm(wc).view(*gy.shape[:-1], wc.shape[1]).to(ctx.x_dtype)
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            x2 = xc.reshape(-1, xc.shape[-1])

            def wgrad(weight=weight, bias=bias, x2=x2, g2=g2):
                if weight.requires_grad:
                    accumulate_grad(weight, x2.t().mm(g2).t())
                if bias is not None and bias.requires_grad:
                    accumulate_grad(bias, g2.sum(0))

            ctx.store.defer(wgrad)
        return gx, None, None, None, None


def _padded_rows(counts_E: torch.Tensor, R: int, device):
    E = counts_E.numel()
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=device), counts_E)
    start = counts_E.cumsum(0) - counts_E
    pos = torch.arange(R, device=device) - start[expert_of_row]
    return expert_of_row, pos, int(counts_E.max()) if E else 0


class _GroupedMMFn(torch.autograd.Function):
    """``grouped_mm(x, w, counts)`` with the weight-gradient deferred to the store.

    The backward mirrors autograd of whichever path ``grouped_mm`` takes, op for op: the
    grouped kernel on the operands ``grouped_operands`` zero-pads to the kernel's stride
    alignment (input grad ``gmm(gy', w')[:, :I]``, weight grad ``gmm(x'^T, gy')^T[:, :O, :I]`` with
    the same offsets, gy' = gy with zero columns up to O') or the zero-padded bmm of other
    dtypes, so the split changes no bit.
    """

    @staticmethod
    def forward(ctx, x, w, counts, store):
        if x.shape[0] == 0:
            y, xc, wc = grouped_mm(x, w, counts), x, w
        else:  # prepared once (autocast cast, alignment padding): multiplied now, saved for backward
            xc, wc, kernel = grouped_operands(x, w)
            y = grouped_mm_prepared(xc, wc, kernel, counts, w.shape[1])
        ctx.save_for_backward(xc, wc, counts)
        ctx.param = w
        ctx.x_dtype = x.dtype
        ctx.store = store
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, counts = ctx.saved_tensors
        param = ctx.param
        O, I = param.shape[1], param.shape[2]  # x and w may carry alignment padding beyond these
        R, E = x.shape[0], w.shape[0]
        if R == 0:
            if param.requires_grad:
                ctx.store.defer(lambda: accumulate_grad(param, torch.zeros_like(param)))
            return x.new_zeros((0, I), dtype=ctx.x_dtype), None, None, None
        gy = gy.contiguous()
        _, _, kernel = grouped_operands(x, w)
        if kernel is not None:
            offs = counts.cumsum(0).to(torch.int32)
            gy = pad_columns(gy, w.shape[1])  # grouped_mm dropped y's alignment columns: zero gradient
            gx = kernel(gy.to(w.dtype), w, offs=offs)[:, :I]
            if param.requires_grad:
                def wgrad(x=x, gy=gy, offs=offs, param=param):
                    gw = kernel(x.transpose(-2, -1), gy.to(x.dtype), offs=offs).transpose(-2, -1)
                    accumulate_grad(param, gw[:, :O, :I])

                ctx.store.defer(wgrad)
            return gx.to(ctx.x_dtype), None, None, None
        e, pos, cap = _padded_rows(counts, R, x.device)
        g_buf = gy.new_zeros(E, cap, gy.shape[1]).index_put((e, pos), gy, accumulate=True)
        gx = torch.bmm(g_buf, w.to(gy.dtype))[e, pos]
        if param.requires_grad:
            def wgrad(x=x, g_buf=g_buf, e=e, pos=pos, cap=cap, param=param):
                buf = x.new_zeros(E, cap, x.shape[1]).index_put((e, pos), x)
                accumulate_grad(param, torch.bmm(buf.transpose(1, 2), g_buf.to(buf.dtype)).transpose(1, 2))

            ctx.store.defer(wgrad)
        return gx.to(ctx.x_dtype), None, None, None


class WgradSplitLinear(nn.Linear):
    """An ``nn.Linear`` whose weight (and bias) gradient is deferred to ``wgrad_store``."""

    wgrad_store: WeightGradStore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFn.apply(x, self.weight, self.bias, self.wgrad_store, _autocast_dtype(x))


class WgradSplitGroupedExperts(GroupedExperts):
    """``GroupedExperts`` whose three grouped weight-gradient GEMMs are deferred to ``wgrad_store``.
    Same arithmetic as ``GroupedExperts.forward``: SwiGLU of two grouped GEMMs, then the third."""

    wgrad_store: WeightGradStore

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        def gmm(a, w):
            return _GroupedMMFn.apply(a, w, counts_E, self.wgrad_store)

        h = F.silu(gmm(x_RD, self.w1)) * gmm(x_RD, self.w3)
        return gmm(h, self.w2)


_SWAPS = {nn.Linear: WgradSplitLinear, GroupedExperts: WgradSplitGroupedExperts}


def split_weight_grads(model: nn.Module, store: WeightGradStore) -> int:
    """Swap every plain ``nn.Linear`` / ``GroupedExperts`` of ``model`` to its weight-gradient
    splitting class (in place; parameters, names and hooks kept) and give ``store`` to every
    module with a ``wgrad_store`` hook (the FP8 modules). Returns the number of modules wired.
    Idempotent: running it again only re-points the store."""
    n = 0
    for m in model.modules():
        target = _SWAPS.get(type(m))
        if target is not None:
            m.__class__ = target
        if target is not None or hasattr(type(m), "wgrad_store") or "wgrad_store" in vars(m):
            m.wgrad_store = store
            n += 1
    return n
