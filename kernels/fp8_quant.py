"""Fine-grained FP8 (E4M3) quantization: the scaling recipe of DeepSeek-V3 (REFERENCE.md section 3).

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

Each public function takes ``use_triton`` explicitly: the Triton kernel or the pure-torch ``*_ref``
implementation of the same math. ``default_use_triton`` gives the usual choice for a tensor.
The ``*_dequant_ref`` helpers rebuild float32 tensors from (fp8, scale) for checks and fallbacks.
"""
import os

import torch
import triton
import triton.language as tl

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
def _scale_from_amax(amax, POW2_SCALE: tl.constexpr):
    """s = max(amax, 1e-4) / 448, optionally rounded up to a power of two."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)  # IEEE division, as in torch
    if POW2_SCALE:
        # Round up to 2**ceil(log2(s)) on the bits, exactly (a log2/exp2 pair can land one binade
        # off on exact powers of two). s is positive and normal (>= 1e-4/448 ~ 2.2e-7): keep the
        # exponent field, and bump it by one when any mantissa bit is set.
        bits = s.to(tl.int32, bitcast=True)
        exp_bits = bits & 0x7F800000
        exp_bits = tl.where((bits & 0x007FFFFF) != 0, exp_bits + 0x00800000, exp_bits)
        s = exp_bits.to(tl.float32, bitcast=True)
    return s


@triton.jit
def _to_e4m3(x, s):
    """e4m3(x / s) with round-to-nearest-even done explicitly in fp32.

    The magnitude is first clamped to 448 (x / s can exceed 448 by an fp32 ulp) and rounded
    onto the E4M3 grid here, so the final cast converts an exactly representable value and the
    result does not depend on the backend's conversion (the Triton CPU interpreter mis-rounds values
    just below a power of two, e.g. 127.99 -> 64). E4M3 keeps 3 mantissa bits: a value with
    exponent e >= -6 has quantum 2**(e-3); below 2**-6 (subnormals) the quantum is 2**-9.
    """
    y = tl.math.div_rn(x, s)  # IEEE division: matches torch's x / s bit for bit
    bits = y.to(tl.int32, bitcast=True)
    mag = tl.minimum(tl.abs(y), 448.0)  # round the magnitude, put the sign bit back at the end
    exponent = tl.maximum(((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    # 2**(3 - e) and 2**(e - 3) built on the bits: both normal for e in [-6, 8].
    inv_quantum = ((127 + 3 - exponent) << 23).to(tl.float32, bitcast=True)
    quantum = ((127 - 3 + exponent) << 23).to(tl.float32, bitcast=True)
    steps = mag * inv_quantum  # exact (power-of-two factor); 0 <= steps <= 16
    # Adding and subtracting 2**23 rounds a non-negative fp32 below 2**23 to the nearest integer,
    # ties to even (fp32 addition rounds to nearest even at unit spacing there). A carry (15.5 ->
    # 16) correctly moves the value into the next binade.
    steps = (steps + 8388608.0) - 8388608.0
    rounded = (steps * quantum).to(tl.int32, bitcast=True) | (bits & -2147483648)  # sign: -0.0 too
    return rounded.to(tl.float32, bitcast=True).to(tl.float8e4nv)


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
    amax = tl.max(tl.abs(x), axis=1)  # masked lanes are 0 and never raise the amax
    s = _scale_from_amax(amax, POW2_SCALE)
    tl.store(y_ptr + offs, _to_e4m3(x, s[:, None]), mask=mask)
    tl.store(s_ptr + rows * NUM_KB + kb, s, mask=rows < R)


@triton.jit
def _act_quant_colwise_kernel(x_ptr, y_ptr, s_ptr, M, K,
                              POW2_SCALE: tl.constexpr, BLOCK: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    # One program: one BLOCK-tall row tile x BLOCK_C columns; one scale per column.
    mb = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (mb * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < M) & (cols[None, :] < K)  # ragged M: the last row tile is partial
    offs = rows[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    s = _scale_from_amax(amax, POW2_SCALE)
    tl.store(y_ptr + offs, _to_e4m3(x, s[None, :]), mask=mask)
    tl.store(s_ptr + mb * K + cols, s, mask=cols < K)


@triton.jit
def _weight_quant_kernel(w_ptr, y_ptr, s_ptr, N, K, NUM_KB,
                         POW2_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    # One program: one BLOCK x BLOCK block; one scalar scale.
    nb = tl.program_id(0)
    kb = tl.program_id(1)
    rows = (nb * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    s = _scale_from_amax(amax, POW2_SCALE)
    tl.store(y_ptr + offs, _to_e4m3(w, s), mask=mask)
    tl.store(s_ptr + nb * NUM_KB + kb, s)


# ----------------------------------------------------------------------------------------------
# Torch references
# ----------------------------------------------------------------------------------------------


def _scale_from_amax_ref(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    s = amax.float().clamp_min(AMAX_FLOOR) / FP8_MAX
    if pow2_scale:
        bits = s.view(torch.int32)
        exp_bits = bits & 0x7F800000
        exp_bits = torch.where((bits & 0x007FFFFF) != 0, exp_bits + 0x00800000, exp_bits)
        s = exp_bits.view(torch.float32)
    return s


def _to_e4m3_ref(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # torch's float -> float8_e4m3fn cast rounds to nearest even, like the kernels' _to_e4m3.
    return (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def act_quant_ref(x: torch.Tensor, block: int = 128, pow2_scale: bool = False):
    """Torch reference of ``act_quant``: 1 x ``block`` tiles along the last dim."""
    k = x.shape[-1]
    num_kb = triton.cdiv(k, block)
    xf = torch.nn.functional.pad(x.float(), (0, num_kb * block - k))  # zero pad: amax unchanged
    tiles = xf.unflatten(-1, (num_kb, block))
    s = _scale_from_amax_ref(tiles.abs().amax(dim=-1), pow2_scale)
    y = _to_e4m3_ref(tiles, s.unsqueeze(-1)).flatten(-2)[..., :k]
    return y.contiguous(), s


def act_quant_colwise_ref(x: torch.Tensor, block: int = 128, pow2_scale: bool = False):
    """Torch reference of ``act_quant_colwise``: ``block`` x 1 tiles of a 2-D [M, K] tensor."""
    y_t, s_t = act_quant_ref(x.t(), block, pow2_scale)  # the row-wise recipe on the transpose
    return y_t.t().contiguous(), s_t.t().contiguous()


def weight_quant_ref(w: torch.Tensor, block: int = 128, pow2_scale: bool = False):
    """Torch reference of ``weight_quant``: ``block`` x ``block`` blocks of a 2-D [N, K] weight."""
    n, k = w.shape
    nb, kb = triton.cdiv(n, block), triton.cdiv(k, block)
    wf = torch.nn.functional.pad(w.float(), (0, kb * block - k, 0, nb * block - n))
    blocks = wf.view(nb, block, kb, block)
    s = _scale_from_amax_ref(blocks.abs().amax(dim=(1, 3)), pow2_scale)
    y = _to_e4m3_ref(blocks, s[:, None, :, None]).view(nb * block, kb * block)[:n, :k]
    return y.contiguous(), s


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


def act_quant(x: torch.Tensor, block: int = 128, pow2_scale: bool = False, *, use_triton: bool):
    """Quantize per 1 x ``block`` tile of the last dim.

    x: [..., K] float32/bfloat16/float16, contiguous; K need not be a multiple of ``block``.
    Returns (q [..., K] float8_e4m3fn, scale [..., ceil(K / block)] float32), x ~= q * scale.
    """
    _check_input("x", x)
    _check_block(block)
    k = x.shape[-1]
    if not use_triton:
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
                      use_triton: bool):
    """Quantize a 2-D [M, K] tensor per ``block`` x 1 tile (``block`` rows of one column).

    This is the Wgrad operand layout: the GEMM reduces over M (tokens), so M is the tiled dim.
    Returns (q [M, K] float8_e4m3fn, scale [ceil(M / block), K] float32),
    x[m, k] ~= q[m, k] * scale[m // block, k]. M need not be a multiple of ``block``.
    """
    _check_input("x", x, ndim=2)
    _check_block(block)
    if not use_triton:
        return act_quant_colwise_ref(x, block, pow2_scale)
    check_triton_runnable(x)
    m, k = x.shape
    y = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((triton.cdiv(m, block), k), dtype=torch.float32, device=x.device)
    if m and k:
        grid = (triton.cdiv(m, block), triton.cdiv(k, _COLS_PER_PROGRAM))
        _act_quant_colwise_kernel[grid](x, y, s, m, k, POW2_SCALE=pow2_scale, BLOCK=block,
                                        BLOCK_C=_COLS_PER_PROGRAM)
    return y, s


def weight_quant(w: torch.Tensor, block: int = 128, pow2_scale: bool = False, *,
                 use_triton: bool):
    """Quantize a 2-D [N, K] weight per ``block`` x ``block`` block.

    Returns (q [N, K] float8_e4m3fn, scale [ceil(N / block), ceil(K / block)] float32).
    The transpose of the result is the block quantization of w.t() (Dgrad needs exactly that).
    """
    _check_input("w", w, ndim=2)
    _check_block(block)
    if not use_triton:
        return weight_quant_ref(w, block, pow2_scale)
    check_triton_runnable(w)
    n, k = w.shape
    nb, kb = triton.cdiv(n, block), triton.cdiv(k, block)
    y = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((nb, kb), dtype=torch.float32, device=w.device)
    if n and k:
        _weight_quant_kernel[(nb, kb)](w, y, s, n, k, kb, POW2_SCALE=pow2_scale, BLOCK=block)
    return y, s
