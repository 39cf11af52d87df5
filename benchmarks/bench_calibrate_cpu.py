"""Measure this machine as a hardware profile for the cost planner: configs/hardware/cpu_measured.yaml.

What the simulated-rank runs of ``benchmarks/bench_predict.py`` spend their time on, measured
one thing at a time (single-threaded, as each simulated rank runs):

* ``peak_tflops.fp32``: torch.mm of 512 x 512 x 512 fp32 matrices (best of 5);
* ``gemm_efficiency.fp32`` (and the attention efficiencies): the benchmark model's own forward
  + backward in one process, FLOPs from ``hai_llm.planner.flops`` divided by the time, over the
  matmul peak. At these tiny shapes (dim 64) per-op overhead dominates, so this is far below 1:
  it is the achieved rate of THIS model, which is what a prediction needs (the GPU profiles take
  theirs from a published kernel trace for the same reason);
* ``net``: gloo send/recv between two processes: latency (8-byte ping-pong / 2) and bandwidth
  (16 MB); ``a2a_latency_us``: the median small all_to_all_single of 4 processes (the EP run's
  world), what each count and payload exchange of the transport costs;
* ``hbm_gbps``: a 128 MB tensor copy (read + write);
* ``ep_link``: the link emulation of the simulated runs (``LinkModel``: NVLink 160 / IB 50 GB/s,
  5 us per stage, docs/deepseek_v3.md#cluster-and-layout) with the ``time_scale`` that makes
  one emulated dispatch as long as one MoE FFN forward of the benchmark model (the report's
  1:1 computation-to-communication ratio, [R] 3.2.1);
* ``shared_cores``: ``os.cpu_count()`` (simulated ranks share them).

    OMP_NUM_THREADS=1 python benchmarks/bench_calibrate_cpu.py [--out configs/hardware/cpu_measured.yaml]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import MICRO_BATCH, SEQ, bench_cfg  # noqa: E402


def _best(fn, reps: int = 5, inner: int = 1) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def matmul_gflops(n: int = 512) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2.0 * n ** 3 / _best(lambda: torch.mm(a, b), inner=10) / 1e9


def model_gflops() -> tuple[float, float]:
    """Achieved FLOP/s of the benchmark model's forward + backward (and its MoE FFN forward
    seconds per micro-batch, for the link time scale)."""
    from hai_llm.model.transformer import build_model
    from hai_llm.planner.flops import model_flops

    cfg = bench_cfg(1, 1, 1, "1f1b")
    model = build_model(cfg.model, device="cpu", seed=0)
    tokens = torch.randint(0, cfg.model.vocab_size, (MICRO_BATCH, SEQ + 1 + cfg.model.n_mtp_layers))

    def step():
        model.zero_grad(set_to_none=True)
        model.loss(tokens).loss.backward()

    dt = _best(step, reps=7)
    fl = model_flops(cfg.model, SEQ, recompute=cfg.model.recompute)
    rate = (fl.model + fl.recompute) * MICRO_BATCH * SEQ / dt
    moe = next(b for i, b in enumerate(model.layers) if cfg.model.is_moe_layer(i))
    x = torch.randn(MICRO_BATCH, SEQ, cfg.model.dim)
    with torch.no_grad():
        ffn_s = _best(lambda: moe.ffn(x), reps=7)
    return rate / 1e9, ffn_s


def _pingpong(rank: int, world: int, sizes: list[int], reps: int) -> dict:
    import torch.distributed as dist

    out = {}
    for n in sizes:
        t = torch.zeros(n, dtype=torch.uint8)
        best = float("inf")
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            else:
                dist.recv(t, 0)
                dist.send(t, 0)
            best = min(best, (time.perf_counter() - t0) / 2)
        out[n] = best
    return out


def _a2a(rank: int, world: int, reps: int) -> float:
    import statistics

    import torch.distributed as dist

    send, recv = torch.zeros(world * 16), torch.zeros(world * 16)
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(recv, send)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gloo_a2a_latency_us(world: int = 4) -> float:
    """Median time of a small all_to_all_single over ``world`` processes (the EP run's world):
    what each count or payload exchange of the transport costs before its bytes."""
    from hai_llm.parallel.spawn import run_ranks

    return max(run_ranks(_a2a, world, 30, timeout=600)) * 1e6


def gloo_link() -> tuple[float, float]:
    """(latency us, bandwidth GB/s) of one gloo send between two processes."""
    from hai_llm.parallel.spawn import run_ranks

    small, big = 8, 16 << 20
    res = run_ranks(_pingpong, 2, [small, big], 20, timeout=600)[0]
    lat = res[small]
    return lat * 1e6, big / max(res[big] - lat, 1e-9) / 1e9


def copy_gbps() -> float:
    a = torch.empty(32 << 20)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / _best(lambda: b.copy_(a)) / 1e9


def link_time_scale(ffn_s: float, rate: float) -> float:
    """Scale making one emulated dispatch of the EP benchmark run last one MoE FFN forward."""
    from hai_llm.planner.hardware import EpLink, HardwareProfile, Net
    from hai_llm.planner.plan import plan_config
    from hai_llm.planner.step_sim import simulate_step

    hw = HardwareProfile(name="probe", description="", gpus_per_node=8, peak_tflops={"fp32": rate / 1e12},
                         gemm_efficiency={"fp32": 1.0}, attn_efficiency_fwd=1.0, attn_efficiency_bwd=1.0,
                         nongemm_fraction=0.0, hbm_gbps=10.0, ep_link=EpLink(160.0, 50.0, 5.0, 1.0),
                         net=Net(1e6, 1e6, 0.0, 0.0))
    cfg = bench_cfg(2, 2, 2, "dualpipe")
    sim = simulate_step(plan_config(cfg, 4, precision="bf16"), cfg.model, hw, transport="flat",
                        gemm_dtype="fp32", act_bytes=4.0)
    return round(ffn_s / sim.dispatch_s, -1)


def measure() -> dict:
    """Every measurement of the profile, now (single-threaded)."""
    torch.set_num_threads(1)
    peak = matmul_gflops()
    rate, ffn_s = model_gflops()
    lat_us, bw = gloo_link()
    return {"peak": peak, "rate": rate, "ffn_s": ffn_s, "lat_us": lat_us, "bw": bw,
            "a2a_us": gloo_a2a_latency_us(), "mem": copy_gbps(),
            "scale": link_time_scale(ffn_s, rate * 1e9), "load": os.getloadavg()[0]}


def profile_text(m: dict) -> str:
    """The profile YAML of measurements ``m`` (``measure()``), with where each number comes from."""
    peak, rate, eff = m["peak"], m["rate"], min(1.0, m["rate"] / m["peak"])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""# Written by benchmarks/bench_calibrate_cpu.py on {stamp} ({platform.node() or 'this machine'},
# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread per rank). Every number is a
# measurement of this script (see its docstring); re-run it on the machine you predict.
name: cpu_measured
description: this machine's CPU cores as simulated ranks (gloo), measured
gpus_per_node: 8   # the virtual node of simulated ranks (hai_llm.layout.DEFAULT_GPUS_PER_NODE)
peak_tflops:
  fp32: {peak / 1e3:.6f}   # torch.mm 512^3 fp32: {peak:.2f} GFLOP/s
gemm_efficiency:
  fp32: {eff:.4f}   # the benchmark model's forward+backward: {rate:.3f} GFLOP/s achieved / matmul peak
attn_efficiency_fwd: {eff:.4f}   # attention priced at the same achieved rate (one measurement)
attn_efficiency_bwd: {eff:.4f}
nongemm_fraction: 0.0   # already inside the achieved rate above
hbm_gbps: {m['mem']:.2f}   # tensor copy, read + write
ep_link:   # hai_llm.parallel.a2a_wire.LinkModel of the simulated runs
  intra_gbps: 160.0
  inter_gbps: 50.0
  latency_us: 5.0
  time_scale: {m['scale']:g}   # one emulated dispatch ~ one MoE FFN forward ({m['ffn_s'] * 1e3:.2f} ms)
net:   # gloo send/recv between two processes of this machine
  intra_gbps: {m['bw']:.3f}
  inter_gbps: {m['bw']:.3f}
  intra_latency_us: {m['lat_us']:.1f}
  inter_latency_us: {m['lat_us']:.1f}
  a2a_latency_us: {m['a2a_us']:.1f}   # median all_to_all_single of 4 processes (count or payload exchange)
shared_cores: {os.cpu_count()}
measured:
  matmul_gflops: {peak:.3f}
  model_gflops: {rate:.4f}
  moe_ffn_forward_ms: {m['ffn_s'] * 1e3:.4f}
  gloo_latency_us: {m['lat_us']:.1f}
  gloo_gbps: {m['bw']:.3f}
  gloo_a2a_us: {m['a2a_us']:.1f}
  copy_gbps: {m['mem']:.2f}
  load_average: {m['load']:.1f}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "configs" / "hardware"
                                         / "cpu_measured.yaml"))
    a = ap.parse_args(argv)
    text = profile_text(measure())
    Path(a.out).write_text(text)
    print(text)
    print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
