"""Typed configuration schema of a hai-llm run, registered with Hydra's ConfigStore.

The YAML files in ``configs/`` only supply values: every key must exist in these
dataclasses, so a misspelt key fails at start-up with Hydra's own message instead of
being silently ignored. The resolved config of each run is saved next to its outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from hai_llm.model.args import ModelArgs


@dataclass
class DataConfig:
    # a folder made by `hai-llm-prepare`; empty = prepare `sources` (or the embedded
    # default: the Python standard library's own source files) into `cache_dir`
    path: str = ""
    sources: list[str] = field(default_factory=list)
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    pattern: str = "*.py"
    text_field: str = "text"
    max_bytes: int = 4_000_000
    cache_dir: str = "data_cache"
    seq_len: int = 128


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # "constant": warmup then constant; "cosine": warmup then cosine to min_lr_ratio*lr;
    # "deepseek": warmup, constant until decay_start, cosine to min_lr_ratio*lr (the paper)
    schedule: str = "cosine"
    warmup_steps: int = 10
    decay_start: float = 0.8  # fraction of train.steps where "deepseek" starts decaying
    min_lr_ratio: float = 0.1
    moments_dtype: str = "float32"  # float32 | bfloat16 (AdamW moments, as the paper)
    # "deepseek_v3": the paper's schedule in tokens consumed (docs/training_recipe.md): warmup
    # over warmup_steps, lr until decay_start_tokens, cosine to min_lr_ratio*lr over
    # decay_tokens, that floor until final_start_tokens, then final_lr (final_start_tokens 0: none)
    decay_start_tokens: float = 0.0
    decay_tokens: float = 0.0
    final_start_tokens: float = 0.0
    final_lr: float = 0.0
    # the step schedules (cosine, deepseek) end at the train.steps of the run's start (kept in
    # its checkpoints); resuming with a larger train.steps keeps that end (the extra steps run
    # at the floor lr) unless this is true: then the rest of the schedule is stretched to end
    # at the new train.steps, continuing from the current lr (no jump)
    extend_schedule: bool = False


@dataclass
class TrainConfig:
    steps: int = 100
    # stop at the first step whose tokens consumed (global_batch x data.seq_len per step, the
    # batch-size ramp included) reach this many; 0 = off, train.steps alone ends the run. With
    # both set the run ends at whichever comes first, and the step lr schedules (cosine,
    # deepseek) end where the run does (hai_llm/train/trainer.py: run_length)
    max_tokens: float = 0.0
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 4  # sequences per forward/backward on one rank
    # batch-size ramp (DeepSeek-V3: 3072 -> 15360 sequences over the first 469B tokens): the
    # global batch grows linearly in tokens consumed from batch_ramp_start to global_batch over
    # batch_ramp_tokens tokens, rounded down to a multiple of batch_ramp_multiple (0 = the
    # layout's granularity, dp * micro_batch (x2 for DualPipe)); batch_ramp_tokens 0 = no ramp.
    # Rules and rounding: hai_llm/layout/batch_ramp.py, docs/batch_ramp.md
    batch_ramp_start: int = 0
    batch_ramp_tokens: int = 0
    batch_ramp_multiple: int = 0
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp8; on CUDA fp32 matmuls may use TF32
    precision: str = "auto"
    # "" = Hydra's output folder of this run (runs/<model>/<time>, or multirun/<time>/<job>
    # in a sweep); set it to an existing run folder to resume that run
    out_dir: str = ""
    ckpt_every: int = 0  # 0 = only at the end
    keep_ckpts: int = 2  # how many of the newest checkpoints to keep; 0 = keep every one
    resume: bool = True  # continue from the latest checkpoint in out_dir if there is one
    # load a legacy (pickle-based DCP) checkpoint whose .metadata names classes outside the
    # allow-list with full pickle, i.e. run any code it holds: only for checkpoints you wrote
    # (hai_llm/checkpoint/safe_load.py, docs/failures.md)
    trust_checkpoint: bool = False
    max_bad_steps: int = 3  # stop after this many consecutive non-finite steps
    ema_decay: float = 0.0  # 0 disables the CPU-side EMA of the parameters
    bias_update: bool = True  # aux-loss-free expert bias step after each optimizer step
    # start a NEW run (nothing to resume in out_dir) from another run's checkpoint: a step_*
    # folder, a checkpoints/ folder or a run folder (its latest); weights and routing biases,
    # plus the optimizer state with init_optimizer. The context-extension stages use it.
    init_from: str = ""
    init_optimizer: bool = False
    # validation loss every eval_every steps (and at the last step) over eval_batches held-out
    # batches of global_batch sequences: the corpus tail those windows cover is never trained
    # on (hai_llm/data/heldout.py); 0 = off, nothing held out
    eval_every: int = 0
    eval_batches: int = 4


@dataclass
class ValueSchedule:
    """A value that is piecewise constant in tokens consumed: ``values[i]`` while tokens <
    ``until_tokens[i]``, the last value after; empty ``values``: the model config's constant."""
    values: list[float] = field(default_factory=list)
    until_tokens: list[float] = field(default_factory=list)


@dataclass
class ScheduleConfig:
    """Token schedules of the model's training constants (the paper's recipe, §4.2)."""
    bias_update_speed: ValueSchedule = field(default_factory=ValueSchedule)  # gamma (model.bias_update_speed)
    mtp_lambda: ValueSchedule = field(default_factory=ValueSchedule)  # lambda (model.mtp_lambda)
    seq_aux_alpha: ValueSchedule = field(default_factory=ValueSchedule)  # alpha (model.seq_aux_alpha)


@dataclass
class ParallelConfig:
    nprocs: int = 1  # ranks simulated on this machine (gloo, CPU); 1 = run in-process
    pp: int = 1
    dp: int = 1
    sp: int = 1
    ep: int = 1
    # ranks per node; 0 = auto: torchrun's LOCAL_WORLD_SIZE under torchrun (an explicit value
    # must equal it there), else 8; set it for virtual nodes of simulated ranks
    gpus_per_node: int = 0
    schedule: str = "1f1b"  # pipeline schedule: 1f1b | zb1p | dualpipe | dualpipev (hai_llm.layout.schedules)
    n_micro: int = 0  # micro-batches per step per dp rank (0 = global_batch / dp / micro_batch)
    stage_layers: list[int] = field(default_factory=list)  # layers per stage; [] = balanced by cost
    overlap: bool = True  # DualPipe: interleave paired F&B chunks (False: F then B, for comparison)
    trace_dir: str = ""  # write per-rank chrome traces and a Gantt PNG of the pipeline here
    # expert all-to-all: flat | hierarchical (node-aware, DeepEP-style) | symmetric (hierarchical across
    # nodes, kernels writing into peers' symmetric-memory buffers inside a node)
    transport: str = "flat"
    # symmetric transport sizing (docs/expert_parallel.md "Tunables"): CUDA bytes per exchange slot
    # and rank in MiB (fixed; a DeepSeek-V3 layer's dispatch needs ~240: set 256), exchanges in
    # flight per rank, programs per kernel launch (0 = one per row block; the report uses 20 SMs)
    symm_slot_mb: int = 64
    symm_slots: int = 8
    symm_programs: int = 0
    # seconds one collective (and each set-up step: store, rendezvous, init) may wait before the
    # rank reports its last collectives and the job stops (hai_llm.parallel.watchdog)
    collective_timeout_s: float = 600.0


WANDB_MODES = ("offline", "online", "disabled")  # logging.wandb (wandb.init's mode)


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # WANDB_MODES: offline | online | disabled
    project: str = "hai-llm"
    log_every: int = 1
    progress: bool = True
    plot: bool = True


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedules: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    """Register the schema; idempotent (ConfigStore overwrites the same names)."""
    cs = ConfigStore.instance()
    cs.store(name="hai_llm_schema", node=Config)


def to_config(cfg: Any) -> Config:
    """A validated ``Config`` object (runs ModelArgs' checks) from an OmegaConf node."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    validate_config(obj)
    return obj


def validate_config(cfg: Config) -> None:
    """Value checks that need no layout; ``hai_llm.layout.build_layout`` checks the rest."""
    t, o = cfg.train, cfg.optim

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    need(t.micro_batch >= 1, f"train.micro_batch must be >= 1, got {t.micro_batch}")
    need(t.batch_ramp_tokens >= 0, f"train.batch_ramp_tokens must be >= 0 (0 = no ramp), got {t.batch_ramp_tokens}")
    need(t.batch_ramp_multiple >= 0,
         f"train.batch_ramp_multiple must be >= 0 (0 = the layout's granularity), got {t.batch_ramp_multiple}")
    need(t.batch_ramp_tokens == 0 or t.batch_ramp_start >= 1,
         f"train.batch_ramp_start must be >= 1 sequences when train.batch_ramp_tokens > 0, got {t.batch_ramp_start}")
    need(t.batch_ramp_tokens > 0 or (t.batch_ramp_start == 0 and t.batch_ramp_multiple == 0),
         f"train.batch_ramp_start={t.batch_ramp_start} / train.batch_ramp_multiple={t.batch_ramp_multiple} are set "
         f"but train.batch_ramp_tokens=0 (no ramp): set train.batch_ramp_tokens > 0 to ramp, or drop them")
    need(t.max_tokens >= 0, f"train.max_tokens must be >= 0 (0 = off: train.steps ends the run), got {t.max_tokens}")
    need(not t.init_optimizer or bool(t.init_from),
         "train.init_optimizer=true needs train.init_from (the checkpoint whose optimizer state to load): set "
         "train.init_from or drop train.init_optimizer")
    need(t.bias_update or not any(cfg.schedules.bias_update_speed.values),
         f"schedules.bias_update_speed={list(cfg.schedules.bias_update_speed.values)} has no effect with "
         f"train.bias_update=false: set schedules.bias_update_speed.values=[] or drop train.bias_update=false")
    need(t.precision in ("auto", "fp32", "bf16", "fp8"),
         f"train.precision must be fp32 | bf16 | fp8, got '{t.precision}' (or auto: bf16 on CUDA, fp32 on CPU)")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto | cpu | cuda, got '{t.device}'")
    need(cfg.parallel.collective_timeout_s > 0, f"parallel.collective_timeout_s must be > 0 seconds (the "
         f"longest one collective or set-up step may wait), got {cfg.parallel.collective_timeout_s}")
    need(cfg.parallel.symm_slot_mb >= 1, f"parallel.symm_slot_mb must be >= 1 (MiB per symmetric exchange slot "
         f"and rank; ~240 for a DeepSeek-V3 layer), got {cfg.parallel.symm_slot_mb}")
    need(cfg.parallel.symm_slots >= 2, f"parallel.symm_slots must be >= 2 (symmetric exchanges in flight per "
         f"rank), got {cfg.parallel.symm_slots}")
    need(cfg.parallel.symm_programs >= 0, f"parallel.symm_programs must be >= 0 (programs per symmetric kernel "
         f"launch, 0 = one per row block), got {cfg.parallel.symm_programs}")
    need(o.schedule in ("constant", "cosine", "deepseek", "deepseek_v3"),
         f"optim.schedule must be constant | cosine | deepseek | deepseek_v3, got '{o.schedule}'")
    if o.schedule == "deepseek_v3":
        need(o.decay_start_tokens >= 0 and o.decay_tokens > 0,
             f"optim.schedule=deepseek_v3 needs optim.decay_start_tokens >= 0 and optim.decay_tokens > 0 "
             f"(the paper: 10e12 and 4.3e12), got {o.decay_start_tokens} and {o.decay_tokens}")
        need(o.final_start_tokens == 0 or o.final_start_tokens >= o.decay_start_tokens + o.decay_tokens,
             f"optim.final_start_tokens={o.final_start_tokens} must be 0 (no final stretch) or >= "
             f"optim.decay_start_tokens + optim.decay_tokens = {o.decay_start_tokens + o.decay_tokens}")
        need(o.final_start_tokens == 0 or o.final_lr > 0,
             f"optim.final_lr must be > 0 when optim.final_start_tokens={o.final_start_tokens} (the lr of the "
             f"last stretch; the paper: 7.3e-6), got {o.final_lr}: set it, or optim.final_start_tokens=0")
    for key in ("bias_update_speed", "mtp_lambda", "seq_aux_alpha"):
        vs = getattr(cfg.schedules, key)
        need(not vs.values or len(vs.values) == len(vs.until_tokens) + 1,
             f"schedules.{key}: values needs one more entry than until_tokens (the value after the last "
             f"boundary), got {len(vs.values)} values and {len(vs.until_tokens)} boundaries")
        need(not vs.until_tokens or bool(vs.values), f"schedules.{key}.until_tokens is set but values is empty")
        need(all(v >= 0 for v in vs.values), f"schedules.{key}.values must be >= 0, got {list(vs.values)}")
        need(all(a < b for a, b in zip([0.0] + list(vs.until_tokens), vs.until_tokens)),
             f"schedules.{key}.until_tokens must be positive and increasing, got {list(vs.until_tokens)}")
    need(cfg.model.routing_bias or not any(cfg.schedules.bias_update_speed.values),
         f"schedules.bias_update_speed must be 0 with model.topk_method='{cfg.model.topk_method}' (no routing "
         f"bias to update), got {list(cfg.schedules.bias_update_speed.values)}")
    need(o.moments_dtype in ("float32", "bfloat16"), f"optim.moments_dtype must be float32 | bfloat16")
    need(t.eval_every >= 0, f"train.eval_every must be >= 0 (0 = no validation), got {t.eval_every}")
    need(t.eval_every == 0 or t.eval_batches >= 1,
         f"train.eval_batches must be >= 1 when train.eval_every > 0, got {t.eval_batches}")
    need(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}: set e.g. optim.lr=3e-3")
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0 (0 = no warmup), got {o.warmup_steps}")
    need(t.ckpt_every >= 0, f"train.ckpt_every must be >= 0 (0 = checkpoint only at the end), got {t.ckpt_every}")
    need(t.keep_ckpts >= 0, f"train.keep_ckpts must be >= 1 (checkpoints kept) or 0 (keep all), got {t.keep_ckpts}")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1 (non-finite steps in a row that stop the run), "
                               f"got {t.max_bad_steps}")
    need(cfg.logging.log_every >= 1, f"logging.log_every must be >= 1 (log every N steps), got {cfg.logging.log_every}")
    need(cfg.logging.wandb in WANDB_MODES,
         f"logging.wandb must be {' | '.join(WANDB_MODES)}, got '{cfg.logging.wandb}'")
    need(cfg.data.seq_len <= cfg.model.max_seq_len,
         f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    # everything that depends on the layout (degrees, batch splits, schedule, stages) is
    # checked by hai_llm.layout.build_layout, which knows the world size
