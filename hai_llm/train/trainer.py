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

import copy
import dataclasses
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
from hai_llm.data.heldout import HeldOutSplit
from hai_llm.model.transformer import build_model, set_loss_weights
from hai_llm.optim import LRSchedule, TrainingSchedule, set_lr
from hai_llm.parallel.watchdog import heartbeat
from hai_llm.runtime import Runtime, SingleProcessRuntime
from hai_llm.train.ema import CPUEma
from hai_llm.train.init_from import init_from_checkpoint
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
    global_batch: int = 0  # sequences of this step (the batch-size ramp's value, else train.global_batch)
    tokens: int = 0  # training tokens consumed after this step (data.seq_len per sequence)


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
        torch.manual_seed(t.seed)
        # built on meta: parallelize() materialises and initialises only this rank's share
        # (stages, expert rows), with the values build_model(cfg.model, device, seed) would give
        # the model's own copy of its args: the trainer sets each step's loss weights on it
        # (set_loss_weights), never on the run's config
        self.model = self.rt.prepare_model(build_model(copy.copy(cfg.model), device="meta"), device=self.device)
        self.dataset = self._open_dataset()
        # validation on: the corpus tail is held out, the sampler only tiles the part before it
        self.heldout = HeldOutSplit(self.dataset, cfg.data.seq_len, 1 + cfg.model.n_mtp_layers, t.global_batch,
                                    t.eval_batches) if t.eval_every > 0 else None
        self.sampler = SequenceSampler(self.dataset, cfg.data.seq_len, t.global_batch, dp_rank=self.rt.dp_rank,
                                       dp_world=self.rt.dp_world, seed=t.seed,
                                       extra_tokens=1 + cfg.model.n_mtp_layers,
                                       n_tokens=self.heldout.train_tokens if self.heldout else None)
        self.optimizer = self.rt.build_optimizer(self.model, cfg)
        self.ema = CPUEma(self.optimizer, t.ema_decay) if t.ema_decay > 0 else None
        self.step = 0
        # training tokens consumed (data.seq_len per sequence, skipped steps included): the
        # batch-size ramp's clock (Layout.batch_at); checkpointed, so a resume continues the ramp
        self.tokens = 0
        # lr, gamma, lambda, alpha as functions of (step, tokens); the lr horizon (the step where
        # the run ends: train.steps or train.max_tokens) is fixed here and kept in checkpoints
        # (hai_llm/optim/schedules.py)
        self.schedule = TrainingSchedule.start(cfg, horizon=self.run_length())
        self.tokens_per_s = 0.0
        self.bad_in_a_row = 0
        self.skipped_total = 0
        if t.resume:
            self._maybe_resume()
        if t.init_from and self.step == 0:  # a new run (e.g. a context-extension stage) from another's weights
            init_from_checkpoint(self, t.init_from, with_optimizer=t.init_optimizer)
            if self.ema is not None:  # the EMA starts from the loaded weights
                self.ema = CPUEma(self.optimizer, t.ema_decay)

    # -- setup ---------------------------------------------------------------------------
    def _open_dataset(self) -> TokenDataset:
        """The run's corpus, checked against model.vocab_size. The main rank prepares it (no
        data.path) and checks it first: the one scan of tokens.bin, whose largest id is cached
        next to it (hai_llm/data/token_scan.py; the launcher's preflight or hai-llm-prepare
        usually did it already), so the other ranks, after the barrier, read the cached value."""
        d, vocab = self.cfg.data, self.cfg.model.vocab_size
        if d.path:
            path = Path(d.path)
        else:
            sources = list(d.sources) or None
            name = "stdlib" if sources is None else "custom"
            path = Path(d.cache_dir) / f"{name}_{Path(d.tokenizer).stem}_{d.max_bytes}"
        dataset = None
        if self.rt.is_main:
            if not d.path:
                ensure_prepared(sources, path, tokenizer=d.tokenizer, pattern=d.pattern,
                                max_bytes=d.max_bytes, text_field=d.text_field)
            dataset = TokenDataset(path)
            dataset.check_vocab(vocab)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if dataset is None:
            dataset = TokenDataset(path)
            dataset.check_vocab(vocab)
        return dataset

    def done(self) -> bool:
        """Whether the run is over: train.steps steps taken, or train.max_tokens tokens consumed."""
        t = self.cfg.train
        return self.step >= t.steps or (t.max_tokens > 0 and self.tokens >= t.max_tokens)

    def run_length(self) -> int:
        """The step where the run will end, from where it is now (step, tokens consumed) under
        this layout's batches: train.steps, or the first step whose tokens reach
        train.max_tokens if that comes first."""
        t = self.cfg.train
        if t.max_tokens <= 0 or self.step >= t.steps:
            return max(t.steps, self.step)
        return self.step + steps_to_tokens(self.rt.layout.batch_at, self.rt.layout.global_batch, self.cfg.data.seq_len,
                                           int(math.ceil(t.max_tokens)), cap=t.steps - self.step,
                                           tokens_so_far=self.tokens)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    # -- checkpoint ------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"step": self.step, "bad_in_a_row": self.bad_in_a_row, "skipped_total": self.skipped_total,
                "sampler": self.sampler.state_dict(), "tokens": self.tokens,
                "lr_schedule": self.schedule.lr.state()}

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
                                    trainer_state=trainer_state, keep=self.cfg.train.keep_ckpts,
                                    model_config=dataclasses.asdict(self.cfg.model))

    def _maybe_resume(self) -> None:
        root = self.out_dir / "checkpoints"
        if self.rt.is_main:  # what interrupted saves left behind, before any rank looks for a checkpoint
            ckpt.remove_stale(root)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        path = ckpt.latest_checkpoint(root)  # the `latest` pointer, else the newest complete step_N
        if path is None:
            return
        # safetensors + JSON, or a legacy pickle checkpoint through an allow-list (checkpoint/safe_load.py);
        # a checkpoint of another model shape is refused naming the model.* keys that differ
        st = ckpt.load_checkpoint(path, weights=dcp_state(self.optimizer, self.ema), buffers=self._buffers(),
                                  model_config=dataclasses.asdict(self.cfg.model),
                                  trust=self.cfg.train.trust_checkpoint)
        after_load(self.optimizer, st["optim_step"], self.ema)
        self.step, self.bad_in_a_row, self.skipped_total = st["step"], st["bad_in_a_row"], st["skipped_total"]
        # checkpoints from before the token count was saved: their runs read data.seq_len tokens
        # per sample consumed (the sampler's position), the same count
        self.tokens = st["tokens"] if "tokens" in st else st["sampler"]["samples_consumed"] * self.cfg.data.seq_len
        self._resume_schedule(st.get("lr_schedule"))
        self.sampler.load_state_dict(st["sampler"])
        if self.rt.is_main:
            print(f"resumed from {path} at step {self.step}")

    def _resume_schedule(self, state: str | None) -> None:
        """The lr schedule of the resumed run (its horizon as when it started), extended when
        train.steps grew and optim.extend_schedule asks for it; the user is told either way.
        A checkpoint written before schedules were stored (no state) keeps this run's train.steps."""
        if state is None:
            return
        lr, note = LRSchedule.from_state(self.cfg.optim, state).resumed(self.step, self.run_length())
        self.schedule = self.schedule.with_lr(lr)
        if note and self.rt.is_main:
            print(note)

    # -- one step --------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        cfg = self.cfg
        # this step's lr, gamma, lambda, alpha: at the tokens consumed BEFORE it (schedules.py)
        self.step_values = sv = self.schedule.at(self.step, self.tokens)
        set_loss_weights(self.model.args, sv.mtp_lambda, sv.seq_aux_alpha)
        # the step's batch: the ramp's value at the tokens consumed so far (the full batch without
        # a ramp), split into micro-batches by the layout; the sampler advances by exactly it
        global_batch = self.rt.layout.batch_at(self.tokens)
        n_micro = self.rt.layout_for(global_batch).n_micro
        batch = self.sampler.next_batch(global_batch)
        self.tokens += global_batch * cfg.data.seq_len
        if self.device.type == "cuda":  # pinned: an asynchronous copy, queued behind the last step
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        tot = self.rt.reduce_metrics(self.rt.forward_backward(self.model, batch, n_micro, self._autocast))
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
            set_lr(self.optimizer, sv.lr)
            self.optimizer.step()
            if cfg.train.bias_update and load is not None:
                self.model.update_expert_bias(load.float(), sv.bias_update_speed)
            if self.ema is not None:
                self.ema.update()
            self.bad_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            self.skipped_total += 1
        self.step += 1  # 1-based from here on, as in metrics.jsonl
        stats = vals[5:] if load is not None else (None, None)
        result = StepResult(loss=loss, ce=ce, mtp=mtp, balance=balance, grad_norm=grad_norm, skipped=not finite,
                            expert_load=load, load_max_over_mean=stats[0], load_worst_layer=stats[1],
                            global_batch=global_batch, tokens=self.tokens)
        if not finite and self.bad_in_a_row >= cfg.train.max_bad_steps:
            err = NonFiniteLossError(
                f"step {self.step}: loss or gradient norm was non-finite for {self.bad_in_a_row} steps in a "
                f"row (steps {self.step - self.bad_in_a_row + 1}-{self.step}, loss={loss}, grad_norm={grad_norm}); "
                f"lower optim.lr, enable optim.grad_clip, or raise train.max_bad_steps (now {cfg.train.max_bad_steps})")
            err.result = result  # fit() logs this last skipped step before stopping
            raise err
        return result

    # -- validation ------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Validation metrics on the held-out split (``train.eval_batches`` fixed batches of
        ``train.global_batch`` sequences, hai_llm/data/heldout.py), identical on every rank:
        ``val_loss`` is the main head's next-token cross-entropy (comparable to the training
        ``ce``), ``val_mtp`` the MTP depths' mean, ``val_time_s`` the evaluation's wall time.
        Each batch runs through the runtime's forward-only ``evaluate`` with the layout's
        micro-batches (the full batch's, also during a batch-size ramp) and is averaged over the
        ranks as a training step is; batches are averaged in float64. Changes nothing a training
        step reads (weights, gradients, routing biases, sampler, random state)."""
        if self.heldout is None:
            raise ValueError("no held-out split: set train.eval_every > 0 (and train.eval_batches)")
        t0 = time.perf_counter()
        total = None
        for b in range(self.heldout.n_batches):
            batch = self.heldout.local_batch_at(b, self.rt.dp_rank, self.rt.dp_world).to(self.device)
            terms = self.rt.reduce_metrics(self.rt.evaluate(self.model, batch, self.rt.layout.n_micro,
                                                            self._autocast))["terms"]
            total = terms if total is None else total + terms
        ce, mtp = (total / self.heldout.n_batches)[1:3].tolist()  # TERMS = (loss, ce, mtp, balance)
        return {"val_loss": ce, "val_mtp": mtp, "val_time_s": time.perf_counter() - t0}

    def _eval_due(self) -> bool:
        every = self.cfg.train.eval_every
        return every > 0 and (self.step % every == 0 or self.done())

    # -- loop ------------------------------------------------------------------------------
    def fit(self) -> list[StepResult]:
        cfg = self.cfg
        logger = MetricsLogger(self.out_dir, cfg.logging, OmegaConf.to_container(OmegaConf.structured(cfg)),
                               self.run_length(), start_step=self.step, is_main=self.rt.is_main)
        results = []
        if self.done() and self.rt.is_main:
            by_tokens = (f", {self.tokens:,} tokens consumed and train.max_tokens={cfg.train.max_tokens:g}"
                         if cfg.train.max_tokens > 0 else "")
            print(f"nothing to train: the run in {self.out_dir} is already at step {self.step} and train.steps="
                  f"{cfg.train.steps}{by_tokens}; raise train.steps{' or train.max_tokens' if by_tokens else ''} "
                  f"to continue it")
        elif cfg.train.max_tokens > 0 and self.run_length() == cfg.train.steps and self.rt.is_main:
            print(f"note: train.steps={cfg.train.steps} ends the run before train.max_tokens={cfg.train.max_tokens:g} "
                  f"tokens are consumed: raise train.steps to let train.max_tokens end it")
        if cfg.train.keep_ckpts == 0 and self.rt.is_main:
            print(f"train.keep_ckpts=0: every checkpoint is kept in {self.out_dir / 'checkpoints'} (set it >= 1 to "
                  f"keep only the newest ones)")
        try:
            while not self.done():
                heartbeat(self.step)  # the rank's watchdog: a step that never ends is reported
                t0 = time.perf_counter()
                try:
                    r = self.train_step()
                except NonFiniteLossError as e:  # the stopping step is a skipped step too: log it
                    logger.log(self.step, {**self._metrics(e.result), "skipped_total": self.skipped_total})
                    raise
                dt = time.perf_counter() - t0
                results.append(r)
                tokens_per_step = r.global_batch * cfg.data.seq_len  # the step's own batch (ramp)
                self.tokens_per_s = tokens_per_step / dt
                val = self.evaluate() if self._eval_due() else {}
                if self.step % cfg.logging.log_every == 0 or self.done() or val:
                    logger.log(self.step, {**self._metrics(r), "lr": self.optimizer.param_groups[0]["lr"],
                                           "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                                           "global_batch": r.global_batch, "tokens": r.tokens,
                                           "skipped_total": self.skipped_total, **val,
                                           **{k: v for k, v in self.step_values.metrics().items()
                                              if k in self.schedule.scheduled}})
                every = cfg.train.ckpt_every
                if (every and self.step % every == 0) or self.done():
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


def steps_to_tokens(batch_at, full_batch: int, seq_len: int, max_tokens: int, cap: int,
                    tokens_so_far: int = 0) -> int:
    """Steps from ``tokens_so_far`` until the tokens consumed reach ``max_tokens`` (the step that
    reaches them included), at most ``cap``. ``batch_at(tokens)`` is each step's global batch
    (``Layout.batch_at``: the ramp, then ``full_batch`` for good, since ramp values never exceed
    it and never decrease), so the steps are walked one by one only while the ramp lasts and
    counted in closed form after it: ceil(remaining tokens / tokens per full step)."""
    t, n = int(tokens_so_far), 0
    while n < cap and t < max_tokens:
        b = batch_at(t)
        if b == full_batch:
            per = full_batch * seq_len
            return min(cap, n + -(-(max_tokens - t) // per))
        t += b * seq_len
        n += 1
    return n


def _load_stats(load: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[mean over layers of max/mean expert load, its max over layers] as float64 on ``device``
    (empty without MoE layers): computed in fp32 like the logged values always were."""
    if load is None:
        return torch.zeros(0, dtype=torch.float64, device=device)
    load = load.float()
    ratio = load.max(-1).values / load.mean(-1).clamp_min(1e-9)
    return torch.stack([ratio.mean(), ratio.max()]).double()
