"""Every schedule of a training run: the learning rate, the bias update speed gamma, the MTP
loss weight lambda and the balance-loss weight alpha, as pure functions of (step, tokens
consumed), so a resumed run, any parallel layout and a straight run see the same values.

Tokens consumed (the one definition): the sum over the optimizer steps already taken of
``global_batch * seq_len``, the sequences of each step times the positions each one trains
(skipped non-finite steps count: their data was consumed). Step ``s`` uses the values at the
tokens consumed *before* it, so step 0 sees 0 tokens; the trainer keeps the count in its
checkpoints. The paper's token breakpoints (docs/deepseek_v3.md#training-recipe): lr constant
until 10T, cosine over 4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B; gamma 0.001 until
14.3T then 0; lambda 0.3 until 10T then 0.1; alpha 1e-4 throughout.

The step schedules ``cosine`` and ``deepseek`` end at a horizon in steps. It is fixed when a
run starts (``LRSchedule.state`` goes into the checkpoint) and changes only by an explicit
extension (``optim.extend_schedule``), which stretches the rest of the schedule to the new end
so the learning rate continues from where it is, with no jump (docs/training_recipe.md).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from hai_llm.config.schema import Config, OptimConfig, ValueSchedule

HORIZON_SCHEDULES = ("cosine", "deepseek")  # the schedules whose shape depends on train.steps


def lr_at(step: float, total_steps: int, cfg: OptimConfig, tokens: float = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based; fractional inside a stretched
    extension) of a schedule ending at ``total_steps``, after ``tokens`` tokens consumed. A pure
    function: resuming needs only the step, the tokens and the horizon."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps  # linear, reaching lr at the last warmup step
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "deepseek_v3":
        return _paper_lr(tokens, cfg, floor)
    start = cfg.warmup_steps if cfg.schedule == "cosine" else max(cfg.warmup_steps, int(cfg.decay_start * total_steps))
    if step < start:
        return cfg.lr
    span = max(1, total_steps - start)
    frac = min(1.0, (step - start) / span)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * frac))


def _paper_lr(tokens: float, cfg: OptimConfig, floor: float) -> float:
    """The paper's post-warmup lr in tokens: lr, cosine to ``floor``, floor, then final_lr."""
    if tokens < cfg.decay_start_tokens:
        return cfg.lr
    if cfg.final_start_tokens > 0 and tokens >= cfg.final_start_tokens:
        return cfg.final_lr
    frac = (tokens - cfg.decay_start_tokens) / cfg.decay_tokens
    if frac >= 1.0:
        return floor  # exactly the floor from the end of the decay on (no cos(pi) rounding)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class Piecewise:
    """A value piecewise constant in tokens consumed: ``values[i]`` while tokens < ``until[i]``."""

    values: tuple[float, ...]
    until: tuple[float, ...] = ()

    @staticmethod
    def of(cfg: ValueSchedule, constant: float) -> "Piecewise":
        """The configured schedule, or the model config's ``constant`` when it is empty."""
        if not cfg.values:
            return Piecewise((float(constant),))
        return Piecewise(tuple(float(v) for v in cfg.values), tuple(float(u) for u in cfg.until_tokens))

    def at(self, tokens: float) -> float:
        for v, u in zip(self.values, self.until):
            if tokens < u:
                return v
        return self.values[-1]


@dataclass(frozen=True)
class Extension:
    """``optim.extend_schedule`` applied when resuming at ``at_step``: the schedule that ended at
    the previous horizon now ends at ``horizon``."""

    at_step: int
    horizon: int


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of a run: ``lr_at`` with the horizon fixed at the run's start, plus the
    explicit extensions made since. Its ``state`` is what checkpoints keep."""

    cfg: OptimConfig
    horizon: int  # train.steps when the run started
    extensions: tuple[Extension, ...] = ()

    @property
    def end(self) -> int:
        """The step where the schedule now reaches its floor (the last extension's horizon)."""
        return self.extensions[-1].horizon if self.extensions else self.horizon

    def at(self, step: int, tokens: float = 0) -> float:
        return lr_at(self._base_step(step), self.horizon, self.cfg, tokens)

    def _base_step(self, step: int) -> float:
        """``step`` mapped back onto the original schedule. Extension (a, H) of a schedule that
        ended at H' (> a) maps step s >= a to a + (s - a) (H' - a) / (H - a): the part of the old
        schedule after a, stretched from H' - a to H - a steps. Continuous at a (no jump), the
        floor at H. Without extensions the step itself (as a float: the same lr bits)."""
        ends = [self.horizon] + [e.horizon for e in self.extensions]
        s = float(step)
        for k in range(len(self.extensions) - 1, -1, -1):  # newest first: each maps onto the one before
            a, prev_end, new_end = self.extensions[k].at_step, ends[k], ends[k + 1]
            if s >= a and a < prev_end:
                s = a + (s - a) * (prev_end - a) / (new_end - a)
        return s

    def resumed(self, step: int, steps: int) -> tuple["LRSchedule", str]:
        """This schedule for a run resumed at ``step`` with ``train.steps = steps``, and a note for
        the user ("" when nothing changed): extended when ``optim.extend_schedule`` asks for it,
        else unchanged (fixed at the run's start)."""
        if self.cfg.schedule not in HORIZON_SCHEDULES or steps == self.end:
            return self, ""
        floor = self.cfg.lr * self.cfg.min_lr_ratio
        if steps > self.end and self.cfg.extend_schedule:
            ext = LRSchedule(self.cfg, self.horizon, self.extensions + (Extension(step, steps),))
            how = (f"the rest of the decay is stretched to end at step {steps} (lr continues from "
                   f"{self.at(step):.3g})" if step < self.end else f"the run had finished its decay: lr stays at {floor:.3g}")
            return ext, f"lr schedule extended from {self.end} to {steps} steps at step {step} " \
                        f"(optim.extend_schedule=true): {how}"
        if steps > self.end:
            return self, (f"note: train.steps={steps} is past the end of this run's {self.cfg.schedule} lr schedule "
                          f"(step {self.end}, fixed when the run started): steps {self.end}..{steps} run at the "
                          f"floor lr {floor:.3g}; add optim.extend_schedule=true to stretch the rest of the "
                          f"decay to step {steps} instead")
        return self, (f"note: train.steps={steps} stops before the end of this run's {self.cfg.schedule} lr "
                      f"schedule (step {self.end}, fixed when the run started): lr will not reach its floor")

    def state(self) -> str:
        """JSON text for the checkpoint's trainer state (no code, no pickle)."""
        return json.dumps({"horizon": self.horizon, "extensions": [[e.at_step, e.horizon] for e in self.extensions]})

    @staticmethod
    def from_state(cfg: OptimConfig, text: str) -> "LRSchedule":
        d = json.loads(text)
        return LRSchedule(cfg, int(d["horizon"]), tuple(Extension(int(a), int(h)) for a, h in d["extensions"]))


@dataclass(frozen=True)
class StepValues:
    """What one optimizer step uses: the learning rate, the bias update speed gamma, and the loss
    weights lambda (MTP) and alpha (sequence-wise balance)."""

    lr: float
    bias_update_speed: float
    mtp_lambda: float
    seq_aux_alpha: float

    def metrics(self) -> dict:
        return {"bias_update_speed": self.bias_update_speed, "mtp_lambda": self.mtp_lambda,
                "seq_aux_alpha": self.seq_aux_alpha}


@dataclass(frozen=True)
class TrainingSchedule:
    """All schedules of a run: ``at(step, tokens)`` gives the step's values."""

    lr: LRSchedule
    gamma: Piecewise
    mtp_lambda: Piecewise
    alpha: Piecewise
    scheduled: tuple[str, ...] = field(default=())  # which of gamma/lambda/alpha have a token schedule

    @staticmethod
    def start(cfg: Config, horizon: int | None = None) -> "TrainingSchedule":
        """The schedules of a run starting now: the lr horizon is the step where the run will end,
        ``horizon`` (the trainer's ``run_length``: train.steps, or fewer when train.max_tokens
        stops the run first), by default this run's train.steps."""
        s, m = cfg.schedules, cfg.model
        return TrainingSchedule(
            lr=LRSchedule(cfg.optim, cfg.train.steps if horizon is None else horizon),
            gamma=Piecewise.of(s.bias_update_speed, m.bias_update_speed),
            mtp_lambda=Piecewise.of(s.mtp_lambda, m.mtp_lambda),
            alpha=Piecewise.of(s.seq_aux_alpha, m.seq_aux_alpha),
            scheduled=tuple(k for k in ("bias_update_speed", "mtp_lambda", "seq_aux_alpha") if getattr(s, k).values))

    def with_lr(self, lr: LRSchedule) -> "TrainingSchedule":
        return TrainingSchedule(lr, self.gamma, self.mtp_lambda, self.alpha, self.scheduled)

    def at(self, step: int, tokens: float) -> StepValues:
        return StepValues(lr=self.lr.at(step, tokens), bias_update_speed=self.gamma.at(tokens),
                          mtp_lambda=self.mtp_lambda.at(tokens), seq_aux_alpha=self.alpha.at(tokens))
