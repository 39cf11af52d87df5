"""Training-step speed and memory of our model vs transformers' DeepseekV3ForCausalLM on CPU.

Why: the HF implementation is the reference we test logits against; this shows what our
vectorised MoE and MLA cost or save for forward + backward on the same config and the SAME
weights (ours is initialized, written with save_hf_checkpoint, and each side loads that folder:
ours with load_hf_checkpoint, HF with from_pretrained). Logits of one batch are compared too, so
the table is known to time the same computation.

Method:
- fp32, train mode, loss = cross-entropy of the logits (no MTP: HF trains none), grads set to None
  between steps; forward and backward timed separately;
- speed: all models in one subprocess, ``--warmup`` untimed then ``--steps`` timed steps taken in
  turn (ours, HF, ours, HF, ...), so load from other processes on a shared machine hits each
  alike; the median step is reported, and the fastest;
- memory: a fresh subprocess per model, RSS high-water mark over two steps minus RSS after loading
  (Linux /proc/self/status VmHWM, reset through /proc/self/clear_refs after loading). torch's CPU
  allocator keeps no peak statistics and tracemalloc does not see tensor memory; RSS counts
  activations, gradients and allocator slack alike, i.e. what the machine must provide.
- HF runs with each ``--hf-experts`` implementation: transformers 5.x defaults to ``grouped_mm``
  (torch's grouped GEMM), ``eager`` is its per-expert Python loop.

``--profile`` prints the top operators of one step of each model (torch.profiler).
Run: OMP_NUM_THREADS=2 python benchmarks/bench_vs_hf.py
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--topk-groups", type=int, default=2)
    p.add_argument("--moe-inter", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
                   help="torch intra-op threads (default: $OMP_NUM_THREADS, else torch's default)")
    p.add_argument("--hf-experts", default="grouped_mm,eager",
                   help="comma-separated transformers experts implementations to time")
    p.add_argument("--profile", action="store_true", help="print the top operators of one step per model")
    p.add_argument("--child", help=argparse.SUPPRESS)  # "time:<variants>" or "mem:<variant>"
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_args(a: argparse.Namespace):
    from hai_llm.model.args import ModelArgs

    return ModelArgs(
        name="bench", vocab_size=a.vocab, dim=a.dim, inter_dim=4 * a.dim, moe_inter_dim=a.moe_inter,
        n_layers=a.layers, n_dense_layers=a.dense_layers, n_heads=a.heads, n_routed_experts=a.experts,
        n_shared_experts=1, n_activated_experts=a.topk, n_expert_groups=a.groups, n_limited_groups=a.topk_groups,
        q_lora_rank=a.dim // 2, kv_lora_rank=a.dim // 4, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_seq_len=4 * a.seq, original_seq_len=a.seq, rope_factor=4.0, n_mtp_layers=0, init_std=0.02)


def _mem_mib() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}


def load_variant(variant: str, ckpt: str):
    """(module, forward(tokens) -> logits) for "ours" or "hf:<experts implementation>"."""
    import torch

    if variant == "ours":
        from hai_llm.interop.hf import args_from_hf_config, load_hf_checkpoint
        from hai_llm.model.transformer import build_model

        model = build_model(args_from_hf_config(ckpt), device="cpu")
        load_hf_checkpoint(model, ckpt)
        return model.train(), model
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa",
                                                  experts_implementation=variant.split(":", 1)[1]).train()
    return model, lambda x: model(input_ids=x, use_cache=False).logits


def train_step(model, forward, tokens) -> tuple[float, float, float]:
    """One forward + backward: (forward s, backward s, process CPU s of all threads)."""
    import torch.nn.functional as F

    c0, t0 = time.process_time(), time.perf_counter()
    logits = forward(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.process_time() - c0


def run_child(a: argparse.Namespace) -> None:
    """"time": all variants in this process, steps interleaved so that load from other processes
    hits each alike; "mem:<variant>": one model alone, its RSS peak over the steps."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0))
    if a.child.startswith("mem:"):
        model, forward = load_variant(a.child[4:], a.ckpt)
        after_load = _mem_mib()["VmRSS"]
        try:  # Linux: "5" resets VmHWM, so the peak below excludes loading
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
        for _ in range(2):  # the peak is reached in the first step already
            train_step(model, forward, tokens)
        peak = _mem_mib()["VmHWM"]
        Path(a.out).write_text(json.dumps({"peak_delta": peak - after_load, "peak": peak, "reset": reset}))
        return
    variants = a.child.split(":", 1)[1].split(",")
    models = {v: load_variant(v, a.ckpt) for v in variants}
    result = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()[0]}
    with torch.no_grad():
        probe = {v: fwd(tokens[:, :-1]).float() for v, (_, fwd) in models.items()}
    times: dict[str, list] = {v: [] for v in variants}
    for i in range(a.warmup + a.steps):
        for v, (model, fwd) in models.items():
            t = train_step(model, fwd, tokens)
            if i >= a.warmup:
                times[v].append(t)
    result["load_after"] = os.getloadavg()[0]
    for v, ts in times.items():
        fwd_ms, bwd_ms = (1e3 * statistics.median(t[k] for t in ts) for k in (0, 1))
        best = min(t[0] + t[1] for t in ts)
        result[v] = {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "tok_s": a.batch * a.seq / (fwd_ms + bwd_ms) * 1e3,
                     "best_tok_s": a.batch * a.seq / best, "cpu_s": min(t[2] for t in ts),
                     "logit_diff": float((probe[v] - probe[variants[0]]).abs().max())}
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(*models[v], tokens)
            result[v]["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    Path(a.out).write_text(json.dumps(result))


def main() -> None:
    a = parse_args()
    if a.child:
        return run_child(a)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("args:", {k: v for k, v in vars(a).items() if k not in ("child", "ckpt", "out")})
    import torch

    import transformers
    from hai_llm.interop.hf import save_hf_checkpoint
    from hai_llm.model.transformer import build_model

    args = model_args(a)
    print(f"config: dim={args.dim} layers={args.n_layers} ({args.n_dense_layers} dense) heads={args.n_heads} "
          f"experts={args.n_routed_experts} top-{args.n_activated_experts} groups {args.n_expert_groups} keep "
          f"{args.n_limited_groups} moe_inter={args.moe_inter_dim} + 1 shared, q/kv rank {args.q_lora_rank}/"
          f"{args.kv_lora_rank}, vocab={args.vocab_size}, batch={a.batch} x seq={a.seq}, fp32, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    variants = ["ours"] + [f"hf:{impl}" for impl in a.hf_experts.split(",") if impl]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        model = build_model(args, device="cpu", seed=0)
        with torch.no_grad():  # a routing bias like a trained model's, so the bias path is exercised
            for m in model.moe_layers():
                m.gate.bias.normal_(0, 0.01)
        save_hf_checkpoint(model, ckpt)
        del model

        def child(kind: str) -> dict:
            out = Path(tmp) / "out.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", kind, "--ckpt", str(ckpt), "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"benchmark child '{kind}' failed:\n{proc.stderr[-4000:]}")
            return json.loads(out.read_text())

        timing = child("time:" + ",".join(variants))
        mem = {v: child("mem:" + v) for v in variants}
    names = {"ours": "hai_llm"} | {v: f"HF experts={v.split(':')[1]}" for v in variants[1:]}
    ours = timing["ours"]
    print(f"\n{'model':<22}{'tokens/s':>9}{'best':>7}{'fwd ms':>8}{'bwd ms':>8}{'CPU s':>7}{'peak dRSS MiB':>14}"
          f"{'RSS MiB':>8}{'max|dlogit|':>12}{'ours/this':>10}{'(CPU)':>7}")
    for v in variants:
        r, m = timing[v], mem[v]
        print(f"{names[v]:<22}{r['tok_s']:>9.0f}{r['best_tok_s']:>7.0f}{r['fwd_ms']:>8.0f}{r['bwd_ms']:>8.0f}"
              f"{r['cpu_s']:>7.2f}{m['peak_delta']:>14.1f}{m['peak']:>8.0f}{r['logit_diff']:>12.1e}"
              f"{ours['tok_s'] / r['tok_s']:>9.2f}x{r['cpu_s'] / ours['cpu_s']:>6.2f}x")
    print(f"\nthreads={timing['threads']}. tokens/s: median step (best: fastest step). CPU s: least process CPU "
          "time of a step, all threads. ours/this: our median tokens/s over that model's, (CPU): its CPU s over "
          "ours; > 1 means ours is faster. peak dRSS: RSS high-water mark over two training steps minus RSS "
          "after loading, one process per model"
          + ("" if all(m["reset"] for m in mem.values()) else " (WARNING: VmHWM not reset, includes loading)"))
    print(f"machine load average (1 min) before/after timing: {timing['load_before']:.1f} / "
          f"{timing['load_after']:.1f} on {os.cpu_count()} cores: above the thread count, other processes "
          "shared the CPU and absolute numbers are low; steps were interleaved so ratios stay comparable")
    if a.profile:
        for v in variants:
            print(f"\n--- profile of one step: {names[v]} ---\n{timing[v]['profile']}")


if __name__ == "__main__":
    main()
