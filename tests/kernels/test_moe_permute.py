"""Tests for hai_llm.kernels.moe_permute: send-order gather (+ fp8), deterministic combine, routing.

On a machine without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1), which must
be set before the kernel module is imported; tests/kernels/conftest.py does that, and the setdefault
below keeps this file runnable on its own.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hai_llm.kernels.moe_permute as mp  # noqa: E402
from hai_llm.kernels.moe_permute import (  # noqa: E402
    dequantize_ref, permute, permute_ref, routing_to_send_order, unpermute_combine,
    unpermute_combine_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DIMS = [1, 100, 128, 200, 384]
FP8_FLOOR_SCALE = 2.0 ** -22  # 2**ceil(log2(1e-4 / 448))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _x(T, D, dtype=torch.float32, seed=0, scale=3.0):
    x = torch.randn(T, D, generator=_gen(seed)) * scale
    return x.to(dtype).to(DEV)


def _index(R, T, seed=1, pad=True):
    lo = -1 if pad else 0
    if T == 0:
        return torch.full((R,), -1, dtype=torch.long, device=DEV)
    return torch.randint(lo, T, (R,), generator=_gen(seed)).to(DEV)


# ------------------------------------------------------------------------------------------ permute
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_is_exact_copy(D, dtype):
    x = _x(29, D, dtype)
    idx = _index(45, 29)
    out = permute(x, idx, out_rows=51, use_triton=True)
    assert out.shape == (51, D) and out.dtype == dtype
    assert torch.equal(out, permute_ref(x, idx, out_rows=51))
    valid = idx >= 0
    assert torch.equal(out[:45][valid], x[idx[valid]])
    assert not out[:45][~valid].any() and not out[45:].any()
    assert torch.equal(permute(x, idx, use_triton=False), x.new_zeros(45, D).index_copy(
        0, valid.nonzero().flatten(), x[idx[valid]]))


def test_permute_non_contiguous_and_int32_index():
    base = _x(20, 300)
    x = base[:, ::2]  # stride (300, 2)
    idx = _index(33, 20, pad=False).to(torch.int32)
    assert torch.equal(permute(x, idx, use_triton=True), x[idx.long()])
    xt = _x(150, 20).t()  # column-major [20, 150]
    q, s = permute(xt, idx, quant_fp8=True, use_triton=True)
    qr, sr = permute_ref(xt.contiguous(), idx, quant_fp8=True)
    assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_fused_fp8(D, dtype):
    x = _x(23, D, dtype, seed=D)
    x[3] = 0  # all-zero row -> floor scale
    x[5, : min(D, 7)] = 1e-6  # tiny tile
    idx = _index(40, 23, seed=D)
    idx[:2] = torch.tensor([3, 5])
    q, s = permute(x, idx, out_rows=44, quant_fp8=True, use_triton=True)
    qr, sr = permute_ref(x, idx, out_rows=44, quant_fp8=True)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (44, D)
    assert s.dtype == torch.float32 and s.shape == (44, (D + 127) // 128)
    assert torch.equal(s, sr)  # power-of-2 scales: bit-exact
    assert torch.equal(torch.frexp(s).mantissa, torch.full_like(s, 0.5))  # powers of two
    assert (s[:40][idx < 0] == FP8_FLOOR_SCALE).all() and (s[40:] == FP8_FLOOR_SCALE).all()
    # the kernel rounds with explicit nearest-even bit arithmetic: bytes match torch's cast exactly
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    # and the dequantized rows are within half an e4m3 ulp (2**-4 relative) of the gathered rows
    deq = dequantize_ref(q, s)
    g = permute_ref(x, idx, out_rows=44).float()
    tol = g.abs() * 2.0 ** -4 + s.repeat_interleave(128, 1)[:, :D] * 2.0 ** -10
    assert ((deq - g).abs() <= tol).all()


def test_fp8_rounding_and_scale_boundaries():
    # a tile whose amax is exactly 448 has scale 1, so q is the plain e4m3 rounding of the values
    sub = 2.0 ** -9
    vals = [448.0, 447.9, 440.0, 127.2, 124.0, 120.0, 17.0, 19.0, 1.0625, 1.1875, -3.3, 0.0,
            2.0 ** -6, 2.0 ** -6 - 2 ** -12, 0.5 * sub, 1.5 * sub, 2.5 * sub, 0.49 * sub,
            -1.5 * sub, -1e-9, 3.0 * 2 ** -8 + 2 ** -11]  # ties, carries, e4m3 subnormals
    row = torch.tensor(vals + [0.0] * (128 - len(vals)))
    amax = 448.0 * 2.0 ** torch.arange(-8, 9, dtype=torch.float32)
    bump = torch.nextafter(amax, torch.full_like(amax, float("inf")))
    rows = [row]
    for a in torch.cat([amax, bump, torch.tensor([0.0, 1e-4, 0.9e-4, 448.0 * 2 ** -22 * 1.0001])]):
        r = torch.zeros(128)
        r[7] = -a
        rows.append(r)
    x = torch.stack(rows).to(DEV)
    idx = torch.arange(x.shape[0], device=DEV)
    q, s = permute(x, idx, quant_fp8=True, use_triton=True)
    qr, sr = permute_ref(x, idx, quant_fp8=True)
    assert torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    assert s[0, 0] == 1.0
    assert torch.equal(q[0].float().cpu(), row.to(torch.float8_e4m3fn).float())
    n = amax.numel()
    assert torch.equal(s[1:1 + n, 0].cpu(), 2.0 ** torch.arange(-8, 9, dtype=torch.float32))
    assert torch.equal(s[1 + n:1 + 2 * n, 0].cpu(),
                       2.0 ** torch.arange(-7, 10, dtype=torch.float32))
    floor = FP8_FLOOR_SCALE
    assert torch.equal(s[1 + 2 * n:, 0].cpu(), torch.tensor([floor, floor, floor, 2 * floor]))


# ------------------------------------------------------------------------------ unpermute_combine
def _loop_combine(y, dst, w, n_tokens, dtype=torch.float32):
    """Per-token python loop in order of r (float32 or float64 accumulation)."""
    out = torch.zeros(n_tokens, y.shape[1], dtype=dtype)
    y, dst, w = y.cpu().to(dtype), dst.cpu().tolist(), w.cpu().to(dtype)
    for r, t in enumerate(dst):
        if t >= 0:
            out[t] = out[t] + w[r] * y[r]
    return out


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.bfloat16, torch.float32)])
def test_unpermute_combine_matches_ref(D, dtype, out_dtype):
    n_tokens, R = 31, 70
    y = _x(R, D, dtype, seed=D + 7)
    dst = _index(R, n_tokens - 3, seed=D)  # tokens 28..30 get no rows; -1 rows are ignored
    w = torch.rand(R, generator=_gen(D)).to(DEV)
    out = unpermute_combine(y, dst, w, n_tokens, out_dtype, use_triton=True)
    ref = unpermute_combine_ref(y, dst, w, n_tokens, out_dtype)
    assert out.dtype == (out_dtype or dtype) and out.shape == (n_tokens, D)
    assert torch.equal(out, ref)  # same summation order, same roundings
    assert not out[n_tokens - 3:].any()
    loop32 = _loop_combine(y, dst, w, n_tokens)
    assert torch.equal(out.cpu(), loop32.to(out.dtype))
    loop64 = _loop_combine(y, dst, w, n_tokens, torch.float64)
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double().cpu(), loop64, rtol=1e-6, atol=1e-6)
    assert torch.equal(unpermute_combine(y, dst, w, n_tokens, out_dtype, use_triton=False), ref)


def test_unpermute_combine_many_rows_per_token_is_deterministic():
    y = _x(300, 64, seed=3, scale=1e3)
    dst = torch.randint(0, 4, (300,), generator=_gen(4)).to(DEV)  # ~75 rows per token
    w = torch.rand(300, generator=_gen(5)).to(DEV)
    a = unpermute_combine(y, dst, w, 5, use_triton=True)
    b = unpermute_combine(y, dst, w, 5, use_triton=True)
    assert torch.equal(a, b) and torch.equal(a, unpermute_combine_ref(y, dst, w, 5))
    assert torch.equal(a.cpu(), _loop_combine(y, dst, w, 5))


# ------------------------------------------------------------------------------------- routing
def _check_send_order(so, topk_idx, n_experts, epr):
    T, k = topk_idx.shape
    flat = topk_idx.reshape(-1).long().cpu()
    assert so.src_index.dtype == torch.int64 and so.src_index.shape == (T * k,)
    assert so.inverse.shape == (T, k)
    assert torch.equal(so.expert_counts.cpu(), torch.bincount(flat, minlength=n_experts))
    assert torch.equal(so.rank_counts.cpu(),
                       so.expert_counts.cpu().view(-1, epr).sum(1))
    expected = sorted(range(T * k), key=lambda s: (int(flat[s]), s))  # by expert, then token
    assert so.order.cpu().tolist() == expected
    assert so.src_index.cpu().tolist() == [s // k for s in expected]
    rows = torch.arange(T * k).view(T, k)
    assert torch.equal(so.order.cpu()[so.inverse.cpu()], rows)
    assert torch.equal(so.src_index.cpu()[so.inverse.cpu()], rows // max(k, 1))


def _routing(T, k, n_experts, seed, unused=()):
    scores = torch.rand(T, n_experts, generator=_gen(seed))
    scores[:, list(unused)] = -1.0  # these experts receive no tokens
    return scores.topk(k, dim=1).indices.to(DEV)


@pytest.mark.parametrize("T,k,n_experts,epr", [(13, 1, 8, 2), (40, 4, 16, 4), (7, 8, 32, 8)])
def test_routing_to_send_order(T, k, n_experts, epr):
    topk_idx = _routing(T, k, n_experts, seed=T, unused=(3,))
    so = routing_to_send_order(topk_idx, n_experts, epr)
    assert so.expert_counts[3] == 0
    _check_send_order(so, topk_idx, n_experts, epr)


def test_routing_edge_cases():
    empty = torch.zeros(0, 4, dtype=torch.long, device=DEV)
    so = routing_to_send_order(empty, 8, 4)
    assert so.src_index.numel() == 0 and so.rank_counts.tolist() == [0, 0]
    one = torch.full((9, 1), 5, dtype=torch.int32, device=DEV)  # all tokens to one expert
    so = routing_to_send_order(one, 8, 2)
    assert so.src_index.tolist() == list(range(9)) and so.rank_counts.tolist() == [0, 0, 9, 0]
    assert so.expert_counts.tolist() == [0] * 5 + [9, 0, 0]
    _check_send_order(so, one, 8, 2)
    x = _x(9, 130)
    sent = permute(x, so.src_index, use_triton=True)
    back = unpermute_combine(sent * 2, so.src_index, torch.full((9,), 0.5, device=DEV), 9,
                             use_triton=True)
    assert torch.equal(sent, x) and torch.equal(back, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [100, 256])
def test_round_trip_k1_returns_x(dtype, D):
    x = _x(37, D, dtype, seed=9)
    so = routing_to_send_order(_routing(37, 1, 8, seed=D), 8, 2)
    sent = permute(x, so.src_index, use_triton=True)
    ones = torch.ones(37, device=DEV)
    back = unpermute_combine(sent, so.src_index, ones, 37, use_triton=True)
    assert torch.equal(back, x)


@pytest.mark.parametrize("k", [2, 8])
def test_round_trip_topk_weighted(k):
    T, D, n_experts = 21, 200, 16
    x = _x(T, D, torch.bfloat16, seed=k)
    topk_idx = _routing(T, k, n_experts, seed=k)
    topk_w = torch.rand(T, k, generator=_gen(k)).to(DEV)
    so = routing_to_send_order(topk_idx, n_experts, 4)
    sent = permute(x, so.src_index, use_triton=True)  # a token appears k times (duplicates)
    expert_of_row = topk_idx.reshape(-1)[so.order]
    y = sent.float() * (1 + expert_of_row[:, None].float())  # "expert" e scales by 1 + e
    w_sent = topk_w.reshape(-1)[so.order]
    out = unpermute_combine(y, so.src_index, w_sent, T, use_triton=True)
    want64 = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(topk_idx[t, j])
            want64[t] += float(topk_w[t, j]) * (1 + e) * x[t].double().cpu()
    torch.testing.assert_close(out.double().cpu(), want64, rtol=1e-6, atol=1e-6)
    # fp8 dispatch payload of the same routing dequantizes to within e4m3 precision
    q, s = permute(x, so.src_index, quant_fp8=True, use_triton=True)
    deq = dequantize_ref(q, s)
    half_ulp = sent.float().abs() * 2 ** -4 + s.repeat_interleave(128, 1)[:, :D] * 2 ** -10
    assert ((deq - sent.float()).abs() <= half_ulp).all()


def test_empty_shapes():
    x0 = torch.zeros(0, 100, device=DEV)
    e = torch.zeros(0, dtype=torch.long, device=DEV)
    assert permute(x0, e, use_triton=True).shape == (0, 100)
    pad = permute(x0, torch.full((3,), -1, device=DEV), out_rows=5, use_triton=True)
    assert pad.shape == (5, 100) and not pad.any()
    q, s = permute(x0, e, quant_fp8=True, use_triton=True)
    assert q.shape == (0, 100) and s.shape == (0, 1)
    x = _x(4, 100)
    assert permute(x, e, use_triton=True).shape == (0, 100)  # R = 0
    out = unpermute_combine(torch.zeros(0, 100, device=DEV), e, torch.zeros(0, device=DEV), 6,
                            use_triton=True)
    assert out.shape == (6, 100) and not out.any()
    out0 = unpermute_combine(x0, e, torch.zeros(0, device=DEV), 0, use_triton=True)
    assert out0.shape == (0, 100)


# -------------------------------------------------------------------------------------- errors
def test_errors():
    x = _x(5, 16)
    idx = torch.tensor([0, 4, 2], device=DEV)
    with pytest.raises(ValueError, match="src_index values"):
        permute(x, torch.tensor([0, 5], device=DEV), use_triton=True, check=True)
    with pytest.raises(ValueError, match="src_index values"):
        permute(x, torch.tensor([-2], device=DEV), use_triton=True, check=True)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        permute(x[0], idx, use_triton=True)
    with pytest.raises(ValueError, match="x must be float32"):
        permute(x.long(), idx, use_triton=True)
    with pytest.raises(ValueError, match="src_index must be int32 or int64"):
        permute(x, idx.float(), use_triton=True)
    with pytest.raises(ValueError, match="src_index must be a 1-D"):
        permute(x, idx[None], use_triton=True)
    with pytest.raises(ValueError, match="out_rows"):
        permute(x, idx, out_rows=2, use_triton=True)
    with pytest.raises(ValueError, match="block"):
        permute(x, idx, quant_fp8=True, block=96, use_triton=True)
    w = torch.ones(3, device=DEV)
    with pytest.raises(ValueError, match="dst_index values"):
        unpermute_combine(x[:3], idx, w, 4, use_triton=True, check=True)
    with pytest.raises(ValueError, match="dst_index has 3 entries but y has 5 rows"):
        unpermute_combine(x, idx, w, 5, use_triton=True)
    with pytest.raises(ValueError, match="weights must be a 1-D"):
        unpermute_combine(x[:3], idx, torch.ones(4, device=DEV), 5, use_triton=True)
    with pytest.raises(ValueError, match="weights must be float32"):
        unpermute_combine(x[:3], idx, w.bfloat16(), 5, use_triton=True)
    with pytest.raises(ValueError, match="out_dtype"):
        unpermute_combine(x[:3], idx, w, 5, out_dtype=torch.float16, use_triton=True)
    with pytest.raises(ValueError, match="n_tokens"):
        unpermute_combine(x[:3], idx, w, -1, use_triton=True)
    with pytest.raises(ValueError, match="y must be a 2-D"):
        unpermute_combine(x[:3, :, None], idx, w, 5, use_triton=True)
    topk = torch.tensor([[0, 1], [2, 3]], device=DEV)
    with pytest.raises(ValueError, match="topk_idx values"):
        routing_to_send_order(topk, 3, 1, check=True)
    with pytest.raises(ValueError, match="multiple of experts_per_rank"):
        routing_to_send_order(topk, 4, 3)
    with pytest.raises(ValueError, match="topk_idx must be a 2-D"):
        routing_to_send_order(topk.flatten(), 4, 2)
    with pytest.raises(ValueError, match="topk_idx must be int32 or int64"):
        routing_to_send_order(topk.float(), 4, 2)


# ----------------------------------------------------- GPU-readiness: host reads, checks, backend
def test_hot_path_reads_nothing_on_the_host(host_reads, monkeypatch):
    """Routing, permute (plain and fp8) and the Triton combine issue no host read (each would be
    a device sync on a GPU); the index range checks run only on request."""
    monkeypatch.delenv("HAI_LLM_DEBUG_CHECKS", raising=False)
    topk_idx = _routing(40, 4, 16, seed=1)
    x = _x(40, 200, torch.bfloat16)
    w = torch.rand(160, generator=_gen(2)).to(DEV)
    with host_reads() as reads:
        so = routing_to_send_order(topk_idx, 16, 4)
        sent = permute(x, so.src_index, out_rows=170, use_triton=True)
        permute(x, so.src_index, quant_fp8=True, use_triton=True)
        permute_ref(x, so.src_index, out_rows=170, quant_fp8=True)
        out = unpermute_combine(sent[:160], so.src_index, w, 40, use_triton=True)
        unpermute_combine(sent[:0], so.src_index[:0], w[:0], 40, use_triton=True)
    assert not reads, dict(reads)
    assert torch.equal(out, unpermute_combine_ref(sent[:160], so.src_index, w, 40))
    _check_send_order(so, topk_idx, 16, 4)
    # the debug checks: one host read per index, on request or with HAI_LLM_DEBUG_CHECKS=1
    with host_reads() as reads:
        permute(x, so.src_index, use_triton=True, check=True)
    assert reads["Tensor.__int__"] == 2  # lo, hi of one aminmax
    bad = torch.tensor([0, 40], device=DEV)
    monkeypatch.setenv("HAI_LLM_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match="src_index values"):
        permute(x, bad, use_triton=False)
    with pytest.raises(ValueError, match="dst_index values"):
        unpermute_combine(x[:2], bad, w[:2], 40, use_triton=False)
    with pytest.raises(ValueError, match="topk_idx values"):
        routing_to_send_order(bad[:, None] // 2, 16, 4)  # expert 20 of 16
    with host_reads() as reads:
        permute(x, so.src_index, use_triton=True, check=False)  # explicit False wins
    assert not reads


def test_use_triton_none_picks_the_backend_by_device(monkeypatch):
    calls = []
    for name in ("permute_ref", "unpermute_combine_ref"):
        real = getattr(mp, name)
        monkeypatch.setattr(mp, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a,
                                                                                             **k))
    x = _x(9, 130)
    idx = _index(12, 9, pad=False)
    sent = permute(x, idx)  # use_triton=None
    out = unpermute_combine(sent, idx, torch.ones(12, device=DEV), 9)
    on_cpu = DEV == "cpu"
    assert calls == (["permute_ref", "unpermute_combine_ref"] if on_cpu else [])
    assert torch.equal(sent, x[idx]) and torch.equal(out, unpermute_combine_ref(
        sent, idx, torch.ones(12, device=DEV), 9))


@pytest.mark.usefixtures("gpu_nan_semantics")  # tl.max drops NaN, as on a GPU
@pytest.mark.parametrize("use_triton", [True, False])
def test_fp8_payload_propagates_nan_and_inf(use_triton):
    x = _x(6, 300, seed=4)
    x[1, 5] = float("nan")  # tile 0 of row 1
    x[2, 200] = float("inf")  # tile 1 of row 2
    x[3, 299] = -float("inf")  # tile 2 (partial) of row 3
    x[4, 0] = -float("nan")
    idx = torch.arange(6, device=DEV)
    q, s = permute(x, idx, quant_fp8=True, use_triton=use_triton)
    bad = torch.zeros(6, 3, dtype=torch.bool)
    bad[1, 0] = bad[2, 1] = bad[3, 2] = bad[4, 0] = True
    assert torch.equal(torch.isnan(s).cpu(), bad)  # exactly the non-finite tiles
    deq = dequantize_ref(q, s).cpu()
    tile_of_col = torch.arange(300) // 128
    for r, t in bad.nonzero().tolist():
        assert torch.isnan(deq[r, tile_of_col == t]).all()
        assert (q[r].view(torch.uint8).cpu()[tile_of_col == t] == 0x7F).all()  # one NaN code
    assert torch.isfinite(deq[~bad[:, tile_of_col]]).all()
    qr, sr = permute_ref(x, idx, quant_fp8=True)
    assert torch.equal(s.isnan(), sr.isnan()) and torch.equal(s[~s.isnan()], sr[~sr.isnan()])
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
