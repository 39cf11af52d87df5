"""The Python parts of ``benchmarks/gpu_smoke.sh``: one subcommand per check, each printing a table.

    python benchmarks/gpu_smoke_checks.py pytest-table FILE.xml   # kernel test results per file
    python benchmarks/gpu_smoke_checks.py grouped-mm [--quick]    # torch grouped_mm fp32 vs bf16
    python benchmarks/gpu_smoke_checks.py d2h [--quick]           # profiler: no device-to-host copy
    python benchmarks/gpu_smoke_checks.py sync-census [--quick]   # syncs of one MoE layer fwd+bwd
    python benchmarks/gpu_smoke_checks.py mfu SUMMARY.json --model small [--peak-tflops 989]

Without a CUDA device the GPU measurements print ``SKIP (no CUDA): <what>`` and the CPU-capable
part runs instead: a small correctness check of ``grouped_mm``, and host-read counts (``.item()``,
``.tolist()``, ``int()`` of a tensor, ``nonzero``, ...: each is a device synchronisation on a GPU)
of the FP8 expert forward/backward on the Triton interpreter and of one MoE layer. Exit status:
0 passed (or skipped), 1 a check failed.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before anything imports triton: the kernels are decorated at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# peak dense bf16 TFLOPS (no sparsity) by device name: the MFU denominator
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.0}


def table(heads: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(heads)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def skip(what: str) -> None:
    print(f"SKIP (no CUDA): {what}")


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _ms(fn, reps: int = 10) -> float:
    fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return 1e3 * (time.perf_counter() - t0) / reps


# ----------------------------------------------------------------------------------------------
# host-read counter (the CPU proxy of a device sync)
# ----------------------------------------------------------------------------------------------

_METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero",
            "unique", "bincount", "cpu")
_FUNCTIONS = ("nonzero", "unique", "bincount")


@contextlib.contextmanager
def host_reads():
    """Counter of host reads by (call, first caller frame inside the repository)."""
    import traceback

    calls: collections.Counter = collections.Counter()
    saved = {}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            site = "?"
            for fr in reversed(traceback.extract_stack()[:-1]):
                if fr.filename.startswith(str(REPO)) and not fr.filename.endswith(
                        "gpu_smoke_checks.py"):
                    site = f"{Path(fr.filename).relative_to(REPO)}:{fr.lineno}"
                    break
            calls[(name, site)] += 1
            return fn(*args, **kwargs)
        return counted

    for name in _METHODS:
        saved[(torch.Tensor, name)] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, wrap(f"Tensor.{name}", saved[(torch.Tensor, name)]))
    for name in _FUNCTIONS:
        saved[(torch, name)] = getattr(torch, name)
        setattr(torch, name, wrap(f"torch.{name}", saved[(torch, name)]))
    try:
        yield calls
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


# ----------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------


def cmd_pytest_table(a) -> int:
    """Per-file counts from a pytest --junitxml file."""
    import xml.etree.ElementTree as ET

    per = collections.OrderedDict()
    for case in ET.parse(a.xml).getroot().iter("testcase"):
        f = (case.get("classname") or "?").rsplit(".", 1)[0].replace(".", "/") + ".py"
        row = per.setdefault(f, [0, 0, 0, 0.0])
        if case.find("failure") is not None or case.find("error") is not None:
            row[1] += 1
        elif case.find("skipped") is not None:
            row[2] += 1
        else:
            row[0] += 1
        row[3] += float(case.get("time") or 0)
    rows = [[f, p, fl, sk, f"{t:.1f}"] for f, (p, fl, sk, t) in per.items()]
    tot = [sum(r[i] for r in per.values()) for i in range(4)]
    rows.append(["total", tot[0], tot[1], tot[2], f"{tot[3]:.1f}"])
    table(["test file", "passed", "failed", "skipped", "seconds"], rows)
    return 1 if tot[1] or not tot[0] else 0


def cmd_grouped_mm(a) -> int:
    """torch's grouped GEMM in fp32 and bf16 (the fp32 inputs leave the sm90 fast path) and the
    model's grouped_mm under bf16 autocast; on the CPU a correctness check only."""
    from hai_llm.model.moe import grouped_mm

    kernel = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm",
                                                                          None)
    if not CUDA:
        skip("grouped_mm timing, fp32 vs bf16")
        g = torch.Generator().manual_seed(0)
        counts = torch.tensor([5, 0, 9, 2])
        x, w = torch.randn(16, 32, generator=g), torch.randn(4, 24, 32, generator=g)
        ref = torch.cat([x[s:e] @ w[i].t() for i, (s, e) in enumerate(zip(
            [0, 5, 5, 14], [5, 5, 14, 16]))])
        rows = []
        for dt in (torch.float32, torch.bfloat16):
            y = grouped_mm(x.to(dt), w.to(dt), counts).float()
            err = float((y - ref).norm() / ref.norm())
            rows.append([str(dt).replace("torch.", ""), f"{err:.1e}",
                         "ok" if err < (1e-5 if dt == torch.float32 else 2e-2) else "WRONG"])
        table(["grouped_mm (CPU)", "rel err vs loop", "status"], rows)
        return 0 if all(r[2] == "ok" for r in rows) else 1
    dev = "cuda"
    shapes = [(8, 512, 2048, 7168)] + ([] if a.quick else [(32, 512, 2048, 7168)])
    rows, ok = [], True
    for e, per, n, k in shapes:
        offs = torch.arange(1, e + 1, device=dev, dtype=torch.int32) * per
        counts = torch.full((e,), per, device=dev)
        flops = 2 * e * per * n * k
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(e * per, k, device=dev, dtype=dt)
            w = torch.randn(e, n, k, device=dev, dtype=dt)
            try:
                ms = _ms(lambda: kernel(x, w.transpose(-2, -1), offs=offs))
                rows.append([f"{e}x{per} N{n} K{k}", f"_grouped_mm {str(dt)[6:]}", f"{ms:.3f}",
                             f"{flops / ms / 1e9:.1f}"])
            except Exception as exc:  # noqa: BLE001 - a table row, not a crash
                rows.append([f"{e}x{per} N{n} K{k}", f"_grouped_mm {str(dt)[6:]}",
                             f"error: {type(exc).__name__}", "-"])
        x = torch.randn(e * per, k, device=dev)
        w = torch.randn(e, n, k, device=dev)

        def model_path():
            with torch.autocast("cuda", torch.bfloat16):
                return grouped_mm(x, w, counts)
        try:
            ms = _ms(model_path)
            rows.append([f"{e}x{per} N{n} K{k}", "model grouped_mm fp32 params, bf16 autocast",
                         f"{ms:.3f}", f"{flops / ms / 1e9:.1f}"])
        except Exception as exc:  # noqa: BLE001
            ok = False
            rows.append([f"{e}x{per} N{n} K{k}", "model grouped_mm (autocast)",
                         f"error: {type(exc).__name__}: {str(exc)[:60]}", "-"])
    table(["experts x rows, N, K", "path", "ms", "TFLOPS"], rows)
    return 0 if ok else 1


def _fp8_modules(dev, quick: bool):
    from hai_llm.fp8 import Fp8GroupedExperts, Fp8Linear

    torch.manual_seed(0)
    if not CUDA:  # the Triton interpreter: tiny, but two 128-row tiles and ragged groups
        e, d, i, rows = 3, 128, 64, 150
    else:
        e, d, i, rows = (8, 1024, 512, 2048) if quick else (16, 2048, 1408, 8192)
    ex = Fp8GroupedExperts(e, d, i, use_triton=True)
    ex.reset_parameters(0.02)
    ex = ex.to(dev)
    lin = Fp8Linear(d, 2 * d, bias=False, use_triton=True).to(dev)
    sizes = [rows // e] * e
    sizes[1] = 0  # an empty expert
    sizes[0] = rows - sum(sizes[1:])
    counts = torch.tensor(sizes, device=dev)  # on the device, as the MoE layer passes them
    x = torch.randn(rows, d, device=dev, requires_grad=True)

    def step():
        y = ex(x, counts)
        y.backward(torch.ones_like(y))
        z = lin(x)
        z.backward(torch.ones_like(z))
    return step


def cmd_d2h(a) -> int:
    """Profile the FP8 grouped experts + an FP8 Linear forward/backward: no device-to-host copy,
    no _local_scalar_dense (.item()) and no stream/device synchronisation may appear."""
    if not CUDA:
        skip("torch.profiler device-to-host check of the FP8 expert forward/backward")
        step = _fp8_modules("cpu", True)
        step()  # warm-up
        with host_reads() as reads:
            step()
        rows = [[n, s, c] for (n, s), c in sorted(reads.items())]
        print("CPU proxy: host reads of Fp8GroupedExperts + Fp8Linear forward/backward on the "
              "Triton interpreter (each would be a device sync on a GPU)")
        table(["host read", "site", "count"], rows or [["(none)", "-", 0]])
        return 1 if reads else 0
    from torch.profiler import ProfilerActivity, profile

    step = _fp8_modules("cuda", a.quick)
    step()  # compile / warm up outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    torch.cuda.synchronize()
    counts = collections.Counter()
    for ev in prof.events():
        name = ev.name
        if "DtoH" in name or "Memcpy D2H" in name:
            counts["device-to-host memcpy: " + name] += 1
        elif name == "aten::_local_scalar_dense":
            counts["aten::_local_scalar_dense (.item / int)"] += 1
        elif name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            counts["host sync: " + name] += 1
        elif "HtoD" in name:
            counts["(info) host-to-device memcpy: " + name] += 1
    bad = {k: v for k, v in counts.items() if not k.startswith("(info)")}
    rows = [[k, v] for k, v in sorted(counts.items())] or [["(no copies, no syncs)", 0]]
    table(["profiler event in FP8 experts + Linear fwd/bwd", "count"], rows)
    print("PASS: no device-to-host copy" if not bad else "FAIL: device-to-host traffic above")
    return 1 if bad else 0


def _moe_layer(dev):
    from hai_llm.config.load import load_model_args
    from hai_llm.model.moe import MoE

    args = load_model_args("small")
    torch.manual_seed(0)
    moe = MoE(args)
    moe.reset_parameters(0.02)
    return moe.to(dev), args


def cmd_sync_census(a) -> int:
    """Synchronising CUDA calls of one MoE layer forward/backward (bf16 autocast, and FP8),
    under torch.cuda.set_sync_debug_mode("warn"), by the Python line that issued them."""
    import copy

    from hai_llm.fp8 import convert_to_fp8

    dev = "cuda" if CUDA else "cpu"
    moe, args = _moe_layer(dev)
    # FP8 on the Triton kernels on both devices (the interpreter on the CPU): the GPU path
    variants = {"bf16": moe, "fp8": convert_to_fp8(copy.deepcopy(moe), use_triton=True)}
    shape = (2, 256) if CUDA else (1, 32)  # the CPU proxy runs FP8 on the Triton interpreter
    x = torch.randn(*shape, args.dim, device=dev, requires_grad=True)

    def run(m, bf16):
        with torch.autocast(dev, torch.bfloat16, enabled=bf16 and CUDA):
            y = m(x)
        y.float().backward(torch.ones_like(y, dtype=torch.float32))
        m.pop_stats()

    rows, ours = [], 0
    if not CUDA:
        skip('sync census under torch.cuda.set_sync_debug_mode("warn")')
        print("CPU proxy: host reads of one MoE layer forward/backward (small model), by site")
        for name, m in variants.items():
            with host_reads() as reads:  # (no warm-up needed: nothing compiles on the CPU)
                run(m, False)
            for (call, site), c in sorted(reads.items()):
                rows.append([name, call, site, c])
                ours += c if site.startswith(("kernels/", "hai_llm/fp8/")) else 0
    else:
        for name, m in variants.items():
            run(m, name == "bf16")  # warm-up: compilation, lazy initialisation
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    run(m, name == "bf16")
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            sites = collections.Counter()
            for w in rec:
                if "synchroniz" in str(w.message):
                    f = Path(w.filename)
                    rel = f.relative_to(REPO) if f.is_relative_to(REPO) else f
                    sites[f"{rel}:{w.lineno}"] += 1
            for site, c in sorted(sites.items()):
                rows.append([name, "sync", site, c])
                ours += c if site.startswith(("kernels/", "hai_llm/fp8/")) else 0
    table(["variant", "call", "site", "count"], rows or [["-", "(none)", "-", 0]])
    total = sum(r[3] for r in rows)
    print(f"total {total}; in kernels/ and hai_llm/fp8/: {ours} (must be 0; the others are "
          f"tracked by issue 17)")
    return 1 if ours else 0


def cmd_mfu(a) -> int:
    """MFU of a finished run: 6 * activated parameters * tokens/s / peak dense bf16 FLOP/s."""
    from hai_llm.config.load import load_model_args
    from hai_llm.model.params import parameter_table

    summary = json.loads(Path(a.summary).read_text())
    tps = float(summary["tokens_per_s"])
    t = parameter_table(load_model_args(a.model))
    n_act = t["main"]["activated_no_embedding"] + t["mtp"]["activated"]
    peak = a.peak_tflops
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    if peak is None:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    flops = 6 * n_act * tps
    mfu = f"{100 * flops / (peak * 1e12):.3f} %" if peak else "n/a (pass --peak-tflops)"
    table(["model", "activated params (no embedding, + MTP)", "tokens/s", "model TFLOP/s",
           "peak bf16 TFLOPS", "MFU"],
          [[a.model, f"{n_act:,}", f"{tps:,.0f}", f"{flops / 1e12:.3f}",
            peak if peak else "?", mfu]])
    print(f"device: {name}; MFU = 6 * N_activated * tokens/s / peak (attention FLOPs not "
          f"counted)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pytest-table")
    p.add_argument("xml")
    for name in ("grouped-mm", "d2h", "sync-census"):
        sub.add_parser(name).add_argument("--quick", action="store_true")
    p = sub.add_parser("mfu")
    p.add_argument("summary")
    p.add_argument("--model", default="small")
    p.add_argument("--peak-tflops", type=float, default=None)
    a = ap.parse_args(argv)
    fn = {"pytest-table": cmd_pytest_table, "grouped-mm": cmd_grouped_mm, "d2h": cmd_d2h,
          "sync-census": cmd_sync_census, "mfu": cmd_mfu}[a.cmd]
    return fn(a)


if __name__ == "__main__":
    sys.exit(main())
