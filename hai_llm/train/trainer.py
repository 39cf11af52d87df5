"""The training loop: data -> micro-batched forward/backward -> clip -> AdamW -> expert
bias update -> EMA -> metrics -> atomic checkpoint, with exact resume.

The loop is written once for every layout. What differs between layouts (where the model's
parts live, how gradients are reduced, how the optimizer state is sharded, how the global
norm and the expert load are summed across ranks, how a step is scheduled over pipeline
stages) lives behind the small ``hai_llm.runtime.Runtime`` interface; the single-process
runtime (``SingleProcessRuntime``, the default) is the reference that every parallel runtime
is tested against. The micro-batch count comes from the runtime's layout.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from hai_llm.checkpoint import store as ckpt
from hai_llm.checkpoint.zero_state import after_load, dcp_state
from hai_llm.config.schema import Config
from hai_llm.data import SequenceSampler, TokenDataset, ensure_prepared
from hai_llm.model.transformer import build_model
from hai_llm.optim import lr_at, set_lr
from hai_llm.runtime import Runtime, SingleProcessRuntime
from hai_llm.train.ema import CPUEma
from hai_llm.train.metrics import MetricsLogger


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float
    ce: float
    mtp: float
    balance: float
    grad_norm: float
    skipped: bool
    expert_load: torch.Tensor | None  # [L, E] tokens per expert over the global batch


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime | None = None, out_dir: str | Path | None = None):
        self.cfg = cfg
        self.rt: Runtime = runtime or SingleProcessRuntime(cfg)
        self.out_dir = Path(out_dir or cfg.train.out_dir)
        self.device = pick_device(cfg.train.device)
        t = cfg.train
        self.local_batch = self.rt.layout.local_batch
        self.n_micro = self.rt.layout.n_micro
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, device=self.device, seed=t.seed)
        self.model = self.rt.prepare_model(model)  # FP8, stages, sp, ep, B/W split: parallelize()
        self.dataset = TokenDataset(self._data_path())
        self.dataset.check_vocab(cfg.model.vocab_size)
        self.sampler = SequenceSampler(self.dataset, cfg.data.seq_len, t.global_batch, dp_rank=self.rt.dp_rank,
                                       dp_world=self.rt.dp_world, seed=t.seed,
                                       extra_tokens=1 + cfg.model.n_mtp_layers)
        self.optimizer = self.rt.build_optimizer(self.model, cfg)
        self.ema = CPUEma(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.step = 0
        self.tokens_per_s = 0.0
        self.bad_in_a_row = 0
        self.skipped_total = 0
        if t.resume:
            self._maybe_resume()

    # -- setup ---------------------------------------------------------------------------
    def _data_path(self) -> Path:
        d = self.cfg.data
        if d.path:
            return Path(d.path)
        sources = list(d.sources) or None
        name = "stdlib" if sources is None else "custom"
        out = Path(d.cache_dir) / f"{name}_{Path(d.tokenizer).stem}_{d.max_bytes}"
        if self.rt.is_main:
            ensure_prepared(sources, out, tokenizer=d.tokenizer, pattern=d.pattern,
                            max_bytes=d.max_bytes, text_field=d.text_field)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return out

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    # -- checkpoint ------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"step": self.step, "bad_in_a_row": self.bad_in_a_row, "skipped_total": self.skipped_total,
                "sampler": self.sampler.state_dict()}

    def _buffers(self) -> dict:
        """Persistent buffers (the routing biases): replicated over data/expert ranks."""
        keep = set(self.model.state_dict().keys())
        return {n: b for n, b in self.model.named_buffers() if n in keep}

    def save(self) -> Path:
        if self.ema is not None:
            self.ema.wait()
        trainer_state = {**self._trainer_state(), "optim_step": float(self.optimizer.sharded_state()["step"])}
        return ckpt.save_checkpoint(self.out_dir / "checkpoints", self.step,
                                    weights=dcp_state(self.optimizer, self.ema), buffers=self._buffers(),
                                    trainer_state=trainer_state, keep=self.cfg.train.keep_ckpts)

    def _maybe_resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out_dir / "checkpoints")
        if path is None:
            return
        template = {**self._trainer_state(), "optim_step": 0.0}
        st = ckpt.load_checkpoint(path, weights=dcp_state(self.optimizer, self.ema), buffers=self._buffers(),
                                  trainer_state=template)
        after_load(self.optimizer, st["optim_step"], self.ema)
        self.step, self.bad_in_a_row, self.skipped_total = st["step"], st["bad_in_a_row"], st["skipped_total"]
        self.sampler.load_state_dict(st["sampler"])
        if self.rt.is_main:
            print(f"resumed from {path} at step {self.step}")

    # -- one step --------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        cfg = self.cfg
        batch = self.sampler.next_batch().to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        tot = self.rt.reduce_metrics(self.rt.forward_backward(self.model, batch, self.n_micro, self._autocast))
        grad_norm = self.optimizer.reduce_gradients()
        finite = math.isfinite(tot["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.clip(grad_norm, cfg.optim.grad_clip)
            set_lr(self.optimizer, lr_at(self.step, cfg.train.steps, cfg.optim))
            self.optimizer.step()
            if cfg.train.bias_update and tot["counts"] is not None:
                self.model.update_expert_bias(tot["counts"].float())
            if self.ema is not None:
                self.ema.update(self.model)
            self.bad_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            self.skipped_total += 1
            if self.bad_in_a_row >= cfg.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"step {self.step}: loss or gradient norm was non-finite for {self.bad_in_a_row} steps in a "
                    f"row (loss={tot['loss']}, grad_norm={grad_norm}); lower optim.lr, enable optim.grad_clip, "
                    f"or raise train.max_bad_steps (now {cfg.train.max_bad_steps})")
        self.step += 1
        return StepResult(loss=tot["loss"], ce=tot["ce"], mtp=tot["mtp"], balance=tot["balance"],
                          grad_norm=grad_norm, skipped=not finite, expert_load=tot["counts"])

    # -- loop ------------------------------------------------------------------------------
    def fit(self) -> list[StepResult]:
        cfg = self.cfg
        logger = MetricsLogger(self.out_dir, cfg.logging, OmegaConf.to_container(OmegaConf.structured(cfg)),
                               cfg.train.steps, start_step=self.step, is_main=self.rt.is_main)
        results = []
        tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        try:
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                r = self.train_step()
                dt = time.perf_counter() - t0
                results.append(r)
                self.tokens_per_s = tokens_per_step / dt
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.steps:
                    logger.log(self.step, {**self._metrics(r), "lr": self.optimizer.param_groups[0]["lr"],
                                           "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                                           "skipped_total": self.skipped_total})
                every = cfg.train.ckpt_every
                if (every and self.step % every == 0) or self.step == cfg.train.steps:
                    self.save()
        finally:
            logger.close()
            if self.ema is not None:
                self.ema.wait()
        return results

    @staticmethod
    def _metrics(r: StepResult) -> dict:
        m = {"loss": r.loss, "ce": r.ce, "mtp": r.mtp, "balance": r.balance, "grad_norm": r.grad_norm,
             "skipped": int(r.skipped)}
        if r.expert_load is not None:
            load = r.expert_load.float()
            ratio = load.max(-1).values / load.mean(-1).clamp_min(1e-9)
            m["expert_load_max_over_mean"] = float(ratio.mean())
            m["expert_load_worst_layer"] = float(ratio.max())
        return m
