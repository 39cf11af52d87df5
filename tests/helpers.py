"""Shared test helpers, imported as ``helpers`` (pytest puts tests/ on sys.path). The one home of
every helper two test files need; fixtures live in conftest.py.

Sections are independent; each says what it is for: numbers and configs (``rel_err``,
``LaunchSpy`` for kernel launch arguments, ``fast_config`` for dotted overrides, ``layout_config``
for parallel layouts), parallel runs against one process (``run_steps``, ``single_process``, ``rank_body``, ``stitch``, ``fit_rank``),
expert-parallel reference reductions, Hugging Face interop models
(``interop_args``, ``tiny_hf_config``, ``randomize``, ``hf_model``, ``our_model``).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

from hai_llm.config.load import load_model_args
from hai_llm.config.schema import Config, DataConfig, LoggingConfig, OptimConfig, ParallelConfig, TrainConfig
from hai_llm.model.args import ModelArgs
from hai_llm.model.transformer import build_model

if TYPE_CHECKING:  # transformers is needed only by the HF interop section
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


# =========================================================================================
# Expert-parallel reference reductions (test-only; the trainer reduces through ZeRO-1)
# =========================================================================================
# A plain all-reduce path for an expert-parallel model, against which the tests compare
# losses, gradients and norms. Gradient bookkeeping: with a loss that is the mean over W ranks
# of per-rank means, every gradient is (1/W) * sum over ranks of local gradients; a rank's
# local expert gradient already holds the contributions of every token of its EP group (the
# all-to-all backward), so dense grads are all-reduced over the batch ranks and expert grads
# only over their replicas (edp), both divided by W.


def _expert_names(model) -> dict:
    from hai_llm.parallel.expert import expert_param_slices

    return expert_param_slices(model)


@torch.no_grad()
def gather_expert_grads(model, group=None) -> dict[str, torch.Tensor]:
    """{fqn: full [E, ...] gradient} all-gathered over the EP group ``group`` (None: the world;
    collective; None grads count as zeros). These are LOCAL grads unless reduced first."""
    import torch.distributed as dist

    out = {}
    params = dict(model.named_parameters())
    for name in _expert_names(model):
        p = params[name]
        t = torch.zeros_like(p) if p.grad is None else p.grad.detach()
        n = dist.get_world_size(group)
        parts = [torch.empty_like(t) for _ in range(n)]
        if n == 1:
            parts = [t.clone()]
        else:
            dist.all_gather(parts, t.contiguous(), group=group)
        out[name] = torch.cat(parts, 0)
    return out


@torch.no_grad()
def reduce_ep_gradients(model, dense_group=None, edp_group=None, batch_world: int | None = None) -> None:
    """Local grads -> global ones for a loss that is the mean over ``batch_world`` ranks (default:
    size of ``dense_group``, None = world): dense grads all_reduce(SUM) over ``dense_group`` / W,
    expert grads all_reduce(SUM) over ``edp_group`` (None or size 1: none) / W. Collective."""
    import torch.distributed as dist

    W = batch_world or dist.get_world_size(dense_group)
    experts = _expert_names(model)
    edp_size = 1 if edp_group is None else dist.get_world_size(edp_group)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if name in experts:
            if edp_size > 1:
                dist.all_reduce(p.grad, group=edp_group)
        else:
            dist.all_reduce(p.grad, group=dense_group)
        p.grad.div_(W)


@torch.no_grad()
def grad_norm_ep(model, ep_group=None) -> torch.Tensor:
    """Global L2 norm of (already reduced) gradients: dense grads are replicated and counted
    once, the squared norms of the expert shards are summed over the EP group (collective)."""
    import torch.distributed as dist

    experts = _expert_names(model)
    dense = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros((), dtype=torch.float64)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if name in experts:
            expert += sq
        else:
            dense += sq
    if experts and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(expert, group=ep_group)
    return (dense + expert).sqrt()


def global_expert_load(local_counts_LE: torch.Tensor, group=None) -> torch.Tensor:
    """Expert load of the whole batch: all_reduce(SUM) of per-rank token counts [L, E] over the
    ranks sharing the batch (None: the world), identical on every rank."""
    import torch.distributed as dist

    load = local_counts_LE.detach().clone()
    if group is not None or dist.is_initialized():
        dist.all_reduce(load, group=group)
    return load


# =========================================================================================
# Numbers and configs
# =========================================================================================
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0/0 reads as 0): the one relative error of the suite."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class LaunchSpy:
    """Stands in for a Triton kernel object (monkeypatched over it in the kernel's module): records
    the launch arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def fast_config(out_dir: str | os.PathLike, data_path: str | os.PathLike, *overrides: str):
    """A validated Config: tiny model, seq_len 32, global_batch 4, micro_batch 2, 3 steps."""
    from hai_llm.config.load import config_dir
    from hai_llm.config.schema import Config, to_config

    base = OmegaConf.structured(Config)
    model = OmegaConf.load(config_dir() / "model" / "tiny.yaml")
    fast = OmegaConf.from_dotlist([
        f"data.path={data_path}", "data.seq_len=32",
        "train.steps=3", "train.global_batch=4", "train.micro_batch=2", "train.device=cpu",
        "train.precision=fp32", f"train.out_dir={out_dir}", "train.seed=1234",
        "optim.warmup_steps=2",
        "logging.wandb=disabled", "logging.progress=false", "logging.plot=false",
    ])
    cfg = OmegaConf.merge(base, {"model": model}, fast, OmegaConf.from_dotlist(list(overrides)))
    return to_config(cfg)


# =========================================================================================
# Parallel layouts against one process: configs, runs, gradients stitched over EP ranks
# =========================================================================================
def layout_config(data_dir: str, out_dir: str, steps: int = 3, model_overrides: list[str] | None = None,
                parallel: dict | None = None, precision: str = "fp32", global_batch: int = 8,
                micro_batch: int = 1, seq_len: int = 32) -> Config:
    return Config(
        model=load_model_args("tiny", model_overrides or []),
        data=DataConfig(path=data_dir, seq_len=seq_len),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, grad_clip=0.0),
        train=TrainConfig(steps=steps, global_batch=global_batch, micro_batch=micro_batch, seed=7, device="cpu",
                          precision=precision, out_dir=out_dir, resume=False),
        parallel=ParallelConfig(**(parallel or {})),
        logging=LoggingConfig(wandb="disabled", progress=False, plot=False),
    )


def run_steps(trainer, steps: int) -> dict:
    """Losses and grad norms of ``steps`` optimizer steps; full gradients of step 1."""
    losses, norms, grads, offsets = [], [], None, {}
    for s in range(steps):
        r = trainer.train_step()
        losses.append(r.loss)
        norms.append(r.grad_norm)
        if s == 0:
            grads = trainer.optimizer.gather_full_grads()
            offsets = trainer.optimizer.expert_row_offsets()
    return {"losses": losses, "norms": norms, "grads": grads, "offsets": offsets,
            "bias": {n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("gate.bias")}}


def single_process(cfg: Config) -> dict:
    from hai_llm.train.trainer import Trainer

    return run_steps(Trainer(cfg), cfg.train.steps)


def rank_body(rank: int, world: int, cfgs: list) -> list[dict]:
    """Run every config on this rank (one spawn, several layouts)."""
    from hai_llm.layout import build_layout
    from hai_llm.runtime.mesh import MeshRuntime
    from hai_llm.train.trainer import Trainer

    out = []
    for cfg in cfgs:
        layout = build_layout(cfg, world)
        out.append(run_steps(Trainer(cfg, runtime=MeshRuntime(cfg, layout)), cfg.train.steps))
    return out


def stitch(results: list[dict]) -> dict[str, torch.Tensor]:
    """Per-parameter gradients of a layout: dense from rank 0, experts assembled from
    the slices of every rank by their global row offsets."""
    grads = dict(results[0]["grads"])
    for r in results:
        for name, (off, rows) in r["offsets"].items():
            g = r["grads"][name]
            if grads.get(name) is None or grads[name].shape[0] != rows:
                grads[name] = torch.zeros((rows,) + tuple(g.shape[1:]))
            grads[name][off:off + g.shape[0]] = g
    return grads




def fit_rank(rank: int, world: int, cfg) -> list[float]:
    """Train ``cfg`` with its layout (resuming if out_dir has a checkpoint); losses."""
    from hai_llm.layout import build_layout
    from hai_llm.runtime.mesh import MeshRuntime
    from hai_llm.train.trainer import Trainer

    t = Trainer(cfg, runtime=MeshRuntime(cfg, build_layout(cfg, world)))
    return [r.loss for r in t.fit()]


# =========================================================================================
# Hugging Face interop: tiny configs and randomised models on both sides
# =========================================================================================
# (used by tests that need transformers; importing this section's functions needs it too)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_hf_config(q_lora_rank=48, n_mtp=0, **kw) -> "DeepseekV3Config":
    from transformers import DeepseekV3Config

    # 8 experts in 4 groups, 2 groups kept, top-2; 1 dense + 2 MoE layers; YaRN stretched 64 -> 256
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=8, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_rope_head_dim=16,
                v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=2,
                first_k_dense_replace=1, max_position_embeddings=256, rope_parameters=dict(YARN),
                num_nextn_predict_layers=n_mtp)
    base.update(kw)
    return DeepseekV3Config(**base)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Larger-than-default weights so routing is far from uniform, norms away from 1, and a small
    non-zero routing bias (0.02 randn keeps it a correction, not the whole decision)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in module.named_parameters():
        if n.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.08 * torch.randn(p.shape, generator=g))
    for n, b in module.named_buffers():
        if "e_score_correction_bias" in n or n.endswith("gate.bias"):
            b.copy_(0.02 * torch.randn(b.shape, generator=g))


def hf_model(cfg: "DeepseekV3Config", seed: int = 0) -> "DeepseekV3ForCausalLM":
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    m = DeepseekV3ForCausalLM(cfg).eval()
    randomize(m, seed)
    return m


def interop_args(**kw) -> ModelArgs:
    """A tiny ModelArgs with every feature the HF comparison exercises (groups, YaRN, MTP)."""
    base = dict(name="tiny", vocab_size=300, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1,
                n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
                n_limited_groups=2, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                v_head_dim=16, max_seq_len=256, original_seq_len=64, rope_factor=4.0, n_mtp_layers=1, init_std=0.02)
    base.update(kw)
    return ModelArgs(**base)


def our_model(args: ModelArgs, seed: int = 1):
    m = build_model(args, device="cpu", seed=seed)
    randomize(m, seed)
    return m.eval()
