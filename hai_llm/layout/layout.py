"""The layout of a run, decided once: ``build_layout(cfg, world_size) -> Layout``.

Every decision that shapes a parallel run is taken here and nowhere else: the degrees and
every rank's mesh coordinates (``ParallelDims``), the pipeline schedule object (from the one
registry, ``layout.schedules``), the stage partition (from the one partitioner,
``layout.partition``) and the micro-batch counts. The launcher validates a config with it
before any process starts, both runtimes and ``parallelize`` read it, the planner (dry run)
and the collective checker plan from it, so they cannot disagree about what a run does.

All checks live in ``build_layout`` and raise one-line ``ValueError`` s that name the config
key and the fix. Value-only checks that need no layout (``train.steps >= 1``, a known
precision...) stay in ``hai_llm.config.schema.validate_config``.

The batch of each step is decided here too: without a ramp every step runs
``train.global_batch`` sequences (``Layout.n_micro`` micro-batches per rank); with
``train.batch_ramp_tokens > 0`` the trainer asks ``Layout.batch_at(tokens consumed)`` for the
step's global batch and ``Layout.for_batch(global_batch)`` for its micro-batch split and
schedule (``layout.batch_ramp``: the ramp's formula and rounding rule). ``build_layout``
checks every batch the ramp can produce against the schedule's rules before training.

The node size is decided here too (:func:`resolve_gpus_per_node`): ``parallel.gpus_per_node``
0 means auto, i.e. torchrun's ``LOCAL_WORLD_SIZE`` under torchrun and nodes of
``DEFAULT_GPUS_PER_NODE`` otherwise; under torchrun an explicit value must equal
``LOCAL_WORLD_SIZE`` (one 8-GPU node taken for two nodes of 4 would make node-limited routing
and the hierarchical transport wrong).

Pure Python: nothing here imports torch (``ParallelDims.build_mesh`` imports it lazily).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, List, Mapping, Optional, Tuple

from .batch_ramp import BatchRamp, granularity
from .dims import ParallelDims
from .partition import partition_layers
from .schedules import PipelineSchedule, schedule_class

if TYPE_CHECKING:  # pragma: no cover
    from hai_llm.config.schema import Config

TRANSPORTS = ("flat", "hierarchical", "symmetric")  # expert all-to-all implementations (parallel.transport)
DEFAULT_GPUS_PER_NODE = 8  # an H800 server; the (virtual) node of non-torchrun runs under auto


@dataclass(frozen=True)
class Layout:
    """Everything about where a run's work sits; built (and validated) by ``build_layout``.

    ``stages[s]`` lists the global layer indices of model stage ``s``
    (``[list(range(n_layers))]`` without a pipeline); a pipeline rank holds the stages
    ``schedule.stage_of(pp_rank, chunk)`` of its local chunks (``stage_layers_of``).
    ``n_micro`` micro-batches of ``micro_batch`` sequences make the ``local_batch`` sequences
    one data-parallel rank processes per optimizer step: the values of the run's full batch
    (``train.global_batch``, the end of a ramp). ``ramp``: the batch-size ramp (None: every
    step runs the full batch); ``for_batch`` gives the layout of one step of the ramp.
    """

    dims: ParallelDims
    schedule: Optional[PipelineSchedule]  # None when pp == 1
    stages: List[List[int]]
    n_micro: int
    local_batch: int
    micro_batch: int
    transport: str
    schedule_name: str  # the registry key of parallel.schedule (validated even when pp == 1)
    ramp: Optional[BatchRamp] = None  # train.batch_ramp_*: the global batch as a function of tokens

    # ------------------------------------------------------------------ degrees
    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def sp(self) -> int:
        return self.dims.sp

    @property
    def ep(self) -> int:
        return self.dims.ep

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all data-parallel ranks."""
        return self.local_batch * self.dims.dp

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    # ------------------------------------------------------------------ per step (batch ramp)
    def batch_at(self, tokens_consumed: int) -> int:
        """Global batch (sequences) of the step that starts after ``tokens_consumed`` training
        tokens: the ramp's value (``BatchRamp.batch_at``), or the full batch without a ramp."""
        return self.global_batch if self.ramp is None else self.ramp.batch_at(tokens_consumed)

    def for_batch(self, global_batch: int) -> "Layout":
        """The layout of a step of ``global_batch`` sequences: the same ranks, stages and
        sequences per micro-batch (``micro_batch``), ``global_batch / dp / micro_batch``
        micro-batches per rank and the schedule built for that count (the rules of
        ``build_layout``; ValueError naming the fix). ``self`` for the full batch. Building a
        schedule costs O(pp * n_micro): the runtimes keep the result per batch
        (``Runtime.layout_for``), which the trainer and the pipeline runtime ask."""
        if global_batch == self.global_batch:
            return self
        cls = schedule_class(self.schedule_name)
        local, n_micro = _micro_split(global_batch, self.dp, self.micro_batch, 0)
        if self.schedule is not None:
            cls.check(self.pp, n_micro)
        return replace(self, n_micro=n_micro, local_batch=local,
                       schedule=None if self.schedule is None else cls(self.pp, n_micro))

    # ------------------------------------------------------------------ per rank
    def coords(self, rank: int) -> dict:
        """All mesh coordinates of global ``rank`` (pp, dp, sp, dp_sp, ep, edp, node, local)."""
        return self.dims.coords(rank)

    @property
    def chunks_per_rank(self) -> int:
        return 1 if self.schedule is None else self.schedule.chunks_per_rank

    def stages_of(self, pp_rank: int) -> List[int]:
        """Global stage index of each local chunk of pipeline rank ``pp_rank``."""
        if not 0 <= pp_rank < self.dims.pp:
            raise ValueError(f"pp_rank {pp_rank} out of range [0, {self.dims.pp})")
        if self.schedule is None:
            return [0]
        return [self.schedule.stage_of(pp_rank, c) for c in range(self.schedule.chunks_per_rank)]

    def stage_layers_of(self, pp_rank: int) -> List[List[int]]:
        """Global layer indices of each local chunk of pipeline rank ``pp_rank``."""
        return [list(self.stages[s]) for s in self.stages_of(pp_rank)]

    def describe(self) -> str:
        d = self.dims
        sched = "no pipeline" if self.schedule is None else \
            f"{self.schedule_name} over {self.num_stages} stages {[len(s) for s in self.stages]} layers"
        return (f"world {d.world_size}: pp={d.pp} dp={d.dp} sp={d.sp} ep={d.ep} (edp={d.edp}), {sched}, "
                f"{self.n_micro} micro-batches x {self.micro_batch} sequences per dp rank, "
                f"transport {self.transport}"
                + ("" if self.ramp is None else
                   f", batch ramp {self.ramp.start} -> {self.ramp.end} sequences over "
                   f"{self.ramp.tokens:,} tokens in multiples of {self.ramp.multiple}"))


def _degree(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"parallel.{name}={value!r} must be an integer >= 1")
    return value


def resolve_gpus_per_node(value, environ: Optional[Mapping[str, str]] = None) -> int:
    """The node size of the run from ``parallel.gpus_per_node`` (0 = auto) and the environment
    (default ``os.environ``).  Under torchrun (``LOCAL_WORLD_SIZE`` set, ``HAI_LLM_SIMULATED``
    unset) the node is what torchrun started on it: auto takes ``LOCAL_WORLD_SIZE`` and any
    other explicit value is refused.  Elsewhere (simulated ranks, one process) auto is
    ``DEFAULT_GPUS_PER_NODE`` and an explicit value makes virtual nodes of that size."""
    env = os.environ if environ is None else environ
    torchrun = "LOCAL_WORLD_SIZE" in env and not env.get("HAI_LLM_SIMULATED")
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"parallel.gpus_per_node={value!r} must be an integer >= 1, or 0 for auto")
    if not torchrun:
        return value or DEFAULT_GPUS_PER_NODE
    local = int(env["LOCAL_WORLD_SIZE"])
    if value and value != local:
        raise ValueError(f"parallel.gpus_per_node={value} but torchrun runs {local} ranks per node "
                         f"(LOCAL_WORLD_SIZE={local}): set parallel.gpus_per_node=0 (auto) or {local}")
    return local


def build_layout(cfg: "Config", world_size: int) -> Layout:
    """The validated layout of ``cfg`` on ``world_size`` ranks (``ValueError`` naming the fix)."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an integer >= 1")
    pp, dp, sp, ep = (_degree(k, getattr(p, k)) for k in ("pp", "dp", "sp", "ep"))
    gpn = resolve_gpus_per_node(p.gpus_per_node)
    if pp * dp * sp != world_size:
        fix = (f"change parallel.dp to {world_size // (pp * sp)}" if world_size % (pp * sp) == 0
               else "make the product equal the number of ranks")
        raise ValueError(f"parallel.pp={pp} x parallel.dp={dp} x parallel.sp={sp} = {pp * dp * sp} "
                         f"but the job has {world_size} ranks (parallel.nprocs or torchrun's "
                         f"WORLD_SIZE): {fix}")
    dims = ParallelDims(world_size=world_size, pp=pp, dp=dp, sp=sp, ep=ep, gpus_per_node=gpn)
    if p.transport not in TRANSPORTS:
        raise ValueError(f"parallel.transport={p.transport!r} is unknown: use one of {TRANSPORTS}")

    # -- batch: global -> per data-parallel rank -> micro-batches
    local, n_micro = _micro_split(t.global_batch, dp, t.micro_batch, p.n_micro)

    # -- the model against the degrees
    if m.n_moe_layers > 0:
        dims.check_experts(m.n_routed_experts, m.n_expert_groups)
    elif ep > 1:
        raise ValueError(f"parallel.ep={ep} but the model has no MoE layers: set parallel.ep=1")
    dims.check_seq_len(cfg.data.seq_len)

    # -- the pipeline: schedule rules, then the stage partition
    cls = schedule_class(p.schedule)
    stage_layers = list(p.stage_layers) or None
    schedule = None
    if pp > 1:
        cls.check(pp, n_micro)
        n_stages = cls.num_stages_for(pp)
        if m.n_layers < n_stages:
            why = f" ({cls.key} holds {cls.stages_per_rank} stages per rank)" if cls.stages_per_rank > 1 else ""
            max_pp = m.n_layers // cls.stages_per_rank  # largest pp this model can fill
            fix = f"lower parallel.pp to at most {max_pp} or add layers" if max_pp else "add layers"
            raise ValueError(f"model.n_layers={m.n_layers} is fewer than the {n_stages} pipeline "
                             f"stages{why}: {fix}")
        stages = partition_layers(m, n_stages, stage_layers)
        schedule = cls(pp, n_micro)
    else:
        stages = partition_layers(m, 1, stage_layers)
    ramp = _build_ramp(t, p, cls, pp, dp)
    return Layout(dims=dims, schedule=schedule, stages=stages, n_micro=n_micro, local_batch=local,
                  micro_batch=local // n_micro, transport=p.transport, schedule_name=cls.key, ramp=ramp)


def _micro_split(global_batch: int, dp: int, micro_batch: int, n_micro: int) -> Tuple[int, int]:
    """``(sequences per data-parallel rank, micro-batches per rank)`` of a global batch, with
    ``n_micro`` micro-batches (0: ``local / micro_batch``); ValueError naming the keys."""
    if global_batch < 1 or global_batch % dp:
        raise ValueError(f"train.global_batch={global_batch} must be divisible by parallel.dp={dp}")
    local = global_batch // dp
    if local % micro_batch:
        raise ValueError(f"train.global_batch / dp = {local} sequences per rank must be divisible by "
                         f"train.micro_batch={micro_batch}")
    n_micro = n_micro or local // micro_batch
    if n_micro < 1 or local % n_micro:
        raise ValueError(f"the {local} sequences per data-parallel rank do not split into "
                         f"parallel.n_micro={n_micro} equal micro-batches: choose a divisor of {local}")
    return local, n_micro


def _build_ramp(t, p, cls, pp: int, dp: int) -> Optional[BatchRamp]:
    """The validated ``BatchRamp`` of ``train.batch_ramp_*`` (None when ``batch_ramp_tokens``
    is 0): every batch it can produce is checked against this layout here, before training."""
    R, start, q = t.batch_ramp_tokens, t.batch_ramp_start, t.batch_ramp_multiple
    if R == 0:
        return None
    end, mb = t.global_batch, t.micro_batch
    if p.n_micro:
        raise ValueError(f"parallel.n_micro={p.n_micro} fixes the micro-batch count, but the batch ramp "
                         f"(train.batch_ramp_tokens={R}) changes it every step: set parallel.n_micro=0 "
                         f"(micro-batches = batch / parallel.dp / train.micro_batch)")
    if not 1 <= start <= end:
        raise ValueError(f"train.batch_ramp_start={start} must be in [1, train.global_batch={end}] "
                         f"(the ramp grows from batch_ramp_start to global_batch sequences)")
    g = granularity(dp, mb, pp > 1 and cls.even_micro)
    why = (f"parallel.dp={dp} x train.micro_batch={mb}"
           + (f" x 2 ({cls.key}: an even number of micro-batches)" if pp > 1 and cls.even_micro else ""))
    q = q or g
    if q < 1 or q % g:
        raise ValueError(f"train.batch_ramp_multiple={t.batch_ramp_multiple} must be a multiple of this "
                         f"layout's batch granularity {g} = {why} (or 0 = {g})")
    # the smallest batch the layout runs: g sequences, or the schedule's minimum micro-batch count
    least = dp * mb * cls.fit_n_micro(pp, 1) if pp > 1 else g
    lo, hi = start // q * q, -(-start // q) * q
    if start % q or start < least:
        ok = sorted({v for v in (lo, hi, -(-least // q) * q) if least <= v <= end})
        fix = (f"use train.batch_ramp_start={' or '.join(map(str, ok))}" if ok else
               f"raise train.global_batch to at least {-(-least // q) * q}")
        rule = (f"a multiple of {q} ({'train.batch_ramp_multiple' if t.batch_ramp_multiple else why})"
                + (f" and at least {least} ({cls.key} with pp={pp} needs n_micro >= "
                   f"{cls.fit_n_micro(pp, 1)} micro-batches of {mb} on each of {dp} dp ranks)" if pp > 1 else ""))
        smaller = " / ".join(k for k, v in (("train.micro_batch", mb), ("parallel.dp", dp)) if v > 1)
        raise ValueError(f"train.batch_ramp_start={start} does not fit the layout: every batch of the ramp "
                         f"must be {rule}: {fix}{', or lower ' + smaller if smaller else ''}")
    ramp = BatchRamp(start=start, end=end, tokens=R, multiple=q)
    for b in ramp.values():  # cheap class-level checks (no schedule is built)
        _, n = _micro_split(b, dp, mb, 0)
        if pp > 1:
            cls.check(pp, n)
    return ramp
