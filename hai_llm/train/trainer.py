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


def resolve_precision(name: str, device: torch.device) -> str:
    """``train.precision`` with ``auto`` resolved: bf16 autocast on CUDA (the fast path of every
    GEMM, grouped GEMMs included), fp32 on CPU (no bf16 speed-up there, and exact CPU tests)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


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
    expert_load: torch.Tensor | None  # [L, E] tokens per expert over the global batch (on the device)
    load_max_over_mean: float | None = None  # mean over layers of max/mean expert load
    load_worst_layer: float | None = None  # the largest max/mean over layers


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime | None = None, out_dir: str | Path | None = None):
        self.cfg = cfg
        self.rt: Runtime = runtime or SingleProcessRuntime(cfg)
        self.out_dir = Path(out_dir or cfg.train.out_dir)
        self.device = pick_device(cfg.train.device)
        t = cfg.train
        self.precision = resolve_precision(t.precision, self.device)
        if self.device.type == "cuda":
            # fp32 matmuls (fp32 runs, and what autocast leaves in fp32) may use TF32 tensor cores
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.local_batch = self.rt.layout.local_batch
        self.n_micro = self.rt.layout.n_micro
        torch.manual_seed(t.seed)
        # built on meta: parallelize() materialises and initialises only this rank's share
        # (stages, expert rows), with the values build_model(cfg.model, device, seed) would give
        self.model = self.rt.prepare_model(build_model(cfg.model, device="meta"), device=self.device)
        self.dataset = TokenDataset(self._data_path())
        self.dataset.check_vocab(cfg.model.vocab_size)
        self.sampler = SequenceSampler(self.dataset, cfg.data.seq_len, t.global_batch, dp_rank=self.rt.dp_rank,
                                       dp_world=self.rt.dp_world, seed=t.seed,
                                       extra_tokens=1 + cfg.model.n_mtp_layers)
        self.optimizer = self.rt.build_optimizer(self.model, cfg)
        self.ema = CPUEma(self.optimizer, t.ema_decay) if t.ema_decay > 0 else None
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
        if self.precision == "bf16":
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
        batch = self.sampler.next_batch()
        if self.device.type == "cuda":  # pinned: an asynchronous copy, queued behind the last step
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        tot = self.rt.reduce_metrics(self.rt.forward_backward(self.model, batch, self.n_micro, self._autocast))
        norm = self.optimizer.reduce_gradients()
        load = tot["counts"]
        # THE host read of the step: loss terms, gradient norm and load statistics, one small
        # float64 tensor, one copy. It must come before the optimizer step, because a non-finite
        # step must not touch weights, moments, step counts, routing biases or the EMA (doing
        # the check on the device would mean masking every one of those updates); and it
        # costs little there, since forward, backward and the gradient reduce-scatter are
        # already queued and the optimizer step needs all of them done anyway. Everything the
        # runtime and the optimizer computed before this point stayed on the device.
        vals = torch.cat([tot["terms"], norm.reshape(1), _load_stats(load, norm.device)]).tolist()
        loss, ce, mtp, balance, grad_norm = vals[:5]
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.clip(grad_norm, cfg.optim.grad_clip)
            set_lr(self.optimizer, lr_at(self.step, cfg.train.steps, cfg.optim))
            self.optimizer.step()
            if cfg.train.bias_update and load is not None:
                self.model.update_expert_bias(load.float())
            if self.ema is not None:
                self.ema.update()
            self.bad_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            self.skipped_total += 1
            if self.bad_in_a_row >= cfg.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"step {self.step}: loss or gradient norm was non-finite for {self.bad_in_a_row} steps in a "
                    f"row (loss={loss}, grad_norm={grad_norm}); lower optim.lr, enable optim.grad_clip, "
                    f"or raise train.max_bad_steps (now {cfg.train.max_bad_steps})")
        self.step += 1
        stats = vals[5:] if load is not None else (None, None)
        return StepResult(loss=loss, ce=ce, mtp=mtp, balance=balance, grad_norm=grad_norm, skipped=not finite,
                          expert_load=load, load_max_over_mean=stats[0], load_worst_layer=stats[1])

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
        if r.load_max_over_mean is not None:
            m["expert_load_max_over_mean"] = r.load_max_over_mean
            m["expert_load_worst_layer"] = r.load_worst_layer
        return m


def _load_stats(load: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[mean over layers of max/mean expert load, its max over layers] as float64 on ``device``
    (empty without MoE layers): computed in fp32 like the logged values always were."""
    if load is None:
        return torch.zeros(0, dtype=torch.float64, device=device)
    load = load.float()
    ratio = load.max(-1).values / load.mean(-1).clamp_min(1e-9)
    return torch.stack([ratio.mean(), ratio.max()]).double()
