"""Parameter accounting of a model config without allocating it (built on meta).

Rows group parameters by role; "activated" counts what one token touches: every dense
weight, the shared experts, and K of the E routed experts of each MoE layer. The MTP
modules are reported separately because they share the main model's embedding and head
(and are dropped at inference).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .args import ModelArgs
from .moe import expert_parameter_names
from .transformer import build_model


def _role(name: str, experts: set[str]) -> str:
    if name in experts:  # the one marker: owned by a GroupedExperts
        return "routed experts"
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head."):
        return "output head"
    if name.startswith("norm."):
        return "final norm"
    # MTP block params look like mtp.0.block.attn.wq_a.weight: classify the block part
    core = "." + name.split(".block.", 1)[-1] if ".block." in name else name
    if ".attn." in core:
        return "attention (MLA)"
    if ".ffn.shared_experts." in core:
        return "shared experts"
    if ".ffn.gate." in core:
        return "router (gate)"
    if ".ffn." in core:
        return "dense FFN"
    if "norm" in core:
        return "norms"
    if "eh_proj" in core:
        return "MTP projection"
    return "other"


def parameter_table(args: ModelArgs) -> dict:
    """Counts by (part, role) and totals; part is "main" or "mtp"."""
    model = build_model(args, device="meta")
    rows: "OrderedDict[tuple[str, str], int]" = OrderedDict()
    # the routing bias is a buffer (never trained by gradients) but it is a checkpoint
    # weight like any other, and the paper's 671B count includes it
    experts = expert_parameter_names(model)
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n.endswith("gate.bias")]
    for name, p in tensors:
        part = "mtp" if name.startswith("mtp.") else "main"
        key = (part, _role(name, experts))
        rows[key] = rows.get(key, 0) + p.numel()
    frac_idle = 1 - args.n_activated_experts / args.n_routed_experts if args.n_routed_experts else 0.0
    out = {"rows": rows}
    for part in ("main", "mtp"):
        total = sum(n for (pt, _), n in rows.items() if pt == part)
        routed = rows.get((part, "routed experts"), 0)
        active = total - routed * frac_idle
        out[part] = {"total": total, "activated": int(round(active))}
    out["main"]["activated_no_embedding"] = out["main"]["activated"] - rows.get(("main", "embedding"), 0)
    return out


def format_table(args: ModelArgs) -> str:
    t = parameter_table(args)
    lines = [f"model: {args.name}", f"{'part':<6} {'role':<18} {'parameters':>18}"]
    for (part, role), n in t["rows"].items():
        lines.append(f"{part:<6} {role:<18} {n:>18,}")
    m, x = t["main"], t["mtp"]
    lines += [
        "",
        f"main model total      {m['total']:>20,}  ({m['total'] / 1e9:.1f}B)",
        f"main model activated  {m['activated']:>20,}  ({m['activated'] / 1e9:.2f}B with embedding and head, "
        f"{m['activated_no_embedding'] / 1e9:.2f}B without the embedding)",
        f"MTP modules total     {x['total']:>20,}  ({x['total'] / 1e9:.2f}B, embedding and head shared)",
        f"MTP modules activated {x['activated']:>20,}  ({x['activated'] / 1e9:.2f}B)",
    ]
    return "\n".join(lines)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
