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


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 4  # sequences per forward/backward on one rank
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp8; on CUDA fp32 matmuls may use TF32
    precision: str = "auto"
    # "" = Hydra's output folder of this run (runs/<model>/<time>, or multirun/<time>/<job>
    # in a sweep); set it to an existing run folder to resume that run
    out_dir: str = ""
    ckpt_every: int = 0  # 0 = only at the end
    keep_ckpts: int = 2
    resume: bool = True  # continue from the latest checkpoint in out_dir if there is one
    max_bad_steps: int = 3  # stop after this many consecutive non-finite steps
    ema_decay: float = 0.0  # 0 disables the CPU-side EMA of the parameters
    bias_update: bool = True  # aux-loss-free expert bias step after each optimizer step


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
    transport: str = "flat"  # expert all-to-all: flat | hierarchical (node-aware, DeepEP-style)


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "hai-llm"
    log_every: int = 1
    progress: bool = True
    plot: bool = True


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
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
    need(t.precision in ("auto", "fp32", "bf16", "fp8"),
         f"train.precision must be fp32 | bf16 | fp8, got '{t.precision}' (or auto: bf16 on CUDA, fp32 on CPU)")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto | cpu | cuda, got '{t.device}'")
    need(o.schedule in ("constant", "cosine", "deepseek"),
         f"optim.schedule must be constant | cosine | deepseek, got '{o.schedule}'")
    need(o.moments_dtype in ("float32", "bfloat16"), f"optim.moments_dtype must be float32 | bfloat16")
    need(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    need(cfg.data.seq_len <= cfg.model.max_seq_len,
         f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    # everything that depends on the layout (degrees, batch splits, schedule, stages) is
    # checked by hai_llm.layout.build_layout, which knows the world size
