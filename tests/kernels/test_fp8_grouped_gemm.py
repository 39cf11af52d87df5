"""Tests of the grouped (MoE, contiguous layout) FP8 GEMM: forward, dgrad and wgrad.

Group layouts cover empty groups, all tokens in one group, a single group, and group boundaries
on, just before and across the 128-token scale tiles of the Wgrad operands. As in
test_fp8_gemm.py, the same fp8 tensors feed the kernel, the torch reference and a float64 matmul of
the dequantized operands; the norm-wise relative error against float64 must stay below 1e-5.

GPU-readiness: the Triton path reads nothing on the host (group offsets built on the device, the
grid sized by the bound cdiv(M_total, BLOCK_M) + G), value checks only on request, both operands
of every launch K-major, and the K-major entry points give the same results as the strided ones.
"""
import pytest
import torch

from helpers import LaunchSpy, rel_err

import hai_llm.kernels.fp8_grouped_gemm as fgg
from hai_llm.kernels.fp8_grouped_gemm import (fp8_grouped_gemm, fp8_grouped_gemm_dgrad,
                                              fp8_grouped_gemm_ref, fp8_grouped_gemm_wgrad,
                                              fp8_grouped_gemm_wgrad_ref, group_offsets)
from hai_llm.kernels.fp8_quant import (act_colwise_dequant_ref, act_dequant_ref,
                                       act_quant_colwise, act_quant_colwise_ref, act_quant_ref,
                                       stacked_weight_quant, weight_dequant_ref,
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
        fp8_grouped_gemm(aq, as_, wq, ws, torch.tensor([4, 5], device=DEVICE), use_triton=True,
                         check=True)
    with pytest.raises(ValueError, match=">= 0"):
        fp8_grouped_gemm(aq, as_, wq, ws, torch.tensor([12, -2], device=DEVICE), use_triton=True,
                         check=True)
    with pytest.raises(ValueError, match="sum to 9"):  # the reference reads the sizes: always
        fp8_grouped_gemm(aq, as_, wq, ws, torch.tensor([4, 5], device=DEVICE), use_triton=False)
    with pytest.raises(ValueError, match="sum to 11"):
        fp8_grouped_gemm_wgrad(*act_quant_colwise_ref(_randn(10, 64, seed=4)),
                               *act_quant_colwise_ref(_randn(10, 128, seed=5)),
                               torch.tensor([5, 6], device=DEVICE), use_triton=True, check=True)
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


# ------------------------------------------------------------------------------------------------
# GPU-readiness: no host reads, grid bound, offsets, K-major launches
# ------------------------------------------------------------------------------------------------


def _operands(sizes, n, k, seed=0):
    m, g = sum(sizes), len(sizes)
    wq, ws, _ = quantized_weights(g, n, k, seed=seed)
    aq, as_ = act_quant_ref(_randn(m, k, seed=seed + 1))
    return aq, as_, wq, ws


def test_triton_path_reads_nothing_on_the_host(host_reads, monkeypatch):
    monkeypatch.delenv("HAI_LLM_DEBUG_CHECKS", raising=False)
    sizes = [3, 0, 130, 5]
    gs = torch.tensor(sizes, device=DEVICE)
    aq, as_, wq, ws = _operands(sizes, 72, 200)
    dyc, dycs = act_quant_colwise(_randn(138, 72, seed=3), use_triton=True, transpose=True)
    xc, xcs = act_quant_colwise(_randn(138, 200, seed=4), use_triton=True, transpose=True)
    with host_reads() as reads:
        offs = group_offsets(gs)
        fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=True)
        fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=True, group_offsets=offs)
        fp8_grouped_gemm_wgrad(dyc, dycs, xc, xcs, gs, use_triton=True, transposed=True,
                               group_offsets=offs)
    assert not reads, dict(reads)
    # the same value checks run on request (one read each), and with HAI_LLM_DEBUG_CHECKS=1
    with host_reads() as reads:
        fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=True, check=True)
    assert reads["Tensor.tolist"] == 1
    monkeypatch.setenv("HAI_LLM_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match="sum to 137"):
        fp8_grouped_gemm(aq, as_, wq, ws, torch.tensor([3, 0, 129, 5], device=DEVICE),
                         use_triton=True)
    fp8_grouped_gemm(aq, as_, wq, ws, torch.tensor([3, 0, 129, 5], device=DEVICE),
                     use_triton=True, check=False)  # an explicit False wins over the variable


def test_grid_is_an_upper_bound_extra_programs_exit():
    # Many empty and tiny groups: cdiv(M, BLOCK_M) + G programs for 6 real row tiles.
    sizes = [0] * 7 + [1, 64, 65, 0, 2, 0, 0, 129] + [0] * 9
    n, k = 40, 136
    gs = torch.tensor(sizes, device=DEVICE)
    aq, as_, wq, ws = _operands(sizes, n, k, seed=5)
    spy = LaunchSpy(fgg._fp8_grouped_gemm_kernel)
    fgg_kernel = fgg._fp8_grouped_gemm_kernel
    try:
        fgg._fp8_grouped_gemm_kernel = spy
        out = fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=True)
    finally:
        fgg._fp8_grouped_gemm_kernel = fgg_kernel
    if spy.launches:  # not launched when autotuning (HAI_LLM_AUTOTUNE=1 on a GPU)
        grid, _, meta = spy.launches[0]
        m, bm = sum(sizes), meta["BLOCK_M"]
        assert grid[0] == -(-m // bm) + len(sizes)
    ref = fp8_grouped_gemm_ref(aq, as_, wq, ws, gs)
    assert rel_err(out, ref.double()) < REF_RTOL


def test_group_offsets():
    gs = torch.tensor([3, 0, 130, 5], device=DEVICE)
    off = group_offsets(gs)
    assert off.dtype == torch.int32 and off.tolist() == [0, 3, 3, 133, 138]
    assert group_offsets(torch.zeros(2, dtype=torch.int32)).tolist() == [0, 0, 0]
    aq, as_, wq, ws = _operands([3, 0, 130, 5], 64, 128)
    a = fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=True)
    b = fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=True, group_offsets=off)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="group_offsets must be int32"):
        fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=True, group_offsets=off.long())
    with pytest.raises(ValueError, match="are not"):
        fp8_grouped_gemm(aq, as_, wq, ws, gs, use_triton=True, check=True,
                         group_offsets=group_offsets(torch.tensor([3, 1, 129, 5], device=DEVICE)))


@pytest.mark.parametrize("sizes,n,k", CASES[:2] + CASES[3:4])
def test_every_launch_is_k_major_and_matches_the_strided_entry_points(sizes, n, k, monkeypatch):
    g, m = len(sizes), sum(sizes)
    gs = torch.tensor(sizes, device=DEVICE)
    w = _randn(g, n, k, seed=m)
    wq, ws = stacked_weight_quant(w, use_triton=True)
    wq_t, ws_t = stacked_weight_quant(w, use_triton=True, transpose=True)
    dyq, dys = act_quant_ref(_randn(m, n, seed=n))
    dy, x = _randn(m, n, seed=n + 1), _randn(m, k, seed=k + 1)
    dyc, dycs = act_quant_colwise(dy, use_triton=True)
    xc, xcs = act_quant_colwise(x, use_triton=True)
    dyc_t, dycs_t = act_quant_colwise(dy, use_triton=True, transpose=True)
    xc_t, xcs_t = act_quant_colwise(x, use_triton=True, transpose=True)
    fwd, wgr = LaunchSpy(fgg._fp8_grouped_gemm_kernel), LaunchSpy(fgg._fp8_grouped_wgrad_kernel)
    monkeypatch.setattr(fgg, "_fp8_grouped_gemm_kernel", fwd)
    monkeypatch.setattr(fgg, "_fp8_grouped_wgrad_kernel", wgr)
    da = fp8_grouped_gemm_dgrad(dyq, dys, wq, ws, gs, use_triton=True)
    da_k = fp8_grouped_gemm_dgrad(dyq, dys, wq_t, ws_t, gs, use_triton=True, b_kmajor=True)
    dw = fp8_grouped_gemm_wgrad(dyc, dycs, xc, xcs, gs, use_triton=True)
    dw_k = fp8_grouped_gemm_wgrad(dyc_t, dycs_t, xc_t, xcs_t, gs, use_triton=True,
                                  transposed=True)
    assert torch.equal(da, da_k) and torch.equal(dw, dw_k)
    # and the same as the references on the strided and on the K-major operands
    da_ref = fp8_grouped_gemm_ref(dyq, dys, wq, ws, gs, b_transposed=True)
    dw_ref = fp8_grouped_gemm_wgrad_ref(dyc, dycs, xc, xcs, gs)
    assert rel_err(da, da_ref.double()) < REF_RTOL and rel_err(dw, dw_ref.double()) < REF_RTOL
    assert torch.equal(dw_ref, fp8_grouped_gemm_wgrad_ref(dyc_t, dycs_t, xc_t, xcs_t, gs,
                                                          transposed=True))
    if not fwd.launches:  # autotuning: the tuned kernel objects were launched instead
        return
    for _, args, _ in fwd.launches:  # (.., stride_am, stride_ak, .., stride_bg, stride_bn,
        assert args[10] == 1 and args[15] == 1  # stride_bk, ..): A and B read along K
    for _, args, _ in wgr.launches:  # stride_dym and stride_xm: tokens (the reduction) contiguous
        assert args[8] == 1 and args[12] == 1
