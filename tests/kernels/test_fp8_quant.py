"""Tests of the fine-grained FP8 quantization kernels (1x128, 128x1, 128x128) against torch.

The Triton kernels run on the GPU when there is one, else on the CPU interpreter (conftest.py).
Scales must agree with the torch reference to 1e-6 relative, quantized values to within one E4M3
ulp (the kernels round explicitly to nearest even, so in practice they agree bit for bit; the
tolerance keeps the tests independent of the backend's division).
"""
import os

import pytest
import torch
import triton
import triton.language as tl

import hai_llm.kernels.fp8_quant as fq
from hai_llm.kernels.fp8_quant import (AMAX_FLOOR, FP8_DTYPE, FP8_MAX, act_colwise_dequant_ref,
                                       act_dequant_ref, act_quant, act_quant_colwise,
                                       act_quant_colwise_ref, act_quant_ref, default_use_triton,
                                       stacked_weight_quant, stacked_weight_quant_ref,
                                       weight_dequant_ref, weight_quant, weight_quant_ref)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # a spread of magnitudes per tile, so that scales differ and subnormals appear
    x = torch.randn(*shape, generator=g) * torch.rand(*shape, generator=g).pow(4) * 10
    return x.to(dtype).to(DEVICE)


def assert_within_one_ulp(q: torch.Tensor, q_ref: torch.Tensor) -> None:
    """E4M3 values (unscaled) differ by at most one ulp: 2**(e-3) in binade e, 2**-9 below 2**-6."""
    a, b = q.float(), q_ref.float()
    assert torch.isfinite(a).all()
    ulp = torch.maximum(a.abs(), b.abs()) * 2.0**-3 + 2.0**-9
    assert ((a - b).abs() <= ulp).all(), f"max diff {(a - b).abs().max()}"


def assert_scales_close(s: torch.Tensor, s_ref: torch.Tensor) -> None:
    assert s.dtype == torch.float32 and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)


def assert_quant_error_bounded(x: torch.Tensor, deq: torch.Tensor, scale_full: torch.Tensor):
    """Round to nearest: error <= half an ulp, i.e. 2**-4 |x| (normals) or 2**-10 s (subnormals)."""
    err = (deq - x.float()).abs()
    bound = x.float().abs() * 2.0**-4 + scale_full * 2.0**-10
    assert (err <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("shape", [(1, 128), (7, 200), (130, 384), (2, 3, 130), (33, 64)])
@pytest.mark.parametrize("pow2_scale", [False, True])
def test_act_quant_matches_ref(shape, pow2_scale):
    x = _randn(*shape, seed=sum(shape))
    q, s = act_quant(x, pow2_scale=pow2_scale, use_triton=True)
    q_ref, s_ref = act_quant_ref(x, pow2_scale=pow2_scale)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert s.shape == (*shape[:-1], -(-shape[-1] // 128))
    assert_scales_close(s, s_ref)
    assert_within_one_ulp(q, q_ref)
    deq = act_dequant_ref(q, s)
    assert_quant_error_bounded(x, deq, s.repeat_interleave(128, -1)[..., : shape[-1]])


@pytest.mark.parametrize("shape", [(1, 64), (7, 200), (130, 129), (257, 33)])
@pytest.mark.parametrize("pow2_scale", [False, True])
def test_act_quant_colwise_matches_ref(shape, pow2_scale):
    x = _randn(*shape, seed=shape[0])
    q, s = act_quant_colwise(x, pow2_scale=pow2_scale, use_triton=True)
    q_ref, s_ref = act_quant_colwise_ref(x, pow2_scale=pow2_scale)
    assert s.shape == (-(-shape[0] // 128), shape[1])
    assert_scales_close(s, s_ref)
    assert_within_one_ulp(q, q_ref)
    # the 128x1 recipe is the 1x128 recipe applied to the transpose
    q_t, s_t = act_quant_ref(x.t().contiguous(), pow2_scale=pow2_scale)
    assert torch.equal(q_ref.t().view(torch.uint8), q_t.view(torch.uint8))
    assert torch.equal(s_ref.t(), s_t)
    deq = act_colwise_dequant_ref(q, s)
    assert_quant_error_bounded(x, deq, s.repeat_interleave(128, 0)[: shape[0]])


@pytest.mark.parametrize("shape,pow2_scale", [((64, 128), False), ((129, 200), False),
                                               ((256, 384), False), ((130, 300), True)])
def test_weight_quant_matches_ref(shape, pow2_scale):
    w = _randn(*shape, seed=shape[1])
    q, s = weight_quant(w, pow2_scale=pow2_scale, use_triton=True)
    q_ref, s_ref = weight_quant_ref(w, pow2_scale=pow2_scale)
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert_scales_close(s, s_ref)
    assert_within_one_ulp(q, q_ref)
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    assert_quant_error_bounded(w, weight_dequant_ref(q, s), full)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    x = _randn(9, 300, seed=3, dtype=dtype)
    q, s = act_quant(x, use_triton=True)
    q_ref, s_ref = act_quant_ref(x)
    assert_scales_close(s, s_ref)
    assert_within_one_ulp(q, q_ref)


def test_e4m3_rounding_is_round_to_nearest_even():
    # A leading 448 pins the scale of every row to exactly 1, so the kernel's fp8 codes are the
    # rounding of the inputs themselves: ties, values just below a power of two (127.99 must
    # become 128), subnormals (below 2**-6), negative values and -0.0 must match torch's cast.
    vals = torch.cat([torch.linspace(-448, 448, 8001), torch.linspace(-0.03, 0.03, 4001),
                      torch.tensor([127.99, -127.99, 336.0, 352.0, 15.5 * 2**-9, 2**-10,
                                    -(2**-10), 3 * 2**-10, 0.0, -0.0, 447.0, -447.9])])
    vals = torch.nn.functional.pad(vals, (0, -vals.numel() % 127)).view(-1, 127)
    x = torch.cat([torch.full((vals.shape[0], 1), FP8_MAX), vals], dim=1).to(DEVICE)
    q, s = act_quant(x, use_triton=True)
    assert torch.all(s == 1.0)
    assert torch.equal(q.view(torch.uint8), x.to(FP8_DTYPE).view(torch.uint8))


def test_pow2_scales_are_powers_of_two_covering_the_amax():
    x = _randn(40, 384, seed=7)
    _, s = act_quant(x, pow2_scale=True, use_triton=True)
    amax = x.view(40, 3, 128).abs().amax(-1).clamp_min(AMAX_FLOOR)
    mantissa, _ = torch.frexp(s)
    assert torch.all(mantissa == 0.5)  # exact powers of two
    assert torch.all(s >= amax / FP8_MAX) and torch.all(s < 2 * amax / FP8_MAX)


def test_all_zero_tiles_use_the_amax_floor():
    x = torch.zeros(3, 256, device=DEVICE)
    x[1, 128:] = 1.0
    q, s = act_quant(x, use_triton=True)
    floor = torch.tensor(AMAX_FLOOR, dtype=torch.float32) / FP8_MAX
    assert s[0, 0].item() == floor.item() and s[1, 1].item() == pytest.approx(1 / FP8_MAX)
    assert torch.all(q[0].float() == 0)


def test_empty_inputs():
    q, s = act_quant(torch.zeros(0, 200, device=DEVICE), use_triton=True)
    assert q.shape == (0, 200) and s.shape == (0, 2)
    q, s = act_quant_colwise(torch.zeros(0, 5, device=DEVICE), use_triton=True)
    assert q.shape == (0, 5) and s.shape == (0, 5)


def test_default_use_triton():
    assert default_use_triton(torch.zeros(1)) is False


def test_bad_inputs_raise():
    x = torch.zeros(4, 128, device=DEVICE)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        act_quant(x.to(torch.int32), use_triton=True)
    with pytest.raises(ValueError, match="contiguous"):
        act_quant(torch.zeros(128, 4, device=DEVICE).t(), use_triton=True)
    with pytest.raises(ValueError, match="power of two"):
        act_quant(x, block=100, use_triton=True)
    with pytest.raises(ValueError, match="2-D"):
        act_quant_colwise(torch.zeros(2, 2, 128, device=DEVICE), use_triton=True)
    with pytest.raises(ValueError, match="2-D"):
        weight_quant(torch.zeros(128, device=DEVICE), use_triton=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_use_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert os.environ.get("TRITON_INTERPRET") is None
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        act_quant(torch.zeros(2, 128), use_triton=True)
    act_quant(torch.zeros(2, 128), use_triton=False)  # the reference needs nothing


# ------------------------------------------------------------------------------------------------
# Non-finite inputs: NaN scale, NaN codes, identically in the kernels and the references. All of
# them run under ``gpu_nan_semantics`` (conftest.py): tl.max/tl.maximum drop NaN as on a GPU.
# ------------------------------------------------------------------------------------------------

pytest_nan = pytest.mark.usefixtures("gpu_nan_semantics")


@triton.jit
def _plain_amax_kernel(x_ptr, out_ptr, N: tl.constexpr):
    """The naive amax the quantizers must NOT rely on: max|x|, then the amax floor."""
    x = tl.load(x_ptr + tl.arange(0, N))
    amax = tl.max(tl.abs(x), axis=0)
    tl.store(out_ptr, amax)
    tl.store(out_ptr + 1, tl.maximum(amax, 1e-4))


@pytest_nan
def test_gpu_nan_semantics_fixture_drops_nan_in_plain_max_but_not_in_our_kernels():
    """Under the fixture a plain tl.max amax of a NaN tile is finite (what the GPU computes), so a
    quantizer built on it would give a finite scale; ours still give NaN. (Triton 3.9's own
    interpreter already drops NaN here, via np.nanmax / np.fmax; the fixture pins it.)"""
    x = torch.arange(128.0, device=DEVICE)
    x[5] = float("nan")
    out = torch.zeros(2, device=DEVICE)
    _plain_amax_kernel[(1,)](x, out, 128)
    assert out.tolist() == [127.0, 127.0]  # the NaN lane was dropped: finite
    x.fill_(float("nan"))
    _plain_amax_kernel[(1,)](x, out, 128)
    assert torch.isnan(out[0]) and out[1] == torch.tensor(1e-4)  # all NaN: max NaN, floor wins
    y = torch.ones(3, 256, device=DEVICE)
    y[1, 5] = float("nan")
    for q, s in (act_quant(y, use_triton=True), act_quant_colwise(y.t().contiguous(), use_triton=True),
                 weight_quant(y, use_triton=True)):
        assert torch.isnan(s).any() and (q.view(torch.uint8) == 0x7F).any()


NONFINITE = [float("nan"), -float("nan"), float("inf"), -float("inf")]


def _poisoned(shape, cells, seed=0):
    x = _randn(*shape, seed=seed)
    for (r, c), v in zip(cells, NONFINITE * len(cells)):
        x[r, c] = v
    return x


def _check_nan_tiles(q, s, want_bad_scales):
    """NaN exactly in the expected scales; every code of such a tile is 0x7f; others finite."""
    assert torch.equal(torch.isnan(s).cpu(), want_bad_scales)
    assert not torch.isinf(s).any()


@pytest_nan
@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("pow2_scale", [False, True])
def test_act_quant_nan_and_inf_give_nan_tiles(use_triton, pow2_scale):
    x = _poisoned((5, 300), [(0, 3), (1, 130), (2, 299), (3, 128)], seed=1)
    q, s = act_quant(x, pow2_scale=pow2_scale, use_triton=use_triton)
    bad = torch.zeros(5, 3, dtype=torch.bool)
    bad[0, 0] = bad[1, 1] = bad[2, 2] = bad[3, 1] = True
    _check_nan_tiles(q, s, bad)
    codes = q.view(torch.uint8).cpu()
    tile = torch.arange(300) // 128
    for r, t in bad.nonzero().tolist():
        assert (codes[r, tile == t] == 0x7F).all()
    deq = act_dequant_ref(q, s).cpu()
    assert torch.isnan(deq[bad[:, tile]]).all() and torch.isfinite(deq[~bad[:, tile]]).all()
    q_ref, s_ref = act_quant_ref(x, pow2_scale=pow2_scale)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(torch.nan_to_num(s), torch.nan_to_num(s_ref))


@pytest_nan
@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("transpose", [False, True])
def test_act_quant_colwise_nan_and_inf_give_nan_tiles(use_triton, transpose):
    x = _poisoned((260, 7), [(0, 0), (129, 3), (259, 6), (5, 4)], seed=2)
    q, s = act_quant_colwise(x, use_triton=use_triton, transpose=transpose)
    bad = torch.zeros(3, 7, dtype=torch.bool)
    bad[0, 0] = bad[1, 3] = bad[2, 6] = bad[0, 4] = True
    _check_nan_tiles(q, s, bad.t() if transpose else bad)
    q_ref, s_ref = act_quant_colwise_ref(x, transpose=transpose)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(torch.nan_to_num(s), torch.nan_to_num(s_ref))
    nan_codes = (q.view(torch.uint8) == 0x7F).sum().item()
    assert nan_codes == 128 + 128 + 4 + 128  # the four poisoned 128x1 tiles (one has 4 rows)


@pytest_nan
@pytest.mark.parametrize("use_triton", [True, False])
def test_weight_quant_nan_and_inf_give_nan_blocks(use_triton):
    w = _poisoned((200, 260), [(0, 0), (150, 140), (199, 259)], seed=3)
    for transpose in (False, True):
        q, s = weight_quant(w, use_triton=use_triton, transpose=transpose)
        bad = torch.zeros(2, 3, dtype=torch.bool)
        bad[0, 0] = bad[1, 1] = bad[1, 2] = True
        _check_nan_tiles(q, s, bad.t() if transpose else bad)
        q_ref, s_ref = weight_quant_ref(w, transpose=transpose)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    deq = weight_dequant_ref(*weight_quant(w, use_triton=use_triton)).cpu()
    assert torch.isnan(deq[:128, :128]).all() and torch.isfinite(deq[:128, 128:]).all()


@pytest_nan  # (an all-NaN tile: NaN from max on a GPU too, both operands NaN)
def test_all_nan_and_all_inf_tiles():
    x = torch.full((2, 128), float("nan"), device=DEVICE)
    x[1] = float("inf")
    for use_triton in (True, False):
        q, s = act_quant(x, pow2_scale=True, use_triton=use_triton)
        assert torch.isnan(s).all() and (q.view(torch.uint8) == 0x7F).all()


# ------------------------------------------------------------------------------------------------
# K-major layouts written by the quantizers, stacked weights, backend by device
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 64), (130, 129), (257, 33)])
@pytest.mark.parametrize("use_triton", [True, False])
def test_colwise_transposed_output_is_the_rowwise_quantization_of_the_transpose(shape, use_triton):
    x = _randn(*shape, seed=shape[0] + 1)
    for pow2 in (False, True):
        q_t, s_t = act_quant_colwise(x, pow2_scale=pow2, use_triton=use_triton, transpose=True)
        q, s = act_quant_colwise(x, pow2_scale=pow2, use_triton=use_triton)
        q_r, s_r = act_quant_ref(x.t().contiguous(), pow2_scale=pow2)
        assert q_t.shape == (shape[1], shape[0]) and q_t.is_contiguous() and s_t.is_contiguous()
        assert torch.equal(q_t.view(torch.uint8), q.t().contiguous().view(torch.uint8))
        assert torch.equal(s_t, s.t())
        assert torch.equal(q_t.view(torch.uint8), q_r.view(torch.uint8))
        assert torch.equal(s_t, s_r)


@pytest.mark.parametrize("use_triton", [True, False])
def test_weight_quant_transposed_and_stacked(use_triton):
    w = _randn(3, 130, 200, seed=9)
    q, s = stacked_weight_quant(w, use_triton=use_triton)
    q_t, s_t = stacked_weight_quant(w, use_triton=use_triton, transpose=True)
    assert q.shape == (3, 130, 200) and s.shape == (3, 2, 2)
    assert q_t.shape == (3, 200, 130) and s_t.shape == (3, 2, 2) and q_t.is_contiguous()
    for e in range(3):
        qe, se = weight_quant_ref(w[e])
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)
        assert torch.equal(q_t[e].view(torch.uint8), qe.t().contiguous().view(torch.uint8))
        assert torch.equal(s_t[e], se.t())
        q2, s2 = weight_quant(w[e], use_triton=use_triton, transpose=True)
        assert torch.equal(q2.view(torch.uint8), q_t[e].view(torch.uint8))
        assert torch.equal(s2, s_t[e])
    q_r, s_r = stacked_weight_quant_ref(w, transpose=True)
    assert torch.equal(q_r.view(torch.uint8), q_t.view(torch.uint8)) and torch.equal(s_r, s_t)
    with pytest.raises(ValueError, match="3-D"):
        stacked_weight_quant(w[0], use_triton=use_triton)


def test_use_triton_none_picks_the_backend_by_device(monkeypatch):
    calls = []
    for name in ("act_quant_ref", "act_quant_colwise_ref", "stacked_weight_quant_ref"):
        real = getattr(fq, name)
        monkeypatch.setattr(fq, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a,
                                                                                             **k))
    x = _randn(4, 256, seed=1)
    act_quant(x)
    act_quant_colwise(x)
    weight_quant(x)
    want = {"act_quant_ref", "act_quant_colwise_ref", "stacked_weight_quant_ref"}
    assert set(calls) == (set() if x.is_cuda else want)
