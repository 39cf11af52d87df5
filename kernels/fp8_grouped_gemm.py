"""Grouped block-scaled FP8 GEMM for MoE experts, contiguous layout (REFERENCE.md section 3).

After dispatch the tokens of one rank are sorted by local expert: rows [off[g], off[g+1]) of the
activation buffer A [M_total, K] belong to expert g, with off = [0, cumsum(group_sizes)].
Groups may be empty and need no padding. Expert g owns the weight B[g] of shape [N, K]
(128x128 block scales [G, ceil(N/128), ceil(K/128)]). The three GEMMs of the expert Linear:

    forward  out[off[g]:off[g+1]]  = A_g  @ B[g]^T   -> [M_total, N]   (A: 1x128 scales)
    dgrad    dA[off[g]:off[g+1]]   = dY_g @ B[g]     -> [M_total, K]   (dY: 1x128 scales)
    wgrad    dB[g]                 = dY_g^T @ A_g    -> [G, N, K]      (dY, A: 128x1 scales)

Forward and dgrad share one kernel (dgrad reads B[g] transposed through its strides). Its 1-D
program axis enumerates (group, BLOCK_M-row tile) pairs: group g owns ceil(size_g / BLOCK_M) tiles,
so an empty group owns none and a ragged group ends in one partial tile. Each program recovers its
(group, tile) from the group offsets with a prefix sum over the (at most a few hundred) groups;
that is the device-side form of a host tile table, and unlike a table it does not depend on
BLOCK_M, which the autotuner picks after the arguments are fixed. The host reads group_sizes once
to validate them and size the grid exactly (pass them on the CPU to avoid a device sync).

Wgrad reduces over tokens. Its operands come from ``act_quant_colwise`` on the whole [M_total, .]
buffer, so the 128-token scale tiles are global: a tile may straddle two groups. The kernel walks
the global 128-row blocks that overlap [off[g], off[g+1]) and masks the rows outside the group,
which is exact for any group boundaries (and costs nothing extra when groups are 128-aligned).

The ``*_ref`` functions do the same math in torch with ``fp8_gemm``'s ``blockwise_scaled_mm_ref``.
"""
import torch
import triton
import triton.language as tl

from hai_llm.kernels.fp8_gemm import (GPU_CONFIGS, INTERPRET_META, SCALE_BLOCK,
                                      blockwise_scaled_mm_ref, check_fp8_operand,
                                      check_out_dtype, check_scale, fp8_scaled_mainloop,
                                      interpreting, scale_rows)
from hai_llm.kernels.fp8_quant import check_triton_runnable, default_use_triton

__all__ = ["default_use_triton", "fp8_grouped_gemm", "fp8_grouped_gemm_dgrad",
           "fp8_grouped_gemm_wgrad", "fp8_grouped_gemm_ref", "fp8_grouped_gemm_wgrad_ref"]


@triton.jit
def _fp8_grouped_gemm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, off_ptr, G, N, K,
                             stride_am, stride_ak, stride_sam, stride_sak,
                             stride_bg, stride_bn, stride_bk, stride_sbg, stride_sbn, stride_sbk,
                             stride_cm, stride_cn,
                             B_SCALE_ROWS: tl.constexpr, G_POW2: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    # --- (group, row tile) of this program: prefix sum of the per-group tile counts -------------
    gs = tl.arange(0, G_POW2)
    in_range = gs < G
    starts = tl.load(off_ptr + gs, mask=in_range, other=0)
    ends = tl.load(off_ptr + gs + 1, mask=in_range, other=0)
    n_tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # 0 for empty groups and padding lanes
    tiles_through = tl.cumsum(n_tiles, axis=0)  # tiles of groups 0..g inclusive
    if tile >= tl.sum(n_tiles):
        return  # only reachable if the grid were over-sized; the wrapper sizes it exactly
    g = tl.sum((tiles_through <= tile).to(tl.int32))  # first group whose tiles reach past `tile`
    first_tile = tl.sum(tl.where(gs < g, n_tiles, 0))
    row_start = tl.sum(tl.where(gs == g, starts, 0)) + (tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(gs == g, ends, 0))
    # --- one [BLOCK_M, BLOCK_N] output tile of A_g @ B[g]^T ------------------------------------
    offs_m = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    g64 = g.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = fp8_scaled_mainloop(acc, a_ptr, stride_am, stride_ak, sa_ptr, stride_sam, stride_sak,
                              b_ptr + g64 * stride_bg, stride_bn, stride_bk,
                              sb_ptr + g64 * stride_sbg, stride_sbn, stride_sbk,
                              offs_m, offs_n, mask_m, mask_n, 0, K,
                              1, B_SCALE_ROWS, BLOCK_K)
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _fp8_grouped_wgrad_kernel(dy_ptr, sdy_ptr, x_ptr, sx_ptr, c_ptr, off_ptr, N, K,
                              stride_dym, stride_dyn, stride_sdym, stride_sdyn,
                              stride_xm, stride_xk, stride_sxm, stride_sxk,
                              stride_cg, stride_cn, stride_ck,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    # Output tile [BLOCK_M of N, BLOCK_N of K] of dB[g] = dY_g^T @ X_g; the reduction runs over
    # the tokens of group g. In mainloop terms A = dY^T (rows n, "K" = tokens) and B = X^T.
    g = tl.program_id(2)
    row_start = tl.load(off_ptr + g)
    row_end = tl.load(off_ptr + g + 1)
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < N
    mask_n = offs_n < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = fp8_scaled_mainloop(acc, dy_ptr, stride_dyn, stride_dym, sdy_ptr, stride_sdyn,
                              stride_sdym, x_ptr, stride_xk, stride_xm, sx_ptr, stride_sxk,
                              stride_sxm,
                              offs_m, offs_n, mask_m, mask_n, row_start, row_end,
                              1, 1, BLOCK_K)  # empty group: no K step, the tile is written as 0
    c = (c_ptr + g.to(tl.int64) * stride_cg
         + offs_m[:, None] * stride_cn + offs_n[None, :] * stride_ck)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# M_total changes every step with the routing, so it is not part of the tuning key.
_fp8_grouped_gemm_kernel_tuned = triton.autotune(
    GPU_CONFIGS, key=["N", "K", "stride_bk", "B_SCALE_ROWS"])(_fp8_grouped_gemm_kernel)
_fp8_grouped_wgrad_kernel_tuned = triton.autotune(
    GPU_CONFIGS, key=["N", "K"])(_fp8_grouped_wgrad_kernel)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _group_offsets(group_sizes: torch.Tensor, m_total: int, g_expected: int | None):
    """Validate group_sizes; returns (host list of sizes, int32 offsets [G+1] on the host)."""
    if group_sizes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_sizes must be an int32 or int64 tensor, got {group_sizes.dtype}")
    if group_sizes.dim() != 1 or group_sizes.numel() == 0:
        raise ValueError(f"group_sizes must be 1-D with one entry per group, got shape "
                         f"{tuple(group_sizes.shape)}")
    if g_expected is not None and group_sizes.numel() != g_expected:
        raise ValueError(f"group_sizes has {group_sizes.numel()} groups but the weights have "
                         f"{g_expected}")
    sizes = group_sizes.tolist()  # one host read of G ints (a sync if they live on the GPU)
    if min(sizes) < 0:
        raise ValueError(f"group_sizes must be >= 0, got {sizes}")
    if sum(sizes) != m_total:
        raise ValueError(f"group_sizes sum to {sum(sizes)} but the activations have "
                         f"{m_total} rows; they must be equal")
    if m_total >= 2**31:
        raise ValueError(f"at most 2**31 - 1 rows are supported, got {m_total}")
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    return sizes, offsets


def _check_rowwise(name: str, t: torch.Tensor, s: torch.Tensor):
    check_fp8_operand(name, t, 2)
    check_scale(f"{name}_scale", s, 2)
    rows, k = t.shape
    if tuple(s.shape) != (rows, triton.cdiv(k, SCALE_BLOCK)):
        raise ValueError(f"{name}_scale must be [rows, ceil(K/128)] = "
                         f"{[rows, triton.cdiv(k, SCALE_BLOCK)]} (1x128 tiles from act_quant), "
                         f"got {list(s.shape)}")


def _check_colwise(name: str, t: torch.Tensor, s: torch.Tensor):
    check_fp8_operand(name, t, 2)
    check_scale(f"{name}_scale", s, 2)
    rows, cols = t.shape
    if tuple(s.shape) != (triton.cdiv(rows, SCALE_BLOCK), cols):
        raise ValueError(f"{name}_scale must be [ceil(rows/128), cols] = "
                         f"{[triton.cdiv(rows, SCALE_BLOCK), cols]} (128x1 tiles from "
                         f"act_quant_colwise), got {list(s.shape)}")


def _check_weights(b: torch.Tensor, b_scale: torch.Tensor, b_transposed: bool):
    """Returns (G, N, K, scale granularity along N) of [G, N, K] (or [G, K, N]) weights."""
    check_fp8_operand("b", b, 3)
    check_scale("b_scale", b_scale, 3)
    g, n, k = (b.shape[0], b.shape[2], b.shape[1]) if b_transposed else b.shape
    sg, sn, sk = ((b_scale.shape[0], b_scale.shape[2], b_scale.shape[1]) if b_transposed
                  else b_scale.shape)
    if sg != g or sk != triton.cdiv(k, SCALE_BLOCK):
        raise ValueError(f"b_scale has shape {list(b_scale.shape)}; for b of shape "
                         f"{list(b.shape)} it needs {g} groups and ceil(K/128) = "
                         f"{triton.cdiv(k, SCALE_BLOCK)} entries along K={k}")
    return g, n, k, scale_rows("b_scale", sn, n, "N")


# ----------------------------------------------------------------------------------------------
# Torch references
# ----------------------------------------------------------------------------------------------


def fp8_grouped_gemm_ref(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                         b_scale: torch.Tensor, group_sizes: torch.Tensor, *,
                         b_transposed: bool = False,
                         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch reference of ``fp8_grouped_gemm`` (forward, or dgrad with b_transposed)."""
    if b_transposed:
        b, b_scale = b.transpose(1, 2), b_scale.transpose(1, 2)
    n = b.shape[1]
    out = torch.empty((a.shape[0], n), dtype=out_dtype, device=a.device)
    row = 0
    for g, size in enumerate(group_sizes.tolist()):
        sb = b_scale[g]
        if sb.shape[0] != n:  # 128x128 blocks: one scale per row of B[g]
            sb = sb.repeat_interleave(SCALE_BLOCK, dim=0)[:n]
        rows = slice(row, row + size)
        out[rows] = blockwise_scaled_mm_ref(a[rows], a_scale[rows], b[g], sb).to(out_dtype)
        row += size
    return out


def fp8_grouped_gemm_wgrad_ref(dy: torch.Tensor, dy_scale: torch.Tensor, x: torch.Tensor,
                               x_scale: torch.Tensor, group_sizes: torch.Tensor, *,
                               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Torch reference of ``fp8_grouped_gemm_wgrad``: dB[g] = dY_g^T @ X_g (global 128x1 tiles)."""
    sizes = group_sizes.tolist()
    out = torch.empty((len(sizes), dy.shape[1], x.shape[1]), dtype=out_dtype, device=dy.device)
    # Canonical orientation: rows = output dim, K = tokens; scales [rows, ceil(tokens/128)].
    dy_t, sdy_t, x_t, sx_t = dy.t(), dy_scale.t(), x.t(), x_scale.t()
    row = 0
    for g, size in enumerate(sizes):
        out[g] = blockwise_scaled_mm_ref(dy_t, sdy_t, x_t, sx_t, row, row + size).to(out_dtype)
        row += size
    return out


# ----------------------------------------------------------------------------------------------
# Validating wrappers
# ----------------------------------------------------------------------------------------------


def fp8_grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                     b_scale: torch.Tensor, group_sizes: torch.Tensor, *, use_triton: bool,
                     b_transposed: bool = False,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[rows of g] = A_g @ B[g]^T for contiguous, expert-sorted rows of A.

    a [M_total, K] fp8 with 1x128 scales [M_total, ceil(K/128)]; b [G, N, K] fp8 (or [G, K, N]
    with b_transposed, which computes A_g @ B[g] for b given as [G, K, N]) with block scales
    [G, ceil(N/128), ceil(K/128)] (per-row [G, N, ceil(K/128)] also accepted), in b's storage
    orientation; group_sizes int [G], >= 0, summing to M_total. Returns [M_total, N].
    """
    _check_rowwise("a", a, a_scale)
    g, n, k, b_gran = _check_weights(b, b_scale, b_transposed)
    m_total, k_a = a.shape
    if k_a != k:
        raise ValueError(f"a and b disagree on the reduction dim K: a has K={k_a}, b has K={k} "
                         f"(check b_transposed)")
    check_out_dtype(out_dtype)
    sizes, offsets = _group_offsets(group_sizes, m_total, g)
    if not use_triton:
        return fp8_grouped_gemm_ref(a, a_scale, b, b_scale, group_sizes,
                                    b_transposed=b_transposed, out_dtype=out_dtype)
    check_triton_runnable(a, a_scale, b, b_scale)
    c = torch.empty((m_total, n), dtype=out_dtype, device=a.device)
    if m_total == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    # stride order (group, N, K) whatever the storage orientation
    s_bg, s_bn, s_bk = (b.stride(0), b.stride(2), b.stride(1)) if b_transposed else b.stride()
    s_sbg, s_sbn, s_sbk = ((b_scale.stride(0), b_scale.stride(2), b_scale.stride(1))
                           if b_transposed else b_scale.stride())
    args = (a, a_scale, b, b_scale, c, offsets.to(a.device), g, n, k,
            a.stride(0), a.stride(1), a_scale.stride(0), a_scale.stride(1),
            s_bg, s_bn, s_bk, s_sbg, s_sbn, s_sbk, c.stride(0), c.stride(1))
    g_pow2 = max(2, triton.next_power_of_2(g))

    def grid(meta):  # exactly one program per (group, row tile) and N tile
        return (sum(triton.cdiv(s, meta["BLOCK_M"]) for s in sizes),
                triton.cdiv(n, meta["BLOCK_N"]))

    if interpreting():
        _fp8_grouped_gemm_kernel[grid(INTERPRET_META)](*args, B_SCALE_ROWS=b_gran, G_POW2=g_pow2,
                                                       **INTERPRET_META)
    else:
        _fp8_grouped_gemm_kernel_tuned[grid](*args, B_SCALE_ROWS=b_gran, G_POW2=g_pow2)
    return c


def fp8_grouped_gemm_dgrad(dy: torch.Tensor, dy_scale: torch.Tensor, b: torch.Tensor,
                           b_scale: torch.Tensor, group_sizes: torch.Tensor, *, use_triton: bool,
                           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dA[rows of g] = dY_g @ B[g]; dy [M_total, N] 1x128, b [G, N, K] as in the forward."""
    return fp8_grouped_gemm(dy, dy_scale, b, b_scale, group_sizes, use_triton=use_triton,
                            b_transposed=True, out_dtype=out_dtype)


def fp8_grouped_gemm_wgrad(dy: torch.Tensor, dy_scale: torch.Tensor, x: torch.Tensor,
                           x_scale: torch.Tensor, group_sizes: torch.Tensor, *, use_triton: bool,
                           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dB[g] = dY_g^T @ X_g -> [G, N, K]; dy [M_total, N] and x [M_total, K] quantized 128x1
    over the whole buffer (act_quant_colwise; scales [ceil(M_total/128), N | K])."""
    _check_colwise("dy", dy, dy_scale)
    _check_colwise("x", x, x_scale)
    (m_total, n), (m_x, k) = dy.shape, x.shape
    if m_x != m_total:
        raise ValueError(f"dy and x must have the same number of rows (tokens), got {m_total} "
                         f"and {m_x}")
    check_out_dtype(out_dtype)
    sizes, offsets = _group_offsets(group_sizes, m_total, None)
    if not use_triton:
        return fp8_grouped_gemm_wgrad_ref(dy, dy_scale, x, x_scale, group_sizes,
                                          out_dtype=out_dtype)
    check_triton_runnable(dy, dy_scale, x, x_scale)
    g = len(sizes)
    if g > 65535:
        raise ValueError(f"at most 65535 groups are supported (grid axis 2), got {g}")
    c = torch.empty((g, n, k), dtype=out_dtype, device=dy.device)
    if n == 0 or k == 0:
        return c
    args = (dy, dy_scale, x, x_scale, c, offsets.to(dy.device), n, k,
            dy.stride(0), dy.stride(1), dy_scale.stride(0), dy_scale.stride(1),
            x.stride(0), x.stride(1), x_scale.stride(0), x_scale.stride(1),
            c.stride(0), c.stride(1), c.stride(2))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_N"]), g)

    if interpreting():
        _fp8_grouped_wgrad_kernel[grid(INTERPRET_META)](*args, **INTERPRET_META)
    else:
        _fp8_grouped_wgrad_kernel_tuned[grid](*args)
    return c
