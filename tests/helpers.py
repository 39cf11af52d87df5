"""Shared test helpers, imported as ``helpers`` (pytest puts tests/ on sys.path).

Sections are independent; each says what it is for.
"""
from __future__ import annotations

import torch


# =========================================================================================
# Expert-parallel reference reductions (test-only; the trainer reduces through ZeRO-1)
# =========================================================================================
# A plain all-reduce path for an expert-parallel model, against which the tests compare
# losses, gradients and norms. Gradient bookkeeping: with a loss that is the mean over W ranks
# of per-rank means, every gradient is (1/W) * sum over ranks of local gradients; a rank's
# local expert gradient already holds the contributions of every token of its EP group (the
# all-to-all backward), so dense grads are all-reduced over the batch ranks and expert grads
# only over their replicas (edp), both divided by W.


def _expert_names(model) -> dict:
    from hai_llm.parallel.expert import expert_param_slices

    return expert_param_slices(model)


@torch.no_grad()
def gather_expert_grads(model, group=None) -> dict[str, torch.Tensor]:
    """{fqn: full [E, ...] gradient} all-gathered over the EP group ``group`` (None: the world;
    collective; None grads count as zeros). These are LOCAL grads unless reduced first."""
    import torch.distributed as dist

    out = {}
    params = dict(model.named_parameters())
    for name in _expert_names(model):
        p = params[name]
        t = torch.zeros_like(p) if p.grad is None else p.grad.detach()
        n = dist.get_world_size(group)
        parts = [torch.empty_like(t) for _ in range(n)]
        if n == 1:
            parts = [t.clone()]
        else:
            dist.all_gather(parts, t.contiguous(), group=group)
        out[name] = torch.cat(parts, 0)
    return out


@torch.no_grad()
def reduce_ep_gradients(model, dense_group=None, edp_group=None, batch_world: int | None = None) -> None:
    """Local grads -> global ones for a loss that is the mean over ``batch_world`` ranks (default:
    size of ``dense_group``, None = world): dense grads all_reduce(SUM) over ``dense_group`` / W,
    expert grads all_reduce(SUM) over ``edp_group`` (None or size 1: none) / W. Collective."""
    import torch.distributed as dist

    W = batch_world or dist.get_world_size(dense_group)
    experts = _expert_names(model)
    edp_size = 1 if edp_group is None else dist.get_world_size(edp_group)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if name in experts:
            if edp_size > 1:
                dist.all_reduce(p.grad, group=edp_group)
        else:
            dist.all_reduce(p.grad, group=dense_group)
        p.grad.div_(W)


@torch.no_grad()
def grad_norm_ep(model, ep_group=None) -> torch.Tensor:
    """Global L2 norm of (already reduced) gradients: dense grads are replicated and counted
    once, the squared norms of the expert shards are summed over the EP group (collective)."""
    import torch.distributed as dist

    experts = _expert_names(model)
    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if name in experts:
            expert += sq
        else:
            dense += sq
    if experts and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(expert, group=ep_group)
    return (dense + expert).sqrt()


def global_expert_load(local_counts_LE: torch.Tensor, group=None) -> torch.Tensor:
    """Expert load of the whole batch: all_reduce(SUM) of per-rank token counts [L, E] over the
    ranks sharing the batch (None: the world), identical on every rank."""
    import torch.distributed as dist

    load = local_counts_LE.detach().clone()
    if group is not None or dist.is_initialized():
        dist.all_reduce(load, group=group)
    return load


# =========================================================================================
# Device placement: every tensor handed to a collective is on the model's device
# =========================================================================================
# NCCL takes only CUDA tensors of the rank's own device; gloo takes anything, so a CPU run
# never notices a tensor built without ``device=``. ``CollectivesOnDevice(dev)`` patches the
# torch.distributed collectives and P2P calls (the list of ``hai_llm.parallel.collective_trace``)
# so that each call first checks its tensor arguments: on ``dev`` and not meta, else an
# AssertionError naming the op, the tensor and the first hai_llm frame that issued it. Combined
# with ``torch.set_default_device("meta")`` inside a rank whose model lives on an explicit CPU
# device, a tensor created without a device fails loudly at its first use or collective.


def _caller_frame() -> str:
    """``file:line`` of the innermost hai_llm (or test) frame on the stack."""
    import traceback

    for fr in reversed(traceback.extract_stack()[:-2]):
        if "/hai_llm/" in fr.filename or "/launch/" in fr.filename:
            return f"{fr.filename.split('/hai_llm/')[-1]}:{fr.lineno} ({fr.name})"
    return "?"


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)


class CollectivesOnDevice:
    """Context manager: every collective / P2P tensor must be on ``device`` (not meta).
    ``calls`` counts the checked calls per op (a test can assert that the paths it meant to
    cover did communicate)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.calls: dict[str, int] = {}
        self._saved: list = []

    def __enter__(self):
        import inspect

        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d
        from hai_llm.parallel.collective_trace import _SPECS

        depth = [0]
        for name, spec in _SPECS.items():
            orig = getattr(c10d, name, None)
            if orig is None or not spec.get("tensors"):
                continue  # object collectives: torch builds their tensors itself
            sig = inspect.signature(orig)

            def wrapper(*args, __orig=orig, __sig=sig, __name=name, __spec=spec, **kwargs):
                if depth[0]:
                    return __orig(*args, **kwargs)
                bound = __sig.bind(*args, **kwargs)
                for arg in __spec["tensors"]:
                    for t in _tensors_in(bound.arguments.get(arg)):
                        if t.is_meta or t.device != self.device:
                            raise AssertionError(
                                f"{__name}({arg}) got a {tuple(t.shape)} {t.dtype} tensor on {t.device}, "
                                f"expected {self.device}; issued at {_caller_frame()}")
                self.calls[__name] = self.calls.get(__name, 0) + 1
                depth[0] += 1
                try:
                    return __orig(*args, **kwargs)
                finally:
                    depth[0] -= 1

            for mod in (c10d, dist):
                if getattr(mod, name, None) is orig:
                    self._saved.append((mod, name, orig))
                    setattr(mod, name, wrapper)
        return self

    def __exit__(self, *exc):
        for mod, name, orig in reversed(self._saved):
            setattr(mod, name, orig)
        self._saved.clear()
