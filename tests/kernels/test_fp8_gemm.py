"""Tests of the block-scaled FP8 GEMM (Fprop, Dgrad, Wgrad of a Linear) over ragged shapes.

Operands are quantized once with the torch reference quantizers and the SAME fp8 tensors and scales
feed the Triton kernel, ``fp8_gemm_ref`` and a float64 matmul of the dequantized operands, so the
only differences left are FP32 accumulation order. The norm-wise relative error against float64
must stay below 1e-5. On a GPU the FP8 tensor cores accumulate the products inside one 128-deep
block with ~14 mantissa bits (the reason for the per-128 promotion), so the bound there is looser.
"""
import inspect
import itertools

import pytest
import torch
import triton

from helpers import LaunchSpy, rel_err

import hai_llm.kernels.fp8_gemm as fg
from hai_llm.kernels.fp8_gemm import (GPU_CONFIGS, INTERPRET_META, fp8_gemm, fp8_gemm_ref,
                                      fp8_linear_dgrad, fp8_linear_fprop, fp8_linear_wgrad,
                                      heuristic_meta, launch_meta)
from hai_llm.kernels.fp8_quant import (act_colwise_dequant_ref, act_dequant_ref, act_quant,
                                       act_quant_colwise, act_quant_colwise_ref, act_quant_ref,
                                       weight_dequant_ref, weight_quant, weight_quant_ref)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64_RTOL = 1e-5 if DEVICE == "cpu" else 1e-3  # vs float64 of the dequantized operands
REF_RTOL = 1e-6 if DEVICE == "cpu" else 1e-3  # Triton vs fp8_gemm_ref on the same inputs


def _randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


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


# ------------------------------------------------------------------------------------------------
# NaN propagation, K-major launches, launch-config policy
# ------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("gpu_nan_semantics")  # tl.max drops NaN, as on a GPU
@pytest.mark.parametrize("use_triton", [True, False])
def test_nan_and_inf_operands_give_nan_outputs(use_triton):
    x, w = _randn(70, 300, seed=1), _randn(200, 300, seed=2)
    x[3, 7] = float("nan")
    x[5, 299] = float("inf")
    w[130, 140] = -float("inf")  # weight block (1, 1): output columns 128..199
    xq, xs = act_quant(x, use_triton=use_triton)
    wq, ws = weight_quant(w, use_triton=use_triton)
    y = fp8_linear_fprop(xq, xs, wq, ws, use_triton=use_triton).cpu()
    bad = torch.zeros(70, 200, dtype=torch.bool)
    bad[3] = bad[5] = True
    bad[:, 128:] = True
    assert torch.equal(torch.isnan(y), bad)
    # Wgrad: a NaN token in dy poisons its 128x1 tile: dW rows of that channel
    dy = _randn(70, 200, seed=3)
    dy[10, 17] = float("nan")
    dyq, dys = act_quant_colwise(dy, use_triton=use_triton, transpose=True)
    xq2, xs2 = act_quant_colwise(_randn(70, 300, seed=4), use_triton=use_triton, transpose=True)
    dw = fp8_linear_wgrad(dyq, dys, xq2, xs2, use_triton=use_triton, transposed=True).cpu()
    assert torch.isnan(dw[17]).all() and torch.isfinite(dw[torch.arange(200) != 17]).all()


def test_dgrad_and_wgrad_launch_k_major_operands(monkeypatch):
    t, n, k = 130, 200, 129
    x, w, dy = _randn(t, k, seed=1), _randn(n, k, seed=2), _randn(t, n, seed=3)
    dyq, dys = act_quant(dy, use_triton=True)
    wq, ws = weight_quant(w, use_triton=True)
    wq_t, ws_t = weight_quant(w, use_triton=True, transpose=True)
    dyc, dycs = act_quant_colwise(dy, use_triton=True)
    xc, xcs = act_quant_colwise(x, use_triton=True)
    dyc_t, dycs_t = act_quant_colwise(dy, use_triton=True, transpose=True)
    xc_t, xcs_t = act_quant_colwise(x, use_triton=True, transpose=True)
    spy = LaunchSpy(fg._fp8_gemm_kernel)
    monkeypatch.setattr(fg, "_fp8_gemm_kernel", spy)
    dx = fp8_linear_dgrad(dyq, dys, wq, ws, use_triton=True)  # W read "transposed": copied
    dx_k = fp8_linear_dgrad(dyq, dys, wq_t, ws_t, use_triton=True, w_transposed=True)
    dw = fp8_linear_wgrad(dyc, dycs, xc, xcs, use_triton=True)
    dw_k = fp8_linear_wgrad(dyc_t, dycs_t, xc_t, xcs_t, use_triton=True, transposed=True)
    assert torch.equal(dx, dx_k) and torch.equal(dw, dw_k)
    assert rel_err(dx, fp8_linear_dgrad(dyq, dys, wq, ws, use_triton=False).double()) < REF_RTOL
    assert rel_err(dw, fp8_linear_wgrad(dyc, dycs, xc, xcs, use_triton=False).double()) < REF_RTOL
    if spy.launches:  # (empty when autotuning on a GPU: the tuned object is launched instead)
        assert len(spy.launches) == 4
        for _, args, _ in spy.launches:  # stride_ak and stride_bk: both operands K-major
            assert args[9] == 1 and args[13] == 1, args[8:16]


def test_launch_config_policy(monkeypatch):
    assert heuristic_meta(4096, 7168, 132) == heuristic_meta(4096, 7168, 132)  # deterministic
    big, small = heuristic_meta(4096, 7168, 132), heuristic_meta(64, 512, 132)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["num_warps"]) == (128, 128, 8)
    assert (small["BLOCK_M"], small["BLOCK_N"], small["num_warps"]) == (64, 128, 4)
    assert heuristic_meta(4096, 7168, 132, small_m=True)["BLOCK_M"] == 64
    assert all(m["BLOCK_K"] == 128 for m in (big, small))
    configs = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
               for c in GPU_CONFIGS}
    for m in (big, small):  # the defaults are among the autotuning configs
        assert (m["BLOCK_M"], m["BLOCK_N"], m["num_warps"], m["num_stages"]) in configs
    dev = torch.device("cpu")
    monkeypatch.delenv("HAI_LLM_AUTOTUNE", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch_meta(4096, 7168, dev) == INTERPRET_META
    monkeypatch.delenv("TRITON_INTERPRET")
    assert launch_meta(4096, 7168, dev) == big  # compiled, not autotuned: the heuristic
    assert launch_meta(256, 256, dev)["BLOCK_M"] == 64  # 4 tiles of 128x128 for 132 SMs
    assert launch_meta(256, 256, dev, matrices=64)["BLOCK_M"] == 128  # 64 such outputs
    monkeypatch.setenv("HAI_LLM_AUTOTUNE", "1")
    assert launch_meta(4096, 7168, dev) is None  # autotune
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        # (Triton itself turns the on-disk cache off under the interpreter)
        from hai_llm.kernels import policy
        assert policy._AUTOTUNE_CACHE_KW == {"cache_results": True}
