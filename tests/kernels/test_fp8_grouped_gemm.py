"""Tests of the grouped (MoE, contiguous layout) FP8 GEMM: forward, dgrad and wgrad.

Group layouts cover empty groups, all tokens in one group, a single group, and group boundaries
on, just before and across the 128-token scale tiles of the Wgrad operands. As in
test_fp8_gemm.py, the same fp8 tensors feed the kernel, the torch reference and a float64 matmul of
the dequantized operands; the norm-wise relative error against float64 must stay below 1e-5.
"""
import pytest
import torch

from hai_llm.kernels.fp8_grouped_gemm import (fp8_grouped_gemm, fp8_grouped_gemm_dgrad,
                                              fp8_grouped_gemm_wgrad)
from hai_llm.kernels.fp8_quant import (act_colwise_dequant_ref, act_dequant_ref,
                                       act_quant_colwise_ref, act_quant_ref, weight_dequant_ref,
                                       weight_quant_ref)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64_RTOL = 1e-5 if DEVICE == "cpu" else 1e-3  # GPU: FP8 tensor cores accumulate ~14 bits per block
REF_RTOL = 1e-6 if DEVICE == "cpu" else 1e-3

CASES = [  # (group sizes, N, K)
    ([3, 0, 130, 5], 129, 200),  # ragged everything, an empty group in the middle
    ([0, 0, 40, 0], 64, 128),  # all tokens in one group
    ([17], 64, 384),  # a single group
    ([128, 1, 127, 0, 44], 72, 136),  # boundaries on / across the 128-token scale tiles
    ([0, 5, 0], 130, 64),  # empty groups at both ends
]


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


def quantized_weights(g: int, n: int, k: int, seed: int):
    w = _randn(g, n, k, seed=seed)
    pairs = [weight_quant_ref(w[i]) for i in range(g)]
    wq, ws = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    w64 = torch.stack([weight_dequant_ref(wq[i], ws[i]) for i in range(g)]).double()
    return wq, ws, w64


def group_slices(sizes):
    start = 0
    for size in sizes:
        yield slice(start, start + size)
        start += size


@pytest.mark.parametrize("sizes,n,k", CASES)
def test_forward_and_dgrad(sizes, n, k):
    m, g = sum(sizes), len(sizes)
    gs = torch.tensor(sizes, device=DEVICE)
    wq, ws, w64 = quantized_weights(g, n, k, seed=m)
    aq, as_ = act_quant_ref(_randn(m, k, seed=k))
    a64 = act_dequant_ref(aq, as_).double()
    out = fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=True)
    out64 = torch.cat([a64[rows] @ w64[i].t() for i, rows in enumerate(group_slices(sizes))])
    check(out, fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=False), out64)

    dyq, dys = act_quant_ref(_randn(m, n, seed=n))
    dy64 = act_dequant_ref(dyq, dys).double()
    da = fp8_grouped_gemm_dgrad(dyq, dys, wq, ws, gs, use_triton=True)
    da64 = torch.cat([dy64[rows] @ w64[i] for i, rows in enumerate(group_slices(sizes))])
    check(da, fp8_grouped_gemm_dgrad(dyq, dys, wq, ws, gs, use_triton=False), da64)


@pytest.mark.parametrize("sizes,n,k", CASES)
def test_wgrad(sizes, n, k):
    m = sum(sizes)
    gs = torch.tensor(sizes, dtype=torch.int32, device=DEVICE)
    dyq, dys = act_quant_colwise_ref(_randn(m, n, seed=n + 1))
    xq, xs = act_quant_colwise_ref(_randn(m, k, seed=k + 1))
    dy64, x64 = act_colwise_dequant_ref(dyq, dys).double(), act_colwise_dequant_ref(xq, xs).double()
    dw = fp8_grouped_gemm_wgrad(dyq, dys, xq, xs, gs, use_triton=True)
    dw64 = torch.stack([dy64[rows].t() @ x64[rows] for rows in group_slices(sizes)])
    check(dw, fp8_grouped_gemm_wgrad(dyq, dys, xq, xs, gs, use_triton=False), dw64)
    for i, size in enumerate(sizes):
        if size == 0:
            assert torch.all(dw[i] == 0)


def test_group_sizes_on_host_with_per_row_weight_scales():
    # int32 sizes, and B quantized with one scale per row and K block (act_quant on each expert).
    sizes, n, k = [9, 0, 20], 40, 130
    w = _randn(3, n, k, seed=1)
    wq, ws = act_quant_ref(w)  # [G, N, K] fp8, scales [G, N, 2]
    aq, as_ = act_quant_ref(_randn(29, k, seed=2))
    out = fp8_grouped_gemm(aq, as_, wq, ws, torch.tensor(sizes, dtype=torch.int32),
                           use_triton=True)
    a64, w64 = act_dequant_ref(aq, as_).double(), act_dequant_ref(wq, ws).double()
    out64 = torch.cat([a64[rows] @ w64[i].t() for i, rows in enumerate(group_slices(sizes))])
    assert rel_err(out, out64) < F64_RTOL


def test_no_tokens_at_all():
    wq, ws, _ = quantized_weights(3, 64, 128, seed=0)
    aq, as_ = act_quant_ref(torch.zeros(0, 128, device=DEVICE))
    gs = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    assert fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=True).shape == (0, 64)
    dyq, dys = act_quant_colwise_ref(torch.zeros(0, 64, device=DEVICE))
    xq, xs = act_quant_colwise_ref(torch.zeros(0, 128, device=DEVICE))
    dw = fp8_grouped_gemm_wgrad(dyq, dys, xq, xs, gs, use_triton=True)
    assert dw.shape == (3, 64, 128) and torch.all(dw == 0)


def test_bad_inputs_raise():
    wq, ws, _ = quantized_weights(2, 64, 128, seed=0)
    aq, as_ = act_quant_ref(_randn(10, 128, seed=1))
    gs = torch.tensor([4, 6], device=DEVICE)
    with pytest.raises(ValueError, match="sum to 9 but the activations have 10"):
        fp8_grouped_gemm(aq, as_, wq, ws, torch.tensor([4, 5], device=DEVICE), use_triton=True)
    with pytest.raises(ValueError, match=">= 0"):
        fp8_grouped_gemm(aq, as_, wq, ws, torch.tensor([12, -2], device=DEVICE), use_triton=True)
    with pytest.raises(ValueError, match="int32 or int64"):
        fp8_grouped_gemm(aq, as_, wq, ws, gs.float(), use_triton=True)
    with pytest.raises(ValueError, match="3 groups but the weights have 2"):
        fp8_grouped_gemm(aq, as_, wq, ws, torch.tensor([4, 6, 0], device=DEVICE),
                         use_triton=True)
    with pytest.raises(ValueError, match="reduction dim K"):
        bq, bs, _ = quantized_weights(2, 64, 256, seed=2)
        fp8_grouped_gemm(aq, as_, bq, bs, gs, use_triton=True)
    with pytest.raises(ValueError, match="3-D"):
        fp8_grouped_gemm(aq, as_, wq[0], ws[0], gs, use_triton=True)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_grouped_gemm(aq.float(), as_, wq, ws, gs, use_triton=False)
    with pytest.raises(ValueError, match="act_quant_colwise"):  # 1x128 scales given to wgrad
        fp8_grouped_gemm_wgrad(aq, as_, aq, as_, gs, use_triton=True)
    with pytest.raises(ValueError, match="1x128 tiles"):  # 128x1 scales given to the forward
        cq, cs = act_quant_colwise_ref(_randn(10, 128, seed=3))
        fp8_grouped_gemm(cq, cs, wq, ws, gs, use_triton=True)
