"""The model as the planner sees it: units placed whole on one pipeline stage, counted on the
real model.

``build_model(args, "meta")`` is built once (cached per config) and split into units: the
embedding, each block, the final norm + head, each MTP module. A stage's parameter count is
the sum of ``numel`` of its units' parameters. Routed-expert tensors (those owned by a
``GroupedExperts``: ``hai_llm.model.moe.expert_parameter_names``) are kept apart because
expert parallelism divides them by ``ep`` (every EP rank holds ``n_routed_experts / ep``
whole experts); everything else (attention, shared expert, router, norms, dense FFN,
embedding, head) is replicated over the stage. The routing bias is a buffer (fp32, not
trained): counted separately. A check asserts that the units cover the model's parameters
exactly, so a new top-level module can never be silently under-counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from hai_llm.model.args import ModelArgs
from hai_llm.model.moe import expert_parameter_names


@dataclass(frozen=True)
class Unit:
    """A piece of the model that is placed whole on one pipeline stage."""

    name: str  # "embed", "L5", "head" (final norm + output head), "MTP0"
    kind: str  # "embed" | "dense" | "moe" | "head" | "mtp"
    dense_params: int  # replicated over the stage (dp_sp group)
    expert_params: int  # routed experts of ALL EP ranks together
    buffers: int  # routing-bias entries (fp32 buffers, not trained)
    moe_blocks: int  # MoE feed-forwards inside (1 for a MoE layer / an MTP module on MoE)
    attn_blocks: int  # MLA blocks inside
    # ZeRO-1 bucket classes in first-appearance order of ``named_parameters``: (2-D or more?,
    # routed expert?, elements; experts of ALL EP ranks). ``ZeroOptimizer`` keys its buckets by
    # (reduce group, ndim >= 2, expert), so this fixes the collective program's bucket order.
    param_keys: tuple[tuple[bool, bool, int], ...] = ()


def _param_keys(*modules) -> tuple[tuple[bool, bool, int], ...]:
    keys: dict[tuple[bool, bool], int] = {}
    for module in modules:
        experts = expert_parameter_names(module)
        for name, p in module.named_parameters():
            k = (p.ndim >= 2, name in experts)
            keys[k] = keys.get(k, 0) + p.numel()
    return tuple((a, b, n) for (a, b), n in keys.items())


def _split_counts(module) -> tuple[int, int, int]:
    experts = expert_parameter_names(module)  # the one marker: owned by a GroupedExperts
    dense = expert = 0
    for name, p in module.named_parameters():
        if name in experts:
            expert += p.numel()
        else:
            dense += p.numel()
    buffers = sum(b.numel() for n, b in module.named_buffers() if n.endswith("gate.bias"))
    return dense, expert, buffers


def _build_units(args: ModelArgs) -> tuple[Unit, ...]:
    from hai_llm.model.transformer import build_model

    model = build_model(args, "meta")
    units = [Unit("embed", "embed", model.embed.weight.numel(), 0, 0, 0, 0, _param_keys(model.embed))]
    for i, block in enumerate(model.layers):
        d, e, b = _split_counts(block)
        moe = args.is_moe_layer(i)
        units.append(Unit(f"L{i}", "moe" if moe else "dense", d, e, b, int(moe), 1, _param_keys(block)))
    d_norm, _, _ = _split_counts(model.norm)
    units.append(Unit("head", "head", d_norm + model.head.weight.numel(), 0, 0, 0, 0,
                      _param_keys(model.norm, model.head)))
    for k, mod in enumerate(model.mtp):
        d, e, b = _split_counts(mod)
        units.append(Unit(f"MTP{k}", "mtp", d, e, b, int(args.is_moe_layer(args.n_layers + k)), 1,
                          _param_keys(mod)))
    total = sum(p.numel() for p in model.parameters())
    covered = sum(u.dense_params + u.expert_params for u in units)
    if covered != total:  # a new top-level module nobody placed: fail loudly, never under-count
        raise RuntimeError(f"dry-run units cover {covered:,} of the model's {total:,} parameters: "
                           f"update hai_llm.planner.units.model_units")
    return tuple(units)


def model_units(args: ModelArgs) -> tuple[Unit, ...]:
    """Units of the real model (built once on the meta device; cached per config)."""
    return _units_of(_ArgsKey(args))


class _ArgsKey:
    """``ModelArgs`` hashed by its repr (the dataclass itself is mutable, so unhashable)."""

    def __init__(self, args: ModelArgs):
        self.args, self.key = args, repr(args)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _ArgsKey) and other.key == self.key


@lru_cache(maxsize=8)
def _units_of(key: _ArgsKey) -> tuple[Unit, ...]:
    return _build_units(key.args)
