"""Tests of the block-scaled FP8 GEMM (Fprop, Dgrad, Wgrad of a Linear) over ragged shapes.

Operands are quantized once with the torch reference quantizers and the SAME fp8 tensors and scales
feed the Triton kernel, ``fp8_gemm_ref`` and a float64 matmul of the dequantized operands, so the
only differences left are FP32 accumulation order. The norm-wise relative error against float64
must stay below 1e-5. On a GPU the FP8 tensor cores accumulate the products inside one 128-deep
block with ~14 mantissa bits (the reason for the per-128 promotion), so the bound there is looser.
"""
import itertools

import pytest
import torch

from hai_llm.kernels.fp8_gemm import (fp8_gemm, fp8_gemm_ref, fp8_linear_dgrad, fp8_linear_fprop,
                                      fp8_linear_wgrad)
from hai_llm.kernels.fp8_quant import (act_colwise_dequant_ref, act_dequant_ref, act_quant,
                                       act_quant_colwise_ref, act_quant_ref, weight_dequant_ref,
                                       weight_quant, weight_quant_ref)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64_RTOL = 1e-5 if DEVICE == "cpu" else 1e-3  # vs float64 of the dequantized operands
REF_RTOL = 1e-6 if DEVICE == "cpu" else 1e-3  # Triton vs fp8_gemm_ref on the same inputs


def _randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


def rel_err(c: torch.Tensor, c64: torch.Tensor) -> float:
    return ((c.double() - c64).norm() / c64.norm()).item()


def check(c: torch.Tensor, c_ref: torch.Tensor, c64: torch.Tensor) -> None:
    assert c.shape == c64.shape and c.dtype == torch.float32
    assert rel_err(c, c64) < F64_RTOL
    assert rel_err(c_ref, c64) < F64_RTOL
    assert rel_err(c, c_ref.double()) < REF_RTOL


# Every combination of ragged and aligned sizes: M, N, K below, at and above 128-multiples.
FPROP_SHAPES = list(itertools.product([1, 7, 130], [64, 129, 256], [128, 200, 384]))


@pytest.mark.parametrize("m,n,k", FPROP_SHAPES)
def test_fprop(m, n, k):
    x, w = _randn(m, k, seed=m + k), _randn(n, k, seed=n)
    xq, xs = act_quant_ref(x)
    wq, ws = weight_quant_ref(w)
    y = fp8_linear_fprop(xq, xs, wq, ws, use_triton=True)
    y64 = act_dequant_ref(xq, xs).double() @ weight_dequant_ref(wq, ws).double().t()
    check(y, fp8_linear_fprop(xq, xs, wq, ws, use_triton=False), y64)


@pytest.mark.parametrize("t,n,k", [(1, 64, 128), (7, 129, 200), (130, 256, 384), (130, 200, 129)])
def test_dgrad(t, n, k):
    dy, w = _randn(t, n, seed=t), _randn(n, k, seed=k)
    dyq, dys = act_quant_ref(dy)
    wq, ws = weight_quant_ref(w)
    dx = fp8_linear_dgrad(dyq, dys, wq, ws, use_triton=True)
    dx64 = act_dequant_ref(dyq, dys).double() @ weight_dequant_ref(wq, ws).double()
    check(dx, fp8_linear_dgrad(dyq, dys, wq, ws, use_triton=False), dx64)


@pytest.mark.parametrize("t,n,k", [(1, 64, 128), (7, 129, 200), (130, 64, 129), (300, 96, 80)])
def test_wgrad(t, n, k):
    dy, x = _randn(t, n, seed=t + 1), _randn(t, k, seed=k + 1)
    dyq, dys = act_quant_colwise_ref(dy)
    xq, xs = act_quant_colwise_ref(x)
    dw = fp8_linear_wgrad(dyq, dys, xq, xs, use_triton=True)
    dw64 = act_colwise_dequant_ref(dyq, dys).double().t() @ act_colwise_dequant_ref(xq, xs).double()
    check(dw, fp8_linear_wgrad(dyq, dys, xq, xs, use_triton=False), dw64)


def test_block_scaled_a_and_per_row_b():
    # The other two scale granularities: A in 128x128 blocks, B with one scale per row and K block.
    a, b = _randn(150, 200, seed=11), _randn(70, 200, seed=12)
    aq, as_ = weight_quant_ref(a)
    bq, bs = act_quant_ref(b)
    c = fp8_gemm(aq, as_, bq, bs, use_triton=True)
    c64 = weight_dequant_ref(aq, as_).double() @ act_dequant_ref(bq, bs).double().t()
    check(c, fp8_gemm_ref(aq, as_, bq, bs), c64)


def test_bf16_output():
    x, w = _randn(7, 200, seed=1), _randn(129, 200, seed=2)
    xq, xs = act_quant_ref(x)
    wq, ws = weight_quant_ref(w)
    y32 = fp8_linear_fprop(xq, xs, wq, ws, use_triton=True)
    y16 = fp8_linear_fprop(xq, xs, wq, ws, use_triton=True, out_dtype=torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=2**-7, atol=1e-6)


def test_end_to_end_with_triton_quantizers():
    # Whole Linear with the Triton quantizers: close to the unquantized product (E4M3 noise only).
    x, w, dy = _randn(64, 256, seed=5), _randn(96, 256, seed=6), _randn(64, 96, seed=7)
    xq, xs = act_quant(x, use_triton=True)
    wq, ws = weight_quant(w, use_triton=True)
    assert rel_err(fp8_linear_fprop(xq, xs, wq, ws, use_triton=True), (x @ w.t()).double()) < 0.05
    dyq, dys = act_quant(dy, use_triton=True)
    assert rel_err(fp8_linear_dgrad(dyq, dys, wq, ws, use_triton=True), (dy @ w).double()) < 0.05


def test_degenerate_sizes():
    xq, xs = act_quant_ref(torch.zeros(0, 200, device=DEVICE))
    wq, ws = weight_quant_ref(_randn(64, 200, seed=0))
    assert fp8_linear_fprop(xq, xs, wq, ws, use_triton=True).shape == (0, 64)
    xq, xs = act_quant_ref(torch.zeros(3, 0, device=DEVICE))
    wq, ws = weight_quant_ref(torch.zeros(5, 0, device=DEVICE))
    y = fp8_linear_fprop(xq, xs, wq, ws, use_triton=True)
    assert y.shape == (3, 5) and torch.all(y == 0)


def test_bad_inputs_raise():
    xq, xs = act_quant_ref(_randn(4, 256, seed=0))
    wq, ws = weight_quant_ref(_randn(64, 256, seed=1))
    w2q, w2s = weight_quant_ref(_randn(64, 200, seed=2))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm(xq.float(), xs, wq, ws, use_triton=True)
    with pytest.raises(ValueError, match="float32"):
        fp8_gemm(xq, xs.half(), wq, ws, use_triton=True)
    with pytest.raises(ValueError, match="reduction dim K"):
        fp8_gemm(xq, xs, w2q, w2s, use_triton=True)
    with pytest.raises(ValueError, match="ceil"):
        fp8_gemm(xq, xs[:, :1].contiguous(), wq, ws, use_triton=True)
    with pytest.raises(ValueError, match="per-row"):
        fp8_gemm(xq, xs[:3], wq, ws, use_triton=True)
    with pytest.raises(ValueError, match="contiguous"):
        fp8_gemm(xq, xs, wq.t().contiguous().t(), ws, use_triton=True)
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_gemm(xq, xs, wq, ws, use_triton=False, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="2-D"):
        fp8_gemm(xq[None], xs, wq, ws, use_triton=False)
