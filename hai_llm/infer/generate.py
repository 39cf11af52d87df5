"""Text generation from a trained model: cached decoding, MTP speculative decoding, and the
uncached reference they are tested against.

* ``generate``: prefill the prompt through :class:`~hai_llm.infer.absorbed.CachedDecoder` (latent
  cache, absorbed ``wkv_b``), then one token per step, each step attending over the cache.
* ``generate(speculative=True)``: the MTP module drafts the token after next and the main model
  verifies it in the same step (the report, section 2.2, names this reuse of the MTP modules;
  docs/deepseek_v3.md "Multi-token prediction (MTP)"). Each step feeds
  ``[x_m, draft]`` at positions ``m, m+1`` to the main model: position m's logits decide x_{m+1}
  (accept the draft or replace it), and when the draft is accepted position m+1's logits give
  x_{m+2} for free, so a step yields 2 tokens on acceptance, 1 otherwise. Acceptance follows
  speculative sampling (Leviathan et al. 2023, arXiv 2211.17192, and Chen et al. 2023,
  arXiv 2302.01318): accept with probability min(1, p(d)/q(d)), else draw from
  normalize(max(p - q, 0)); the output then has exactly the main model's distribution, and with
  greedy decoding (p, q one-hot) it is token for token plain greedy decoding. The main model's
  cache entry of a rejected draft is rewritten by the next step at that position. Only depth 1
  drafts (DeepSeek-V3 trains D = 1; deeper modules would draft further tokens from drafted ones).
* ``generate_uncached``: the model's own training-path ``forward`` over the whole sequence at every
  step, no cache: the reference of the tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hai_llm.model.transformer import Transformer

from .absorbed import CachedDecoder
from .sampling import SamplingConfig, distribution, draw, sample


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # the generated tokens (the prompt excluded)
    drafted: int = 0  # speculative decoding: drafts verified
    accepted: int = 0  # ... and accepted
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def _prepare(model: Transformer, prompt: list[int], max_new_tokens: int, seed: int):
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (--prompt)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"max_seq_len={model.args.max_seq_len}; shorten the prompt or lower --max-new-tokens")
    device = next(model.parameters()).device
    return device, torch.Generator(device=device).manual_seed(seed)


def _finish(out: list[int], max_new_tokens: int, stop_id: int | None) -> list[int]:
    out = out[:max_new_tokens]
    if stop_id is not None and stop_id in out:
        out = out[:out.index(stop_id) + 1]
    return out


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0, speculative: bool = False,
             stop_id: int | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt`` (token ids), stopping after ``stop_id``."""
    device, gen = _prepare(model, prompt, max_new_tokens, seed)
    t0 = time.perf_counter()
    if speculative:
        res = _speculative(model, prompt, max_new_tokens, sampling, gen, stop_id, device)
    else:
        dec = CachedDecoder(model, 1, len(prompt) + max_new_tokens)
        h = dec.main(torch.tensor([prompt], device=device), 0)
        out: list[int] = []
        while True:
            out.append(sample(dec.logits(h[0, -1]), sampling, gen))
            if len(out) == max_new_tokens or out[-1] == stop_id:
                break
            h = dec.main(torch.tensor([[out[-1]]], device=device), len(prompt) + len(out) - 1)
        res = Generation(out)
    res.tokens = _finish(res.tokens, max_new_tokens, stop_id)
    res.seconds = time.perf_counter() - t0
    return res


def _accept(p: torch.Tensor, q: torch.Tensor, d: int, gen: torch.Generator) -> bool:
    """Speculative sampling's test: accept draft ``d`` with probability min(1, p(d) / q(d))
    (no random number when that is 0 or 1, e.g. greedy)."""
    ratio = float(p[d]) / max(float(q[d]), 1e-30)
    if ratio >= 1.0 or ratio <= 0.0:
        return ratio >= 1.0
    return float(torch.rand((), generator=gen, device=p.device)) < ratio


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(p - q, 0)): the distribution of a replacement token (p itself if empty)."""
    r = (p - q).clamp_min(0.0)
    total = r.sum()
    return p if float(total) <= 0.0 else r / total


def _speculative(model: Transformer, prompt: list[int], max_new: int, sampling: SamplingConfig,
                 gen: torch.Generator, stop_id: int | None, device) -> Generation:
    if model.args.n_mtp_layers < 1:
        raise ValueError("speculative decoding drafts with the MTP module, but this model has "
                         "model.n_mtp_layers=0; sample without --speculative")
    n = len(prompt)
    dec = CachedDecoder(model, 1, n + max_new)
    def T(ids: list[int]) -> torch.Tensor:  # one sequence of ids as a [1, S] batch
        return torch.tensor([ids], device=device)

    seq = list(prompt)
    hn = dec.main(T(seq), 0)  # main model over positions 0..n-1
    seq.append(sample(dec.logits(hn[0, -1]), sampling, gen))  # x_n
    # MTP position i reads (main state i, token i+1) and predicts token i+2
    hm = dec.mtp(1, hn, T(seq[1:n + 1]), 0)
    res = Generation()
    while len(seq) - n < max_new and seq[-1] != stop_id:
        q = distribution(dec.logits(hm[0, -1]), sampling)
        d = draw(q, gen)  # the draft of x_{m+1}
        m = len(seq) - 1  # the last committed token x_m; main cache valid for 0..m-1, MTP too
        hn = dec.main(T([seq[m], d]), m)
        p = distribution(dec.logits(hn[0, 0]), sampling)
        res.drafted += 1
        if _accept(p, q, d, gen):
            res.accepted += 1
            seq.append(d)
            if len(seq) - n >= max_new or d == stop_id:
                break
            seq.append(draw(distribution(dec.logits(hn[0, 1]), sampling), gen))  # x_{m+2}, free
            hm = dec.mtp(1, hn, T(seq[m + 1:m + 3]), m)  # MTP positions m, m+1
        else:
            seq.append(draw(_residual(p, q), gen))  # position m+1 of the main cache is rewritten next step
            hm = dec.mtp(1, hn[:, :1], T([seq[m + 1]]), m)
    res.tokens = seq[n:]
    return res


@torch.no_grad()
def generate_uncached(model: Transformer, prompt: list[int], max_new_tokens: int,
                      sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                      stop_id: int | None = None) -> Generation:
    """The reference: the model's training-path ``forward`` over the whole sequence every step."""
    device, gen = _prepare(model, prompt, max_new_tokens, seed)
    t0 = time.perf_counter()
    seq = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([seq], device=device))[0, -1]
        model.pop_moe_stats()
        seq.append(sample(logits, sampling, gen))
        if seq[-1] == stop_id:
            break
    return Generation(_finish(seq[len(prompt):], max_new_tokens, stop_id), seconds=time.perf_counter() - t0)
