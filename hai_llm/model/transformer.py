"""The DeepSeek-V3 transformer on one device: embedding, n_layers blocks (first
n_dense_layers with a dense SwiGLU FFN, the rest MoE), final norm, output head, and
``n_mtp_layers`` multi-token-prediction modules that share the embedding and head.

Build on the meta device with :func:`build_model` and materialize later, so the 671B
config can be inspected without memory. Token layout of one training sample: a window
of S + 1 + D tokens; the main model reads tokens[:S] and predicts tokens[1:S+1], MTP
depth k (1-based) reads the embeddings of tokens[k:S+k] and predicts tokens[k+1:S+k+1].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .attention import MLA
from .layers import MLP, RMSNorm, Rope, maybe_recompute, rope_cos_sin
from .moe import MoE, MoEStats


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.args = args
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.dim, args.inter_dim)

    def _forward(self, x, rope: Rope):
        sel = self.args.recompute == "selective"
        x = x + self.attn(maybe_recompute(sel, self.attn_norm, x), rope)
        return x + self.ffn(maybe_recompute(sel, self.ffn_norm, x))

    def forward(self, x_BSD, rope: Rope):
        return maybe_recompute(self.args.recompute == "full", self._forward, x_BSD, rope)


class MTPModule(nn.Module):
    """Depth-k MTP: h_k = Block(eh_proj([enorm(emb(t_{i+k})) ; hnorm(h_{k-1})])); logits
    come from ``norm`` then the main model's shared head."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h_BSD, emb_BSD, rope: Rope):
        # embedding first in the concat: DeepSeek's released weights and HF/vLLM use this order
        x = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))
        return self.block(x, rope)


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
        tables recomputed (they are garbage after ``to_empty``)."""
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        std = self.args.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
            elif isinstance(m, MoE):
                m.reset_parameters(std)
        self.reset_buffers()
        if seed is not None:
            torch.random.set_rng_state(gen_state)

    def reset_buffers(self) -> None:
        cos, sin = rope_cos_sin(self.args, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    # -- forward -------------------------------------------------------------------------
    def rope(self, pos_S: torch.Tensor) -> Rope:
        if int(pos_S.max()) >= self.args.max_seq_len:
            raise ValueError(f"position {int(pos_S.max())} exceeds model max_seq_len={self.args.max_seq_len}")
        return Rope(self.rope_cos[pos_S], self.rope_sin[pos_S], pos_S)

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

    def mtp_hidden(self, h_BSD: torch.Tensor, tokens_BT: torch.Tensor, pos_S: torch.Tensor) -> list[torch.Tensor]:
        """Normed hidden states of each MTP depth at positions ``pos_S``; depth k reads
        the embedding of the token k places ahead (tokens_BT is the whole window)."""
        rope = self.rope(pos_S)
        outs = []
        for k, mod in enumerate(self.mtp, start=1):
            h_BSD = mod(h_BSD, self.embed(tokens_BT[:, pos_S + k]), rope)
            outs.append(mod.norm(h_BSD))
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
        h = self.hidden(tokens_BT[:, pos_S], pos_S)
        ce = F.cross_entropy(self.head(self.norm(h)).flatten(0, 1).float(), tokens_BT[:, pos_S + 1].flatten())
        mtp_terms = [F.cross_entropy(self.head(hk).flatten(0, 1).float(), tokens_BT[:, pos_S + k + 1].flatten())
                     for k, hk in enumerate(self.mtp_hidden(h, tokens_BT, pos_S), start=1)]
        mtp = torch.stack(mtp_terms).mean() if mtp_terms else ce.new_zeros(())
        stats = self.pop_moe_stats()
        balance = sum((s.balance_loss for s in stats), ce.new_zeros(()))
        loss = ce + self.args.mtp_lambda * mtp + balance
        counts = torch.stack([s.counts for s in stats]) if stats else None
        return LossOutput(loss=loss, ce=ce.detach(), mtp=mtp.detach(), balance=balance.detach(),
                          expert_counts=counts)

    def pop_moe_stats(self) -> list[MoEStats]:
        out = []
        for m in self.moe_layers():
            s = m.pop_stats()
            if s is not None:
                out.append(s)
        return out

    @torch.no_grad()
    def update_expert_bias(self, load_LE: torch.Tensor, gamma: float | None = None) -> None:
        """Apply the aux-loss-free bias step to every MoE layer; ``load_LE`` rows follow
        ``moe_layers()`` order and must be counted over the step's whole global batch."""
        gamma = self.args.bias_update_speed if gamma is None else gamma
        layers = self.moe_layers()
        if load_LE.shape[0] != len(layers):
            raise ValueError(f"load has {load_LE.shape[0]} rows but the model has {len(layers)} MoE layers")
        for m, load in zip(layers, load_LE):
            m.update_bias(load, gamma)


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


def build_model(args: ModelArgs, device: str | torch.device = "meta", seed: int | None = 0,
                dtype: torch.dtype = torch.float32) -> Transformer:
    """Build on the meta device; materialize on ``device`` and initialize unless it is meta."""
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
