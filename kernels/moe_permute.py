"""Data movement around the MoE all-to-all: gather tokens into send order, combine outputs back.

Why this exists: expert parallelism (docs/deepseek_v3.md; arXiv:2412.19437) sends every token
once per chosen expert, grouped by destination expert (and therefore by destination rank, because
a rank holds a contiguous range of experts).  Before the dispatch all-to-all the rows must be gathered into
that order, and the paper sends the dispatch payload in FP8 with power-of-2 scales per 1x128 tile,
so the gather fuses that quantization (one pass over the activations instead of two).  After the
combine all-to-all the expert outputs come back in the same order and must be weighted by the
routing weights and summed per token; that sum is done in fp32 in a FIXED order (no atomics), so a
run is bit-reproducible and the pure-torch reference reproduces it exactly.

Public API (the ``*_ref`` functions are pure torch):

* ``routing_to_send_order(topk_idx, n_experts, experts_per_rank, check=None)`` -> ``SendOrder``
* ``permute(x, src_index, out_rows=None, quant_fp8=False, block=128, use_triton=None,
  check=None)``
* ``unpermute_combine(y, dst_index, weights, n_tokens, out_dtype=None, use_triton=None,
  check=None)``

``use_triton=None`` picks the Triton kernels exactly for CUDA tensors and the references otherwise
(``hai_llm.kernels.policy.resolve_use_triton``); True / False force one.

No host synchronisation on the hot path: routing, permute and the Triton combine run on device
tensors without reading them on the host (per-expert and per-token counts with ``scatter_add_``,
not ``bincount``, whose CUDA kernel reads the maximum on the host). The index range checks
(``src_index`` / ``dst_index`` in [-1, n), ``topk_idx`` in [0, n_experts)) are a host read each,
so they run only with ``check=True`` or ``HAI_LLM_DEBUG_CHECKS=1`` (``hai_llm.kernels.policy``);
shape, dtype and device checks always run. Only the reference combine reads one number on the
host (the largest number of rows per token, its loop count).

Index conventions: ``src_index[r] == -1`` makes output row r of ``permute`` a zero row (padding,
e.g. to align an expert's group for a grouped GEMM), and ``dst_index[r] == -1`` makes
``unpermute_combine`` ignore row r, so padded rows round-trip.

Summation order of ``unpermute_combine`` (the contract the reference reproduces bit-for-bit):
``acc_t = 0.0f; for r ascending with dst_index[r] == t: acc_t = acc_t + (w[r] * float(y[r]))``
with every product and sum rounded to fp32 (no fused multiply-add: the GPU launch passes
``enable_fp_fusion=False``), then one rounding to the output dtype.

FP8 recipe (``quant_fp8=True``): per row and per ``block``-wide channel tile,
``amax = max(max|x|, 1e-4)``, ``scale = 2**ceil(log2(amax / 448))``, ``x_fp8 = e4m3(x / scale)``
(round to nearest even), dequantized as ``x_fp8.float() * scale``.  The kernel derives the exponent
from the bits of ``amax`` (448 = 1.75 * 2**8, so ``e = E - 8 + (mantissa(amax) > 0.75)``), which is
exact and needs no division or log; the reference evaluates the formula in float64.  Because the
scale is a power of two, ``x / scale`` is exact and only the e4m3 cast rounds.  A tile holding a
NaN or an infinity gets a NaN scale and NaN codes (0x7f), in the kernel (counted with comparisons:
``tl.max`` drops NaN on a GPU) and in the reference alike, so a non-finite activation stays
non-finite through an FP8 dispatch.

Not differentiable through the Triton path (forward data movement only): the backward of
``permute`` is ``unpermute_combine`` with unit weights and vice versa, which the caller's
autograd.Function composes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hai_llm.kernels.policy import debug_checks, resolve_use_triton

FP8_E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
# Both narrowing casts below are rounded to nearest even with explicit bit arithmetic first, so the
# final ``.to()`` only ever sees exactly representable values.  That makes the result independent of
# how a backend implements the cast (Triton 3.x's CPU interpreter truncates fp32 -> bf16 and rounds
# fp32 -> fp8 half-up without carrying into the exponent, e.g. 127.2 -> 64).
@triton.jit
def _round_to_e4m3(v):
    """fp32 -> nearest-even e4m3 value (still fp32), for |v| <= 448."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    # normals (>= 2**-6): keep 3 of 23 mantissa bits; a carry correctly bumps the exponent
    norm = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # subnormals: multiples of 2**-9, rounded by the 2**23 magic-number trick
    sub = ((a * 512.0 + 8388608.0) - 8388608.0) * 0.001953125
    r = tl.where(a >= 0.015625, norm, sub)
    sign = v.to(tl.int32, bitcast=True) & -2147483648
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_bf16(v):
    """fp32 -> nearest-even bf16 value (still fp32); NaN passes through."""
    bits = v.to(tl.int32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, r)


@triton.jit
def _permute_kernel(x_ptr, idx_ptr, out_ptr, scale_ptr, R, OUT_ROWS, D, stride_xt, stride_xd,
                    n_tiles, QUANT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program: BLOCK_R output rows x one BLOCK_D column tile (the quantization tile if QUANT).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < OUT_ROWS
    col_ok = cols < D
    src = tl.load(idx_ptr + rows, mask=row_ok & (rows < R), other=-1).to(tl.int64)
    live = (src >= 0)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + src[:, None] * stride_xt + cols[None, :].to(tl.int64) * stride_xd,
                mask=live, other=0.0)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    store_ok = row_ok[:, None] & col_ok[None, :]
    if QUANT:
        xf = x.to(tl.float32)
        ax = tl.abs(xf)
        # non-finite lanes counted with a comparison (False for NaN): tl.max drops NaN on a GPU
        bad = tl.sum(tl.where(ax < float("inf"), 0, 1), axis=1) > 0
        amax = tl.maximum(tl.max(ax, axis=1), 1e-4)
        amax = tl.where(bad, 1.0, amax)  # keep the bit arithmetic below on finite values
        bits = amax.to(tl.int32, bitcast=True)
        # ceil(log2(amax / 448)) from the bits: amax = m * 2**E, 448 = 1.75 * 2**8.
        e = ((bits >> 23) & 0xFF) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
        inv_scale = ((127 - e) << 23).to(tl.float32, bitcast=True)
        xs = tl.where(bad[:, None], 0.0, xf * inv_scale[:, None])
        q = _round_to_e4m3(tl.clamp(xs, -448.0, 448.0)).to(tl.float8e4nv)
        # a non-finite tile: NaN codes (written on the bits: the interpreter casts NaN to 384)
        q = tl.where(bad[:, None], 0x7F, q.to(tl.int8, bitcast=True)).to(tl.float8e4nv,
                                                                          bitcast=True)
        scale = tl.where(bad, float("nan"), scale)
        tl.store(out_ptr + offs, q, mask=store_ok)
        tl.store(scale_ptr + rows.to(tl.int64) * n_tiles + tl.program_id(1), scale, mask=row_ok)
    else:
        tl.store(out_ptr + offs, x, mask=store_ok)


@triton.jit
def _combine_kernel(y_ptr, w_ptr, order_ptr, row_ptr_ptr, out_ptr, n_tokens, D, stride_yr,
                    stride_yd, OUT_BF16: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    # One program: BLOCK_T tokens x BLOCK_D columns.  Token t owns the CSR slice
    # order[row_ptr[t]:row_ptr[t+1]] (rows of token t in increasing r); step j adds each token's
    # j-th row, so every token is summed sequentially in increasing r.
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = toks < n_tokens
    col_ok = cols < D
    start = tl.load(row_ptr_ptr + toks, mask=tok_ok, other=0)
    count = tl.load(row_ptr_ptr + toks + 1, mask=tok_ok, other=0) - start
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.max(count, axis=0)):
        live = j < count
        row = tl.load(order_ptr + start + j, mask=live, other=0).to(tl.int64)
        w = tl.load(w_ptr + row, mask=live, other=0.0)
        v = tl.load(y_ptr + row[:, None] * stride_yr + cols[None, :].to(tl.int64) * stride_yd,
                    mask=live[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = acc + w[:, None] * v  # masked lanes add +0.0, which leaves acc unchanged
    if OUT_BF16:
        acc = _round_to_bf16(acc)
    offs = toks[:, None].to(tl.int64) * D + cols[None, :]
    store_ok = tok_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=store_ok)


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------
def _check_index(name: str, idx: torch.Tensor, length_name: str, upper: int, device,
                 check: bool | None) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor, got "
                         f"{getattr(idx, 'shape', type(idx))}")
    if idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {idx.dtype}; cast it with .long()")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the data is on {device}; move it")
    if idx.numel() and debug_checks(check):  # a host read: debug only (module docstring)
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < -1 or hi >= upper:
            raise ValueError(f"{name} values must lie in [-1, {length_name}={upper}) "
                             f"(-1 = padding), got range [{lo}, {hi}]")


def _check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, D], got "
                         f"{getattr(t, 'shape', type(t))}; reshape it to 2-D")
    if t.dtype not in _X_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_runnable(t: torch.Tensor) -> None:
    # Kernels decorated while TRITON_INTERPRET=1 run on CPU tensors; compiled ones need a GPU.
    interpreted = not isinstance(_permute_kernel, triton.runtime.JITFunction)
    if t.device.type == "cpu" and not interpreted:
        raise ValueError("use_triton=True needs GPU tensors; for CPU tensors pass use_triton=False "
                         "or set TRITON_INTERPRET=1 before hai_llm.kernels is imported")


def _pow2_scale_ref(amax: torch.Tensor) -> torch.Tensor:
    """2**ceil(log2(max(amax, 1e-4) / 448)) evaluated in float64, returned as float32; NaN for a
    non-finite amax (a tile holding a NaN or an infinity)."""
    a = amax.double().clamp_min(AMAX_FLOOR)
    s = torch.exp2(torch.ceil(torch.log2(a / FP8_E4M3_MAX))).float()
    return torch.where(torch.isfinite(amax), s, torch.full_like(s, float("nan")))


# --------------------------------------------------------------------------------------------------
# permute
# --------------------------------------------------------------------------------------------------
def permute_ref(x: torch.Tensor, src_index: torch.Tensor, out_rows: int | None = None,
                quant_fp8: bool = False, block: int = 128):
    """Pure-torch permute: out[r] = x[src_index[r]] (zero row for -1), optionally fp8-quantized."""
    R, D = src_index.numel(), x.shape[1]
    out_rows = R if out_rows is None else out_rows
    idx = src_index.long()
    g = torch.zeros(out_rows, D, dtype=x.dtype, device=x.device)
    if R and x.shape[0]:  # no nonzero() / boolean indexing: nothing is read on the host
        rows = x.index_select(0, idx.clamp_min(0))
        g[:R] = torch.where((idx >= 0)[:, None], rows, torch.zeros((), dtype=x.dtype,
                                                                    device=x.device))
    if not quant_fp8:
        return g
    n_tiles = triton.cdiv(D, block)
    pad = torch.zeros(out_rows, n_tiles * block, dtype=torch.float32, device=x.device)
    pad[:, :D] = g.float()
    tiles = pad.view(out_rows, n_tiles, block)
    scale = _pow2_scale_ref(tiles.abs().amax(dim=2))
    q = (tiles / scale[:, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = torch.where(torch.isnan(q), float("nan"), q)  # one NaN code (0x7f), as the kernel
    return q.reshape(out_rows, n_tiles * block)[:, :D].to(torch.float8_e4m3fn), scale


def dequantize_ref(x_fp8: torch.Tensor, scales: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of the fused quantization: x_fp8.float() * scale of its tile, as float32."""
    D = x_fp8.shape[1]
    return x_fp8.float() * scales.repeat_interleave(block, dim=1)[:, :D]


def permute(x: torch.Tensor, src_index: torch.Tensor, out_rows: int | None = None,
            quant_fp8: bool = False, block: int = 128, *, use_triton: bool | None = None,
            check: bool | None = None):
    """Gather rows of x into send order: out[r] = x[src_index[r]] for r < len(src_index).

    ``src_index[r] == -1`` and rows ``len(src_index) <= r < out_rows`` are zero rows (padding).
    Returns out [out_rows, D] in x's dtype, or with ``quant_fp8`` the tuple
    (x_fp8 [out_rows, D] float8_e4m3fn, scales [out_rows, ceil(D / block)] float32).
    ``use_triton=None``: Triton exactly for CUDA tensors. ``check``: verify the index range on
    the host (default: ``HAI_LLM_DEBUG_CHECKS``); an index out of range is undefined otherwise.
    """
    _check_2d("x", x)
    T, D = x.shape
    use_triton = resolve_use_triton(use_triton, x)
    _check_index("src_index", src_index, "x.shape[0]", T, x.device, check)
    R = src_index.numel()
    if out_rows is None:
        out_rows = R
    if not isinstance(out_rows, int) or out_rows < R:
        raise ValueError(f"out_rows must be an int >= len(src_index)={R}, got {out_rows}")
    if not isinstance(block, int) or block < 1 or block > 4096 or block & (block - 1):
        raise ValueError(f"block must be a power of two in [1, 4096], got {block}")
    if not use_triton or out_rows == 0 or D == 0 or T == 0:  # T == 0: all rows are padding
        return permute_ref(x, src_index, out_rows, quant_fp8, block)
    _check_runnable(x)
    idx = src_index.contiguous()
    if quant_fp8:
        n_tiles = triton.cdiv(D, block)
        out = torch.empty(out_rows, D, dtype=torch.float8_e4m3fn, device=x.device)
        scales = torch.empty(out_rows, n_tiles, dtype=torch.float32, device=x.device)
        block_d = block
    else:
        n_tiles = 0
        out = torch.empty(out_rows, D, dtype=x.dtype, device=x.device)
        scales = out  # unused by the kernel when QUANT is False
        block_d = min(triton.next_power_of_2(D), 1024)
    block_r = max(1, min(64, 4096 // block_d, triton.next_power_of_2(out_rows)))
    grid = (triton.cdiv(out_rows, block_r), triton.cdiv(D, block_d))
    _permute_kernel[grid](x, idx, out, scales, R, out_rows, D, x.stride(0), x.stride(1), n_tiles,
                          QUANT=quant_fp8, BLOCK_R=block_r, BLOCK_D=block_d)
    return (out, scales) if quant_fp8 else out


# --------------------------------------------------------------------------------------------------
# unpermute_combine
# --------------------------------------------------------------------------------------------------
def _count(values: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [n] histogram of values in [0, n) on their device: ``bincount`` without its host read
    (CUDA bincount reads the maximum to size its output)."""
    out = torch.zeros(n, dtype=torch.int64, device=values.device)
    return out.scatter_add_(0, values.long(), torch.ones_like(values, dtype=torch.int64))


def _csr_by_token(dst_index: torch.Tensor, n_tokens: int):
    """Rows grouped by token, increasing r inside a token (stable sort); -1 rows sort last."""
    key = torch.where(dst_index < 0, n_tokens, dst_index.long())
    order = torch.argsort(key, stable=True)
    counts = _count(key, n_tokens + 1)[:n_tokens]
    row_ptr = torch.zeros(n_tokens + 1, dtype=torch.int64, device=dst_index.device)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    return order, row_ptr


def unpermute_combine_ref(y: torch.Tensor, dst_index: torch.Tensor, weights: torch.Tensor,
                          n_tokens: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch combine in the documented order: step j adds every token's j-th row (by r)."""
    D = y.shape[1]
    order, row_ptr = _csr_by_token(dst_index, n_tokens)
    counts = row_ptr[1:] - row_ptr[:-1]
    acc = torch.zeros(n_tokens, D, dtype=torch.float32, device=y.device)
    max_count = int(counts.max()) if n_tokens else 0
    for j in range(max_count):
        toks = torch.nonzero(counts > j).flatten()  # distinct tokens: plain indexed add is exact
        rows = order[row_ptr[toks] + j]
        acc[toks] = acc[toks] + weights[rows][:, None] * y[rows].float()
    return acc.to(out_dtype or y.dtype)


def unpermute_combine(y: torch.Tensor, dst_index: torch.Tensor, weights: torch.Tensor,
                      n_tokens: int, out_dtype: torch.dtype | None = None, *,
                      use_triton: bool | None = None, check: bool | None = None) -> torch.Tensor:
    """out[t] = sum over rows r with dst_index[r] == t of weights[r] * y[r] (fp32, in order of r).

    Rows with ``dst_index == -1`` are ignored; tokens without rows get zeros.  The result has
    ``out_dtype`` (default y's dtype; float32 keeps the unrounded accumulator).
    ``use_triton=None``: Triton exactly for CUDA tensors. ``check``: verify the index range on
    the host (default: ``HAI_LLM_DEBUG_CHECKS``).
    """
    _check_2d("y", y)
    R, D = y.shape
    if not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be a non-negative int, got {n_tokens}")
    use_triton = resolve_use_triton(use_triton, y)
    _check_index("dst_index", dst_index, "n_tokens", n_tokens, y.device, check)
    if dst_index.numel() != R:
        raise ValueError(f"dst_index has {dst_index.numel()} entries but y has {R} rows; "
                         "pass one destination token per row of y")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or weights.numel() != R:
        raise ValueError(f"weights must be a 1-D tensor with one entry per row of y ({R}), got "
                         f"{getattr(weights, 'shape', type(weights))}")
    if weights.dtype != torch.float32 or weights.device != y.device:
        raise ValueError(f"weights must be float32 on {y.device}, got {weights.dtype} on "
                         f"{weights.device}; use weights.float().to(y.device)")
    if out_dtype is not None and out_dtype not in (y.dtype, torch.float32):
        raise ValueError(f"out_dtype must be None, y.dtype ({y.dtype}) or torch.float32, "
                         f"got {out_dtype}")
    if n_tokens == 0 or D == 0 or R == 0:  # nothing to sum: zeros (no reference, no host read)
        return torch.zeros(n_tokens, D, dtype=out_dtype or y.dtype, device=y.device)
    if not use_triton:
        return unpermute_combine_ref(y, dst_index, weights, n_tokens, out_dtype)
    _check_runnable(y)
    order, row_ptr = _csr_by_token(dst_index, n_tokens)
    out = torch.empty(n_tokens, D, dtype=out_dtype or y.dtype, device=y.device)
    block_d = min(triton.next_power_of_2(D), 512)
    block_t = max(1, min(64, 4096 // block_d, triton.next_power_of_2(n_tokens)))
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(D, block_d))
    # enable_fp_fusion=False: no FMA contraction, so GPU results follow the documented roundings
    _combine_kernel[grid](y, weights.contiguous(), order, row_ptr, out, n_tokens, D, y.stride(0),
                          y.stride(1), OUT_BF16=out.dtype == torch.bfloat16, BLOCK_T=block_t,
                          BLOCK_D=block_d, enable_fp_fusion=False)
    return out


# --------------------------------------------------------------------------------------------------
# routing -> send order (pure torch, vectorised)
# --------------------------------------------------------------------------------------------------
class SendOrder(NamedTuple):
    """Everything the expert-parallel layer needs to dispatch and combine.

    src_index [T*k] int64: token of each send row; rows grouped by expert (ascending), token
        order inside an expert.  Pass it to ``permute`` and, as dst_index, to
        ``unpermute_combine``.
    order [T*k] int64: flat routing slot ``t*k + j`` of each send row, so the routing weights in
        send order are ``topk_weights.reshape(-1)[order]``.
    inverse [T, k] int64: send row of slot (t, j), i.e. ``src_index[inverse[t, j]] == t``.
    expert_counts [n_experts] int64: rows per expert.
    rank_counts [n_experts // experts_per_rank] int64: rows per destination rank (the all-to-all
        split sizes), rank r holding experts [r * experts_per_rank, (r + 1) * experts_per_rank).
    """
    src_index: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    expert_counts: torch.Tensor
    rank_counts: torch.Tensor


def routing_to_send_order(topk_idx: torch.Tensor, n_experts: int, experts_per_rank: int, *,
                          check: bool | None = None) -> SendOrder:
    """Sort the (token, expert) pairs of a top-k routing by expert, stable in token order.

    All on the device, no host read; ``check`` (default: ``HAI_LLM_DEBUG_CHECKS``) verifies
    0 <= topk_idx < n_experts on the host."""
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be a 2-D [tokens, k] tensor, got "
                         f"{getattr(topk_idx, 'shape', type(topk_idx))}")
    if topk_idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"topk_idx must be int32 or int64, got {topk_idx.dtype}")
    if not isinstance(n_experts, int) or not isinstance(experts_per_rank, int) \
            or n_experts < 1 or experts_per_rank < 1 or n_experts % experts_per_rank:
        raise ValueError(f"n_experts ({n_experts}) must be a positive multiple of "
                         f"experts_per_rank ({experts_per_rank})")
    if topk_idx.numel() and debug_checks(check):  # a host read: debug only
        lo, hi = (int(v) for v in torch.aminmax(topk_idx))
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"topk_idx values must lie in [0, n_experts={n_experts}), got range "
                             f"[{lo}, {hi}]")
    T, k = topk_idx.shape
    flat = topk_idx.reshape(-1).long()
    order = torch.argsort(flat, stable=True)  # flat is token-major, so ties keep token order
    src_index = torch.div(order, k, rounding_mode="floor") if k else order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    expert_counts = _count(flat, n_experts)
    rank_counts = expert_counts.view(n_experts // experts_per_rank, experts_per_rank).sum(1)
    return SendOrder(src_index, order, inverse.view(T, k), expert_counts, rank_counts)
