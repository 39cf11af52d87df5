"""Grouped block-scaled FP8 GEMM for MoE experts, contiguous layout (docs/deepseek_v3.md;
arXiv:2412.19437, section 3.3).

After dispatch the tokens of one rank are sorted by local expert: rows [off[g], off[g+1]) of the
activation buffer A [M_total, K] belong to expert g, with off = [0, cumsum(group_sizes)].
Groups may be empty and need no padding. Expert g owns the weight B[g] of shape [N, K]
(128x128 block scales [G, ceil(N/128), ceil(K/128)]). The three GEMMs of the expert Linear:

    forward  out[off[g]:off[g+1]]  = A_g  @ B[g]^T   -> [M_total, N]   (A: 1x128 scales)
    dgrad    dA[off[g]:off[g+1]]   = dY_g @ B[g]     -> [M_total, K]   (dY: 1x128 scales)
    wgrad    dB[g]                 = dY_g^T @ A_g    -> [G, N, K]      (dY, A: 128x1 scales)

Forward and dgrad share one kernel. Its 1-D program axis enumerates (group, BLOCK_M-row tile)
pairs: group g owns ceil(size_g / BLOCK_M) tiles, so an empty group owns none and a ragged group
ends in one partial tile. Each program recovers its (group, tile) from the group offsets with a
prefix sum over the (at most a few hundred) groups; that is the device-side form of a host tile
table, and unlike a table it does not depend on BLOCK_M, which may be chosen after the arguments
are fixed. No host read of the group sizes: the offsets are built on the device with torch ops
(``group_offsets``; callers running several GEMMs over one routing build them once and pass
``group_offsets=``), and the grid is sized by the upper bound cdiv(M_total, BLOCK_M) + G on the
number of row tiles (each group adds at most one partial tile); programs past the real tile count
return at once. Value checks of the group sizes (>= 0, summing to M_total) read them on the host,
so on the Triton path they run only with ``check=True`` or ``HAI_LLM_DEBUG_CHECKS=1``
(``hai_llm.kernels.policy``); the torch references read the sizes anyway and always check.

Wgrad reduces over tokens. Its operands come from ``act_quant_colwise`` on the whole [M_total, .]
buffer, so the 128-token scale tiles are global: a tile may straddle two groups. The kernel walks
the global 128-row blocks that overlap [off[g], off[g+1]) and masks the rows outside the group,
which is exact for any group boundaries (and costs nothing extra when groups are 128-aligned).

Operand layouts (see ``fp8_gemm``): every launch reads both operands K-major. Dgrad wants
B[g]^T, i.e. the weights quantized transposed ([G, K, N], ``stacked_weight_quant(...,
transpose=True)``, passed without ``b_transposed``); with ``b_transposed=True`` the wrapper makes
that copy itself. Wgrad wants dY^T [N, M_total] and X^T [K, M_total] (``act_quant_colwise(...,
transpose=True)``, passed with ``transposed=True``); given the [M_total, .] layout, the wrapper
copies. A NaN or infinity in a token tile makes the tile's scale NaN: in Wgrad a 128-token tile
straddling two groups then makes both groups' gradients NaN (a non-finite step is skipped anyway).

The ``*_ref`` functions do the same math in torch with ``fp8_gemm``'s ``blockwise_scaled_mm_ref``.
"""
import torch
import triton
import triton.language as tl

from hai_llm.kernels.fp8_gemm import (GPU_CONFIGS, SCALE_BLOCK, blockwise_scaled_mm_ref,
                                      check_fp8_operand, check_out_dtype, check_scale,
                                      fp8_scaled_mainloop, launch_meta, scale_rows)
from hai_llm.kernels.fp8_quant import check_triton_runnable, default_use_triton
from hai_llm.kernels.policy import autotune, debug_checks, resolve_use_triton

__all__ = ["default_use_triton", "fp8_grouped_gemm", "fp8_grouped_gemm_dgrad",
           "fp8_grouped_gemm_wgrad", "fp8_grouped_gemm_ref", "fp8_grouped_gemm_wgrad_ref",
           "group_offsets"]


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
        return  # the grid is an upper bound (cdiv(M_total, BLOCK_M) + G): nothing to do here
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


# Only with HAI_LLM_AUTOTUNE=1. M_total changes every step with the routing, so it is not part of
# the tuning key.
_fp8_grouped_gemm_kernel_tuned = autotune(
    GPU_CONFIGS, key=["N", "K", "stride_bk", "B_SCALE_ROWS"])(_fp8_grouped_gemm_kernel)
_fp8_grouped_wgrad_kernel_tuned = autotune(
    GPU_CONFIGS, key=["N", "K"])(_fp8_grouped_wgrad_kernel)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_group_sizes(group_sizes: torch.Tensor, g_expected: int | None, m_total: int) -> None:
    """Checks of group_sizes that need no host read: dtype, shape, and the row-count limit."""
    if not isinstance(group_sizes, torch.Tensor) or group_sizes.dtype not in (torch.int32,
                                                                              torch.int64):
        raise ValueError(f"group_sizes must be an int32 or int64 tensor, got "
                         f"{getattr(group_sizes, 'dtype', type(group_sizes))}")
    if group_sizes.dim() != 1 or group_sizes.numel() == 0:
        raise ValueError(f"group_sizes must be 1-D with one entry per group, got shape "
                         f"{tuple(group_sizes.shape)}")
    if g_expected is not None and group_sizes.numel() != g_expected:
        raise ValueError(f"group_sizes has {group_sizes.numel()} groups but the weights have "
                         f"{g_expected}")
    if m_total >= 2**31:
        raise ValueError(f"at most 2**31 - 1 rows are supported, got {m_total}")


def _check_group_values(group_sizes: torch.Tensor, m_total: int,
                        offsets: torch.Tensor | None) -> None:
    """The value checks: one host read of the sizes (a device sync if they live on a GPU)."""
    sizes = group_sizes.tolist()
    if min(sizes) < 0:
        raise ValueError(f"group_sizes must be >= 0, got {sizes}")
    if sum(sizes) != m_total:
        raise ValueError(f"group_sizes sum to {sum(sizes)} but the activations have "
                         f"{m_total} rows; they must be equal")
    if offsets is not None:
        expected = [0]
        for size in sizes:
            expected.append(expected[-1] + size)
        if offsets.tolist() != expected:
            raise ValueError(f"group_offsets {offsets.tolist()} are not [0, cumsum(group_sizes)]"
                             f" = {expected}")


def group_offsets(group_sizes: torch.Tensor, device: torch.device | str | None = None
                  ) -> torch.Tensor:
    """int32 offsets [0, cumsum(group_sizes)] of shape [G + 1] on ``device`` (default: the sizes'
    device), built with torch ops: no host read. Row range of group g: [off[g], off[g + 1])."""
    device = group_sizes.device if device is None else torch.device(device)
    off = torch.zeros(group_sizes.numel() + 1, dtype=torch.int32, device=device)
    torch.cumsum(group_sizes.to(device), 0, dtype=torch.int32, out=off[1:])
    return off


def _offsets_for(group_sizes: torch.Tensor, offsets: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    if offsets is None:
        return group_offsets(group_sizes, device)
    if (offsets.dtype != torch.int32 or offsets.dim() != 1
            or offsets.numel() != group_sizes.numel() + 1 or offsets.device != device):
        raise ValueError(f"group_offsets must be int32 [G + 1] = [{group_sizes.numel() + 1}] on "
                         f"{device} (see group_offsets()), got {offsets.dtype} "
                         f"{list(offsets.shape)} on {offsets.device}")
    return offsets


def _check_rowwise(name: str, t: torch.Tensor, s: torch.Tensor):
    check_fp8_operand(name, t, 2)
    check_scale(f"{name}_scale", s, 2)
    rows, k = t.shape
    if tuple(s.shape) != (rows, triton.cdiv(k, SCALE_BLOCK)):
        raise ValueError(f"{name}_scale must be [rows, ceil(K/128)] = "
                         f"{[rows, triton.cdiv(k, SCALE_BLOCK)]} (1x128 tiles from act_quant), "
                         f"got {list(s.shape)}")


def _check_colwise(name: str, t: torch.Tensor, s: torch.Tensor, transposed: bool = False):
    """A 128x1-tiled Wgrad operand: [tokens, cols] with scales [ceil(tokens/128), cols], or with
    ``transposed`` [cols, tokens] with scales [cols, ceil(tokens/128)]. Returns (tokens, cols)."""
    check_fp8_operand(name, t, 2)
    check_scale(f"{name}_scale", s, 2)
    if transposed:
        cols, rows = t.shape
        want = (cols, triton.cdiv(rows, SCALE_BLOCK))
        hint = "[cols, ceil(tokens/128)] (act_quant_colwise with transpose=True)"
    else:
        rows, cols = t.shape
        want = (triton.cdiv(rows, SCALE_BLOCK), cols)
        hint = "[ceil(rows/128), cols] (128x1 tiles from act_quant_colwise)"
    if tuple(s.shape) != want:
        raise ValueError(f"{name}_scale must be {hint} = {list(want)}, got {list(s.shape)}")
    return rows, cols


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
                               out_dtype: torch.dtype = torch.float32,
                               transposed: bool = False) -> torch.Tensor:
    """Torch reference of ``fp8_grouped_gemm_wgrad``: dB[g] = dY_g^T @ X_g (global 128x1 tiles)."""
    sizes = group_sizes.tolist()
    # Canonical orientation: rows = output dim, K = tokens; scales [rows, ceil(tokens/128)].
    if transposed:
        dy_t, sdy_t, x_t, sx_t = dy, dy_scale, x, x_scale
    else:
        dy_t, sdy_t, x_t, sx_t = dy.t(), dy_scale.t(), x.t(), x_scale.t()
    out = torch.empty((len(sizes), dy_t.shape[0], x_t.shape[0]), dtype=out_dtype,
                      device=dy.device)
    row = 0
    for g, size in enumerate(sizes):
        out[g] = blockwise_scaled_mm_ref(dy_t, sdy_t, x_t, sx_t, row, row + size).to(out_dtype)
        row += size
    return out


# ----------------------------------------------------------------------------------------------
# Validating wrappers
# ----------------------------------------------------------------------------------------------


def fp8_grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                     b_scale: torch.Tensor, group_sizes: torch.Tensor, *,
                     use_triton: bool | None = None, b_transposed: bool = False,
                     out_dtype: torch.dtype = torch.float32,
                     group_offsets: torch.Tensor | None = None,
                     check: bool | None = None) -> torch.Tensor:
    """out[rows of g] = A_g @ B[g]^T for contiguous, expert-sorted rows of A.

    a [M_total, K] fp8 with 1x128 scales [M_total, ceil(K/128)]; b [G, N, K] fp8 (or [G, K, N]
    with b_transposed, which computes A_g @ B[g] for b given as [G, K, N]) with block scales
    [G, ceil(N/128), ceil(K/128)] (per-row [G, N, ceil(K/128)] also accepted), in b's storage
    orientation; group_sizes int [G], >= 0, summing to M_total. Returns [M_total, N].

    ``group_offsets``: the int32 [G + 1] offsets of ``group_offsets(group_sizes, a.device)``, when
    the caller already built them (several GEMMs over one routing). ``check``: run the host-side
    value checks of group_sizes on the Triton path (default: ``HAI_LLM_DEBUG_CHECKS``).
    ``use_triton=None``: Triton exactly for CUDA tensors.
    """
    _check_rowwise("a", a, a_scale)
    g, n, k, b_gran = _check_weights(b, b_scale, b_transposed)
    m_total, k_a = a.shape
    if k_a != k:
        raise ValueError(f"a and b disagree on the reduction dim K: a has K={k_a}, b has K={k} "
                         f"(check b_transposed)")
    check_out_dtype(out_dtype)
    _check_group_sizes(group_sizes, g, m_total)
    if not resolve_use_triton(use_triton, a):
        _check_group_values(group_sizes, m_total, group_offsets)  # the reference reads them anyway
        return fp8_grouped_gemm_ref(a, a_scale, b, b_scale, group_sizes,
                                    b_transposed=b_transposed, out_dtype=out_dtype)
    check_triton_runnable(a, a_scale, b, b_scale)
    offsets = _offsets_for(group_sizes, group_offsets, a.device)
    if debug_checks(check):  # user-given offsets are compared too
        _check_group_values(group_sizes, m_total, group_offsets)
    c = torch.empty((m_total, n), dtype=out_dtype, device=a.device)
    if m_total == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    if b_transposed:  # K-major B for the launch: [G, N, K] with K contiguous (an FP8 copy)
        b, b_scale = b.transpose(1, 2).contiguous(), b_scale.transpose(1, 2).contiguous()
    args = (a, a_scale, b, b_scale, c, offsets, g, n, k,
            a.stride(0), a.stride(1), a_scale.stride(0), a_scale.stride(1),
            *b.stride(), *b_scale.stride(), c.stride(0), c.stride(1))
    g_pow2 = max(2, triton.next_power_of_2(g))

    def grid(meta):  # an upper bound on the (group, row tile) pairs; the extra programs return
        return (triton.cdiv(m_total, meta["BLOCK_M"]) + g, triton.cdiv(n, meta["BLOCK_N"]))

    # 64-row tiles when the groups average fewer than 128 rows (less padding per partial tile)
    meta = launch_meta(m_total, n, a.device, extra_m_tiles=g, small_m=m_total < 128 * g)
    if meta is None:
        _fp8_grouped_gemm_kernel_tuned[grid](*args, B_SCALE_ROWS=b_gran, G_POW2=g_pow2)
    else:
        _fp8_grouped_gemm_kernel[grid(meta)](*args, B_SCALE_ROWS=b_gran, G_POW2=g_pow2, **meta)
    return c


def fp8_grouped_gemm_dgrad(dy: torch.Tensor, dy_scale: torch.Tensor, b: torch.Tensor,
                           b_scale: torch.Tensor, group_sizes: torch.Tensor, *,
                           use_triton: bool | None = None,
                           out_dtype: torch.dtype = torch.float32,
                           b_kmajor: bool = False, group_offsets: torch.Tensor | None = None,
                           check: bool | None = None) -> torch.Tensor:
    """dA[rows of g] = dY_g @ B[g]; dy [M_total, N] 1x128, b [G, N, K] as in the forward.

    ``b_kmajor=True``: b is already given as B^T [G, K, N] with scales [G, ceil(K/128),
    ceil(N/128)] (``stacked_weight_quant(W, transpose=True)``), the K-major operand of the launch:
    no copy."""
    return fp8_grouped_gemm(dy, dy_scale, b, b_scale, group_sizes, use_triton=use_triton,
                            b_transposed=not b_kmajor, out_dtype=out_dtype,
                            group_offsets=group_offsets, check=check)


def fp8_grouped_gemm_wgrad(dy: torch.Tensor, dy_scale: torch.Tensor, x: torch.Tensor,
                           x_scale: torch.Tensor, group_sizes: torch.Tensor, *,
                           use_triton: bool | None = None,
                           out_dtype: torch.dtype = torch.float32, transposed: bool = False,
                           group_offsets: torch.Tensor | None = None,
                           check: bool | None = None) -> torch.Tensor:
    """dB[g] = dY_g^T @ X_g -> [G, N, K]; dy [M_total, N] and x [M_total, K] quantized 128x1
    over the whole buffer (act_quant_colwise; scales [ceil(M_total/128), N | K]).

    ``transposed=True``: dy and x are given as dY^T [N, M_total] and X^T [K, M_total] with scales
    [N | K, ceil(M_total/128)] (``act_quant_colwise(..., transpose=True)``), the K-major operands
    of the launch: no copy. ``group_offsets``, ``check``, ``use_triton``: as in
    ``fp8_grouped_gemm``."""
    m_total, n = _check_colwise("dy", dy, dy_scale, transposed)
    m_x, k = _check_colwise("x", x, x_scale, transposed)
    if m_x != m_total:
        raise ValueError(f"dy and x must have the same number of rows (tokens), got {m_total} "
                         f"and {m_x}")
    check_out_dtype(out_dtype)
    _check_group_sizes(group_sizes, None, m_total)
    if not resolve_use_triton(use_triton, dy):
        _check_group_values(group_sizes, m_total, group_offsets)
        return fp8_grouped_gemm_wgrad_ref(dy, dy_scale, x, x_scale, group_sizes,
                                          out_dtype=out_dtype, transposed=transposed)
    check_triton_runnable(dy, dy_scale, x, x_scale)
    g = group_sizes.numel()
    if g > 65535:
        raise ValueError(f"at most 65535 groups are supported (grid axis 2), got {g}")
    offsets = _offsets_for(group_sizes, group_offsets, dy.device)
    if debug_checks(check):  # user-given offsets are compared too
        _check_group_values(group_sizes, m_total, group_offsets)
    c = torch.empty((g, n, k), dtype=out_dtype, device=dy.device)
    if n == 0 or k == 0:
        return c
    if not transposed:  # K-major operands for the launch: tokens contiguous (FP8 copies)
        dy, dy_scale = dy.t().contiguous(), dy_scale.t().contiguous()
        x, x_scale = x.t().contiguous(), x_scale.t().contiguous()
    # kernel stride order: (along tokens, along the output dim) for data and scales
    args = (dy, dy_scale, x, x_scale, c, offsets, n, k,
            dy.stride(1), dy.stride(0), dy_scale.stride(1), dy_scale.stride(0),
            x.stride(1), x.stride(0), x_scale.stride(1), x_scale.stride(0),
            c.stride(0), c.stride(1), c.stride(2))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_N"]), g)

    meta = launch_meta(n, k, dy.device, matrices=g)  # g output matrices share the SMs
    if meta is None:
        _fp8_grouped_wgrad_kernel_tuned[grid](*args)
    else:
        _fp8_grouped_wgrad_kernel[grid(meta)](*args, **meta)
    return c
