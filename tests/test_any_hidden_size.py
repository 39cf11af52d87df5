"""Any ``dim`` / ``moe_inter_dim``: the grouped expert GEMM against a per-expert reference on sizes
that are not multiples of the grouped kernel's 16-byte stride alignment (4 fp32 / 8 bf16 elements).

torch's grouped GEMM rejects such strides ("strides should be multiple of 16 bytes"), so
``grouped_operands`` zero-pads I and O (``hai_llm/model/moe.py``). Checked here: forward and
backward in fp32 and bf16 against a float64 loop over experts, a whole model with dim=67 and
moe_inter_dim=13, the zero-bubble weight-gradient split, and FP8 experts against the same FP8
computation on explicitly zero-padded sizes (expert parallelism: ``tests/test_fidelity_parallel.py``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err

from hai_llm.config.load import load_model_args
from hai_llm.model.moe import MoE, grouped_aligned, grouped_mm
from hai_llm.model.transformer import Transformer

ODD = ["dim=67", "moe_inter_dim=13"]  # neither a multiple of 4 (fp32) nor of 8 (bf16)
COUNTS = torch.tensor([3, 0, 5, 2])  # ragged, with an empty expert


def _reference_mm(x, w, counts):
    """Per-expert loop: y[rows of e] = x[rows of e] @ w[e]^T."""
    out, start = [], 0
    for e, c in enumerate(counts.tolist()):
        out.append(x[start:start + c] @ w[e].T)
        start += c
    return torch.cat(out)


# bf16: the kernel rounds each output once from an fp32 accumulation, the float64 reference of the
# same rounded inputs differs by that rounding (2^-8 relative) plus fp32 summation order
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("I, O", [(67, 24), (67, 13), (13, 67), (24, 67), (64, 32)])
def test_grouped_mm_any_size_matches_per_expert_loop(dtype, I, O):
    g = torch.Generator().manual_seed(I * 100 + O)
    x = torch.randn(int(COUNTS.sum()), I, generator=g).to(dtype).requires_grad_()
    w = torch.randn(len(COUNTS), O, I, generator=g).to(dtype).requires_grad_()
    y = grouped_mm(x, w, COUNTS)
    assert y.shape == (x.shape[0], O) and y.dtype == dtype
    gy = torch.randn(y.shape, generator=g).to(dtype)
    (y.float() * gy.float()).sum().backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = _reference_mm(xr, wr, COUNTS)
    (yr * gy.double()).sum().backward()
    torch.testing.assert_close(y.double(), yr.detach(), **TOL[dtype])
    torch.testing.assert_close(x.grad.double(), xr.grad, **TOL[dtype])
    torch.testing.assert_close(w.grad.double(), wr.grad, **TOL[dtype])
    assert w.grad[1].abs().max() == 0  # the empty expert gets exactly no gradient


def test_alignment_rule():
    assert [grouped_aligned(n, torch.float32) for n in (1, 4, 13, 24, 67)] == [4, 4, 16, 24, 68]
    assert [grouped_aligned(n, torch.bfloat16) for n in (1, 8, 13, 24, 67)] == [8, 8, 16, 24, 72]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_sized_model_trains_and_moe_matches_loop(dtype):
    args = load_model_args("tiny", ODD)
    torch.manual_seed(0)
    moe = MoE(args).to(dtype)
    moe.reset_parameters(0.3)
    x = torch.randn(12, args.dim).to(dtype)
    w, idx, _ = moe.gate(x)
    y = moe.routed(x, w, idx)
    ref = torch.zeros(12, args.dim, dtype=torch.float64)
    ex = moe.experts
    for t in range(12):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            xt = x[t].double()
            h = F.silu(ex.w1[e].double() @ xt) * (ex.w3[e].double() @ xt)
            ref[t] += float(w[t, k]) * (ex.w2[e].double() @ h)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    else:  # bf16 rounds every GEMM output, the SwiGLU product and the weighted sum (2^-8 each)
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2

    model = Transformer(args)
    model.init_weights(0)
    model = model.to(dtype)
    model.reset_buffers()
    out = model.loss(torch.randint(0, args.vocab_size, (2, 18), generator=torch.Generator().manual_seed(1)))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in model.named_parameters() if ".experts." in n]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)


# ------------------------------------------------------------------ wgrad split and FP8 experts
def test_wgrad_split_odd_sizes_same_bits_as_autograd():
    from hai_llm.model.moe import GroupedExperts
    from hai_llm.pipeline.wgrad_split import WeightGradStore, WgradSplitGroupedExperts

    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        a = GroupedExperts(4, 67, 13).to(dtype)
        a.reset_parameters(0.2)
        b = GroupedExperts(4, 67, 13).to(dtype)
        b.load_state_dict(a.state_dict())
        b.__class__ = WgradSplitGroupedExperts
        b.wgrad_store = WeightGradStore()
        x = torch.randn(10, 67).to(dtype)
        outs = []
        for m in (a, b):
            xx = x.clone().requires_grad_()
            y = m(xx, COUNTS)
            y.float().square().sum().backward()
            outs.append((y.detach(), xx.grad, m.w1.grad, m.w2.grad, m.w3.grad))
        # bit-exact: the split's backward runs the same padded GEMMs as autograd, op for op
        for got, want in zip(outs[1], outs[0], strict=True):
            assert torch.equal(got, want)


def test_fp8_experts_odd_sizes_equal_zero_padded_sizes():
    from hai_llm.fp8 import Fp8GroupedExperts
    from hai_llm.model.moe import GroupedExperts

    D, I, Dp, Ip = 67, 13, 128, 128
    torch.manual_seed(0)
    odd = GroupedExperts(4, D, I)
    odd.reset_parameters(0.2)
    pad = GroupedExperts(4, Dp, Ip)
    with torch.no_grad():
        for name, (r, c) in (("w1", (Ip - I, Dp - D)), ("w3", (Ip - I, Dp - D)), ("w2", (Dp - D, Ip - I))):
            getattr(pad, name).copy_(F.pad(getattr(odd, name), (0, c, 0, r)))
    for m in (odd, pad):
        Fp8GroupedExperts.convert_(m, use_triton=False)
    x = torch.randn(10, D)
    xa, xb = x.clone().requires_grad_(), F.pad(x, (0, Dp - D)).requires_grad_()
    ya, yb = odd(xa, COUNTS), pad(xb, COUNTS)
    ya.square().sum().backward()
    yb.square().sum().backward()
    # zero rows/columns change no 128x128 block maximum (hence no FP8 scale or code) and add
    # exact zeros to every dot product, so the odd sizes compute the padded problem on the same
    # E4M3 codes; but K=67 and K=128 are different fp32 GEMM shapes (the BLAS may block and order
    # the sums differently), so not bit-exact: fp32 summation error, <= K * 2**-24 ~ 8e-6 relative
    # per dot product in the worst case, ~1e-7 norm-wise in practice; rtol 1e-5 still catches a
    # changed scale or code (an E4M3 step is 2**-4 relative)
    assert rel_err(ya, yb[:, :D]) < 1e-5 and rel_err(xa.grad, xb.grad[:, :D]) < 1e-5
    assert rel_err(odd.w1.grad, pad.w1.grad[:, :I, :D]) < 1e-5
    assert rel_err(odd.w2.grad, pad.w2.grad[:, :D, :I]) < 1e-5
    assert yb[:, D:].abs().max() == 0  # exact: zero weight rows, sums of exact zeros

