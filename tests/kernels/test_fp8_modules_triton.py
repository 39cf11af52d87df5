"""The FP8 modules on the Triton path (CPU interpreter here, compiled on a GPU): non-finite values
propagate into the weight gradients, and forward + backward read nothing on the host.

Why: on a GPU ``tl.max`` drops NaN, so before the quantizers counted non-finite lanes explicitly a
NaN gradient became a finite +-448 * scale and the trainer's non-finite-step check never saw it;
and every host read (``.tolist()`` of the expert counts, ``.item()``) is a device sync that
stalls the overlapped forward/backward of DualPipe.
"""
import pytest
import torch

from hai_llm.fp8 import Fp8GroupedExperts, Fp8Linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _linear(use_triton, seed=0):
    torch.manual_seed(seed)
    return Fp8Linear(160, 96, bias=True, use_triton=use_triton).to(DEVICE)


def _experts(use_triton, seed=0):
    torch.manual_seed(seed)
    ex = Fp8GroupedExperts(3, 64, 32, use_triton=use_triton)
    ex.reset_parameters(0.1)
    return ex.to(DEVICE)


@pytest.mark.usefixtures("gpu_nan_semantics")  # tl.max drops NaN, as on a GPU
@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fp8_linear_nonfinite_grad_gives_nonfinite_weight_grad(use_triton, bad):
    lin = _linear(use_triton)
    x = torch.randn(2, 20, 160, device=DEVICE, requires_grad=True)
    y = lin(x)
    dy = torch.randn_like(y)
    dy[1, 3, 17] = bad
    y.backward(dy)
    assert torch.isnan(lin.weight.grad).any()  # the trainer's non-finite check sees this step
    assert torch.isnan(lin.weight.grad[17]).all()  # the poisoned 128x1 tile covers channel 17
    assert torch.isnan(x.grad[1, 3]).all()  # its 1x128 Dgrad tile covers row (1, 3)
    assert torch.isfinite(x.grad[0]).all()
    assert not torch.isfinite(lin.bias.grad[17])


@pytest.mark.usefixtures("gpu_nan_semantics")  # tl.max drops NaN, as on a GPU
@pytest.mark.parametrize("use_triton", [True, False])
def test_fp8_linear_nan_input_gives_nan_output_and_weight_grad(use_triton):
    lin = _linear(use_triton)
    x = torch.randn(20, 160, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        x[4, 150] = float("nan")
    y = lin(x)
    assert torch.isnan(y[4]).all() and torch.isfinite(y[torch.arange(20) != 4]).all()
    y.backward(torch.ones_like(y))
    assert torch.isnan(lin.weight.grad[:, 128:]).all()  # x's 128x1 tile of channels >= 128


@pytest.mark.usefixtures("gpu_nan_semantics")  # tl.max drops NaN, as on a GPU
@pytest.mark.parametrize("use_triton", [True, False])
def test_fp8_experts_nan_grad_gives_nan_weight_grads(use_triton):
    ex = _experts(use_triton)
    x = torch.randn(20, 64, device=DEVICE, requires_grad=True)
    y = ex(x, torch.tensor([7, 0, 13], device=DEVICE))
    dy = torch.randn_like(y)
    dy[9, 5] = float("nan")  # a token of expert 2
    y.backward(dy)
    assert torch.isnan(ex.w2.grad[2]).any() and torch.isnan(ex.w1.grad[2]).any()
    assert torch.isnan(x.grad[9]).all()
    assert torch.all(ex.w2.grad[1] == 0)  # the empty expert stays exactly zero


def test_triton_forward_backward_reads_nothing_on_the_host(host_reads):
    lin, ex = _linear(True), _experts(True)
    x = torch.randn(2, 20, 160, device=DEVICE, requires_grad=True)
    xr = torch.randn(20, 64, device=DEVICE, requires_grad=True)
    counts = torch.tensor([7, 0, 13], device=DEVICE)
    with host_reads() as reads:
        y = lin(x)
        y.backward(torch.ones_like(y))
        yr = ex(xr, counts)
        yr.backward(torch.ones_like(yr))
    assert not reads, dict(reads)
    assert torch.isfinite(lin.weight.grad).all() and torch.isfinite(ex.w1.grad).all()
