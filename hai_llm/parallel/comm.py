"""Names of the flat-tensor collectives across torch versions, looked up at call time.

torch 2.13 renamed ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to
``all_gather_single`` / ``reduce_scatter_single`` (same arguments) and deprecated the old
names; older releases only have the old ones. Call sites use these two functions so a
run prints no deprecation warning on any supported torch.

Both resolve the ``torch.distributed`` function on every call instead of binding it at
import: a tracer that patches ``torch.distributed`` (``hai_llm.parallel.collective_trace``)
then sees the ZeRO-1 and sequence-parallel collectives that go through here.
"""
from __future__ import annotations

import torch.distributed as dist


def all_gather_single(output_tensor, input_tensor, group=None, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output_tensor, input_tensor, group=group, async_op=async_op)


def reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=None, async_op: bool = False):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, op=op, group=group, async_op=async_op)
