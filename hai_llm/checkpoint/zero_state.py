"""Layout-independent checkpoint state of the ZeRO-1 optimizer (``hai_llm.parallel.zero``).

Every parameter ``fqn`` is saved as three 1-D tensors over its *global* flattened
elements (all experts, whatever the expert-parallel degree): ``master.fqn`` (fp32
weights), ``exp_avg.fqn`` and ``exp_avg_sq.fqn`` (AdamW moments), plus ``ema.fqn`` when
an EMA is kept. Each rank contributes exactly the range it owns; the global sharding
metadata is computed from the layout arithmetic, so no collective is needed to describe
it, and DCP can read any range back under another layout.

Devices: a shard's placement names the local tensor's own device, index included
(``rank:3/cuda:3``, ``rank:0/cpu`` for the CPU-resident EMA): torch compares it with the
tensor's device and ``cuda`` is not ``cuda:0``.  The EMA is this rank's master shard in host
memory (pinned on CUDA, ``hai_llm.train.ema``), saved and loaded in place like the master
weights: no collective touches it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from hai_llm.parallel.zero import ShardPiece, global_layout, owned_pieces


def _sharded(local: torch.Tensor, piece: ShardPiece, layout: list[tuple[int, int, int]]):
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    # the full device, index included: ``Shard`` checks placement.device() == local.device,
    # and torch.device("cuda") != torch.device("cuda:0").  Only this rank's entries are checked
    # and DCP reads only offsets and sizes of the others, so they carry the same device string.
    dev = str(local.device)
    me = dist.get_rank()
    shards_md = [ShardMetadata([lo], [hi - lo], f"rank:{r}/{dev}") for lo, hi, r in layout]
    md = ShardedTensorMetadata(shards_metadata=shards_md, size=torch.Size([piece.global_numel]),
                               tensor_properties=TensorProperties(dtype=local.dtype, layout=torch.strided,
                                                                  requires_grad=False,
                                                                  memory_format=torch.contiguous_format,
                                                                  pin_memory=_pinned(local)))
    shard = Shard(tensor=local, metadata=ShardMetadata([piece.global_lo], [local.numel()], f"rank:{me}/{dev}"))
    return ShardedTensor._init_from_local_shards_and_global_metadata([shard], md)


def _pinned(t: torch.Tensor) -> bool:
    """Whether ``t`` is in pinned host memory (torch checks it against the shard's properties)."""
    return t.device.type == "cpu" and torch.cuda.is_available() and t.is_pinned()


def dcp_state(zopt, ema=None) -> dict:
    """The optimizer + weights part of a DCP state dict: views into the live shards, so
    DCP's in-place load restores them directly."""
    distributed = dist.is_initialized()
    state: dict = {}
    for b in zopt.buckets:
        tensors = zopt._state_tensors(b)
        layout = global_layout(b) if distributed else {}
        for pc in owned_pieces(b):
            views = {k: t[pc.bucket_lo:pc.bucket_hi] for k, t in tensors.items()}
            if ema is not None:
                views["ema"] = ema.piece(b, pc)  # the EMA of this rank's master shard (train/ema.py)
            for kind, v in views.items():
                key = f"{kind}.{pc.name}"
                if distributed:
                    state[key] = _sharded(v, pc, layout[pc.name])
                else:
                    if v.numel() != pc.global_numel:
                        raise RuntimeError(f"single-process piece of {pc.name} covers {v.numel()} of "
                                           f"{pc.global_numel} elements")
                    state[key] = v
    return state


@torch.no_grad()
def after_load(zopt, step: float, ema=None) -> None:
    """Rebuild full parameters from the loaded owned ranges. The EMA (``ema``) needs nothing:
    it holds only this rank's master shard, which DCP loaded in place through ``dcp_state``'s
    views."""
    zopt.set_step(step)
    zopt.broadcast_params()
