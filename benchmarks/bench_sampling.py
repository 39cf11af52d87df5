"""Sampling speed and KV-cache size: uncached (the training-path forward over the whole sequence
every step), cached with MLA's latent cache and absorbed ``wkv_b``, and MTP speculative decoding.

Prints tokens/s of greedy generation for each mode, the MTP acceptance rate, and the cache size per
token against what caching expanded keys and values would cost. With ``--run`` it samples from a
trained run (e.g. the main job's ``runs/small``), otherwise from a freshly initialised model of
``--model`` (tokens/s only: an untrained MTP module's drafts are rarely accepted).

    python benchmarks/bench_sampling.py --run runs/small --new 256
    python benchmarks/bench_sampling.py --model small --new 128

Timings on a shared machine are noisy: re-run on a quiet one before quoting them.
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    from hai_llm.config.load import load_model_args
    from hai_llm.infer import generate, generate_uncached, load_run
    from hai_llm.model.transformer import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a run folder or folder of runs (default: a fresh model)")
    ap.add_argument("--model", default="small", help="model config when no --run is given")
    ap.add_argument("--prompt", default="def main(")
    ap.add_argument("--new", type=int, default=128, help="tokens to generate")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.run:
        run = load_run(a.run)
        model, prompt, where = run.model, run.tokenizer.encode(a.prompt), str(run.checkpoint)
    else:
        model = build_model(load_model_args(a.model), "cpu", seed=0).eval()
        prompt, where = list(a.prompt.encode()), f"fresh {a.model} model"
    args = model.args
    print(f"{where}: prompt {len(prompt)} tokens, {a.new} new, greedy, {a.threads} thread(s)")
    rows = []
    for name, fn in [("uncached (full forward per token)", lambda: generate_uncached(model, prompt, a.new)),
                     ("latent cache + absorbed wkv_b", lambda: generate(model, prompt, a.new)),
                     ("latent cache + MTP speculative", lambda: generate(model, prompt, a.new, speculative=True))]:
        fn()  # warm-up
        g = fn()
        rate = "" if g.acceptance_rate is None else f"{100 * g.acceptance_rate:.0f}%"
        rows.append((name, f"{len(g.tokens) / g.seconds:.1f}", rate))
    w = max(len(r[0]) for r in rows)
    print(f"{'mode':<{w}}  tokens/s  MTP acceptance")
    for name, tps, rate in rows:
        print(f"{name:<{w}}  {tps:>8}  {rate}")
    latent = args.kv_lora_rank + args.qk_rope_head_dim
    expanded = args.n_heads * (args.qk_head_dim + args.v_head_dim)
    print(f"cache per token per layer: {latent} numbers (latent {args.kv_lora_rank} + rope key "
          f"{args.qk_rope_head_dim}); expanded keys+values would be {expanded} ({expanded / latent:.1f}x)")


if __name__ == "__main__":
    main()
