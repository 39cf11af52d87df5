"""`hai-llm-sample`: generate text from a trained run's checkpoint, in one process.

    hai-llm-sample runs/small --prompt "def main(" --max-new-tokens 200        # the main job's latest run
    hai-llm-sample runs/small/20261201-120000 --temperature 0.8 --top-p 0.95 --seed 3
    hai-llm-sample RUN --speculative          # MTP drafts, the main model verifies; prints the acceptance rate

The run may have been trained with any parallel layout (checkpoints are stored in global
coordinates); the model is rebuilt from the run's ``config.yaml`` and decoded with MLA's latent
KV cache and the absorbed ``wkv_b`` (docs/sampling.md). The prompt and the generated text go to
stdout, one statistics line to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hai-llm-sample", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder (train.out_dir), or a folder of runs: its newest one with a checkpoint")
    ap.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    ap.add_argument("--checkpoint", default=None, help="a step_N folder (default: the run's latest)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--stop-at-eos", action="store_true", help="stop after the tokenizer's end-of-document id")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (0 = torch's default; 1 is fastest for small models on a busy machine)")
    a = ap.parse_args(argv)
    try:
        return _sample(a)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("HAI_LLM_TRACEBACK"):
            raise
        print(f"hai-llm-sample: error: {e}", file=sys.stderr)
        return 2


def _sample(a) -> int:
    import torch

    from hai_llm.infer import SamplingConfig, generate, load_run

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    sampling = SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    run = load_run(a.run, a.checkpoint, device=device)
    prompt = run.tokenizer.encode(a.prompt)
    stop = run.tokenizer.eos_id if a.stop_at_eos else None
    out = generate(run.model, prompt, a.max_new_tokens, sampling, seed=a.seed, speculative=a.speculative,
                   stop_id=stop)
    print(a.prompt + run.tokenizer.decode(out.tokens, skip_special_tokens=True))
    stats = (f"{len(out.tokens)} tokens in {out.seconds:.2f} s ({len(out.tokens) / max(out.seconds, 1e-9):.1f} tok/s) "
             f"from {run.checkpoint}")
    if a.speculative:
        stats += f"; MTP drafts accepted: {out.accepted}/{out.drafted} ({100 * (out.acceptance_rate or 0):.0f}%)"
    print(stats, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
