"""The DeepSeek-V3 transformer on one device: embedding, n_layers blocks (first
n_dense_layers with a dense SwiGLU FFN, the rest MoE), final norm, output head, and
``n_mtp_layers`` multi-token-prediction modules that share the embedding and head.

Build on the meta device with :func:`build_model` and materialize later, so the 671B
config can be inspected without memory. Token layout of one training sample: a window
of S + 1 + D tokens; the main model reads tokens[:S] and predicts tokens[1:S+1], MTP
depth k (1-based) reads the embeddings of tokens[k:S+k] and predicts tokens[k+1:S+k+1].
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .attention import MLA
from .layers import MLP, RMSNorm, Rope, maybe_recompute, rope_at, rope_cos_sin
from .moe import Gate, GroupedExperts, MoE, MoEStats, pop_moe_stats, update_expert_bias


class Block(nn.Module):
    """One transformer block, exposed as the pieces every execution path composes.

    ``forward`` = ``ffn_part(attn_part(x))``; a pipeline stage that overlaps two micro-batches
    calls the same pieces one at a time (``attn_part``, ``ffn_input``, then the MoE's own
    ``route`` / ``routed`` / ``shared`` / ``merge``, then ``residual``), so the arithmetic of a
    block is written here only.
    """

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.args = args
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.dim, args.inter_dim)

    @property
    def selective(self) -> bool:
        return self.args.recompute == "selective"

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def attn_part(self, x_BSD: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x + attention(attn_norm(x)): the attention half with its residual."""
        return x_BSD + self.attn(maybe_recompute(self.selective, self.attn_norm, x_BSD), rope)

    def ffn_input(self, h_BSD: torch.Tensor) -> torch.Tensor:
        """ffn_norm(h): what the FFN (or the MoE router and experts) reads."""
        return maybe_recompute(self.selective, self.ffn_norm, h_BSD)

    @staticmethod
    def residual(h_BSD: torch.Tensor, y_BSD: torch.Tensor) -> torch.Tensor:
        """The FFN half's residual add."""
        return h_BSD + y_BSD

    def ffn_part(self, h_BSD: torch.Tensor) -> torch.Tensor:
        """h + ffn(ffn_norm(h)): the FFN half with its residual."""
        return self.residual(h_BSD, self.ffn(self.ffn_input(h_BSD)))

    def _forward(self, x, rope: Rope):
        return self.ffn_part(self.attn_part(x, rope))

    def forward(self, x_BSD, rope: Rope):
        return maybe_recompute(self.args.recompute == "full", self._forward, x_BSD, rope)


class MTPModule(nn.Module):
    """Depth-k MTP: h_k = Block(eh_proj([enorm(emb(t_{i+k})) ; hnorm(n_{k-1})])) with n_{k-1} the
    normed state the previous head reads (the main model's final ``norm`` output for k = 1, depth
    k-1's ``norm`` output otherwise: docs/deepseek_v3.md#mtp-input); logits come from ``norm`` then
    the main model's shared head."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def input_proj(self, h_BSD, emb_BSD):
        """eh_proj([enorm(emb) ; hnorm(h)]): the block's input; ``h`` is the previous depth's normed
        state (``Transformer.mtp_states``)."""
        # embedding first in the concat: DeepSeek's released weights and HF/vLLM use this order
        return self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))

    def forward(self, h_BSD, emb_BSD, rope: Rope):
        return self.block(self.input_proj(h_BSD, emb_BSD), rope)


def window_tokens(tokens_BT: torch.Tensor, pos_S: torch.Tensor, ahead: int = 0) -> torch.Tensor:
    """The tokens ``ahead`` places after positions ``pos_S`` of each training window: the model's
    input at 0, the main model's targets at 1, MTP depth k's extra input at k and its targets at
    k + 1 (the window layout of the module docstring, stated once)."""
    return tokens_BT[:, pos_S + ahead]


def logits_ce(head: nn.Module, hn_BSD: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (in fp32) of ``head(hn)`` against ``targets`` over every position, from a
    normed state: the loss of the main model (after its final norm) and of each MTP depth (after
    that module's norm), all through the shared output head."""
    return F.cross_entropy(head(hn_BSD).flatten(0, 1).float(), targets_BS.flatten())


@dataclass(frozen=True)
class LossWeights:
    """The gradient each loss term receives from ``total_loss(...) / n_micro``.

    A pipeline stage owns only some terms and back-propagates each one itself; it must seed
    them with exactly what autograd of the one-device loss would, in the same floating-point
    order: ``loss = ce + mtp_lambda * mean_k(mtp_k) + sum(balance)``, so ce and every balance
    term get ``scale`` and each MTP depth gets ``(scale * mtp_lambda) / D`` (the product's
    backward, then the mean's division)."""

    mtp_lambda: float
    n_mtp: int

    @staticmethod
    def of(args: ModelArgs) -> "LossWeights":
        return LossWeights(args.mtp_lambda, args.n_mtp_layers)

    def ce(self, scale: torch.Tensor) -> torch.Tensor:
        return scale

    def balance(self, scale: torch.Tensor) -> torch.Tensor:
        return scale

    def mtp_each(self, scale: torch.Tensor) -> torch.Tensor:
        return (scale * self.mtp_lambda) / self.n_mtp


def set_loss_weights(args: ModelArgs, mtp_lambda: float, seq_aux_alpha: float) -> None:
    """Set this step's loss weights (lambda of MTP, alpha of the sequence-wise balance loss) on
    ``args``, the one ModelArgs object that every module of a built model reads them from
    (``Transformer.loss``, each ``MoE``, every pipeline stage's ``LossWeights.of`` and the
    pipeline runtime's ``total_loss``), so each layout applies the same values. The trainer
    calls it before each step with the values of its token schedules
    (``hai_llm.optim.schedules``); the model itself schedules nothing. ``args`` must be the
    model's own copy, not the run's config."""
    args.mtp_lambda = mtp_lambda
    args.seq_aux_alpha = seq_aux_alpha


def total_loss(ce: torch.Tensor, mtp: torch.Tensor, balance_terms, mtp_lambda: float):
    """(loss, balance): ``ce + mtp_lambda * mtp + sum(balance_terms)``, summed left to right.

    ``mtp`` is the mean over depths of the MTP cross-entropies (zero without MTP). The one
    definition of the training objective: ``Transformer.loss`` and the pipeline runtime (which
    recombines all-reduced per-stage values) both call it, so their losses are the same
    floating-point expression."""
    balance = ce.new_zeros(())
    for b in balance_terms:
        balance = balance + b
    return ce + mtp_lambda * mtp + balance, balance


@dataclass
class LossOutput:
    loss: torch.Tensor  # ce + mtp_lambda * mean(mtp) + balance: what backward sees
    ce: torch.Tensor
    mtp: torch.Tensor  # mean over depths of the MTP cross-entropies (0 when D = 0)
    balance: torch.Tensor
    expert_counts: torch.Tensor | None = None  # [n_moe_layers(+mtp), E]
    extras: dict = field(default_factory=dict)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # _weight skips nn.Embedding's own normal_ init: on the meta device that call runs
        # through torch's decompositions and imports torch._dynamo (seconds per process);
        # init_weights initialises it like every other matrix anyway
        self.embed = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList([Block(i, args) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.mtp = nn.ModuleList([MTPModule(args.n_layers + k, args) for k in range(args.n_mtp_layers)])
        cos, sin = rope_cos_sin(args, device=self.embed.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- init ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for every matrix, ones for norms, zero routing bias; RoPE
        tables recomputed (they are garbage after ``materialize``). Each parameter's values are
        a function of (seed, its name, expert row) only (:func:`init_parameters`), so every
        layout's share of the model starts from the same weights. ``seed=None`` draws the seed
        from the global generator."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu"))
        init_parameters(self, self.args, seed)

    def reset_buffers(self) -> None:
        cos, sin = rope_cos_sin(self.args, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    # -- forward -------------------------------------------------------------------------
    def rope(self, pos_S: torch.Tensor) -> Rope:
        return rope_at(self.rope_cos, self.rope_sin, pos_S)

    def embed_tokens(self, tokens_BT: torch.Tensor, pos_S: torch.Tensor, ahead: int = 0) -> torch.Tensor:
        """Embeddings of the tokens ``ahead`` places after positions ``pos_S`` of the window."""
        return self.embed(window_tokens(tokens_BT, pos_S, ahead))

    def main_ce(self, hn_BSD: torch.Tensor, tokens_BT: torch.Tensor, pos_S: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the main model's next-token prediction from its normed final state."""
        return logits_ce(self.head, hn_BSD, window_tokens(tokens_BT, pos_S, 1))

    def mtp_ce(self, depth: int, hn_BSD: torch.Tensor, tokens_BT: torch.Tensor,
               pos_S: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of MTP depth ``depth`` (1-based) from that module's normed output state."""
        return logits_ce(self.head, hn_BSD, window_tokens(tokens_BT, pos_S, depth + 1))

    def hidden(self, tokens_BS: torch.Tensor, pos_S: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (before ``norm``) of the main model. ``pos_S``: global
        positions of the tokens (default 0..S-1)."""
        if pos_S is None:
            pos_S = torch.arange(tokens_BS.shape[1], device=tokens_BS.device)
        rope = self.rope(pos_S)
        h = self.embed(tokens_BS)
        for layer in self.layers:
            h = layer(h, rope)
        return h

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] of the main model (no MTP)."""
        return self.head(self.norm(self.hidden(tokens_BS)))

    def mtp_states(self, hn_BSD: torch.Tensor, tokens_BT: torch.Tensor, pos_S: torch.Tensor) -> list[torch.Tensor]:
        """Normed output state of every MTP depth (each module's ``norm`` applied) from the main
        model's normed final state ``hn_BSD``. Depth k reads the very tensor the previous head reads:
        ``norm(h)`` for k = 1, depth k-1's normed output after that, as Hugging Face's ``MtpModel``
        (``last_hidden_state``, then each layer's ``post_norm``) and Megatron-Core (decoder output
        after ``final_layernorm``, then each MTP layer's ``final_layernorm``) do
        (docs/deepseek_v3.md#mtp-input). One norm per state, shared by its head and the next depth."""
        rope = self.rope(pos_S)
        outs = []
        for k, mod in enumerate(self.mtp, start=1):
            hn_BSD = mod.norm(mod(hn_BSD, self.embed_tokens(tokens_BT, pos_S, k), rope))
            outs.append(hn_BSD)
        return outs

    def loss(self, tokens_BT: torch.Tensor, pos_S: torch.Tensor | None = None) -> LossOutput:
        """Training loss on windows of S + 1 + D tokens (see module docstring), over the
        positions ``pos_S`` of the window (default: all S; a sequence-parallel rank passes
        its own chunks). Cross-entropies are means over those positions."""
        D = self.args.n_mtp_layers
        S = tokens_BT.shape[1] - 1 - D
        if S < 1:
            raise ValueError(f"need windows of seq_len + 1 + n_mtp_layers tokens; got {tokens_BT.shape[1]} "
                             f"with n_mtp_layers={D}")
        if pos_S is None:
            pos_S = torch.arange(S, device=tokens_BT.device)
        hn = self.norm(self.hidden(window_tokens(tokens_BT, pos_S), pos_S))  # read by the head and MTP depth 1
        ce = self.main_ce(hn, tokens_BT, pos_S)
        mtp_terms = [self.mtp_ce(k, hk, tokens_BT, pos_S)
                     for k, hk in enumerate(self.mtp_states(hn, tokens_BT, pos_S), start=1)]
        mtp = torch.stack(mtp_terms).mean() if mtp_terms else ce.new_zeros(())
        stats = self.pop_moe_stats()
        loss, balance = total_loss(ce, mtp, [s.balance_loss for s in stats], self.args.mtp_lambda)
        counts = torch.stack([s.counts for s in stats]) if stats else None
        return LossOutput(loss=loss, ce=ce.detach(), mtp=mtp.detach(), balance=balance.detach(),
                          expert_counts=counts)

    def pop_moe_stats(self) -> list[MoEStats]:
        return pop_moe_stats(self.moe_layers())

    def update_expert_bias(self, load_LE: torch.Tensor, gamma: float | None = None) -> None:
        """Apply the aux-loss-free bias step to every MoE layer; ``load_LE`` rows follow
        ``moe_layers()`` order and must be counted over the step's whole global batch."""
        update_expert_bias(self.moe_layers(), load_LE,
                           self.args.bias_update_speed if gamma is None else gamma)


def materialize(module: nn.Module, device: str | torch.device) -> nn.Module:
    """Give every meta parameter and buffer real (uninitialised) storage on ``device``.

    Same result as ``nn.Module.to_empty`` without its detour through torch's module
    ``_apply`` machinery, whose first call imports torch._dynamo (seconds per process,
    paid again by every spawned rank)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                   requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return module


def param_seed(seed: int, name: str, row: int | None = None) -> int:
    """Seed of the generator of parameter ``name`` (its global name), or of row ``row`` (global
    expert index) of a stacked expert weight: a stable 63-bit hash of (seed, name[, row]), the
    same in every process and every Python run (no ``hash()``, which is salted per process)."""
    key = f"{seed}/{name}" if row is None else f"{seed}/{name}/{row}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _normal_(t: torch.Tensor, std: float, seed: int) -> None:
    # a generator of the tensor's own device: CPU and CUDA draw different numbers for one seed,
    # but a given device always draws the same numbers for the same (seed, shape)
    g = torch.Generator(device=t.device).manual_seed(seed)
    t.normal_(0.0, std, generator=g)


@torch.no_grad()
def init_parameters(root: nn.Module, args: ModelArgs, seed: int) -> None:
    """Initialise every parameter and buffer of ``root`` (a ``Transformer``, or any part of one
    whose ``named_modules`` carry the full model's global names, e.g. a pipeline rank's
    ``PipelineModel``) as a function of (seed, global name) alone:

    * matrices (``nn.Linear``, ``nn.Embedding``, the router ``Gate``): Normal(0, init_std) from a
      generator seeded by ``param_seed(seed, name)``;
    * stacked routed experts [E, ...]: row r (global expert index ``ep_slice.offset + r`` on an
      expert-parallel slice) from its own generator ``param_seed(seed, name, global row)``, so the
      slice of EP rank k equals rows [k E/ep, (k+1) E/ep) of the single-process draw;
    * norms: ones; routing bias: zeros; RoPE tables: recomputed.

    Values therefore do not depend on the layout (stages, expert slices, which modules a rank
    keeps, iteration order), only on the device type's generator. Every parameter must have
    real storage (``materialize`` first)."""
    std = args.init_std
    done: set[int] = set()
    for m in root.modules():  # the RoPE tables of a Transformer or a PipelineModel
        if m._buffers.get("rope_cos") is not None:
            cos, sin = rope_cos_sin(args, device=m.rope_cos.device)
            m.rope_cos.copy_(cos)
            m.rope_sin.copy_(sin)
    for mname, m in root.named_modules():
        prefix = f"{mname}." if mname else ""
        own = dict(m.named_parameters(recurse=False))
        if any(p.is_meta for p in own.values()):
            raise ValueError(f"init_parameters: {prefix or 'the root module'} is on the meta device; "
                             "materialize it first (hai_llm.model.transformer.materialize)")
        if isinstance(m, GroupedExperts):
            sl = getattr(m, "ep_slice", None)  # set by expert parallelism: a slice of global rows
            first = sl.offset if sl is not None else 0
            for pname, w in own.items():
                for r in range(w.shape[0]):
                    _normal_(w[r], std, param_seed(seed, prefix + pname, first + r))
        elif isinstance(m, (nn.Linear, nn.Embedding, Gate)):
            _normal_(m.weight, std, param_seed(seed, prefix + "weight"))
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.zero_()  # a Linear's bias, or the router's routing bias (a buffer)
        elif isinstance(m, RMSNorm):
            m.weight.fill_(1.0)
        else:
            continue  # a container: its parameters (none so far) are reported below
        done.update(id(p) for p in own.values())
    missed = [n for n, p in root.named_parameters() if id(p) not in done]
    if missed:
        raise ValueError(f"init_parameters: no initialisation rule for {missed[:3]}; add one for its module type")


def build_model(args: ModelArgs, device: str | torch.device = "meta", seed: int | None = 0,
                dtype: torch.dtype = torch.float32) -> Transformer:
    """Build on the meta device; materialize on ``device`` and initialize unless it is meta
    (``init_weights``: layout-independent values, see :func:`init_parameters`). A parallel run
    instead hands the meta model to ``hai_llm.runtime.parallelize``, which materializes and
    initializes only what its rank keeps, with the same values."""
    with torch.device("meta"):
        model = Transformer(args)
    if str(device) == "meta":
        return model
    model = materialize(model, device)
    model.init_weights(seed)
    if dtype != torch.float32:
        model = model.to(dtype)
        model.reset_buffers()
    return model
