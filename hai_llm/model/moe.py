"""DeepSeekMoE, single device: the sigmoid gate with group-limited routing and a
routing-only bias (V3; the softmax gate of DeepSeek-V2 without bias as well), fine-grained
routed experts run as one grouped GEMM (any sizes: operands zero-padded to the kernel's stride
alignment), shared experts, the complementary sequence-wise balance loss and the
auxiliary-loss-free bias update.

Expert weights are stacked ([E, out, in] per projection) so that a grouped GEMM, FP8
block quantization and expert parallelism (a slice along E) all see one tensor; the
checkpoint rename table splits or fuses them for DeepSeek's and Hugging Face's layouts.

Routing statistics (per-expert token counts and the balance loss of the last forward)
are kept on the module and collected by the trainer / pipeline stage after each
forward: ``pop_stats``. That keeps the model free of process groups and lets a pipeline
stage add the balance loss of exactly the layers it owns to its own backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .layers import MLP


class Gate(nn.Module):
    """Router: scores = sigmoid(x W^T) (V3) or softmax(x W^T) (V2) in fp32; the bias (V3 only,
    zero otherwise) only for choosing experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        # not a Parameter: updated by +-gamma after each optimizer step, never by gradients
        self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x_TD.float(), self.weight.float())
        return logits.sigmoid() if self.args.score_func == "sigmoid" else logits.softmax(-1)

    def route(self, scores_TE: torch.Tensor):
        """(weights [T,K] fp32, expert ids [T,K]) from unbiased scores [T,E]."""
        T, E = scores_TE.shape
        choice = scores_TE.detach() + self.bias
        if self.n_groups > 1:
            grouped = choice.view(T, self.n_groups, E // self.n_groups)
            # a group is worth the sum of its two best (biased) experts (V3's noaux_tc) or its
            # best expert (V2's group_limited_greedy: the max of the group's softmax scores)
            best = 2 if self.args.topk_method == "noaux_tc" else 1
            group_score = grouped.topk(min(best, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = group_score.topk(self.topk_groups, dim=-1).indices
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        idx = choice.topk(self.topk, dim=-1).indices
        weights = scores_TE.gather(1, idx)
        if self.args.norm_topk_prob:  # V3; V2 keeps the raw softmax scores (norm_topk_prob=False)
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.args.route_scale, idx

    def forward(self, x_TD: torch.Tensor):
        s = self.scores(x_TD)
        w, idx = self.route(s)
        return w, idx, s

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        self.bias.zero_()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: the CPU kernel of
    grouped_mm's backward rejects expanded gradients (e.g. from ``y.sum()``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


# torch's grouped-GEMM kernels (CPU and CUDA) need every stride of their operands to span a
# multiple of 16 bytes: 4 fp32 or 8 bf16/fp16 elements
_GROUPED_ALIGN_BYTES = 16


def grouped_aligned(n: int, dtype: torch.dtype) -> int:
    """``n`` rounded up to the grouped kernel's stride alignment for ``dtype``."""
    per = max(1, _GROUPED_ALIGN_BYTES // dtype.itemsize)
    return -(-n // per) * per


def pad_columns(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with zero columns appended to its last dimension up to ``n`` (itself if already n)."""
    return t if t.shape[-1] == n else F.pad(t, (0, n - t.shape[-1]))


def grouped_operands(x_RI: torch.Tensor, w_EOI: torch.Tensor):
    """``(x, w, kernel)``: the operands a grouped GEMM of ``x`` and ``w`` runs on, and torch's
    grouped-GEMM kernel for them (None: the zero-padded bmm path).

    torch's grouped GEMM is a custom op without an autocast rule, so the cast autocast would
    apply to a matmul is applied here by hand: under CUDA autocast both operands go to the
    autocast dtype (the sm90 fast path needs bf16 inputs; fp32 operands would send it to a
    per-expert fallback). Outside autocast the dtypes are kept: fp32/bf16/fp16 use the grouped
    kernel, anything else (fp64 references) the padded bmm.

    For the kernel, I and O are zero-padded to its 16-byte stride alignment (x -> [R, I'],
    w -> [E, O', I']; a no-op for aligned sizes such as every power of two >= 8): the zero
    columns of I add exact zeros to every dot product, and the O' - O extra outputs are dropped
    by :func:`grouped_mm`, so any ``dim`` / ``moe_inter_dim`` gives the unpadded result."""
    dev = x_RI.device.type
    if dev == "cuda" and torch.is_autocast_enabled(dev):
        cast = torch.get_autocast_dtype(dev)
        x_RI, w_EOI = x_RI.to(cast), w_EOI.to(cast)
    kernel = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if kernel is None or x_RI.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or w_EOI.dtype != x_RI.dtype:
        return x_RI, w_EOI, None
    O, I = w_EOI.shape[1], w_EOI.shape[2]
    Op, Ip = grouped_aligned(O, x_RI.dtype), grouped_aligned(I, x_RI.dtype)
    if (Op, Ip) != (O, I):
        x_RI, w_EOI = pad_columns(x_RI, Ip), F.pad(w_EOI, (0, Ip - I, 0, Op - O))
    return x_RI, w_EOI, kernel


def grouped_mm(x_RI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[e(r)]^T for rows sorted by expert, ``counts`` rows per expert.

    One grouped-GEMM kernel over ragged groups (see :func:`grouped_operands` for dtypes and the
    alignment padding); other dtypes scatter rows into a zero-padded [E, max_count, I] batch and
    use one bmm (that path reads the largest count on the host: it serves fp64 references only).
    """
    O = w_EOI.shape[1]
    if x_RI.shape[0] == 0:
        return x_RI.new_zeros(0, O)
    return grouped_mm_prepared(*grouped_operands(x_RI, w_EOI), counts_E, O)


def grouped_mm_prepared(x_RI: torch.Tensor, w_EOI: torch.Tensor, kernel, counts_E: torch.Tensor,
                        out_cols: int) -> torch.Tensor:
    """:func:`grouped_mm` on operands :func:`grouped_operands` already prepared (cast, padded),
    keeping the first ``out_cols`` outputs: for callers that also keep the operands (the
    weight-gradient split saves them for its backward) and must not prepare them twice."""
    E, O = w_EOI.shape[0], out_cols
    if kernel is not None:
        offs = counts_E.cumsum(0).to(torch.int32)
        y = kernel(x_RI, w_EOI.transpose(-2, -1), offs=offs)
        return _ContiguousGrad.apply(y if y.shape[1] == O else y[:, :O])
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x_RI.device), counts_E)
    start = counts_E.cumsum(0) - counts_E
    pos = torch.arange(x_RI.shape[0], device=x_RI.device) - start[expert_of_row]
    cap = int(counts_E.max())
    buf = x_RI.new_zeros(E, cap, x_RI.shape[1])
    buf = buf.index_put((expert_of_row, pos), x_RI)
    out = torch.bmm(buf, w_EOI.transpose(1, 2).to(x_RI.dtype))
    return out[expert_of_row, pos]


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights w1/w3 [E, I, D] and w2 [E, D, I]."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by (local) expert, ``counts_E`` rows each -> expert outputs [R, D]."""
        h = F.silu(grouped_mm(x_RD, self.w1, counts_E)) * grouped_mm(x_RD, self.w3, counts_E)
        return grouped_mm(h, self.w2, counts_E)

    def reset_parameters(self, std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=std)


def sort_by_expert(idx_TK: torch.Tensor, n_experts: int):
    """Stable order of the T*K (token, slot) pairs by expert: (order, token_of_row, counts)."""
    flat = idx_TK.flatten()
    order = torch.argsort(flat, stable=True)
    token_of_row = order // idx_TK.shape[1]
    return order, token_of_row, expert_counts(flat, n_experts)


def expert_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each of ``n_experts`` (int64 [E]) from any tensor of expert ids.

    ``scatter_add_`` into a fixed-size buffer: unlike ``bincount`` (whose output size depends on
    the data, so CUDA must read the maximum back to the host) it never synchronises."""
    flat = idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=idx.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.long))


def sequence_balance_loss(scores_BSE: torch.Tensor, idx_BSK: torch.Tensor, n_experts: int,
                          reducer=None, world: int = 1) -> torch.Tensor:
    """Complementary sequence-wise balance loss sum_i f_i P_i, averaged over sequences.

    f_i = E / (K S) * #tokens of the sequence routed to expert i (detached counts),
    P_i = mean over the sequence of s_i / sum_j s_j (unbiased scores, differentiable).
    With softmax scores (DeepSeek-V2) sum_j s_j = 1 and this is V2's expert-level balance loss
    with ``seq_aux`` (its P_i = mean of s_i), so one function serves both families.

    Under sequence parallelism each of ``world`` ranks holds S/world tokens of every
    sequence: the counts are summed over ranks by ``reducer`` (no gradient), and each rank
    returns world * (its tokens' share of P) so that the mean over ranks, which is what the
    data-parallel gradient average computes, is exactly the one-device loss.
    """
    B, S_local, K = idx_BSK.shape
    S = S_local * world
    counts = torch.zeros(B, n_experts, device=idx_BSK.device, dtype=torch.float32)
    counts.scatter_add_(1, idx_BSK.reshape(B, S_local * K), torch.ones(B, S_local * K, device=idx_BSK.device))
    if reducer is not None:
        counts = reducer(counts)
    f = counts * (n_experts / (K * S))
    p_local = (scores_BSE / scores_BSE.sum(-1, keepdim=True)).sum(1) / S
    return world * (f * p_local).sum(-1).mean()


@dataclass
class Routing:
    """The router's decision for a flattened batch of tokens (``MoE.route``)."""

    x_TD: torch.Tensor  # the FFN input, flattened to tokens
    weights_TK: torch.Tensor  # fp32 routing weights of the K chosen experts
    idx_TK: torch.Tensor  # expert ids
    shape: tuple  # (B, S, D) to restore


@dataclass
class MoEStats:
    counts: torch.Tensor  # [E] tokens routed to each expert in the last forward (detached)
    balance_loss: torch.Tensor  # alpha * sequence-wise loss, part of the autograd graph


class MoE(nn.Module):
    """Routed experts (top-K of E, group-limited) plus always-on shared experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.n_experts = args.n_routed_experts
        self.gate = Gate(args)
        self.experts = GroupedExperts(args.n_routed_experts, args.dim, args.moe_inter_dim)
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) \
            if args.n_shared_experts > 0 else None
        self._stats: MoEStats | None = None
        # Hooks set by parallelization functions (the model itself never communicates):
        # ``dispatcher(x, weights, idx, experts) -> y`` replaces the local routed compute
        # (expert parallelism); ``seq_reducer`` sums [B, E] routing statistics over the
        # ranks that share a sequence, and ``seq_world`` is their number (sequence parallel).
        self.dispatcher = None
        self.seq_reducer = None
        self.seq_world = 1

    def routed(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        """sum_k weight_k * expert_{idx_k}(x) for every token, via one grouped GEMM."""
        if self.dispatcher is not None:
            return self.dispatcher(x_TD, weights_TK, idx_TK, self.experts)
        order, token_of_row, counts = sort_by_expert(idx_TK, self.n_experts)
        y = self.experts(x_TD[token_of_row], counts)
        y = y * weights_TK.flatten()[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_of_row, y.to(x_TD.dtype))

    def route(self, x_BSD: torch.Tensor) -> Routing:
        """Score and choose experts for every token, recording the routing statistics."""
        B, S, D = x_BSD.shape
        x = x_BSD.reshape(B * S, D)
        weights, idx, scores = self.gate(x)
        self.record(scores.view(B, S, -1), idx.view(B, S, -1))
        return Routing(x, weights, idx, (B, S, D))

    def shared(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """Output of the always-on shared experts (None without them)."""
        return None if self.shared_experts is None else self.shared_experts(x_TD)

    @staticmethod
    def merge(routed_TD: torch.Tensor, shared_TD: torch.Tensor | None, shape: tuple) -> torch.Tensor:
        """routed + shared, back to [B, S, D]."""
        y = routed_TD if shared_TD is None else routed_TD + shared_TD
        return y.view(*shape)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        r = self.route(x_BSD)
        return self.merge(self.routed(r.x_TD, r.weights_TK, r.idx_TK), self.shared(r.x_TD), r.shape)

    # -- balancing -----------------------------------------------------------------------
    def record(self, scores_BSE: torch.Tensor, idx_BSK: torch.Tensor) -> None:
        counts = expert_counts(idx_BSK.detach(), self.n_experts)
        if self.args.seq_aux_alpha > 0 and torch.is_grad_enabled():
            bal = self.args.seq_aux_alpha * sequence_balance_loss(scores_BSE, idx_BSK, self.n_experts,
                                                                  self.seq_reducer, self.seq_world)
        else:
            bal = scores_BSE.new_zeros(())
        # A forward re-run inside backward (activation checkpointing) must compute the same
        # ops as the original, but its statistics were already recorded by that original
        if torch._C._current_graph_task_id() == -1:
            self._stats = MoEStats(counts=counts, balance_loss=bal)

    def pop_stats(self) -> MoEStats | None:
        s, self._stats = self._stats, None
        return s

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, gamma: float) -> None:
        """Aux-loss-free balancing: b -= gamma where the expert took more than the mean
        load of the step's whole batch, b += gamma where it took less."""
        load = load_E.to(self.gate.bias)
        self.gate.bias.add_(gamma * torch.sign(load.mean() - load))

    def reset_parameters(self, std: float) -> None:
        self.gate.reset_parameters(std)
        self.experts.reset_parameters(std)


def pop_moe_stats(layers) -> list[MoEStats]:
    """The statistics of the last forward of every layer in ``layers`` that ran one."""
    out = []
    for m in layers:
        st = m.pop_stats()
        if st is not None:
            out.append(st)
    return out


@torch.no_grad()
def update_expert_bias(layers, load_LE: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free bias step of every MoE layer in ``layers``; ``load_LE`` has one row per
    layer, counted over the step's whole global batch."""
    layers = list(layers)
    if load_LE.shape[0] != len(layers):
        raise ValueError(f"load has {load_LE.shape[0]} rows but the model has {len(layers)} MoE layers")
    for m, load in zip(layers, load_LE):
        m.update_bias(load, gamma)


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Fully-qualified names of the routed-expert parameters of ``model``.

    The one marker of an expert parameter is its owner: a :class:`GroupedExperts` (or a
    subclass such as the FP8 one). Expert parallelism slices exactly these along dim 0, ZeRO
    reduces them over their expert-data-parallel replicas, and parameter tables count them
    as routed; nothing else decides by name.
    """
    names = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            for pname, _ in mod.named_parameters(recurse=False):
                names.add(f"{mname}.{pname}" if mname else pname)
    return names
