"""Exponential moving average of the parameters, kept in CPU memory and updated off the
training thread (the paper uses it to estimate model quality early without extra GPU
memory).

After each optimizer step the trainer calls ``update``: the parameters are snapshotted to
CPU (a copy, so training can go on modifying them) and a worker thread folds the snapshot
into the average, ema = decay * ema + (1 - decay) * param, while the next step computes.
``wait`` joins the pending update before the EMA is read or checkpointed.
"""
from __future__ import annotations

import threading

import torch
from torch import nn


class CPUEma:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().to("cpu", torch.float32, copy=True) for n in self.names}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def update(self, model: nn.Module) -> None:
        self.wait()
        params = dict(model.named_parameters())
        snap = {n: params[n].detach().to("cpu", torch.float32, copy=True) for n in self.names}
        self._thread = threading.Thread(target=self._fold, args=(snap,), daemon=True)
        self._thread.start()

    def _fold(self, snap: dict) -> None:
        try:
            with torch.no_grad():
                for n, v in snap.items():
                    self.shadow[n].lerp_(v, 1.0 - self.decay)
        except BaseException as e:  # surfaced on the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("EMA update failed") from err

    def state_dict(self) -> dict:
        self.wait()
        return {f"ema.{n}": t for n, t in self.shadow.items()}

    def load_state_dict(self, sd: dict) -> None:
        self.wait()
        for n in self.names:
            self.shadow[n].copy_(sd[f"ema.{n}"])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (e.g. an evaluation copy)."""
        self.wait()
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n])
