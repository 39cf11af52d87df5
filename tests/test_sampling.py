"""Sampling from checkpoints (hai_llm/infer, hai-llm-sample): the latent KV cache, the absorbed
attention, cached and speculative decoding against the uncached reference, the sampling rules,
and the CLI on a checkpoint written by a parallel layout.

Token-for-token comparisons run the model in float64. Why: cached and uncached decoding (and
speculative verification of two positions against plain decoding of one) compute the same logits
through differently shaped operations (absorbed vs expanded attention, S=2 vs S=1 GEMMs), so they
agree only up to rounding; in float32 a near-tie of the two best logits (a gap below ~1e-6) could
flip an argmax and fail the test without any bug. In float64 the paths agree to ~1e-13 (the
model's RMSNorms and RoPE still round through float32 on identical inputs), so an argmax flip
needs a gap ~1e6 times smaller. Comparisons of values (absorbed vs model attention) run in
float32 with a tolerance derived from float32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from hai_llm.config.load import load_model_args
from hai_llm.infer import LatentCache, SamplingConfig, absorbed_attention, generate, generate_uncached
from hai_llm.infer.generate import _accept, _residual
from hai_llm.infer.sampling import distribution
from hai_llm.model.transformer import build_model
from helpers import randomize, rel_err

PROMPT = [5, 17, 99, 3, 250, 41, 41, 7, 120, 64, 33, 200]


def _model(dtype=torch.float64, seed=3):
    args = load_model_args("tiny")
    m = build_model(args, "cpu", seed=seed)
    randomize(m, seed)  # larger weights: routing far from uniform, logits far from flat
    m = m.to(dtype)
    m.reset_buffers()
    return m.eval()


def _agreeing_mtp(m):
    """A model whose MTP draft is accepted about half the time: block outputs (``wo``, every
    ``w2``) shrunk to 0.1 so the main model's next token is mostly a function of the current
    token, and an MTP module that passes the next token's embedding through unchanged (identity
    block, ``eh_proj`` = [I | 0], unit norms), so its draft of x_{i+2} is that function of x_{i+1}.
    Exercises both the accept and the reject branch (measured: 13 of 26 drafts accepted)."""
    with torch.no_grad():
        for block in m.layers:
            block.attn.wo.weight.mul_(0.1)
            for name, p in block.ffn.named_parameters():
                if "w2" in name.split("."):
                    p.mul_(0.1)
        mod = m.mtp[0]
        dim = m.args.dim
        for norm in (m.norm, mod.enorm, mod.norm):
            norm.weight.fill_(1.0)
        mod.eh_proj.weight.copy_(torch.cat([torch.eye(dim), torch.zeros(dim, dim)], 1))
        mod.block.attn.wo.weight.zero_()
        for name, p in mod.block.ffn.named_parameters():
            if "w2" in name.split("."):
                p.zero_()
    return m


def test_latent_cache_holds_only_the_latent_and_rope_key():
    m = _model()
    a = m.args
    gen = generate(m, PROMPT, 4)  # fills a cache the way generation does
    cache = LatentCache.for_model(a, batch=2, max_len=16)
    per = a.kv_lora_rank + a.qk_rope_head_dim
    assert cache.numbers_per_token_per_layer == per
    stored = sum(t.numel() for t in vars(cache).values() if isinstance(t, torch.Tensor))
    assert stored == (a.n_layers + a.n_mtp_layers) * 2 * 16 * per  # nothing else per token
    # what is cached: kv_norm(latent) and the roped key, as the model computes them
    from hai_llm.infer import CachedDecoder

    dec = CachedDecoder(m, 1, len(PROMPT))
    dec.main(torch.tensor([PROMPT]), 0)
    blk = m.layers[0]
    x = blk.attn_norm(m.embed(torch.tensor([PROMPT])))
    lat = blk.attn.latent(x, m.rope(torch.arange(len(PROMPT))))
    assert torch.equal(dec.cache.kv[0], blk.attn.kv_norm(lat[..., :a.kv_lora_rank]))
    assert torch.equal(dec.cache.pe[0], lat[..., a.kv_lora_rank:])
    assert len(gen.tokens) == 4


@torch.no_grad()
def test_absorbed_attention_equals_model_attention():
    m = _model(torch.float32)
    a = m.args
    S, split = 24, 15
    torch.manual_seed(0)
    for layer in range(a.n_layers):
        blk = m.layers[layer]
        x = blk.attn_norm(torch.randn(2, S, a.dim))
        rope = m.rope(torch.arange(S))
        ref = blk.attn(x, rope)  # the training path: expanded keys/values, SDPA
        cache = LatentCache.for_model(a, 2, S)
        # a prefix, then the rest attending over the cached prefix, as decoding does
        first = absorbed_attention(blk.attn, x[:, :split], m.rope(torch.arange(split)), cache, layer, 0)
        rest = absorbed_attention(blk.attn, x[:, split:], m.rope(torch.arange(split, S)), cache, layer, split)
        got = torch.cat([first, rest], 1)
        # float32: the absorbed path sums q.W_k^T over the latent (C=32) instead of q.k over the
        # head dim (16) and weights latents before W_v: each output is a different ordering of
        # the same ~C*T products, a few ulps (eps 1.2e-7) each; 1e-5 relative leaves >10x margin
        # while a missing mask, scale or rope would be off by 1e-2 or more
        assert rel_err(got, ref) < 1e-5, (layer, rel_err(got, ref))


def test_cached_greedy_equals_uncached_greedy():
    m = _model()
    cached = generate(m, PROMPT, 48)
    uncached = generate_uncached(m, PROMPT, 48)
    assert cached.tokens == uncached.tokens
    assert len(set(cached.tokens)) > 3  # a real continuation, not one repeated token


def test_speculative_greedy_equals_plain_greedy():
    n = 40
    for m in (_model(), _agreeing_mtp(_model(seed=5))):
        plain = generate(m, PROMPT, n)
        spec = generate(m, PROMPT, n, speculative=True)
        assert spec.tokens == plain.tokens
        assert spec.drafted > 0
    assert 0 < spec.accepted < spec.drafted, (spec.accepted, spec.drafted)  # both branches ran
    # a greedy step yields 2 tokens on acceptance, 1 otherwise (the first token comes from the prefill)
    assert spec.drafted in (n - 1 - spec.accepted, n - spec.accepted)


def test_speculative_sampling_keeps_the_target_distribution():
    """P(output t) = q(t) min(1, p(t)/q(t)) + P(reject) residual(t) = p(t), exactly."""
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        p = torch.rand(7, generator=g, dtype=torch.float64).softmax(0)
        q = (3 * torch.rand(7, generator=g, dtype=torch.float64)).softmax(0)
        accept = torch.minimum(torch.ones_like(p), p / q)
        out = q * accept + (1 - (q * accept).sum()) * _residual(p, q)
        assert torch.allclose(out, p, atol=1e-12)
    p = torch.tensor([0.0, 1.0, 0.0])
    assert _accept(p, torch.tensor([0.0, 1.0, 0.0]), 1, g) and not _accept(p, torch.tensor([1.0, 0.0, 0.0]), 0, g)


def test_sampling_rules_and_seed():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert torch.equal(distribution(logits, SamplingConfig()), torch.tensor([1.0, 0, 0, 0, 0]))
    k2 = distribution(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert (k2[2:] == 0).all() and abs(float(k2.sum()) - 1) < 1e-6
    full = logits.softmax(0)
    p = distribution(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    # the smallest prefix of most likely tokens whose mass reaches 0.8: the first two (0.665 + 0.245)
    assert (p[:2] > 0).all() and (p[2:] == 0).all() and torch.allclose(p[:2], full[:2] / full[:2].sum())
    with pytest.raises(ValueError, match="top-p"):
        SamplingConfig(top_p=0.0)
    m = _model()
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)
    a, b = (generate(m, PROMPT, 16, cfg, seed=7) for _ in range(2))
    assert a.tokens == b.tokens  # seeded
    assert generate(m, PROMPT, 16, cfg, seed=7, speculative=True).tokens  # runs; its draws differ by design


def test_generation_limits_are_explained():
    m = _model()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(m, PROMPT, m.args.max_seq_len)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(m, [], 4)


@pytest.mark.dist
def test_cli_samples_from_a_pipeline_parallel_checkpoint(corpus_dir, tmp_path, capsys):
    """hai-llm-sample on a run trained by the simulated-rank launcher with a 2-stage DualPipe
    pipeline (each rank wrote only its stages' parameter ranges): it loads into one process,
    prints the prompt and its continuation, and generates what the loaded model generates."""
    from omegaconf import OmegaConf

    from hai_llm.infer import load_run
    from hai_llm.launch.ranks import launch
    from hai_llm.launch.sample import main
    from helpers import layout_config

    run = tmp_path / "run"
    cfg = layout_config(str(corpus_dir), str(run), steps=3, global_batch=4,
                        parallel=dict(nprocs=2, pp=2, schedule="dualpipe"))
    launch(cfg, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    capsys.readouterr()
    assert main([str(tmp_path), "--prompt", "def ", "--max-new-tokens", "24", "--speculative",
                 "--device", "cpu"]) == 0  # the folder of runs: its newest run is picked
    out, err = capsys.readouterr()
    loaded = load_run(run)
    want = generate(loaded.model, loaded.tokenizer.encode("def "), 24)
    # greedy speculative == greedy in exact arithmetic; in float32 a near-tie could differ, so
    # compare with plain greedy only the printed text's start and the stats line
    assert out.startswith("def ") and len(out.rstrip("\n")) > len("def ")
    assert "MTP drafts accepted" in err and "step_" in err
    assert main([str(run), "--prompt", "def ", "--max-new-tokens", "24", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == "def " + loaded.tokenizer.decode(want.tokens,
                                                                                  skip_special_tokens=True)
    assert main([str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    assert "neither a run folder" in capsys.readouterr().err
