"""Exponential moving average of the weights, kept in host memory for the ZeRO shard this rank
owns, and updated off the training thread (the paper uses it to estimate model quality early
without extra GPU memory).

What is averaged: the optimizer's fp32 master shards (``ZeroOptimizer.buckets[i].master``), i.e.
exactly the elements this rank owns and checkpoints, not a full copy of its parameters. Across
the ranks of a reduce group the shards tile every parameter once, so the EMA costs 1/W of the
parameters per rank (W = ranks of the reduce group) instead of all of them, and it is saved in
global coordinates next to the master weights (``ema.<fqn>``, ``hai_llm.checkpoint.zero_state``),
which makes it as layout-independent as they are.

After each optimizer step the trainer calls ``update``: the master shards are copied into a
staging buffer (on CUDA: pinned host memory, ``non_blocking`` copies queued behind the optimizer
step, and a CUDA event marks their completion) and a worker thread waits for that event and
folds the snapshot into the average, ema = lerp(ema, snapshot, 1 - decay), while the next step
computes. ``wait`` joins the pending update before the EMA is read or checkpointed. Nothing here
blocks the training thread on the device.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from hai_llm.parallel.comm import all_gather_single
from hai_llm.parallel.zero import owned_pieces


class CPUEma:
    """EMA of ``zopt``'s master shards (a ``ZeroOptimizer``), with decay ``decay``."""

    def __init__(self, zopt, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.zopt = zopt
        self.decay = decay
        self.cuda = zopt.device.type == "cuda"
        # pinned host memory when the shards live on a GPU: asynchronous device-to-host copies
        host = dict(dtype=torch.float32, device="cpu", pin_memory=self.cuda)
        self.shards = [torch.empty(b.shard, **host) for b in zopt.buckets]
        self._staging = [torch.empty(b.shard, **host) for b in zopt.buckets]
        for s, b in zip(self.shards, zopt.buckets):
            s.copy_(b.master.detach())  # starts as the weights (one blocking copy, at set-up)
        self._index = {id(b): i for i, b in enumerate(zopt.buckets)}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- the update ------------------------------------------------------------------------
    def update(self) -> None:
        """Queue the snapshot of the master shards and fold it in on the worker thread."""
        self.wait()  # the previous fold is done with the staging buffers
        for st, b in zip(self._staging, self.zopt.buckets):
            st.copy_(b.master.detach(), non_blocking=self.cuda)
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record()  # after the copies on the current stream
        self._thread = threading.Thread(target=self._fold, args=(done,), daemon=True)
        self._thread.start()

    def _fold(self, done) -> None:
        try:
            if done is not None:
                done.synchronize()  # this thread waits for the copies, not the training thread
            with torch.no_grad():
                for s, v in zip(self.shards, self._staging):
                    s.lerp_(v, 1.0 - self.decay)
        except BaseException as e:  # surfaced on the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("EMA update failed") from err

    # -- views for checkpoints and tests -----------------------------------------------------
    def piece(self, b, pc) -> torch.Tensor:
        """The EMA of owned piece ``pc`` (``hai_llm.parallel.zero.ShardPiece``) of bucket ``b``:
        a 1-D view into this rank's shard (what ``zero_state.dcp_state`` saves and loads)."""
        return self.shards[self._index[id(b)]][pc.bucket_lo:pc.bucket_hi]

    def state_dict(self) -> dict:
        """{"ema.<fqn>": EMA of the part of ``fqn`` this rank owns}: shaped like the parameter
        when the rank owns all of it (a single process), else the 1-D owned range."""
        self.wait()
        out = {}
        for b in self.zopt.buckets:
            shapes = {n: p.shape for n, p in zip(b.names, b.params)}
            for pc in owned_pieces(b):
                v = self.piece(b, pc)
                whole = pc.param_hi - pc.param_lo == shapes[pc.name].numel()
                out[f"ema.{pc.name}"] = v.view(shapes[pc.name]) if whole else v
        return out

    def load_state_dict(self, sd: dict) -> None:
        self.wait()
        for b in self.zopt.buckets:
            for pc in owned_pieces(b):
                self.piece(b, pc).copy_(sd[f"ema.{pc.name}"].reshape(-1))

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Load the averaged weights into the optimizer's model (e.g. for an evaluation):
        the shards are all-gathered over each reduce group, as ``broadcast_params`` does for
        the master weights. Collective."""
        self.wait()
        if model is not None and model is not self.zopt.model:
            raise ValueError("CPUEma.copy_to writes the EMA into the model its optimizer was built for")
        for b, s in zip(self.zopt.buckets, self.shards):
            mine = s.to(b.master.device)
            if b.spec.group is not None and b.world > 1:
                full = torch.empty(b.shard * b.world, dtype=torch.float32, device=b.master.device)
                all_gather_single(full, mine, group=b.spec.group)
            else:
                full = mine
            for p, o in zip(b.params, b.offsets):
                p.copy_(full[o:o + p.numel()].view_as(p))
