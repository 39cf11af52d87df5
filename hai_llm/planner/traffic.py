"""What a rank sends per training step, by group and link.

Bytes this rank sends; ring algorithms, so a reduce-scatter or an all-gather of B bytes over
n ranks sends (n-1)/n * B and an all-reduce 2 (n-1)/n * B:

* ZeRO-1 reduce-scatter of fp32 gradients and all-gather of fp32 parameters over ``dp_sp``
  (dense) and ``edp`` (experts), over the union of both copies' groups under DualPipe (every
  stage lives on two ranks); without ZeRO-1 an all-reduce of the gradients;
* the tied embedding's reduce-scatter and all-gather over both ends' groups (1F1B/ZB1P with
  MTP);
* the EP all-to-all per micro-batch per MoE layer (forward dispatch FP8 + backward
  combine-gradient FP8, forward combine BF16 + backward dispatch-gradient BF16) split into
  InfiniBand and NVLink copies by ``ep_traffic`` (node-limited, DeepEP-style routing);
* the pipeline send of activations (forward) and activation gradients (backward),
  T * dim * 2 bytes each;
* the sequence-parallel all-gather of the 576-number MLA latent per attention layer (and the
  reduce-scatter of its gradient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hai_llm.layout.dims import ParallelDims
from hai_llm.model.args import ModelArgs

from .activations import FP8_TILE, SCALE_BYTES


@dataclass
class CommItem:
    name: str
    group: str  # dp_sp | edp (x2 under DualPipe) | ep | pp | sp | embed
    link: str  # "IB" | "NVLink" | "mixed"
    op: str
    bytes_per_step: float
    detail: str = ""


def _distinct_targets(n_gpus: int, per_gpu: int, k: float) -> float:
    """Expected number of distinct GPUs hit when k experts are drawn uniformly without
    replacement from n_gpus * per_gpu experts (per_gpu on each GPU); k may be fractional
    (linear interpolation between floor and ceil)."""
    total = n_gpus * per_gpu

    def exact(kk: int) -> float:
        kk = max(0, min(kk, total))
        miss = math.comb(total - per_gpu, kk) / math.comb(total, kk) if kk <= total - per_gpu else 0.0
        return n_gpus * (1.0 - miss)

    lo = math.floor(k)
    frac = k - lo
    return exact(lo) if frac == 0 else (1 - frac) * exact(lo) + frac * exact(lo + 1)


def ep_traffic(args: ModelArgs, dims: ParallelDims) -> dict[str, float]:
    """Expected copies of one token's hidden state that leave its GPU in one dispatch.

    DeepEP-style node-limited routing (docs/deepseek_v3.md#all-to-all), balanced uniform routing:

    * EP group on one node (``ep <= gpus_per_node``): the token goes once to every distinct GPU
      hosting one of its K experts, d = ep * (1 - C(E - e, K) / C(E, K)) with e = E / ep experts
      per GPU; the copies that are its own GPU (d / ep of them) stay local. IB = 0.
    * EP group on N = ep / gpus_per_node nodes, one expert group per node, each token limited to
      M = n_limited_groups nodes, K / M experts on each: one IB copy per selected remote node,
      ``ib = M (1 - 1/N)`` (own node selected with probability M/N); on each selected node the
      copy is forwarded over NVLink to the d = g (1 - C(E_node - e, K/M) / C(E_node, K/M))
      distinct target GPUs other than the entry GPU, ``nvlink = M d (1 - 1/g)`` (g GPUs/node).

    ``naive`` is what a per-expert all_to_all_single moves (K (1 - 1/ep) copies, no dedup), of
    which ``naive_cross_node`` cross nodes. Combine moves the same copies back (partial sums
    are reduced on the forwarding GPU before crossing IB).
    """
    E, K, ep, g = args.n_routed_experts, args.n_activated_experts, dims.ep, dims.gpus_per_node
    out = {"ib": 0.0, "nvlink": 0.0, "naive": 0.0, "naive_cross_node": 0.0, "nodes": 1,
           "nodes_per_token": 1.0}
    if ep == 1 or args.n_moe_layers == 0:
        return out
    per_gpu = E // ep
    out["naive"] = K * (1 - 1 / ep)
    n_nodes = dims.nodes_per_ep_group if ep > g and dims.world_size >= g else 1
    out["nodes"] = n_nodes
    if n_nodes == 1:
        d = _distinct_targets(ep, per_gpu, K)
        out["nvlink"] = d * (1 - 1 / ep)
        return out
    M = min(args.n_limited_groups, n_nodes) if args.n_expert_groups == n_nodes else n_nodes
    d = _distinct_targets(g, per_gpu, K / M)
    out["nodes_per_token"] = float(M)
    out["ib"] = M * (1 - 1 / n_nodes)
    out["nvlink"] = M * d * (1 - 1 / g)
    out["naive_cross_node"] = K * (1 - g / ep)
    return out


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def shard_size(params: int, n: int) -> int:
    """Elements of a ZeRO-1 shard of ``params`` over ``n`` ranks."""
    return -(-params // n)  # ZeRO pads to a multiple of n


def rank_comm(args: ModelArgs, dims: ParallelDims, *, dense: int, expert: int, zero1: bool,
              pair: bool, shared_embed: int, mb_moe: int, mb_attn: int, pp_sends: int, T: int,
              fp8: bool, ept: dict[str, float]) -> list[CommItem]:
    """Everything one pipeline rank sends in one step.

    ``dense`` / ``expert``: parameters it holds (experts already / ep); ``pair``: DualPipe, its
    stages also live on rank pp-1-r; ``shared_embed``: parameters of an embedding copy it keeps
    for MTP (0: none); ``mb_moe`` / ``mb_attn``: micro-batch x MoE-layer (attention-layer)
    passes; ``pp_sends``: activation and gradient sends to other pipeline ranks; ``T``: tokens
    per micro-batch; ``ept``: ``ep_traffic``.
    """
    # DualPipe: every parameter lives on ranks r and pp-1-r, and ZeRO-1 reduce-scatters and
    # all-gathers it over the UNION of both copies' groups (hai_llm.runtime.pipeline), so the
    # groups are twice as large and no separate pair reduction exists
    copies = 2 if pair else 1
    n_d, n_e, D = copies * dims.stage_size, copies * dims.edp, args.dim
    tag = ", both DualPipe copies" if pair else ""
    b_disp = 1.0 + SCALE_BYTES / FP8_TILE if fp8 else 2.0  # FP8 E4M3 + an fp32 scale per 1x128 tile
    comm: list[CommItem] = []
    if zero1:  # the trainer keeps fp32 parameters: both directions move fp32
        comm += [
            CommItem("dense grad reduce-scatter", "dp_sp", "mixed", "reduce_scatter fp32",
                     _ring(n_d) * 4 * shard_size(dense, n_d) * n_d, f"(n-1)/n * 4 B * P_dense, n={n_d}{tag}"),
            CommItem("dense param all-gather", "dp_sp", "mixed", "all_gather fp32",
                     _ring(n_d) * 4 * shard_size(dense, n_d) * n_d, f"(n-1)/n * 4 B * P_dense, n={n_d}{tag}"),
            CommItem("expert grad reduce-scatter", "edp", "mixed", "reduce_scatter fp32",
                     _ring(n_e) * 4 * shard_size(expert, n_e) * n_e, f"(n-1)/n * 4 B * P_expert, n={n_e}{tag}"),
            CommItem("expert param all-gather", "edp", "mixed", "all_gather fp32",
                     _ring(n_e) * 4 * shard_size(expert, n_e) * n_e, f"(n-1)/n * 4 B * P_expert, n={n_e}{tag}"),
        ]
    else:
        comm += [
            CommItem("dense grad all-reduce", "dp_sp", "mixed", "all_reduce fp32",
                     2 * _ring(n_d) * 4 * dense, f"2(n-1)/n * 4 B * P_dense, n={n_d}{tag}"),
            CommItem("expert grad all-reduce", "edp", "mixed", "all_reduce fp32",
                     2 * _ring(n_e) * 4 * expert, f"2(n-1)/n * 4 B * P_expert, n={n_e}{tag}"),
        ]
    if shared_embed:  # 1F1B/ZB1P with MTP: the embedding copy is reduced over both ends' groups
        n_t = 2 * dims.stage_size
        comm.append(CommItem("tied embedding reduce-scatter + all-gather", "embed", "IB",
                             "reduce_scatter + all_gather fp32",
                             2 * _ring(n_t) * 4 * shard_size(shared_embed, n_t) * n_t,
                             f"stage 0 and the MTP stage: 2 x (n-1)/n * 4 B * P_embed, n={n_t}"))
    for link in ("ib", "nvlink"):
        if ept[link] > 0:
            L = "IB" if link == "ib" else "NVLink"
            comm.append(CommItem(f"EP dispatch ({L})", "ep", L, "all_to_all FP8" if fp8 else "all_to_all bf16",
                                 2 * mb_moe * T * D * ept[link] * b_disp,
                                 f"fwd dispatch + bwd combine-grad: {mb_moe} micro-batch x MoE-layer "
                                 f"x T={T} x D={D} x {ept[link]:.3f} copies x {b_disp:.4g} B"))
            comm.append(CommItem(f"EP combine ({L})", "ep", L, "all_to_all bf16",
                                 2 * mb_moe * T * D * ept[link] * 2.0,
                                 f"fwd combine + bwd dispatch-grad: {mb_moe} x T x D x "
                                 f"{ept[link]:.3f} copies x 2 B"))
    if pp_sends:
        comm.append(CommItem("PP send act/grad", "pp", "IB", "send bf16", pp_sends * T * D * 2.0,
                             f"{pp_sends} sends x T x D x 2 B"))
    if dims.sp > 1:
        lat = args.kv_lora_rank + args.qk_rope_head_dim
        comm.append(CommItem("SP latent all-gather + grad reduce-scatter", "sp", "NVLink",
                             "all_gather bf16", 2 * mb_attn * (dims.sp - 1) * T * lat * 2.0,
                             f"2 x {mb_attn} micro-batch x attn-layer x (sp-1) x T x {lat} x 2 B"))
    return comm
