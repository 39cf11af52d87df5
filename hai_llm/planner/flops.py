"""FLOPs per token of a DeepSeek-V3-style model, counted from its shapes: forward, backward
(input-gradient and weight-gradient apart), attention included, MTP included, recomputation
counted separately.

Why a formula and not a profiler: the planner needs FLOPs for a 671B model it never builds,
split by the pieces the pipeline overlaps (attention half, MLP half, head) and by kind of
work (GEMMs that run at the GEMM rate, the attention core that runs at FlashAttention's
rate). ``tests/test_cost_flops.py`` checks the formula against
``torch.utils.flop_counter.FlopCounterMode`` (and DeepSpeed's FLOPs profiler) on a real
forward + backward of a small config.

Conventions (per token of the micro-batch, multiply-add = 2 FLOPs):

* a Linear ``in -> out`` costs ``2 in out`` forward, ``2 in out`` for the input gradient
  (dgrad, the report's "B") and ``2 in out`` for the weight gradient (wgrad, "W");
* MLA: ``wq_a`` D->q_lora, ``wq_b`` q_lora->H(dn+dr), ``wkv_a`` D->(c+dr), ``wkv_b``
  c->H(dn+dv), ``wo`` H dv->D; the attention core ``Q K^T`` (H (dn+dr) per key) and ``P V``
  (H dv per key) over ``s_eff`` keys: ``2 H (dn+dr+dv) s_eff``; ``s_eff = (S+1)/2`` for causal
  attention computed block-sparse (FlashAttention skips masked tiles), ``S`` when the mask is
  applied to a dense score matrix (what ``FlopCounterMode`` counts for
  ``scaled_dot_product_attention``, causal or not). Its backward is 2x the forward (dQ, dK,
  dV, dP), all on the input-gradient side;
* MoE: router ``2 D E``; K routed + n_shared experts of 3 matrices ``D x I``: ``6 D I (K +
  n_shared)`` (balanced routing: every token meets exactly K experts); dense FFN ``6 D
  inter_dim``; head ``2 D V`` (main model and every MTP depth, the head is shared but run
  once per depth); MTP ``eh_proj`` ``2 (2D) D``; the embedding is a lookup (0);
* element-wise work (norms, SwiGLU, RoPE, softmax, routing top-k) is not counted: it is
  memory-bound and the hardware profile prices it as a measured share of the step
  (``hardware.HardwareProfile.nongemm_fraction``);
* recomputation (``model.recompute``): ``selective`` re-runs ``wq_b`` and ``wkv_b`` forward
  in backward (norm outputs are element-wise: 0 FLOPs); ``full`` re-runs the whole block's
  forward. It is reported separately and is NOT part of the model FLOPs used for MFU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hai_llm.model.args import ModelArgs

KINDS = ("embed", "dense", "moe", "head", "mtp")


@dataclass
class PieceFlops:
    """FLOPs per token of one piece of work, by where they run.

    ``gemm_*``: Linear layers (forward, input grad, weight grad); ``attn_*``: the attention core
    (forward, backward); ``recompute_*``: extra forward work done again in backward."""

    gemm_f: float = 0.0
    gemm_b: float = 0.0
    gemm_w: float = 0.0
    attn_f: float = 0.0
    attn_b: float = 0.0
    recompute_gemm: float = 0.0
    recompute_attn: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)  # forward FLOPs by matrix

    def add_linear(self, name: str, n_in: int, n_out: int, times: float = 1.0) -> None:
        f = 2.0 * n_in * n_out * times
        self.gemm_f += f
        self.gemm_b += f
        self.gemm_w += f
        self.terms[name] = self.terms.get(name, 0.0) + f

    def __iadd__(self, o: "PieceFlops") -> "PieceFlops":
        for k in ("gemm_f", "gemm_b", "gemm_w", "attn_f", "attn_b", "recompute_gemm", "recompute_attn"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        for k, v in o.terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        return self

    @property
    def forward(self) -> float:
        return self.gemm_f + self.attn_f

    @property
    def backward(self) -> float:
        return self.gemm_b + self.gemm_w + self.attn_b

    @property
    def model(self) -> float:
        """Forward + backward, recomputation excluded (the MFU numerator)."""
        return self.forward + self.backward

    @property
    def recompute(self) -> float:
        return self.recompute_gemm + self.recompute_attn


def attention_keys(seq_len: int, causal: bool = True) -> float:
    """Mean keys a query attends to: (S+1)/2 block-sparse causal, S dense."""
    return (seq_len + 1) / 2.0 if causal else float(seq_len)


def attn_piece(args: ModelArgs, seq_len: int, *, causal: bool = True,
               recompute: str = "none") -> PieceFlops:
    """The attention half of a block: MLA projections and the attention core."""
    D, H = args.dim, args.n_heads
    dn, dr, dv, c = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim, args.kv_lora_rank
    p = PieceFlops()
    if args.q_lora_rank:
        p.add_linear("wq_a", D, args.q_lora_rank)
        p.add_linear("wq_b", args.q_lora_rank, H * (dn + dr))
    else:
        p.add_linear("wq", D, H * (dn + dr))
    p.add_linear("wkv_a", D, c + dr)
    p.add_linear("wkv_b", c, H * (dn + dv))
    p.add_linear("wo", H * dv, D)
    core = 2.0 * H * (dn + dr + dv) * attention_keys(seq_len, causal)
    p.attn_f, p.attn_b = core, 2.0 * core
    p.terms["attention_core"] = core
    if recompute == "selective":  # the MLA up-projections (q, k, v) are recomputed in backward
        p.recompute_gemm = p.terms.get("wq_b", 0.0) + p.terms["wkv_b"]
    elif recompute == "full":
        p.recompute_gemm, p.recompute_attn = p.gemm_f, p.attn_f
    return p


def mlp_piece(args: ModelArgs, moe: bool, *, recompute: str = "none") -> PieceFlops:
    """The FFN half of a block: the router and K routed + shared experts, or the dense FFN."""
    D = args.dim
    p = PieceFlops()
    if moe:
        p.add_linear("router", D, args.n_routed_experts)
        n = args.n_activated_experts + args.n_shared_experts
        p.add_linear("experts", D, args.moe_inter_dim, times=3.0 * n)
    else:
        p.add_linear("ffn", D, args.inter_dim, times=3.0)
    if recompute == "full":
        p.recompute_gemm = p.gemm_f
    return p


def head_piece(args: ModelArgs) -> PieceFlops:
    p = PieceFlops()
    p.add_linear("head", args.dim, args.vocab_size)
    return p


def unit_flops(args: ModelArgs, kind: str, seq_len: int, *, causal: bool = True,
               recompute: str = "none") -> dict[str, PieceFlops]:
    """Per-token FLOPs of one planner unit (``units.Unit.kind``) split into its pieces, in the
    order the stage runs them: ``{"attn": ..., "mlp": ...}`` for a block, ``{"head": ...}``,
    ``{"eh_proj", "attn", "mlp", "head"}`` for an MTP module, ``{}`` for the embedding."""
    if kind == "embed":
        return {}
    if kind in ("dense", "moe"):
        return {"attn": attn_piece(args, seq_len, causal=causal, recompute=recompute),
                "mlp": mlp_piece(args, kind == "moe", recompute=recompute)}
    if kind == "head":
        return {"head": head_piece(args)}
    if kind == "mtp":
        proj = PieceFlops()
        proj.add_linear("eh_proj", 2 * args.dim, args.dim)
        moe = args.n_routed_experts > 0 and args.is_moe_layer(args.n_layers)
        return {"eh_proj": proj, "attn": attn_piece(args, seq_len, causal=causal, recompute=recompute),
                "mlp": mlp_piece(args, moe, recompute=recompute), "head": head_piece(args)}
    raise ValueError(f"unknown unit kind {kind!r}: one of {KINDS}")


def model_flops(args: ModelArgs, seq_len: int, *, causal: bool = True, recompute: str = "none",
                mtp: bool = True) -> PieceFlops:
    """Per-token FLOPs of the whole model (every layer, the head, the MTP modules)."""
    total = PieceFlops()
    kinds = ["embed"] + ["moe" if args.is_moe_layer(i) else "dense" for i in range(args.n_layers)] + ["head"]
    kinds += ["mtp"] * (args.n_mtp_layers if mtp else 0)
    for kind in kinds:
        for piece in unit_flops(args, kind, seq_len, causal=causal, recompute=recompute).values():
            total += piece
    return total


def six_n(args: ModelArgs, activated_params: float) -> float:
    """The "6 N" rule of thumb for comparison: 6 x activated parameters (no attention core)."""
    return 6.0 * activated_params


def flops_summary(args: ModelArgs, seq_len: int, *, recompute: str = "selective") -> dict[str, float]:
    """The numbers the cost report prints (FLOPs per token)."""
    causal = model_flops(args, seq_len, causal=True, recompute=recompute)
    main = model_flops(args, seq_len, causal=True, recompute=recompute, mtp=False)
    dense_mask = model_flops(args, seq_len, causal=False, recompute="none")
    return {
        "forward": causal.forward, "backward": causal.backward, "model": causal.model,
        "recompute": causal.recompute, "model_without_mtp": main.model,
        "mtp": causal.model - main.model, "attention_core": causal.attn_f + causal.attn_b,
        "gemm": causal.gemm_f + causal.gemm_b + causal.gemm_w,
        "model_dense_mask": dense_mask.model,
    }
