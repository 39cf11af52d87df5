"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seeded generator.

One function turns logits into the distribution actually sampled from (``distribution``), so
plain sampling and speculative decoding's accept/reject rule (``hai_llm.infer.generate``) use the
same filtered probabilities. ``temperature == 0`` is greedy: argmax, no random numbers drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def distribution(logits_V: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """fp32 probabilities ``[V]`` after temperature, top-k and top-p (renormalised). Greedy: the
    one-hot of the argmax."""
    logits = logits_V.float()
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).float()
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep a token if the mass of the tokens before it is still below top_p (the first always)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def draw(probs_V: torch.Tensor, generator: torch.Generator | None) -> int:
    """A token from ``probs`` (argmax when it is one-hot, without drawing a random number)."""
    top = int(probs_V.argmax())
    if float(probs_V[top]) == 1.0:
        return top
    return int(torch.multinomial(probs_V, 1, generator=generator))


def sample(logits_V: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    return draw(distribution(logits_V, cfg), generator)
