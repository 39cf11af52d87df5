"""Block-scaled FP8 GEMM: the three GEMMs of an FP8 Linear (docs/deepseek_v3.md; arXiv:2412.19437,
section 3.3).

One kernel computes ``C[M, N] = sum_k A[m, k] * B[n, k]`` where both operands are E4M3 with
float32 scales. Along the reduction dim K every scale covers 128 elements; along its other dim
(M for A, N for B) a scale covers either 1 element (per-row, the 1x128 activation tiles and the
128x1 Wgrad tiles) or 128 elements (the 128x128 weight blocks). The kernel walks K in steps of
BLOCK_K = 128, exactly one scale block, so each step is

    acc += dot(A[:, kb], B[:, kb]^T) * sa[:, kb] (outer) sb[:, kb]

with ``acc`` in FP32: the partial sum of at most 128 products is promoted into the FP32
accumulator and scaled there, the "promotion every N_C = 128 elements" of the paper.

Operands are passed in their storage layout, flagged by ``a_transposed`` / ``b_transposed``:

    a: [M, K] (or [K, M] if a_transposed), a_scale in the same orientation:
       [M or ceil(M/128), ceil(K/128)]  (or [ceil(K/128), M or ceil(M/128)])
    b: [N, K] (or [K, N] if b_transposed), b_scale likewise.

The scale granularity along M / N is read from the scale's shape (M rows -> per-row; ceil(M/128)
rows -> 128-row blocks; when M == 1 both readings are the same math). For a Linear y = x W^T with
x [T, K], W [N, K]:

    Fprop  y  [T, N] = x  @ W^T : a = x  (1x128, [T, K]),  b = W [N, K] (128x128)
    Dgrad  dx [T, K] = dy @ W   : a = dy (1x128, [T, N]),  b = W [N, K], b_transposed (the
                                  128x128 scales of W are also those of W^T)
    Wgrad  dW [N, K] = dy^T @ x : a = dy [T, N], b = x [T, K], both 128x1 (act_quant_colwise),
                                  a_transposed and b_transposed (T is the reduction dim)

``fp8_linear_fprop`` / ``fp8_linear_dgrad`` / ``fp8_linear_wgrad`` name these cases.
``fp8_gemm_ref`` is the same per-K-block math in torch; the grouped MoE GEMM reuses both the
Triton main loop and ``blockwise_scaled_mm_ref``.

Operand layout on the GPU: Hopper's FP8 wgmma reads both operands K-major (the reduction dim
contiguous) from shared memory. The kernel is therefore always launched on K-major operands: a
``*_transposed`` operand is copied to K-major by the wrapper (an FP8 copy, 1 byte per element)
before the launch. The FP8 modules avoid even that copy by quantizing straight into the K-major
layout (``weight_quant(..., transpose=True)`` for Dgrad, ``act_quant_colwise(...,
transpose=True)`` for Wgrad) and calling ``fp8_gemm`` without flags. Same codes, same scales,
same per-128 K steps: the results are identical to the strided reading.

Launch configuration: one deterministic tile config per shape (``heuristic_meta``) by default, so
every rank compiles the same kernel and no step times configs; ``HAI_LLM_AUTOTUNE=1`` autotunes
over ``GPU_CONFIGS`` instead, with Triton's on-disk result cache when available
(``hai_llm.kernels.policy``). The CPU interpreter always uses ``INTERPRET_META``.

NaN and infinities propagate: a non-finite input tile has a NaN scale (``fp8_quant``), and every
partial product is multiplied by both scales, so each output it touches is NaN on every backend.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from hai_llm.kernels.fp8_quant import FP8_DTYPE, check_triton_runnable, default_use_triton
from hai_llm.kernels.policy import autotune, autotune_enabled, resolve_use_triton

SCALE_BLOCK = 128  # K extent of every scale; the kernels' BLOCK_K is pinned to it
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["SCALE_BLOCK", "default_use_triton", "fp8_gemm", "fp8_gemm_ref", "fp8_linear_fprop",
           "fp8_linear_dgrad", "fp8_linear_wgrad", "blockwise_scaled_mm_ref", "heuristic_meta"]

# Hopper-oriented autotuning space (H800/H100: 228 KB shared memory; a 128x256 tile with 4
# stages of 128-deep FP8 operands uses 4 * (16 + 32) KB = 192 KB).
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": SCALE_BLOCK}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3), (128, 128, 4, 4),
                         (128, 256, 8, 3), (128, 256, 8, 4)]
]
# The CPU interpreter cannot autotune (it needs a GPU to time configs): one small pinned tile,
# small enough that ragged test shapes still span several tiles.
INTERPRET_META = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": SCALE_BLOCK}

# The default (non-autotuned) choices, both in GPU_CONFIGS. 128x128 with 8 warps: two warpgroups
# of 64x128, i.e. 64 fp32 registers per thread for the accumulator plus 64 for the fresh per-block
# dot of the promotion step. 128x256 tiles would need 256 such registers per thread and spill.
# 64x128 (one warpgroup) when the 128x128 grid would leave streaming multiprocessors idle.
_TILE_LARGE = (128, 128, 8, 3)  # BLOCK_M, BLOCK_N, num_warps, num_stages
_TILE_SMALL = (64, 128, 4, 4)
_DEFAULT_SMS = 132  # H100 / H800 / H200 SXM


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (read at call time, not import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached; no device synchronisation)."""
    if device.type != "cuda":
        return _DEFAULT_SMS
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def heuristic_meta(m: int, n: int, sms: int, extra_m_tiles: int = 0,
                   small_m: bool = False) -> dict:
    """The default launch config for an output of m x n (deterministic in the shape).

    128x128 tiles unless their count (plus ``extra_m_tiles`` partial row tiles per N column, the
    grouped GEMM's per-group remainders) is below ``sms``, or ``small_m`` asks for 64-row tiles
    (grouped GEMM with fewer than 128 rows per group on average). Returns the kernel's
    constexprs plus num_warps / num_stages.
    """
    bm, bn, warps, stages = _TILE_LARGE
    if small_m or (triton.cdiv(m, bm) + extra_m_tiles) * triton.cdiv(n, bn) < sms:
        bm, bn, warps, stages = _TILE_SMALL
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": SCALE_BLOCK, "num_warps": warps,
            "num_stages": stages}


@triton.jit
def fp8_scaled_mainloop(acc, a_ptr, stride_am, stride_ak, sa_ptr, stride_sam, stride_sak,
                        b_ptr, stride_bn, stride_bk, sb_ptr, stride_sbn, stride_sbk,
                        offs_m, offs_n, mask_m, mask_n, k_lo, k_hi,
                        A_SCALE_ROWS: tl.constexpr, B_SCALE_ROWS: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """acc[m, n] += sum over k in [k_lo, k_hi) of A[m, k] sa[m, k] * B[n, k] sb[n, k].

    K is walked in BLOCK_K-aligned steps kb (global scale blocks: scale column kb covers
    k in [kb * BLOCK_K, (kb + 1) * BLOCK_K)); k outside [k_lo, k_hi) loads as 0, so a range that
    starts or ends inside a block (ragged K, or an MoE group's token range in Wgrad) is exact.
    A scale row is (m // A_SCALE_ROWS), i.e. per row (1) or per 128-row block (128). offs_* are
    int64 so that offsets into large operands cannot overflow.
    """
    kb_lo = k_lo // BLOCK_K
    kb_hi = tl.where(k_hi > k_lo, tl.cdiv(k_hi, BLOCK_K), kb_lo)  # empty range: no step at all
    sa_rows = sa_ptr + (offs_m // A_SCALE_ROWS) * stride_sam
    sb_rows = sb_ptr + (offs_n // B_SCALE_ROWS) * stride_sbn
    for kb in range(kb_lo, kb_hi):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = (offs_k >= k_lo) & (offs_k < k_hi)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        sa = tl.load(sa_rows + kb * stride_sak, mask=mask_m, other=0.0)
        sb = tl.load(sb_rows + kb * stride_sbk, mask=mask_n, other=0.0)
        # A fresh FP32 dot over one 128-deep block, scaled, then added: the promotion step.
        acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
    return acc


@triton.jit
def _fp8_gemm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, M, N, K,
                     stride_am, stride_ak, stride_sam, stride_sak,
                     stride_bn, stride_bk, stride_sbn, stride_sbk, stride_cm, stride_cn,
                     A_SCALE_ROWS: tl.constexpr, B_SCALE_ROWS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Axis 0 (fastest) walks M, so consecutive programs reuse the same B (weight) tile from L2.
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = fp8_scaled_mainloop(acc, a_ptr, stride_am, stride_ak, sa_ptr, stride_sam, stride_sak,
                              b_ptr, stride_bn, stride_bk, sb_ptr, stride_sbn, stride_sbk,
                              offs_m, offs_n, mask_m, mask_n, 0, K,
                              A_SCALE_ROWS, B_SCALE_ROWS, BLOCK_K)
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Only with HAI_LLM_AUTOTUNE=1 (module docstring).
_fp8_gemm_kernel_tuned = autotune(
    GPU_CONFIGS, key=["M", "N", "K", "stride_ak", "stride_bk", "A_SCALE_ROWS", "B_SCALE_ROWS"]
)(_fp8_gemm_kernel)


# ----------------------------------------------------------------------------------------------
# Validation helpers (shared with fp8_grouped_gemm)
# ----------------------------------------------------------------------------------------------


def check_fp8_operand(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dtype != FP8_DTYPE:
        raise ValueError(f"{name} must be float8_e4m3fn (quantize it with fp8_quant), "
                         f"got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous in its storage layout; use the *_transposed "
                         f"flag instead of a transposed view, or call .contiguous()")


def check_scale(name: str, s: torch.Tensor, ndim: int) -> None:
    if s.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {s.dtype}")
    if s.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(s.shape)}")
    if not s.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous()")


def scale_rows(name: str, extent: int, rows: int, what: str) -> int:
    """Granularity (1 or SCALE_BLOCK) of a scale with ``extent`` entries along a dim of ``rows``."""
    if extent == rows:
        return 1  # per row/column; also the reading taken when rows <= 1 (same math either way)
    if extent == triton.cdiv(rows, SCALE_BLOCK):
        return SCALE_BLOCK
    raise ValueError(f"{name} has {extent} entries along {what} (size {rows}); expected {rows} "
                     f"(per-row scales) or {triton.cdiv(rows, SCALE_BLOCK)} (128-blocks)")


def check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def _operand(name: str, t: torch.Tensor, s: torch.Tensor, transposed: bool, outer: str):
    """Validate one operand; returns (rows, K, scale granularity) and canonical strides."""
    check_fp8_operand(name, t, 2)
    check_scale(f"{name}_scale", s, 2)
    rows, k = (t.shape[1], t.shape[0]) if transposed else t.shape
    s_rows, s_k = (s.shape[1], s.shape[0]) if transposed else s.shape
    if s_k != triton.cdiv(k, SCALE_BLOCK):
        raise ValueError(f"{name}_scale has {s_k} entries along K={k}; expected "
                         f"ceil(K/128) = {triton.cdiv(k, SCALE_BLOCK)}")
    gran = scale_rows(f"{name}_scale", s_rows, rows, outer)
    # (stride along rows, stride along K) of the data and of the scale
    t_strides = (t.stride(1), t.stride(0)) if transposed else (t.stride(0), t.stride(1))
    s_strides = (s.stride(1), s.stride(0)) if transposed else (s.stride(0), s.stride(1))
    return rows, k, gran, t_strides, s_strides


# ----------------------------------------------------------------------------------------------
# Torch references
# ----------------------------------------------------------------------------------------------


def blockwise_scaled_mm_ref(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                            k_lo: int = 0, k_hi: int | None = None) -> torch.Tensor:
    """FP32 sum over k in [k_lo, k_hi) of a[m, k] b[n, k], scaled per 128-block of K.

    a [M, K], b [N, K] fp8 in canonical (K-last) orientation; sa [M, ceil(K/128)] and
    sb [N, ceil(K/128)] hold one scale per row and K block (block scales already expanded).
    Mirrors ``fp8_scaled_mainloop`` step by step: fp32 matmul of one block, scaled, accumulated.
    """
    k_hi = a.shape[1] if k_hi is None else k_hi
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    if k_hi <= k_lo:
        return acc
    for kb in range(k_lo // SCALE_BLOCK, triton.cdiv(k_hi, SCALE_BLOCK)):
        lo, hi = max(k_lo, kb * SCALE_BLOCK), min(k_hi, (kb + 1) * SCALE_BLOCK)
        part = a[:, lo:hi].float() @ b[:, lo:hi].float().t()
        acc += part * sa[:, kb, None] * sb[None, :, kb]
    return acc


def _canonical(t: torch.Tensor, s: torch.Tensor, transposed: bool):
    """(data [rows, K], per-row scale [rows, ceil(K/128)]) from a storage-layout operand."""
    if transposed:
        t, s = t.t(), s.t()
    rows = t.shape[0]
    if s.shape[0] != rows:  # 128-row blocks: expand to one scale per row
        s = s.repeat_interleave(SCALE_BLOCK, dim=0)[:rows]
    return t, s


def fp8_gemm_ref(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 *, a_transposed: bool = False, b_transposed: bool = False,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch reference of ``fp8_gemm`` (same arguments, same per-K-block math)."""
    a_mk, sa = _canonical(a, a_scale, a_transposed)
    b_nk, sb = _canonical(b, b_scale, b_transposed)
    return blockwise_scaled_mm_ref(a_mk, sa, b_nk, sb).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Validating wrappers
# ----------------------------------------------------------------------------------------------


def to_k_major(t: torch.Tensor, s: torch.Tensor, transposed: bool):
    """(data [rows, K], scale [rows or ceil(rows/128), ceil(K/128)]), both contiguous, from an
    operand in storage layout: a transposed one is copied (FP8, 1 byte per element)."""
    if transposed:
        return t.t().contiguous(), s.t().contiguous()
    return t, s


def launch_meta(m: int, n: int, device: torch.device, matrices: int = 1,
                **heuristic) -> dict | None:
    """Launch config of the FP8 GEMM kernels: the interpreter's pinned tile, None to autotune
    (HAI_LLM_AUTOTUNE=1), else ``heuristic_meta`` for the device (``matrices`` outputs of
    m x n share its multiprocessors)."""
    if interpreting():
        return INTERPRET_META
    if autotune_enabled():
        return None
    return heuristic_meta(m, n, -(-sm_count(device) // max(1, matrices)), **heuristic)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *,
             use_triton: bool | None = None, a_transposed: bool = False,
             b_transposed: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C[M, N] = A[M, K] @ B[N, K]^T with block-scaled FP8 operands (layouts: module docstring).

    Accumulates in FP32, applying both scales once per 128-wide K step. M, N, K need not be
    multiples of 128. Returns a new contiguous [M, N] tensor of ``out_dtype``. The Triton path
    always runs on K-major operands (a transposed operand is copied first).
    ``use_triton=None``: Triton exactly for CUDA tensors.
    """
    m, k, a_gran, _, _ = _operand("a", a, a_scale, a_transposed, "M")
    n, k_b, b_gran, _, _ = _operand("b", b, b_scale, b_transposed, "N")
    if k != k_b:
        raise ValueError(f"a and b disagree on the reduction dim K: a has K={k}, b has K={k_b} "
                         f"(check the *_transposed flags)")
    check_out_dtype(out_dtype)
    if not resolve_use_triton(use_triton, a):
        return fp8_gemm_ref(a, a_scale, b, b_scale, a_transposed=a_transposed,
                            b_transposed=b_transposed, out_dtype=out_dtype)
    check_triton_runnable(a, a_scale, b, b_scale)
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    a, a_scale = to_k_major(a, a_scale, a_transposed)
    b, b_scale = to_k_major(b, b_scale, b_transposed)
    args = (a, a_scale, b, b_scale, c, m, n, k, a.stride(0), a.stride(1), a_scale.stride(0),
            a_scale.stride(1), b.stride(0), b.stride(1), b_scale.stride(0), b_scale.stride(1),
            c.stride(0), c.stride(1))
    meta = launch_meta(m, n, a.device)
    if meta is None:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
        _fp8_gemm_kernel_tuned[grid](*args, A_SCALE_ROWS=a_gran, B_SCALE_ROWS=b_gran)
    else:
        grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
        _fp8_gemm_kernel[grid](*args, A_SCALE_ROWS=a_gran, B_SCALE_ROWS=b_gran, **meta)
    return c


def fp8_linear_fprop(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor,
                     w_scale: torch.Tensor, *, use_triton: bool | None = None,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y [T, N] = x @ W^T; x [T, K] with 1x128 scales [T, ceil(K/128)], W [N, K] 128x128-blocked."""
    return fp8_gemm(x, x_scale, w, w_scale, use_triton=use_triton, out_dtype=out_dtype)


def fp8_linear_dgrad(dy: torch.Tensor, dy_scale: torch.Tensor, w: torch.Tensor,
                     w_scale: torch.Tensor, *, use_triton: bool | None = None,
                     out_dtype: torch.dtype = torch.float32,
                     w_transposed: bool = False) -> torch.Tensor:
    """dx [T, K] = dy @ W; dy [T, N] with 1x128 scales, W [N, K] as quantized for Fprop.

    ``w_transposed=True``: w is already W^T [K, N] with scales [ceil(K/128), ceil(N/128)]
    (``weight_quant(W, transpose=True)``), the K-major operand: no copy before the launch."""
    if w_transposed:
        return fp8_gemm(dy, dy_scale, w, w_scale, use_triton=use_triton, out_dtype=out_dtype)
    return fp8_gemm(dy, dy_scale, w, w_scale, use_triton=use_triton, b_transposed=True,
                    out_dtype=out_dtype)


def fp8_linear_wgrad(dy: torch.Tensor, dy_scale: torch.Tensor, x: torch.Tensor,
                     x_scale: torch.Tensor, *, use_triton: bool | None = None,
                     out_dtype: torch.dtype = torch.float32,
                     transposed: bool = False) -> torch.Tensor:
    """dW [N, K] = dy^T @ x; dy [T, N], x [T, K] quantized 128x1 (scales [ceil(T/128), N | K]).

    ``transposed=True``: dy and x are given as dy^T [N, T] and x^T [K, T] with scales
    [N | K, ceil(T/128)] (``act_quant_colwise(..., transpose=True)``), the K-major operands:
    no copy before the launch."""
    if transposed:
        return fp8_gemm(dy, dy_scale, x, x_scale, use_triton=use_triton, out_dtype=out_dtype)
    return fp8_gemm(dy, dy_scale, x, x_scale, use_triton=use_triton, a_transposed=True,
                    b_transposed=True, out_dtype=out_dtype)
