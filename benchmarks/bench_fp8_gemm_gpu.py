"""Throughput of our block-scaled FP8 GEMMs (Triton) at DeepSeek-V3 shapes, on a GPU.

Dense (``fp8_gemm``): M = 4096 tokens, K = 7168 (model dim), N in {2048, 4096, 7168, 16384}, in
the Fprop orientation (x 1x128 tiles, W 128x128 blocks); plus Dgrad (dx = dy W: W quantized
transposed, ``weight_quant(..., transpose=True)``) and Wgrad (dW = dy^T x: both quantized 128x1
and stored transposed, ``act_quant_colwise(..., transpose=True)``) at N = 2048 and 7168. Every
launch reads both operands K-major, as the FP8 modules run them.
Grouped (``fp8_grouped_gemm``, contiguous layout): G experts x 512 tokens, G in {8, 32}, for the
expert up-projection (N 2048, K 7168) and down-projection (N 7168, K 2048), forward and Wgrad.

Baselines on the same (M, N, K) of each GEMM: ``torch._scaled_mm`` with per-tensor and with
row-wise scales (one scale per row of each operand: coarser than our 1x128 / 128x128 tiles, the
cuBLAS FP8 path), and a bf16 ``torch.matmul``. Grouped baselines: one bf16 ``torch._grouped_mm``
when available, else G bf16 matmuls. Every Triton result is first checked against the torch
reference of the same block-scaled math (``fp8_gemm_ref`` / ``fp8_grouped_gemm_ref``) before it
is timed. Timing: ``triton.testing.do_bench`` (median ms, L2 flushed between runs);
TFLOPS = 2 M N K / t. The launch config is the per-shape heuristic unless ``--autotune``
(= ``HAI_LLM_AUTOTUNE=1``, see docs/fp8.md).

    python benchmarks/bench_fp8_gemm_gpu.py            # on a CUDA machine (H100/H800/H200)
    python benchmarks/bench_fp8_gemm_gpu.py --quick    # fewer shapes (benchmarks/gpu_smoke.sh)
    python benchmarks/bench_fp8_gemm_gpu.py --smoke    # CPU: Triton interpreter, tiny shapes,
                                                        # correctness only (checks the script)

On a machine without CUDA and without --smoke it prints why it skips and exits 0.
For reference (docs/deepseek_v3.md): DeepGEMM reports ~1520-1550 dense and 1214-1346 grouped FP8
TFLOPS on H800; the H100 SXM dense FP8 peak is ~1979 TFLOPS (989 bf16).
"""
from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first triton import: the interpreter is chosen at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from hai_llm.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref  # noqa: E402
from hai_llm.kernels.fp8_grouped_gemm import (fp8_grouped_gemm, fp8_grouped_gemm_ref,  # noqa: E402
                                              fp8_grouped_gemm_wgrad,
                                              fp8_grouped_gemm_wgrad_ref, group_offsets)
from hai_llm.kernels.fp8_quant import (FP8_DTYPE, FP8_MAX, act_quant,  # noqa: E402
                                       act_quant_colwise, stacked_weight_quant, weight_quant)

DENSE_N = (2048, 4096, 7168, 16384)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench(fn, smoke: bool) -> float:
    """Median milliseconds of fn()."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def per_tensor_fp8(t: torch.Tensor):
    s = t.abs().amax().float().clamp_min(1e-12) / FP8_MAX
    return (t / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


def rowwise_fp8(t: torch.Tensor):
    s = t.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (t / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


def scaled_mm_baselines(a: torch.Tensor, b: torch.Tensor, smoke: bool) -> dict:
    """ms of torch._scaled_mm (per-tensor, row-wise) and bf16 matmul for c = a @ b^T,
    a [M, K], b [N, K] in high precision."""
    out = {}
    ab, bb = a.bfloat16(), b.bfloat16()
    out["bf16"] = bench(lambda: ab @ bb.t(), smoke)
    if not a.is_cuda or not hasattr(torch, "_scaled_mm"):
        return out
    aq, as_ = per_tensor_fp8(a)
    bq, bs = per_tensor_fp8(b)
    try:
        torch._scaled_mm(aq, bq.t(), scale_a=as_, scale_b=bs, out_dtype=torch.bfloat16)
        out["_scaled_mm tensor"] = bench(lambda: torch._scaled_mm(
            aq, bq.t(), scale_a=as_, scale_b=bs, out_dtype=torch.bfloat16), smoke)
    except Exception as e:  # noqa: BLE001 - report, keep going
        print(f"    _scaled_mm per-tensor unavailable: {type(e).__name__}: {str(e)[:120]}")
    aq, as_ = rowwise_fp8(a)
    bq, bs = rowwise_fp8(b)
    bst = bs.t().contiguous()  # [1, N]
    try:
        torch._scaled_mm(aq, bq.t(), scale_a=as_, scale_b=bst, out_dtype=torch.bfloat16)
        out["_scaled_mm rowwise"] = bench(lambda: torch._scaled_mm(
            aq, bq.t(), scale_a=as_, scale_b=bst, out_dtype=torch.bfloat16), smoke)
    except Exception as e:  # noqa: BLE001
        print(f"    _scaled_mm row-wise unavailable: {type(e).__name__}: {str(e)[:120]}")
    return out


def dense(dev, smoke: bool, quick: bool, use_triton: bool) -> list[dict]:
    rows = []
    m, k = (256, 512) if smoke else (4096, 7168)
    if smoke:
        ns = (128,) if quick else (128, 256)
    else:
        ns = (2048, 7168) if quick else DENSE_N
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g)
    for n in ns:
        w = torch.randn(n, k, device=dev, generator=g) * 0.02
        xq, xs = act_quant(x, use_triton=use_triton)
        wq, ws = weight_quant(w, use_triton=use_triton)
        # (name, K-major operands, the same operands in the strided layout, a_hp, b_hp)
        cases = [("fprop", (xq, xs, wq, ws), ((xq, xs, wq, ws), {}), x, w)]
        if n in (2048, 7168, 128):
            dy = torch.randn(m, n, device=dev, generator=g)
            dyq, dys = act_quant(dy, use_triton=use_triton)
            wq_t, ws_t = weight_quant(w, use_triton=use_triton, transpose=True)
            dyc, dycs = act_quant_colwise(dy, use_triton=use_triton, transpose=True)
            xc, xcs = act_quant_colwise(x, use_triton=use_triton, transpose=True)
            dyc_s, dycs_s = act_quant_colwise(dy, use_triton=use_triton)
            xc_s, xcs_s = act_quant_colwise(x, use_triton=use_triton)
            cases += [
                ("dgrad", (dyq, dys, wq_t, ws_t), ((dyq, dys, wq, ws), {"b_transposed": True}),
                 dy, w.t().contiguous()),
                ("wgrad", (dyc, dycs, xc, xcs),
                 ((dyc_s, dycs_s, xc_s, xcs_s), {"a_transposed": True, "b_transposed": True}),
                 dy.t().contiguous(), x.t().contiguous())]
        for name, ops, (strided, kw), a_hp, b_hp in cases:
            ref = fp8_gemm_ref(*ops)
            lay = rel_err(fp8_gemm_ref(*strided, **kw), ref)  # same math, other storage layout
            assert lay < 1e-6, f"{name}: K-major and strided operands disagree ({lay:.1e})"
            got = fp8_gemm(*ops, use_triton=use_triton, out_dtype=torch.float32)
            err = rel_err(got, ref)
            assert err < 1e-3, f"{name} n={n}: rel err {err} vs the torch reference"
            rows_, cols_ = got.shape
            red = ops[0].shape[1]
            flops = 2 * rows_ * cols_ * red
            ms = bench(lambda: fp8_gemm(*ops, use_triton=use_triton, out_dtype=torch.bfloat16),
                       smoke)
            base = {b: tflops(flops, t) for b, t in scaled_mm_baselines(a_hp, b_hp, smoke).items()}
            rows.append({"gemm": name, "shape": f"{rows_}x{cols_}x{red}", "err": err, "ms": ms,
                         "tflops": tflops(flops, ms), **base})
            print(f"  dense {name:5s} M N K = {rows_} {cols_} {red}: {tflops(flops, ms):7.1f} "
                  f"TFLOPS ({ms:.3f} ms), rel err {err:.1e}, baselines "
                  + ", ".join(f"{b} {v:.1f}" for b, v in base.items()), flush=True)
    return rows


def grouped(dev, smoke: bool, quick: bool, use_triton: bool) -> list[dict]:
    rows = []
    g = torch.Generator(device=dev).manual_seed(1)
    if smoke:
        configs = [(3, 40, 128, 256)] + ([] if quick else [(3, 40, 256, 128)])
    else:
        configs = [(G, 512, n, k) for G in ((8,) if quick else (8, 32))
                   for n, k in ((2048, 7168), (7168, 2048))]
    for n_groups, per, n, k in configs:
        sizes = torch.full((n_groups,), per, dtype=torch.int64)
        if smoke:
            sizes[1] = 0  # an empty expert
            sizes[0] = 2 * per
        m = int(sizes.sum())
        sizes = sizes.to(dev)  # on the device, as the FP8 experts pass them (no host read)
        x = torch.randn(m, k, device=dev, generator=g)
        w = torch.randn(n_groups, n, k, device=dev, generator=g) * 0.02
        xq, xs = act_quant(x, use_triton=use_triton)
        wq, ws = stacked_weight_quant(w, use_triton=use_triton)
        ref = fp8_grouped_gemm_ref(xq, xs, wq, ws, sizes)
        got = fp8_grouped_gemm(xq, xs, wq, ws, sizes, use_triton=use_triton)
        err = rel_err(got, ref)
        assert err < 1e-3, f"grouped fwd rel err {err}"
        flops = 2 * m * n * k
        offsets = group_offsets(sizes)
        ms = bench(lambda: fp8_grouped_gemm(xq, xs, wq, ws, sizes, use_triton=use_triton,
                                            out_dtype=torch.bfloat16, group_offsets=offsets),
                   smoke)
        xb, wb = x.bfloat16(), w.bfloat16()
        offs = sizes.cumsum(0).to(torch.int32)
        if dev.type == "cuda" and hasattr(torch, "_grouped_mm"):
            base = bench(lambda: torch._grouped_mm(xb, wb.transpose(-2, -1), offs=offs), smoke)
            bname = "bf16 _grouped_mm"
        else:
            bounds = [0] + sizes.cumsum(0).tolist()
            base = bench(lambda: [xb[a:b] @ wb[i].t() for i, (a, b) in
                                  enumerate(zip(bounds[:-1], bounds[1:]))], smoke)
            bname = "bf16 matmul loop"
        shape = f"{n_groups}x{per} N{n} K{k}"
        rows.append({"gemm": "grouped fwd", "shape": shape, "err": err, "ms": ms,
                     "tflops": tflops(flops, ms), "bf16": tflops(flops, base)})
        print(f"  grouped fwd   G={n_groups} x {per} N={n} K={k}: {tflops(flops, ms):7.1f} TFLOPS "
              f"({ms:.3f} ms), rel err {err:.1e}, {bname} {tflops(flops, base):.1f}", flush=True)
        # Wgrad: dW[g] = dY_g^T X_g, both 128x1 along tokens, stored transposed (K-major)
        dy = torch.randn(m, n, device=dev, generator=g)
        dyc, dycs = act_quant_colwise(dy, use_triton=use_triton, transpose=True)
        xc, xcs = act_quant_colwise(x, use_triton=use_triton, transpose=True)
        ref = fp8_grouped_gemm_wgrad_ref(dyc, dycs, xc, xcs, sizes, transposed=True)
        got = fp8_grouped_gemm_wgrad(dyc, dycs, xc, xcs, sizes, use_triton=use_triton,
                                     transposed=True)
        err = rel_err(got, ref)
        assert err < 1e-3, f"grouped wgrad rel err {err}"
        ms = bench(lambda: fp8_grouped_gemm_wgrad(dyc, dycs, xc, xcs, sizes, use_triton=use_triton,
                                                  out_dtype=torch.bfloat16, transposed=True,
                                                  group_offsets=offsets), smoke)
        rows.append({"gemm": "grouped wgrad", "shape": shape, "err": err, "ms": ms,
                     "tflops": tflops(flops, ms)})
        print(f"  grouped wgrad G={n_groups} x {per} N={n} K={k}: {tflops(flops, ms):7.1f} TFLOPS "
              f"({ms:.3f} ms), rel err {err:.1e}", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["gemm", "shape", "tflops", "_scaled_mm tensor", "_scaled_mm rowwise", "bf16", "ms",
            "err"]
    heads = ["GEMM", "M x N x K", "ours TFLOPS", "scaled_mm tensor", "scaled_mm rowwise",
             "bf16 TFLOPS", "ours ms", "rel err"]

    def fmt(r, c):
        v = r.get(c)
        if v is None:
            return "-"
        if c == "err":
            return f"{v:.1e}"
        if c == "ms":
            return f"{v:.3f}"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r, c) for c in cols] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def quant_bandwidth(dev, smoke: bool, use_triton: bool) -> None:
    m, k = (128, 256) if smoke else (4096, 7168)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    nbytes = m * k * (2 + 1) + m * (k // 128) * 4  # read bf16, write fp8 + scales
    for name, fn in (("act_quant 1x128", lambda: act_quant(x, use_triton=use_triton)),
                     ("act_quant_colwise 128x1",
                      lambda: act_quant_colwise(x, use_triton=use_triton)),
                     ("weight_quant 128x128", lambda: weight_quant(x, use_triton=use_triton))):
        ms = bench(fn, smoke)
        print(f"  {name:24s} [{m}, {k}] bf16: {ms:.3f} ms, {nbytes / (ms * 1e-3) / 1e9:.0f} GB/s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="CPU Triton interpreter, tiny shapes, correctness only")
    ap.add_argument("--quick", action="store_true",
                    help="fewer shapes: dense N 2048 / 7168, grouped G = 8 (the GPU smoke script; "
                         "with --smoke: one dense and one grouped shape)")
    ap.add_argument("--autotune", action="store_true",
                    help="autotune the launch configs (HAI_LLM_AUTOTUNE=1) instead of the "
                         "per-shape heuristic")
    args = ap.parse_args(argv)
    if args.autotune:
        os.environ["HAI_LLM_AUTOTUNE"] = "1"  # read at call time by the kernel wrappers
    print("command: python " + " ".join([sys.argv[0]] + sys.argv[1:]))
    print(f"torch {torch.__version__}, triton {triton.__version__}")
    if not torch.cuda.is_available() and not args.smoke:
        print("SKIP (no CUDA): FP8 GEMM throughput. This benchmark times the Triton FP8 GEMMs on "
              "a GPU (H100/H800/H200); run it there, or pass --smoke to check the script on the "
              "CPU interpreter at tiny shapes.")
        return 0
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
              f"{props.multi_processor_count} SMs, CUDA {torch.version.cuda}, launch configs: "
              + ("autotuned" if args.autotune else "per-shape heuristic"))
    else:
        print("CPU smoke run (TRITON_INTERPRET=1): times are NOT GPU throughput")
    print("\n== dense fp8_gemm (Triton, K-major operands) ==")
    rows = dense(dev, args.smoke, args.quick, use_triton=True)
    print("\n== grouped fp8_grouped_gemm (contiguous layout) ==")
    rows += grouped(dev, args.smoke, args.quick, use_triton=True)
    print("\n== quantization kernels ==")
    quant_bandwidth(dev, args.smoke, use_triton=True)
    print("\n== FP8 GEMM table (TFLOPS; every result checked against the torch reference) ==")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
