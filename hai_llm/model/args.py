"""Model hyper-parameters of a DeepSeek-V3-style model.

One dataclass, with DeepSeek's own field names (``inference/model.py`` ModelArgs) so that
their ``config_671B.json`` maps onto it key for key. It doubles as the Hydra schema of the
``model`` config group (see ``hai_llm.config.schema``), so a misspelt key fails at start-up.
The defaults are the 671B model; ``configs/model/*.yaml`` override them.

Routing covers two families: DeepSeek-V3 (``topk_method='noaux_tc'``: sigmoid scores, groups
scored by their two best biased scores, a routing-only bias updated aux-loss-free, top-k weights
normalized) and DeepSeek-V2 / V2-Lite (``'group_limited_greedy'`` / ``'greedy'``: softmax scores,
groups scored by their best score, no bias, weights = scores * route_scale). See
docs/checkpoints.md for the released checkpoints each setting reproduces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ModelArgs:
    name: str = "deepseek_v3_671b"
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432  # FFN width of the first n_dense_layers dense layers
    moe_inter_dim: int = 2048  # width of every routed and shared expert
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: str = "sigmoid"
    route_scale: float = 2.5
    # expert choice: "noaux_tc" (V3), "group_limited_greedy" (V2), "greedy" (V2-Lite: no groups)
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True  # divide the K chosen scores by their sum before route_scale
    # balancing: auxiliary-loss-free bias step and the complementary sequence-wise loss
    bias_update_speed: float = 0.001
    seq_aux_alpha: float = 1e-4
    # MLA
    q_lora_rank: int = 1536  # 0 means a plain wq projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # RoPE / YaRN
    max_seq_len: int = 4096
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # multi-token prediction
    n_mtp_layers: int = 1
    mtp_lambda: float = 0.3
    # numerics / init
    norm_eps: float = 1e-6
    init_std: float = 0.006
    # activation memory: "none" | "selective" (RMSNorms and MLA up-projections recomputed
    # in backward, as the paper does) | "full" (whole layer recomputed)
    recompute: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def routing_bias(self) -> bool:
        """Whether routing has the aux-loss-free correction bias (V3's ``e_score_correction_bias``);
        the V2 methods have none (the buffer then stays zero and is not part of HF checkpoints)."""
        return self.topk_method == "noaux_tc"

    @property
    def yarn_active(self) -> bool:
        return self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        # (d_nope + d_rope)^-0.5, times mscale^2 with mscale = 0.1*mscale_cfg*ln(factor)+1
        # when YaRN stretches the context (DeepSeek's inference code, docs/deepseek_v3.md#yarn).
        scale = self.qk_head_dim ** -0.5
        if self.yarn_active:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"model config '{self.name}': {msg}")

        for f in ("vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "v_head_dim", "max_seq_len", "moe_inter_dim", "inter_dim"):
            need(getattr(self, f) > 0, f"{f} must be positive, got {getattr(self, f)}")
        need(0 <= self.n_dense_layers <= self.n_layers,
             f"n_dense_layers={self.n_dense_layers} must be in [0, n_layers={self.n_layers}]")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim={self.qk_rope_head_dim} must be a positive even number (RoPE rotates pairs)")
        need(self.q_lora_rank >= 0, "q_lora_rank must be >= 0 (0 = plain wq)")
        need(self.score_func in ("sigmoid", "softmax"),
             f"score_func must be 'sigmoid' or 'softmax', got '{self.score_func}'")
        need(self.topk_method in ("noaux_tc", "group_limited_greedy", "greedy"),
             f"topk_method must be noaux_tc | group_limited_greedy | greedy, got '{self.topk_method}'")
        need(self.routing_bias or self.bias_update_speed == 0,
             f"topk_method='{self.topk_method}' has no routing bias (DeepSeek-V2 routing): set bias_update_speed=0")
        need(self.recompute in ("none", "selective", "full"),
             f"recompute must be none | selective | full, got '{self.recompute}'")
        need(self.n_mtp_layers >= 0, "n_mtp_layers must be >= 0")
        if self.n_moe_layers > 0:
            need(self.n_routed_experts > 0, "n_routed_experts must be positive when MoE layers exist")
            need(1 <= self.n_activated_experts <= self.n_routed_experts,
                 f"n_activated_experts={self.n_activated_experts} must be in [1, n_routed_experts={self.n_routed_experts}]")
            need(self.n_expert_groups >= 1 and self.n_routed_experts % self.n_expert_groups == 0,
                 f"n_routed_experts={self.n_routed_experts} must be divisible by n_expert_groups={self.n_expert_groups}")
            need(1 <= self.n_limited_groups <= self.n_expert_groups,
                 f"n_limited_groups={self.n_limited_groups} must be in [1, n_expert_groups={self.n_expert_groups}]")
            per_group = self.n_routed_experts // self.n_expert_groups
            need(self.topk_method != "greedy" or self.n_expert_groups == 1,
                 f"topk_method='greedy' ignores expert groups: set n_expert_groups=1 and n_limited_groups=1 "
                 f"(or topk_method=group_limited_greedy), got n_expert_groups={self.n_expert_groups}")
            if self.n_expert_groups > 1 and self.topk_method == "noaux_tc":
                need(per_group >= 2 or self.n_activated_experts <= self.n_limited_groups,
                     "each expert group needs >= 2 experts (groups are scored by their top-2)")
            if self.n_expert_groups > 1:
                need(self.n_limited_groups * per_group >= self.n_activated_experts,
                     f"n_limited_groups={self.n_limited_groups} groups of {per_group} experts cannot "
                     f"hold n_activated_experts={self.n_activated_experts}")
