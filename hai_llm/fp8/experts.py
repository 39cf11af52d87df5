"""FP8 routed experts: the three expert projections of a MoE layer as grouped FP8 GEMMs.

``Fp8GroupedExperts`` replaces :class:`hai_llm.model.moe.GroupedExperts` with the same stacked
parameters (``w1``/``w3`` [E, I, D], ``w2`` [E, D, I], fp32 masters) and the same call,
``forward(x_RD, counts_E)`` on rows sorted by expert. Each projection runs as
``hai_llm.kernels.fp8_grouped_gemm`` with ``group_sizes = counts`` (empty experts are fine):

    forward   h1 = x W1[e]^T, h3 = x W3[e]^T     x: 1x128 tiles, W: 128x128 blocks per expert
              h  = silu(h1) * h3                  (fp32, from the fp32 GEMM outputs)
              y  = h W2[e]^T                      h: 1x128 tiles
    backward  dh  = dy W2[e]                      (grouped dgrad, dy 1x128)
              dW2 = dy_e^T h_e                    (grouped wgrad, dy and h 128x1 along tokens)
              dh1, dh3 = SwiGLU backward of dh    (fp32)
              dx  = dh1 W1[e] + dh3 W3[e]         (two grouped dgrads)
              dW1 = dh1_e^T x_e, dW3 = dh3_e^T x_e  (grouped wgrads, 128x1 along tokens)

What is cached for backward, all as FP8 1x128 tiles plus fp32 scales (about 1.03 bytes per
element), following the paper ("the SwiGLU input of MoE experts is cached in FP8 and its output
recomputed"):

* the SwiGLU inputs ``h1`` and ``h3`` [R, I]. Backward dequantizes them, recomputes the SwiGLU
  output ``h`` (needed by the w2 Wgrad) and its derivative from these FP8 values. The forward used
  the fp32 h1/h3, so the backward's h differs from the forward's by one E4M3 rounding of the
  SwiGLU inputs (at most 2**-4 relative per element);
* the expert input ``x`` [R, D] as quantized for the forward; the w1/w3 Wgrad re-tiles it to 128x1
  (dequantize, re-quantize column-wise, as in ``Fp8Linear``);
* the master weights (parameters, no extra memory), re-quantized per 128x128 block in backward
  (deterministic, bit-identical to the forward's FP8 weights).

No host synchronisation: the per-expert counts stay on the device; the group offsets are built
there once per layer (``hai_llm.kernels.fp8_grouped_gemm.group_offsets``) and shared by the
nine grouped GEMMs of forward and backward, whose grids are sized without reading the counts.
Backward quantizes the Dgrad weights and the Wgrad operands straight into the K-major layouts
(``transpose=True``) that the FP8 tensor cores read.

The expert input ``x`` is quantized with power-of-two scales (``pow2_scale=True``, the format of
the FP8 dispatch payload of the paper and of ``hai_llm.parallel.transport``): re-quantizing a
tensor that already went through a 1x128 power-of-two FP8 rounding is then the identity, so with
an FP8 dispatch the expert's Fprop sees exactly the FP8 values that crossed the network (no
second rounding), and the 128x1 re-tiling for Wgrad is exact up to E4M3 underflow.

Nothing of the size of the SwiGLU output ``h`` or of the fp32 GEMM outputs is kept.

Gradients (dy, dh1, dh3) are quantized through ``linear.grad_quant`` (power-of-two pre-scaling
that keeps the quantizers' absolute amax floor from flattening small gradients), and with
``wgrad_store`` set the three grouped Wgrad GEMMs are deferred to ``store.defer`` (zero-bubble
pipeline schedules), exactly as in ``Fp8Linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hai_llm.kernels.fp8_grouped_gemm import (fp8_grouped_gemm, fp8_grouped_gemm_dgrad,
                                              fp8_grouped_gemm_wgrad, group_offsets)
from hai_llm.kernels.fp8_quant import (act_dequant_ref, act_quant, act_quant_colwise,
                                       stacked_weight_quant)
from hai_llm.model.moe import GroupedExperts

from .linear import grad_quant, output_dtype, resolve_use_triton, retile_colwise, run_wgrad

__all__ = ["Fp8GroupedExperts", "expert_weight_quant", "fp8_grouped_swiglu"]

def expert_weight_quant(w: torch.Tensor, *, use_triton: bool, transpose: bool = False):
    """128x128 block quantization of each expert of a stacked [E, N, K] weight, in one launch.

    Returns (q [E, N, K] fp8, scales [E, ceil(N/128), ceil(K/128)] fp32), identical to
    ``weight_quant`` applied to every ``w[e]``; with ``transpose`` the same codes and scales stored
    as q [E, K, N], scales [E, ceil(K/128), ceil(N/128)] (the K-major operand of a grouped Dgrad).
    """
    w = w.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    return stacked_weight_quant(w, use_triton=use_triton, transpose=transpose)


def _silu_grad(a: torch.Tensor) -> torch.Tensor:
    sig = torch.sigmoid(a)
    return sig * (1 + a * (1 - sig))


class _Fp8GroupedSwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, w3, counts, use_triton: bool, pow2_scale: bool,
                out_dtype: torch.dtype, wgrad_store):
        # The counts stay where they are (no host read): the Triton path builds the group
        # offsets on the device once and hands them to all nine grouped GEMMs of the layer.
        sizes = counts.detach()
        if sizes.dtype not in (torch.int32, torch.int64):
            sizes = sizes.long()
        offs = group_offsets(sizes, x.device) if use_triton else None
        gk = {"use_triton": use_triton, "group_offsets": offs}
        with torch.autocast(x.device.type, enabled=False):
            x = x if x.is_contiguous() else x.contiguous()
            xq, xs = act_quant(x, pow2_scale=pow2_scale, use_triton=use_triton)
            w1q, w1s = expert_weight_quant(w1, use_triton=use_triton)
            w3q, w3s = expert_weight_quant(w3, use_triton=use_triton)
            w2q, w2s = expert_weight_quant(w2, use_triton=use_triton)
            h1 = fp8_grouped_gemm(xq, xs, w1q, w1s, sizes, **gk)
            h3 = fp8_grouped_gemm(xq, xs, w3q, w3s, sizes, **gk)
            h = F.silu(h1) * h3
            hq, hs = act_quant(h, use_triton=use_triton)
            y = fp8_grouped_gemm(hq, hs, w2q, w2s, sizes, out_dtype=out_dtype, **gk)
            # the SwiGLU inputs, cached in FP8 (h and the fp32 h1/h3 die here)
            h1q, h1s = act_quant(h1, use_triton=use_triton)
            h3q, h3s = act_quant(h3, use_triton=use_triton)
        ctx.save_for_backward(xq, xs, h1q, h1s, h3q, h3s, w1, w2, w3, sizes, offs)
        ctx.use_triton = use_triton
        ctx.pow2_scale = pow2_scale
        ctx.wgrad_store = wgrad_store
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, xs, h1q, h1s, h3q, h3s, w1, w2, w3, sizes, offs = ctx.saved_tensors
        ut = ctx.use_triton
        gk = {"use_triton": ut, "group_offsets": offs}
        need_x, need_w1, need_w2, need_w3 = ctx.needs_input_grad[:4]
        dev = dy.device
        dx = None
        with torch.autocast(dev.type, enabled=False):
            dy = dy if dy.is_contiguous() else dy.contiguous()
            # recompute the SwiGLU output and its derivative from the FP8-cached inputs
            h1 = act_dequant_ref(h1q, h1s)
            h3 = act_dequant_ref(h3q, h3s)
            s1 = F.silu(h1)
            dh1 = dh3 = None
            if need_x or need_w1 or need_w3:
                dyq, dys = grad_quant(dy, use_triton=ut)
                # Dgrad reads W[e]^T: quantized straight into [E, K, N] (K-major), same codes
                w2q, w2s = expert_weight_quant(w2, use_triton=ut, transpose=True)
                dh = fp8_grouped_gemm_dgrad(dyq, dys, w2q, w2s, sizes, b_kmajor=True, **gk)
                dh1 = dh * h3 * _silu_grad(h1)
                dh3 = dh * s1
                del dh
            if need_x:
                w1q, w1s = expert_weight_quant(w1, use_triton=ut, transpose=True)
                w3q, w3s = expert_weight_quant(w3, use_triton=ut, transpose=True)
                d1q, d1s = grad_quant(dh1, use_triton=ut)
                d3q, d3s = grad_quant(dh3, use_triton=ut)
                dx = fp8_grouped_gemm_dgrad(d1q, d1s, w1q, w1s, sizes, b_kmajor=True, **gk)
                dx += fp8_grouped_gemm_dgrad(d3q, d3s, w3q, w3s, sizes, b_kmajor=True, **gk)
                dx = dx.to(ctx.x_dtype)
            h = s1 * h3 if need_w2 else None
            del h1, h3, s1
        pow2 = ctx.pow2_scale

        def wgrad(d, a, w, a_pow2=False, a_cached=False):
            """dW[e] = d_e^T a_e over the global 128x1 token tiles of d and a, both quantized
            transposed ([., tokens], tokens contiguous: the K-major operands)."""
            def thunk():
                with torch.autocast(dev.type, enabled=False):
                    dc, dcs = grad_quant(d, colwise=True, use_triton=ut, transpose=True)
                    if a_cached:  # the FP8 expert input, re-tiled 1x128 -> 128x1
                        ac, acs = retile_colwise(a[0], a[1], a_pow2, ut, transpose=True)
                    else:
                        ac, acs = act_quant_colwise(a, use_triton=ut, transpose=True)
                    return fp8_grouped_gemm_wgrad(dc, dcs, ac, acs, sizes, out_dtype=w.dtype,
                                                  transposed=True, **gk)
            return w, thunk

        dw1, dw2, dw3 = run_wgrad(ctx.wgrad_store, [
            wgrad(dh1, (xq, xs), w1, pow2, True) if need_w1 else None,
            wgrad(dy, h, w2) if need_w2 else None,
            wgrad(dh3, (xq, xs), w3, pow2, True) if need_w3 else None])
        return dx, dw1, dw2, dw3, None, None, None, None, None


def fp8_grouped_swiglu(x_RD: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                       counts_E: torch.Tensor, *, use_triton: bool | None = None,
                       pow2_scale: bool = True, wgrad_store=None) -> torch.Tensor:
    """Functional form: w2(silu(w1 x) * w3 x) per expert in FP8 -> [R, D] (module docstring)."""
    ut = resolve_use_triton(use_triton, w1)
    out_dtype = output_dtype(x_RD)
    if x_RD.shape[0] == 0:  # no rows on this rank: keep the graph connected, nothing to compute
        return (x_RD.new_zeros(0, w2.shape[1]) + 0 * (w1.sum() + w2.sum() + w3.sum())).to(out_dtype)
    return _Fp8GroupedSwiGLUFn.apply(x_RD, w1, w2, w3, counts_E, ut, pow2_scale, out_dtype,
                                     wgrad_store)


class Fp8GroupedExperts(GroupedExperts):
    """``GroupedExperts`` computed with FP8 grouped GEMMs (module docstring). Same parameters and
    state_dict; ``Fp8GroupedExperts.convert_(experts)`` swaps the class in place."""

    fp8_use_triton: bool | None = None  # None: Triton iff the weights are on CUDA
    fp8_pow2_scale: bool = True  # the expert input x: power-of-two scales (the dispatch format)
    wgrad_store = None  # an object with defer(fn): Wgrad GEMMs deferred (zero-bubble pipelines)

    def __init__(self, n_experts: int, dim: int, inter_dim: int, *,
                 use_triton: bool | None = None, pow2_scale: bool = True):
        super().__init__(n_experts, dim, inter_dim)
        self.fp8_use_triton = use_triton
        self.fp8_pow2_scale = pow2_scale

    @classmethod
    def convert_(cls, experts: GroupedExperts, *, use_triton: bool | None = None,
                 pow2_scale: bool = True) -> "Fp8GroupedExperts":
        if not isinstance(experts, GroupedExperts):
            raise TypeError(f"expected GroupedExperts, got {type(experts).__name__}")
        experts.__class__ = cls
        experts.fp8_use_triton = use_triton
        experts.fp8_pow2_scale = pow2_scale
        return experts

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_swiglu(x_RD, self.w1, self.w2, self.w3, counts_E,
                                  use_triton=self.fp8_use_triton, pow2_scale=self.fp8_pow2_scale,
                                  wgrad_store=self.wgrad_store)

    def extra_repr(self) -> str:
        backend = {None: "auto", True: "triton", False: "torch"}[self.fp8_use_triton]
        e, i, d = self.w1.shape
        return f"n_experts={e}, dim={d}, inter_dim={i}, fp8=e4m3, backend={backend}"
