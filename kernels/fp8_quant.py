"""Fine-grained FP8 (E4M3) quantization: the scaling recipe of DeepSeek-V3 (docs/deepseek_v3.md;
arXiv:2412.19437, section 3.3).

Every tensor that feeds an FP8 GEMM is cut into small tiles, each with its own float32 scale
computed online from the tile's absolute maximum (no delayed scaling):

* activations, Fprop/Dgrad operand: 1x128 tiles along the last dim (per token, 128 channels),
  ``act_quant``;
* activations and output gradients, Wgrad operand: 128x1 tiles (128 tokens, one channel), so that
  the reduction dim of the Wgrad GEMM (tokens) is tiled by 128 as well, ``act_quant_colwise``;
* weights: 128x128 blocks, ``weight_quant``.

For a tile with absolute maximum ``amax`` the scale is ``s = max(amax, 1e-4) / 448`` (448 is the
largest finite E4M3 value; the 1e-4 floor is the one of DeepSeek's public ``inference/kernel.py``
and keeps all-zero tiles finite). With ``pow2_scale=True`` the scale is rounded UP to a power of
two, ``2**ceil(log2(s))``, the "finer format" the paper uses for cached activations and the dispatch
payload: dividing by a power of two is exact and ``|x / s| <= 448`` still holds. The stored value is
``q = e4m3(x / s)`` and ``x ~= q * s``.

Non-finite inputs propagate, identically in the kernels and the references: a tile holding a NaN
or an infinity gets a NaN scale and all its FP8 codes are NaN (0x7f), so everything computed from
it (dequantized values, GEMM outputs, weight gradients) is NaN and the trainer's non-finite-step
check sees it. This is explicit in the kernels: ``tl.max``/``tl.maximum``/``tl.minimum`` drop NaN
on a GPU (PTX max/min return the non-NaN operand) while the CPU interpreter (numpy) propagates it,
so the kernels count the non-finite lanes of each tile with comparisons instead of relying on the
reductions, and write the NaN code on the bits (the interpreter's fp32 -> fp8 cast turns NaN into
384).

Layouts for the GEMMs: ``act_quant_colwise(..., transpose=True)`` and
``weight_quant(..., transpose=True)`` write the quantization of ``x`` transposed (bit for bit the
quantization of ``x.t()`` with the transposed tiles), so that Dgrad and Wgrad get both operands
K-major (reduction dim contiguous) without an extra copy: Hopper's FP8 wgmma reads only K-major
operands from shared memory.

Each public function takes ``use_triton``: True runs the Triton kernel, False the pure-torch
``*_ref`` implementation of the same math, None (the default) Triton exactly for CUDA tensors
(``default_use_triton``). The ``*_dequant_ref`` helpers rebuild float32 tensors from (fp8, scale)
for checks and fallbacks.
"""
import os

import torch
import triton
import triton.language as tl

from hai_llm.kernels.policy import resolve_use_triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 (fn variant: no infinities, 0x7f/0xff are NaN)
AMAX_FLOOR = 1e-4  # DeepSeek's floor on the tile amax before dividing by FP8_MAX
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Rows (act_quant) or columns (act_quant_colwise) handled by one program next to its 1-D tile.
# The kernels are memory bound; these values only trade grid size against per-program work.
_ROWS_PER_PROGRAM = 32
_COLS_PER_PROGRAM = 32


def default_use_triton(t: torch.Tensor) -> bool:
    """The usual backend choice: Triton for CUDA tensors, the torch reference otherwise."""
    return t.is_cuda


def check_triton_runnable(*tensors: torch.Tensor) -> None:
    """Raise ValueError unless a Triton kernel can run on ``tensors`` (shared by the GEMM files).

    Triton needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set in the environment
    before triton decorated the kernels (i.e. before importing this package).
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not tensors[0].is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "use_triton=True needs CUDA tensors, or TRITON_INTERPRET=1 in the environment before "
            "importing triton; pass use_triton=False to use the torch reference instead"
        )


def _check_block(block: int) -> None:
    # tl.arange needs a power-of-two extent; 16 is the smallest K a tl.dot accepts.
    if not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 (128 in the paper's recipe), "
                         f"got {block}")


def _check_input(name: str, x: torch.Tensor, ndim: int | None = None) -> None:
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() first")


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_amax(x, AXIS: tl.constexpr):
    """(amax of |x| along AXIS, NaN where that slice holds a NaN or an infinity).

    ``tl.max`` cannot be trusted with NaN (dropped on a GPU, kept by the interpreter), so the
    non-finite lanes are counted with a comparison, which is False for NaN on every backend.
    Masked lanes are loaded as 0 and never count. AXIS = -1 reduces a 2-D tile to a scalar.
    """
    ax = tl.abs(x)
    bad = tl.where(ax < float("inf"), 0, 1)
    if AXIS == -1:
        amax = tl.max(tl.max(ax, axis=1), axis=0)
        n_bad = tl.sum(tl.sum(bad, axis=1), axis=0)
    else:
        amax = tl.max(ax, axis=AXIS)
        n_bad = tl.sum(bad, axis=AXIS)
    return tl.where(n_bad > 0, float("nan"), amax)


@triton.jit
def _scale_from_amax(amax, POW2_SCALE: tl.constexpr):
    """s = max(amax, 1e-4) / 448, optionally rounded up to a power of two; NaN stays NaN."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)  # IEEE division, as in torch
    if POW2_SCALE:
        # Round up to 2**ceil(log2(s)) on the bits, exactly (a log2/exp2 pair can land one binade
        # off on exact powers of two). s is positive and normal (>= 1e-4/448 ~ 2.2e-7): keep the
        # exponent field, and bump it by one when any mantissa bit is set.
        bits = s.to(tl.int32, bitcast=True)
        exp_bits = bits & 0x7F800000
        exp_bits = tl.where((bits & 0x007FFFFF) != 0, exp_bits + 0x00800000, exp_bits)
        s = exp_bits.to(tl.float32, bitcast=True)
    # tl.maximum dropped a NaN amax on the GPU and the bit trick mangles it: restore it here.
    return tl.where(amax == amax, s, float("nan"))


@triton.jit
def _to_e4m3(x, s):
    """e4m3(x / s) with round-to-nearest-even done explicitly in fp32; NaN -> the NaN code 0x7f.

    The magnitude is first clamped to 448 (x / s can exceed 448 by an fp32 ulp) and rounded
    onto the E4M3 grid here, so the final cast converts an exactly representable value and the
    result does not depend on the backend's conversion (the Triton CPU interpreter mis-rounds values
    just below a power of two, e.g. 127.99 -> 64, and turns NaN into 384). E4M3 keeps 3 mantissa
    bits: a value with exponent e >= -6 has quantum 2**(e-3); below 2**-6 (subnormals) the
    quantum is 2**-9. x / s is NaN exactly when the tile is non-finite (its scale is NaN).
    """
    y = tl.math.div_rn(x, s)  # IEEE division: matches torch's x / s bit for bit
    bits = y.to(tl.int32, bitcast=True)
    mag = tl.minimum(tl.abs(y), 448.0)  # round the magnitude, put the sign bit back at the end
    exponent = tl.maximum(((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    exponent = tl.minimum(exponent, 8)  # only reached by NaN lanes, which are replaced below
    # 2**(3 - e) and 2**(e - 3) built on the bits: both normal for e in [-6, 8].
    inv_quantum = ((127 + 3 - exponent) << 23).to(tl.float32, bitcast=True)
    quantum = ((127 - 3 + exponent) << 23).to(tl.float32, bitcast=True)
    steps = mag * inv_quantum  # exact (power-of-two factor); 0 <= steps <= 16
    # Adding and subtracting 2**23 rounds a non-negative fp32 below 2**23 to the nearest integer,
    # ties to even (fp32 addition rounds to nearest even at unit spacing there). A carry (15.5 ->
    # 16) correctly moves the value into the next binade.
    steps = (steps + 8388608.0) - 8388608.0
    rounded = (steps * quantum).to(tl.int32, bitcast=True) | (bits & -2147483648)  # sign: -0.0 too
    rounded = tl.where(y == y, rounded, 0)  # keep the cast below on finite values
    q = rounded.to(tl.float32, bitcast=True).to(tl.float8e4nv).to(tl.int8, bitcast=True)
    return tl.where(y == y, q, 0x7F).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, R, K, NUM_KB,
                      POW2_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    # One program: BLOCK_R rows x one BLOCK-wide tile of the last dim; one scale per row.
    pid_r = tl.program_id(0)
    kb = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < R) & (cols[None, :] < K)  # ragged K: the last tile is partial
    offs = rows[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _scale_from_amax(_tile_amax(x, 1), POW2_SCALE)  # masked lanes are 0: amax unchanged
    tl.store(y_ptr + offs, _to_e4m3(x, s[:, None]), mask=mask)
    tl.store(s_ptr + rows * NUM_KB + kb, s, mask=rows < R)


@triton.jit
def _act_quant_colwise_kernel(x_ptr, y_ptr, s_ptr, M, K, NUM_MB,
                              POW2_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr,
                              BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program: one BLOCK-tall row tile x BLOCK_C columns; one scale per column.
    # TRANSPOSE writes q^T [K, M] and s^T [K, NUM_MB] (K-major Wgrad operands) instead of
    # q [M, K] and s [NUM_MB, K].
    mb = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (mb * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < K)  # ragged M: the last row tile is partial
    offs = rows[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _scale_from_amax(_tile_amax(x, 0), POW2_SCALE)
    q = _to_e4m3(x, s[None, :])
    if TRANSPOSE:
        tl.store(y_ptr + cols[None, :] * M + rows[:, None], q, mask=mask)
        tl.store(s_ptr + cols * NUM_MB + mb, s, mask=cols < K)
    else:
        tl.store(y_ptr + offs, q, mask=mask)
        tl.store(s_ptr + mb * K + cols, s, mask=cols < K)


@triton.jit
def _weight_quant_kernel(w_ptr, y_ptr, s_ptr, N, K, NUM_NB, NUM_KB,
                         POW2_SCALE: tl.constexpr, TRANSPOSE: tl.constexpr,
                         BLOCK: tl.constexpr):
    # One program: one BLOCK x BLOCK block of matrix e (axis 2) of a stack [E, N, K]; one scalar
    # scale. TRANSPOSE writes q^T [E, K, N] and scales [E, NUM_KB, NUM_NB] (Dgrad's K-major B).
    nb = tl.program_id(0)
    kb = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    rows = (nb * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (kb * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    base = e * N * K
    w = tl.load(w_ptr + base + rows[:, None] * K + cols[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)
    s = _scale_from_amax(_tile_amax(w, -1), POW2_SCALE)
    q = _to_e4m3(w, s)
    if TRANSPOSE:
        tl.store(y_ptr + base + cols[None, :] * N + rows[:, None], q, mask=mask)
        tl.store(s_ptr + (e * NUM_KB + kb) * NUM_NB + nb, s)
    else:
        tl.store(y_ptr + base + rows[:, None] * K + cols[None, :], q, mask=mask)
        tl.store(s_ptr + (e * NUM_NB + nb) * NUM_KB + kb, s)


# ----------------------------------------------------------------------------------------------
# Torch references
# ----------------------------------------------------------------------------------------------


def _scale_from_amax_ref(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    """The kernels' scale from a tile amax; NaN for a non-finite amax (a NaN or inf in the tile:
    torch's amax propagates NaN, and inf is caught by isfinite)."""
    amax = amax.float()
    s = amax.clamp_min(AMAX_FLOOR) / FP8_MAX
    if pow2_scale:
        bits = s.view(torch.int32)
        exp_bits = bits & 0x7F800000
        exp_bits = torch.where((bits & 0x007FFFFF) != 0, exp_bits + 0x00800000, exp_bits)
        s = exp_bits.view(torch.float32)
    return torch.where(torch.isfinite(amax), s, torch.full_like(s, float("nan")))


def _to_e4m3_ref(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # torch's float -> float8_e4m3fn cast rounds to nearest even, like the kernels' _to_e4m3; a NaN
    # scale makes x / s NaN, which clamp keeps; NaN is made positive so that the cast gives the
    # kernels' NaN code 0x7f (the cast keeps the sign bit: 0xff for a negative NaN).
    y = (x / s).clamp(-FP8_MAX, FP8_MAX)
    return torch.where(torch.isnan(y), float("nan"), y).to(FP8_DTYPE)


def act_quant_ref(x: torch.Tensor, block: int = 128, pow2_scale: bool = False):
    """Torch reference of ``act_quant``: 1 x ``block`` tiles along the last dim."""
    k = x.shape[-1]
    num_kb = triton.cdiv(k, block)
    xf = torch.nn.functional.pad(x.float(), (0, num_kb * block - k))  # zero pad: amax unchanged
    tiles = xf.unflatten(-1, (num_kb, block))
    s = _scale_from_amax_ref(tiles.abs().amax(dim=-1), pow2_scale)
    y = _to_e4m3_ref(tiles, s.unsqueeze(-1)).flatten(-2)[..., :k]
    return y.contiguous(), s


def act_quant_colwise_ref(x: torch.Tensor, block: int = 128, pow2_scale: bool = False,
                          transpose: bool = False):
    """Torch reference of ``act_quant_colwise``: ``block`` x 1 tiles of a 2-D [M, K] tensor
    (with ``transpose``: the same values stored as q^T [K, M], s^T [K, ceil(M / block)])."""
    y_t, s_t = act_quant_ref(x.t(), block, pow2_scale)  # the row-wise recipe on the transpose
    if transpose:
        return y_t.contiguous(), s_t.contiguous()
    return y_t.t().contiguous(), s_t.t().contiguous()


def stacked_weight_quant_ref(w: torch.Tensor, block: int = 128, pow2_scale: bool = False,
                             transpose: bool = False):
    """Torch reference of ``stacked_weight_quant``: ``block`` x ``block`` blocks of every matrix
    of an [E, N, K] stack (with ``transpose``: q [E, K, N], scales [E, ceil(K/b), ceil(N/b)])."""
    e, n, k = w.shape
    nb, kb = triton.cdiv(n, block), triton.cdiv(k, block)
    wf = torch.nn.functional.pad(w.float(), (0, kb * block - k, 0, nb * block - n))
    blocks = wf.view(e, nb, block, kb, block)
    s = _scale_from_amax_ref(blocks.abs().amax(dim=(2, 4)), pow2_scale)
    y = _to_e4m3_ref(blocks, s[:, :, None, :, None]).view(e, nb * block, kb * block)[:, :n, :k]
    if transpose:
        return y.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous()
    return y.contiguous(), s


def weight_quant_ref(w: torch.Tensor, block: int = 128, pow2_scale: bool = False,
                     transpose: bool = False):
    """Torch reference of ``weight_quant``: ``block`` x ``block`` blocks of a 2-D [N, K] weight."""
    y, s = stacked_weight_quant_ref(w[None], block, pow2_scale, transpose)
    return y[0], s[0]


def act_dequant_ref(x_fp8: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """float32 tensor from ``act_quant`` output: x[..., k] = q[..., k] * scale[..., k // block]."""
    k = x_fp8.shape[-1]
    return x_fp8.float() * scale.repeat_interleave(block, dim=-1)[..., :k]


def act_colwise_dequant_ref(x_fp8: torch.Tensor, scale: torch.Tensor,
                            block: int = 128) -> torch.Tensor:
    """float32 tensor from ``act_quant_colwise`` output: x[m, k] = q[m, k] * scale[m // block, k]"""
    return x_fp8.float() * scale.repeat_interleave(block, dim=0)[: x_fp8.shape[0]]


def weight_dequant_ref(w_fp8: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """float32 weight from ``weight_quant``: w[n, k] = q[n, k] * scale[n // block, k // block]."""
    n, k = w_fp8.shape
    full = scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)[:n, :k]
    return w_fp8.float() * full


# ----------------------------------------------------------------------------------------------
# Validating wrappers
# ----------------------------------------------------------------------------------------------


_use_triton = resolve_use_triton  # None -> Triton exactly for CUDA tensors


def act_quant(x: torch.Tensor, block: int = 128, pow2_scale: bool = False, *,
              use_triton: bool | None = None):
    """Quantize per 1 x ``block`` tile of the last dim.

    x: [..., K] float32/bfloat16/float16, contiguous; K need not be a multiple of ``block``.
    Returns (q [..., K] float8_e4m3fn, scale [..., ceil(K / block)] float32), x ~= q * scale.
    A tile holding a NaN or an infinity gets a NaN scale and NaN codes (module docstring).
    """
    _check_input("x", x)
    _check_block(block)
    k = x.shape[-1]
    if not _use_triton(use_triton, x):
        return act_quant_ref(x, block, pow2_scale)
    check_triton_runnable(x)
    num_kb = triton.cdiv(k, block)
    y = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((*x.shape[:-1], num_kb), dtype=torch.float32, device=x.device)
    rows = x.numel() // k if k else 0
    if rows and k:
        grid = (triton.cdiv(rows, _ROWS_PER_PROGRAM), num_kb)
        _act_quant_kernel[grid](x, y, s, rows, k, num_kb, POW2_SCALE=pow2_scale,
                                BLOCK_R=_ROWS_PER_PROGRAM, BLOCK=block)
    return y, s


def act_quant_colwise(x: torch.Tensor, block: int = 128, pow2_scale: bool = False, *,
                      use_triton: bool | None = None, transpose: bool = False):
    """Quantize a 2-D [M, K] tensor per ``block`` x 1 tile (``block`` rows of one column).

    This is the Wgrad operand layout: the GEMM reduces over M (tokens), so M is the tiled dim.
    Returns (q [M, K] float8_e4m3fn, scale [ceil(M / block), K] float32),
    x[m, k] ~= q[m, k] * scale[m // block, k]. M need not be a multiple of ``block``.

    ``transpose=True`` returns the same codes and scales stored transposed, q^T [K, M] and
    s^T [K, ceil(M / block)] (bit for bit ``act_quant(x.t().contiguous())``): the K-major operand
    of a Wgrad GEMM, written directly by the kernel.
    """
    _check_input("x", x, ndim=2)
    _check_block(block)
    if not _use_triton(use_triton, x):
        return act_quant_colwise_ref(x, block, pow2_scale, transpose)
    check_triton_runnable(x)
    m, k = x.shape
    num_mb = triton.cdiv(m, block)
    y = torch.empty((k, m) if transpose else (m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((k, num_mb) if transpose else (num_mb, k), dtype=torch.float32,
                    device=x.device)
    if m and k:
        grid = (num_mb, triton.cdiv(k, _COLS_PER_PROGRAM))
        _act_quant_colwise_kernel[grid](x, y, s, m, k, num_mb, POW2_SCALE=pow2_scale,
                                        TRANSPOSE=transpose, BLOCK=block,
                                        BLOCK_C=_COLS_PER_PROGRAM)
    return y, s


def stacked_weight_quant(w: torch.Tensor, block: int = 128, pow2_scale: bool = False, *,
                         use_triton: bool | None = None, transpose: bool = False):
    """Quantize every matrix of a stack [E, N, K] (e.g. MoE experts) per ``block`` x ``block``
    block, in one launch.

    Returns (q [E, N, K] float8_e4m3fn, scale [E, ceil(N / block), ceil(K / block)] float32),
    identical to ``weight_quant`` of each ``w[e]``; with ``transpose=True`` the same codes and
    scales stored transposed, q [E, K, N] and scale [E, ceil(K / block), ceil(N / block)]
    (the K-major B operand of a grouped Dgrad).
    """
    _check_input("w", w, ndim=3)
    _check_block(block)
    if not _use_triton(use_triton, w):
        return stacked_weight_quant_ref(w, block, pow2_scale, transpose)
    check_triton_runnable(w)
    e, n, k = w.shape
    if e > 65535:
        raise ValueError(f"at most 65535 matrices per stack are supported (grid axis 2), got {e}")
    nb, kb = triton.cdiv(n, block), triton.cdiv(k, block)
    y = torch.empty((e, k, n) if transpose else (e, n, k), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((e, kb, nb) if transpose else (e, nb, kb), dtype=torch.float32,
                    device=w.device)
    if e and n and k:
        _weight_quant_kernel[(nb, kb, e)](w, y, s, n, k, nb, kb, POW2_SCALE=pow2_scale,
                                          TRANSPOSE=transpose, BLOCK=block)
    return y, s


def weight_quant(w: torch.Tensor, block: int = 128, pow2_scale: bool = False, *,
                 use_triton: bool | None = None, transpose: bool = False):
    """Quantize a 2-D [N, K] weight per ``block`` x ``block`` block.

    Returns (q [N, K] float8_e4m3fn, scale [ceil(N / block), ceil(K / block)] float32).
    The transpose of the result is the block quantization of w.t(); ``transpose=True`` returns
    exactly that, q [K, N] and scale [ceil(K / block), ceil(N / block)] written by the kernel
    (Dgrad's K-major B operand).
    """
    _check_input("w", w, ndim=2)
    y, s = stacked_weight_quant(w[None], block, pow2_scale, use_triton=use_triton,
                                transpose=transpose)
    return y[0], s[0]
