"""Derive the H800 profile's achieved efficiencies from DeepSeek's published training trace.

``configs/hardware/h800.yaml`` prices GEMMs, attention and the remaining (memory-bound) kernels
with rates measured on DeepSeek's own training kernels: the PyTorch-profiler trace
``train.json`` of github.com/deepseek-ai/profile-data (commit 4496024), one overlapped F&B pair
of DualPipe with 4 MoE layers per chunk, EP64, 4K tokens per micro-batch. This script re-derives
those numbers from the trace so they can be checked:

* kernel time on the compute streams (everything but DeepEP's communication kernels), split
  into GEMM kernels, FlashAttention forward / backward kernels, and the rest;
* the FLOPs of 4 MoE layers x 4096 tokens forward + input grad + weight grad from
  ``hai_llm.planner.flops`` (GEMMs) and the causal attention core (forward, 2x for backward);
* achieved / peak (H800 dense: 1979 FP8, 989.5 BF16 TFLOPS).

    git clone https://github.com/deepseek-ai/profile-data && \\
        python benchmarks/bench_cost_h800_trace.py profile-data/train.json
"""
from __future__ import annotations

import argparse
import json
import sys

FP8_PEAK, BF16_PEAK = 1979e12, 989.5e12
LAYERS, TOKENS = 4, 4096  # the trace's chunk: 4 MoE layers; FlashAttention grid 32 x 128-row tiles


def derive(trace: dict) -> dict[str, float]:
    from hai_llm.config.load import load_model_args
    from hai_llm.planner.flops import attn_piece, mlp_piece

    args = load_model_args("deepseek_v3_671b", [])
    a, m = attn_piece(args, TOKENS), mlp_piece(args, True)
    gemm = (a.gemm_f + a.gemm_b + a.gemm_w + m.gemm_f + m.gemm_b + m.gemm_w) * TOKENS * LAYERS
    attn_f, attn_b = a.attn_f * TOKENS * LAYERS, a.attn_b * TOKENS * LAYERS
    every = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]
    # the communication stream: where DeepEP's dispatch / combine kernels run (20 SMs)
    comm = {e["tid"] for e in every if "dpsk::ep::internode::dispatch" in e["name"]}
    kernels = [e for e in every if e["tid"] not in comm]
    t = lambda pick: sum(e["dur"] for e in kernels if pick(e["name"])) * 1e-6
    g = t(lambda n: "gemm" in n.lower())
    ff = t(lambda n: "flash" in n.lower() and "Bwd" not in n)
    fb = t(lambda n: "flash" in n.lower() and "Bwd" in n)
    total = t(lambda n: True)
    return {"gemm_ms": g * 1e3, "gemm_tflops": gemm / g / 1e12, "gemm_efficiency_fp8": gemm / g / FP8_PEAK,
            "attn_fwd_efficiency": attn_f / ff / BF16_PEAK, "attn_bwd_efficiency": attn_b / fb / BF16_PEAK,
            "nongemm_fraction": (total - g - ff - fb) / total, "compute_kernel_ms": total * 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="profile-data/train.json")
    a = ap.parse_args(argv)
    with open(a.trace) as f:
        out = derive(json.load(f))
    for k, v in out.items():
        print(f"{k:24s} {v:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
