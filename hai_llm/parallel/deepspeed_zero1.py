"""DeepSpeed's ZeRO stage 1 engine as an independent reference for our ZeRO-1 (``zero.py``).

Our optimizer is hand-written; DeepSpeed's ``DeepSpeedZeroOptimizer`` (stage 1) is the
implementation most of the field trusts. This module trains the same dense model twice, side by
side on every rank of a gloo world: once with :class:`hai_llm.parallel.zero.ZeroOptimizer` and
once with ``deepspeed.initialize(..., zero_optimization.stage=1)``, from the same weights, on the
same per-rank batches, with the same AdamW hyper-parameters, gradient clipping and learning-rate
schedule, in fp32. After every step it gathers both sides' full parameters and AdamW moments and
reports their relative differences, the losses, the gradient norms, each side's optimizer-state
bytes on this rank and each side's step time (the two steps alternate, so the machine's load
hits both alike). ``tests/test_deepspeed_zero1.py`` asserts on the differences,
``benchmarks/bench_deepspeed_zero1.py`` prints the bytes and times.

The optimizer on DeepSpeed's side is ``torch.optim.AdamW`` passed as the client optimizer
(``zero_allow_untested_optimizer``): the same decoupled weight decay as ``hai_llm/optim/adamw.py``
(``p *= 1 - lr wd`` before the Adam update, eps added to the bias-corrected ``sqrt(v_hat)``),
while DeepSpeed's own ``FusedAdam(adam_w_mode=True)`` is CUDA-only and its CPU Adam is a
C++ extension built on first use. DeepSpeed's ZeRO code owns everything around the inner
update: flattening, partitioning, gradient averaging, the global norm, clipping, all-gather.
The learning rate comes from a client ``LambdaLR`` over ``hai_llm.optim.lr_at``; DeepSpeed steps
it after each optimizer step, so step ``s`` (0-based) runs at ``lr_at(s)``, as in our trainer.

What differs by design (all of it float32 rounding, none of it math):

* gradient averaging: ours reduce-scatters the SUM and multiplies by ``1/W``; DeepSpeed
  averages in its reduce path (its own bucket boundaries and summation order);
* the global norm: ours sums squares in float64 over each rank's owned slice; DeepSpeed sums
  per-partition norms in float32;
* clipping: ours multiplies by ``max_norm / (norm + 1e-6)`` when ``norm > max_norm``; DeepSpeed
  divides by ``clamp((norm + 1e-6) / max_norm, min=1)``;
* the Adam update: ours computes ``(m / bc1) / (sqrt(v / bc2) + eps)``, torch's AdamW
  ``m / (sqrt(v) / sqrt(bc2) + eps)`` times ``lr / bc1``; the moment updates themselves are the
  same operations (``lerp``, ``mul``/``addcmul``);
* partitioning: ours pads each (reduce group, decay class) bucket to ``W * ceil(n / W)``,
  DeepSpeed pads each parameter group with its alignment; both are compared after gathering.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hai_llm.config.load import load_model_args
from hai_llm.config.schema import OptimConfig
from hai_llm.model.transformer import build_model
from hai_llm.optim import lr_at, param_groups, set_lr
from hai_llm.parallel.comm import all_gather_single
from hai_llm.parallel.zero import ReduceSpec, ZeroOptimizer

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Zero1Case:
    """One side-by-side run: the model (a config made dense), the batches and the optimizer."""

    model: str = "tiny"
    # every layer dense (DeepSpeed's ZeRO knows nothing of our expert groups) and no MTP block
    model_overrides: tuple[str, ...] = ("n_dense_layers=3", "n_mtp_layers=0")
    steps: int = 4
    micro_batch: int = 2  # sequences per rank per step
    seq_len: int = 32
    seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=0.5,
        schedule="cosine", warmup_steps=2, min_lr_ratio=0.1))
    compare: bool = True  # gather and compare the full state after every step (collectives)


class LossModule(nn.Module):
    """The training loss as a module's forward: DeepSpeed's engine calls ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.model.loss(tokens_BT).loss


def dense_model(case: Zero1Case) -> nn.Module:
    """The case's model with every layer dense, initialised identically on every call."""
    args = load_model_args(case.model, list(case.model_overrides))
    if args.n_moe_layers or args.n_mtp_layers:
        raise ValueError(f"Zero1Case.model_overrides must make '{case.model}' dense: set n_dense_layers="
                         f"{args.n_layers} and n_mtp_layers=0 (got {args.n_moe_layers} MoE layers)")
    return build_model(args, device="cpu", seed=case.seed)


def rank_batch(case: Zero1Case, step: int, rank: int, vocab: int) -> torch.Tensor:
    """Tokens of ``rank`` at ``step``: windows of seq_len + 1 (inputs and shifted targets)."""
    g = torch.Generator().manual_seed(case.seed * 1_000_003 + step * 1009 + rank)
    return torch.randint(0, vocab, (case.micro_batch, case.seq_len + 1), generator=g)


# ------------------------------------------------------------------------------- ours
def build_ours(model: nn.Module, world: int, case: Zero1Case) -> ZeroOptimizer:
    """ZeroOptimizer over the whole world: every parameter in one reduce group, gradient scale
    1/W (the loss is the mean over ranks of each rank's mean, as DeepSpeed's averaging)."""
    o = case.optim
    group = dist.group.WORLD if world > 1 else None
    spec = ReduceSpec(group=group, ranks=list(range(world)), grad_scale=1.0 / world)
    return ZeroOptimizer(model, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                         moments_dtype=torch.float32, spec_of=lambda n, p: spec, world_group=group)


def ours_step(model: nn.Module, opt: ZeroOptimizer, tokens: torch.Tensor, step: int, case: Zero1Case):
    """One step in the trainer's order: backward, reduce-scatter + norm, clip, lr, AdamW, gather."""
    opt.zero_grad(set_to_none=True)
    loss = model.loss(tokens).loss
    loss.backward()
    norm = float(opt.reduce_gradients())
    opt.clip(norm, case.optim.grad_clip)
    set_lr(opt, lr_at(step, case.steps, case.optim))
    opt.step()
    return float(loss.detach()), norm


@torch.no_grad()
def full_state_ours(model: nn.Module, opt: ZeroOptimizer) -> dict[str, dict[str, torch.Tensor]]:
    """{param name: {param, exp_avg, exp_avg_sq}} in full, all-gathered from the shards."""
    out = {n: {"param": p.detach().clone()} for n, p in model.named_parameters()}
    for b in opt.buckets:
        st = opt.inner.state[b.master]
        for key in ("exp_avg", "exp_avg_sq"):
            full = st[key]
            if b.spec.group is not None and b.world > 1:
                full = torch.empty(b.shard * b.world, dtype=st[key].dtype)
                all_gather_single(full, st[key].contiguous(), group=b.spec.group)
            for n, p, o in zip(b.names, b.params, b.offsets):
                out[n][key] = full[o:o + p.numel()].view_as(p).clone()
    return out


# ---------------------------------------------------------------------------- DeepSpeed
def build_deepspeed(model: nn.Module, case: Zero1Case):
    """``deepspeed.initialize`` with ZeRO stage 1, fp32, our clipping and schedule. The process
    group must exist already (gloo ranks of ``hai_llm.parallel.spawn.run_ranks``)."""
    import deepspeed
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    # both sides on the CPU of this gloo rank, also on a CUDA host: DeepSpeed would otherwise pick
    # its CUDA accelerator and move its copy of the model to cuda:LOCAL_RANK.  DeepSpeed's own API
    # for choosing the accelerator in code (no DS_ACCELERATOR written into the process env)
    set_accelerator(CPU_Accelerator())
    o = case.optim
    # no decay on vectors (norm weights), as ours: the same split as hai_llm.optim.param_groups
    inner = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                              weight_decay=o.weight_decay, foreach=False)
    config = {
        "train_micro_batch_size_per_gpu": case.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW as the client optimizer
        "steps_per_print": 1 << 30,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }

    def schedule(optimizer):
        # LambdaLR multiplies the groups' initial lr (o.lr) by this factor; stepped by the engine
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, case.steps, o) / o.lr)

    engine, _, _, _ = deepspeed.initialize(model=LossModule(model), optimizer=inner, lr_scheduler=schedule,
                                           config=config, dist_init_required=False)
    return engine


def deepspeed_step(engine, tokens: torch.Tensor):
    loss = engine(tokens)
    engine.backward(loss)
    engine.step()
    return float(loss.detach()), float(engine.get_global_grad_norm())


@torch.no_grad()
def full_state_deepspeed(engine) -> dict[str, dict[str, torch.Tensor]]:
    """{param name (our model's): {param, exp_avg, exp_avg_sq}} gathered by DeepSpeed's own
    helpers (collectives: every rank calls them in the same order). ``param`` is the fp32
    master copy, which is also what the all-gather wrote into the module.

    DeepSpeed links each parameter to its slices of the optimizer state once, right after the
    first group's first step; torch's AdamW creates a group's state at that group's first step,
    so every group after the first would stay unlinked (``exp_avg not found in optimizer state
    fragment``, DeepSpeed 0.19.8). Linking again with DeepSpeed's own helper, once the state
    exists, makes ``safe_get_full_optimizer_state`` see every group."""
    from deepspeed.utils import (lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param,
                                 safe_get_full_optimizer_state)

    zopt = engine.optimizer
    for lp_params, flat in zip(zopt.bit16_groups, zopt.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(lp_params, flat, zopt.optimizer.state)
    out = {}
    for n, p in engine.module.model.named_parameters():
        out[n] = {"param": safe_get_full_fp32_param(p).clone(),
                  "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                  "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
    return out


def deepspeed_state_bytes(engine) -> int:
    """Bytes of this rank's optimizer state: the fp32 master partitions and both moments."""
    zopt = engine.optimizer
    total = 0
    for part in zopt.single_partition_of_fp32_groups:
        total += part.numel() * part.element_size()
        st = zopt.optimizer.state.get(part, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                total += st[key].numel() * st[key].element_size()
    return total


# ----------------------------------------------------------------------------- the run
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0/0 reads as 0)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_states(ours: dict, ref: dict) -> dict[str, float]:
    """Per state key, the largest relative difference over parameters, and the worst name."""
    out = {}
    for key in STATE_KEYS:
        errs = {n: _rel(ours[n][key], ref[n][key]) for n in ref}
        worst = max(errs, key=errs.get)
        out[key], out[key + "_worst"] = errs[worst], worst
    return out


def compare_rank(rank: int, world: int, case: Zero1Case) -> dict:
    """Body of one rank (``run_ranks``): both optimizers, step by step. Returns per-step losses,
    norms and state differences, each side's state bytes and step times (seconds)."""
    model_ours, model_ds = dense_model(case), dense_model(case)
    opt = build_ours(model_ours, world, case)
    engine = build_deepspeed(model_ds, case)
    vocab = model_ours.args.vocab_size
    rows: list[dict] = []
    for step in range(case.steps):
        tokens = rank_batch(case, step, rank, vocab)
        t0 = time.perf_counter()
        loss_o, norm_o = ours_step(model_ours, opt, tokens, step, case)
        t1 = time.perf_counter()
        lr_ds = engine.optimizer.param_groups[0]["lr"]  # the scheduler steps inside engine.step()
        loss_d, norm_d = deepspeed_step(engine, tokens)
        t2 = time.perf_counter()
        row = {"step": step, "loss_ours": loss_o, "loss_ds": loss_d, "norm_ours": norm_o, "norm_ds": norm_d,
               "time_ours": t1 - t0, "time_ds": t2 - t1, "lr_ours": opt.param_groups[0]["lr"],
               "lr_ds": lr_ds}
        if case.compare:
            row.update(compare_states(full_state_ours(model_ours, opt), full_state_deepspeed(engine)))
        rows.append(row)
    return {"rows": rows, "bytes_ours": opt.state_bytes(), "bytes_ds": deepspeed_state_bytes(engine),
            "n_params": sum(p.numel() for p in model_ours.parameters())}
