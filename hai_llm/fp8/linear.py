"""FP8 Linear: all three GEMMs of ``y = x W^T`` in E4M3 with fine-grained online scales.

The DeepSeek-V3 recipe (docs/deepseek_v3.md; arXiv:2412.19437, section 3.3), as a drop-in
``nn.Linear`` subclass with the same parameters (an fp32 master ``weight`` of shape [out, in],
optional ``bias``):

    Fprop  y  = x @ W^T      x: 1x128 tiles (act_quant)      W: 128x128 blocks (weight_quant)
    Dgrad  dx = dy @ W       dy: 1x128 tiles                 W: the same 128x128 blocks
    Wgrad  dW = dy^T @ x     dy, x: 128x1 tiles along tokens (act_quant_colwise)

E4M3 everywhere (no E5M2); every scale is computed online from its tile's amax
(``s = max(amax, 1e-4) / 448``); the GEMMs accumulate in FP32, promoting and scaling every 128
elements of K (``hai_llm.kernels.fp8_gemm``).

What is kept for backward (``ctx.save_for_backward``, so ``saved_tensors_hooks`` see it):

* the FP8 input ``x`` as quantized for Fprop (1 byte/element) plus its 1x128 scales
  (4 bytes per 128 elements): 1.03 bytes/element instead of 4 (fp32) or 2 (bf16). Linears that
  read the same input tensor (MLA's ``wq_a`` and ``wkv_a``, an MLP's ``w1`` and ``w3``) share one
  quantization and so one cached copy (``input_quant``: a small identity-keyed cache);
* the master weight itself (a parameter, no extra memory). Backward re-quantizes it per
  128x128 block, which is deterministic and so gives bit for bit the FP8 weight of Fprop.

Wgrad needs ``x`` tiled 128x1 along tokens, but the cache is 1x128: backward dequantizes the
cached tiles (exact: q * s in fp32) and re-quantizes them column-wise, the paper's "re-tiling".
By default (``pow2_scale=True``) every tile scale of x is a power of two, as the paper does for
the activations it re-tiles: the second quantization then only multiplies each FP8 value by a
power of two, which is exact unless the value drops below E4M3's normal range (2**-6 of the new
scale) and loses subnormal bits. Measured on 1024x512 tensors: Gaussian data, 0 elements change;
heavy-tailed data (x * exp(2 N(0,1))), 1.8 % of the elements change (all underflow), 1e-5 relative
norm error. With ordinary scales (``pow2_scale=False``) 99 % of the elements get a second E4M3
rounding (2.6 % relative norm error on Gaussian data). Power-of-two scales cost nothing in
precision (the mantissa keeps its 3 bits; only the top of the range, (224, 448] instead of 448, is
used for the tile amax). The paper stores the input of the attention output projection ``wo`` in
a custom E5M6 format; we keep E4M3 (with power-of-two scales) for it like for every other Linear.

Gradient quantization: dy is scaled by a power of two bringing its max into [0.5, 1) before the
tile quantizers, and the scales are divided by the same factor (``grad_quant``): exact, and it
keeps the quantizers' absolute amax floor (1e-4) from flattening small gradients. A NaN or inf in
dy (or x) gives its tiles NaN scales (``hai_llm.kernels.fp8_quant``), so dx and dW come out NaN and
the trainer's non-finite-step check sees the step, on the GPU as on the CPU.

Operand layouts: backward quantizes straight into the K-major layouts the FP8 tensor cores read,
the weight transposed for Dgrad (``weight_quant(..., transpose=True)``) and dy, x transposed for
Wgrad (``act_quant_colwise(..., transpose=True)``): same codes and scales as the row-major
quantization, no extra copy before the GEMMs.

Zero-bubble pipelines: with ``wgrad_store`` set (an object with ``defer(fn)``), backward computes
only dx and hands the Wgrad GEMM to ``store.defer`` as a closure that accumulates into ``.grad``.

Output dtype: the input's dtype, or the autocast dtype when autocast is on (like ``nn.Linear``).
The GEMMs themselves always run with autocast off. dx has x's dtype; dW has the weight's dtype
(fp32 master) and is accumulated into ``weight.grad`` by autograd.

``use_triton``: True runs the Triton kernels (CUDA, or CPU with TRITON_INTERPRET=1), False the
pure-torch references (real FP8 rounding through ``torch.float8_e4m3fn``, fp32 accumulation per
128-block), None picks Triton exactly when the weight is on CUDA.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from hai_llm.model.layers import accumulate_grad
from hai_llm.kernels.fp8_gemm import fp8_linear_dgrad, fp8_linear_fprop, fp8_linear_wgrad
from hai_llm.kernels.fp8_quant import (act_dequant_ref, act_quant, act_quant_colwise,
                                       default_use_triton, weight_quant)

__all__ = ["Fp8Linear", "fp8_linear", "grad_prescale", "grad_quant",
           "output_dtype", "resolve_use_triton", "run_wgrad"]


def resolve_use_triton(use_triton: bool | None, t: torch.Tensor) -> bool:
    """``use_triton`` if given, else Triton exactly for CUDA tensors."""
    return default_use_triton(t) if use_triton is None else bool(use_triton)


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """What ``nn.Linear`` would return for input ``x``: the autocast dtype when autocast is
    enabled for x's device type (and x is floating), else x's own dtype."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def grad_prescale(t: torch.Tensor) -> torch.Tensor:
    """Power-of-two factor g (a 0-d fp32 tensor, no host sync) bringing max|t| into [0.5, 1).

    The quantizers floor every tile amax at 1e-4 (DeepSeek's inference-kernel constant). That is
    harmless for activations but not for gradients, whose entries shrink with the number of tokens
    averaged in the loss (1e-6 and below is normal): a floored tile is quantized with a scale far
    above its amax, and its small entries lose mantissa bits or flush to zero. ``grad_quant``
    quantizes ``t * g`` and divides the scales by g. Both are exact (powers of two), so every tile
    whose amax is >= 1e-4 * max|t| / g is quantized exactly as without the floor, and the floor
    becomes relative to the tensor instead of absolute. Zero or non-finite tensors get g = 1.
    """
    amax = t.detach().abs().amax().float() if t.numel() else t.new_zeros((), dtype=torch.float32)
    _, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1)
    ok = torch.isfinite(amax) & (amax > 0)
    e = torch.where(ok, e, torch.zeros_like(e)).clamp(-100, 100)
    return torch.ldexp(torch.ones_like(amax), -e)


def grad_quant(t: torch.Tensor, *, colwise: bool = False, use_triton: bool,
               transpose: bool = False):
    """``act_quant`` (1x128) or ``act_quant_colwise`` (128x1; with ``transpose`` stored
    transposed, the K-major Wgrad operand) of a gradient, with the amax floor made relative to the
    tensor (see ``grad_prescale``); same (q, scale) contract."""
    g = grad_prescale(t)
    # bf16 has fp32's exponent range, so t * g stays exact there; fp16 goes through fp32
    tg = t.float() * g if t.dtype == torch.float16 else t * g.to(t.dtype)
    if colwise:
        q, s = act_quant_colwise(tg, use_triton=use_triton, transpose=transpose)
    else:
        q, s = act_quant(tg, use_triton=use_triton)
    return q, s / g


class _InputQuantCache:
    """The last few (input tensor -> its 1x128 FP8 quantization) pairs, so that Linears reading
    the same input (MLA's wq_a and wkv_a, an MLP's w1 and w3) quantize it once and save ONE FP8
    copy for backward. Inputs are held by weak reference and matched by identity and version
    counter (an in-place change invalidates the entry); the FP8 results are held weakly as well,
    so the cache never keeps memory alive on its own."""

    SIZE = 4

    def __init__(self):
        self.entries: list[tuple] = []

    def get(self, x: torch.Tensor, key: tuple):
        for ref, version, k, qref, sref in self.entries:
            if ref() is x and version == x._version and k == key:
                q, s = qref(), sref()
                if q is not None and s is not None:
                    return q, s
        return None

    def put(self, x: torch.Tensor, key: tuple, q: torch.Tensor, s: torch.Tensor) -> None:
        self.entries = [e for e in self.entries if e[0]() is not None][-(self.SIZE - 1):]
        self.entries.append((weakref.ref(x), x._version, key, weakref.ref(q), weakref.ref(s)))


_input_cache = _InputQuantCache()


def input_quant(x: torch.Tensor, k: int, pow2_scale: bool, use_triton: bool):
    """1x128 quantization of x viewed as [T, k], shared between Linears reading the same x."""
    cache = not x.is_inference()  # inference tensors have no version counter
    key = (tuple(x.shape), pow2_scale, use_triton)
    hit = _input_cache.get(x, key) if cache else None
    if hit is not None:
        return hit
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    q, s = act_quant(x2, pow2_scale=pow2_scale, use_triton=use_triton)
    if cache:
        _input_cache.put(x, key, q, s)
    return q, s


def retile_colwise(q: torch.Tensor, s: torch.Tensor, pow2_scale: bool, use_triton: bool,
                   transpose: bool = False):
    """128x1 (token-tiled) FP8 of a tensor cached as 1x128 FP8 tiles [T, K]: dequantize (exact)
    and re-quantize column-wise (a second E4M3 rounding, exact up to underflow with pow2 scales).
    ``transpose``: stored as [K, T] with scales [K, ceil(T/128)] (the K-major Wgrad operand)."""
    return act_quant_colwise(act_dequant_ref(q, s), pow2_scale=pow2_scale, use_triton=use_triton,
                             transpose=transpose)


def run_wgrad(store, params_grads) -> list:
    """Either compute the weight gradients now (``store`` None: returned to autograd) or hand
    them to ``store.defer`` as one closure that accumulates them into ``p.grad`` later (the
    B/W split of zero-bubble pipeline schedules); then autograd gets None for those params.

    ``params_grads``: [(param, thunk computing its gradient) or None]."""
    if store is None:
        return [None if pg is None else pg[1]() for pg in params_grads]
    todo = [pg for pg in params_grads if pg is not None]

    def wgrad(todo=todo):
        for p, thunk in todo:
            accumulate_grad(p, thunk())

    store.defer(wgrad)
    return [None] * len(params_grads)


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, use_triton: bool, pow2_scale: bool, out_dtype: torch.dtype,
                wgrad_store):
        n, k = weight.shape
        lead = x.shape[:-1]
        with _no_autocast(x.device):
            xq, xs = input_quant(x, k, pow2_scale, use_triton)
            wq, ws = weight_quant(weight.detach(), use_triton=use_triton)
            y = fp8_linear_fprop(xq, xs, wq, ws, use_triton=use_triton, out_dtype=torch.float32
                                 if bias is not None else out_dtype)
            if bias is not None:
                y = (y + bias.float()).to(out_dtype)
        ctx.save_for_backward(xq, xs, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_dtype = x.dtype
        ctx.lead = lead
        ctx.use_triton = use_triton
        ctx.pow2_scale = pow2_scale
        ctx.wgrad_store = wgrad_store
        ctx.saved_bias = bias
        return y.view(*lead, n)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, weight = ctx.saved_tensors
        n, k = weight.shape
        ut = ctx.use_triton
        dx = None
        dev = dy.device
        with _no_autocast(dev):
            dy2 = dy.reshape(-1, n)
            if not dy2.is_contiguous():
                dy2 = dy2.contiguous()
            if ctx.needs_input_grad[0]:
                # Dgrad: dy per 1x128 tile (never block-wise: the paper's warning, arXiv:2412.19437)
                dyq, dys = grad_quant(dy2, use_triton=ut)
                # W^T [K, N] (K-major for the GEMM): the same blocks and codes as Fprop's W
                wq, ws = weight_quant(weight.detach(), use_triton=ut, transpose=True)
                dx = fp8_linear_dgrad(dyq, dys, wq, ws, use_triton=ut, out_dtype=ctx.x_dtype,
                                      w_transposed=True).view(*ctx.lead, k)

        def wgrad(weight=weight, dy2=dy2, xq=xq, xs=xs, pow2=ctx.pow2_scale):
            with _no_autocast(dev):
                # dy^T [N, T] and x^T [K, T], 128x1 tiles along T, T contiguous (K-major)
                dyc, dycs = grad_quant(dy2, colwise=True, use_triton=ut, transpose=True)
                xc, xcs = retile_colwise(xq, xs, pow2, ut, transpose=True)
                return fp8_linear_wgrad(dyc, dycs, xc, xcs, use_triton=ut, out_dtype=weight.dtype,
                                        transposed=True)

        def bgrad(dy2=dy2, dtype=ctx.bias_dtype):
            return dy2.float().sum(0).to(dtype)

        dw, db = run_wgrad(ctx.wgrad_store, [
            (weight, wgrad) if ctx.needs_input_grad[1] else None,
            (ctx.saved_bias, bgrad) if ctx.has_bias and ctx.needs_input_grad[2] else None])
        return dx, dw, db, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               use_triton: bool | None = None, pow2_scale: bool = True,
               wgrad_store=None) -> torch.Tensor:
    """Functional FP8 ``F.linear``: x [..., in] -> [..., out] (dtype: see ``output_dtype``).

    ``wgrad_store``: an object with ``defer(fn)`` (e.g. the pipeline's ``WeightGradStore``); when
    given, backward computes only dx and defers the Wgrad GEMM (accumulated into ``.grad``)."""
    return _Fp8LinearFn.apply(x, weight, bias, resolve_use_triton(use_triton, weight), pow2_scale,
                              output_dtype(x), wgrad_store)


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose Fprop, Dgrad and Wgrad run in FP8 (module docstring).

    Same parameters, names and state_dict as ``nn.Linear``; an existing Linear becomes one in
    place with ``Fp8Linear.convert_(linear)`` (a class swap, parameters untouched). The class
    attributes are the defaults a swapped module reads.
    """

    fp8_use_triton: bool | None = None  # None: Triton iff the weight is on CUDA
    fp8_pow2_scale: bool = True  # power-of-two scales for the cached input (exact re-tiling)
    wgrad_store = None  # set to a WeightGradStore-like object (defer(fn)) to defer Wgrad

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, use_triton: bool | None = None, pow2_scale: bool = True):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8_use_triton = use_triton
        self.fp8_pow2_scale = pow2_scale

    @classmethod
    def convert_(cls, linear: nn.Linear, *, use_triton: bool | None = None,
                 pow2_scale: bool = True) -> "Fp8Linear":
        """Turn ``linear`` into an Fp8Linear in place (keeps its parameters and hooks)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        linear.fp8_use_triton = use_triton
        linear.fp8_pow2_scale = pow2_scale
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, use_triton=self.fp8_use_triton,
                          pow2_scale=self.fp8_pow2_scale, wgrad_store=self.wgrad_store)

    def extra_repr(self) -> str:
        backend = {None: "auto", True: "triton", False: "torch"}[self.fp8_use_triton]
        return (f"{super().extra_repr()}, fp8=e4m3 1x128/128x128, backend={backend}"
                + ("" if self.fp8_pow2_scale else ", pow2_scale=False"))
