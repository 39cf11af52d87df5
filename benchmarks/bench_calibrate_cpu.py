"""Measure this machine as a hardware profile for the cost planner: configs/hardware/cpu_measured.yaml.

What the simulated-rank runs of ``benchmarks/bench_predict.py`` spend their time on, measured
one thing at a time (single-threaded, as each simulated rank runs):

* ``peak_tflops.fp32``: torch.mm of 512 x 512 x 512 fp32 matrices (best of 5);
* ``gemm_efficiency.fp32`` (and the attention efficiencies): one training step of the benchmark
  model on ONE rank through the real runtime path (``bench_predict.train_step``: the layout's
  micro-batches, forward + backward, optimizer), FLOPs from ``hai_llm.planner.flops`` divided by
  its CPU seconds (``time.process_time``: what the rank's own core spent, so a busy machine
  slows the measurement less), over the matmul peak. At these tiny shapes (dim 64) per-op
  dispatch overhead dominates, so this is far below 1: it is the achieved rate of THIS model's
  pieces, which is what a prediction needs (the GPU profiles take theirs from a published
  kernel trace for the same reason);
* ``core_share``: the same step run at once in ``os.cpu_count()`` processes: solo CPU seconds /
  CPU seconds of each concurrent copy (caches and memory bandwidth shared by busy cores);
* ``net``: gloo send/recv between two processes: latency (8-byte ping-pong / 2) and bandwidth
  (16 MB); ``a2a_cpu_us`` / ``a2a_latency_us``: the real flat transport between two processes
  (the EP group of the runs) on the benchmark's routing shapes: plan + dispatch + combine + both
  gradients, per dispatch/combine the CPU seconds of the issuing process (its Python, packing
  and gloo threads) and the wall time beyond them; ``p2p_cpu_us``: CPU seconds of one pipeline
  send or receive of a micro-batch's activations (receiver already waiting);
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
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

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


def _step_cpu_s(reps: int) -> list[float]:
    """CPU seconds of ``reps`` one-rank training steps of the benchmark model (runtime path)."""
    from bench_predict import build_run, train_step

    torch.set_num_threads(1)
    layout, rt, model, opt, batch = build_run(bench_cfg(1, 1, 1, "1f1b"), 1)
    train_step(rt, layout, model, opt, batch)
    out = []
    for _ in range(reps):
        c0 = time.process_time()
        train_step(rt, layout, model, opt, batch)
        out.append(time.process_time() - c0)
    return out


def _step_flops() -> float:
    from hai_llm.layout import build_layout
    from hai_llm.planner.flops import model_flops

    cfg = bench_cfg(1, 1, 1, "1f1b")
    fl = model_flops(cfg.model, SEQ, recompute=cfg.model.recompute)
    return (fl.model + fl.recompute) * build_layout(cfg, 1).local_batch * SEQ


def _concurrent_body(barrier, queue, reps: int) -> None:
    barrier.wait()
    queue.put(statistics.median(_step_cpu_s(reps)))


def runtime_gflops(reps: int = 7) -> tuple[float, float]:
    """(achieved GFLOP/s of one rank's training step alone, core share with every core busy)."""
    import multiprocessing as mp

    solo = statistics.median(_step_cpu_s(reps))
    n = os.cpu_count() or 1
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_body, args=(barrier, queue, reps)) for _ in range(n)]
    for p in procs:
        p.start()
    shared = statistics.median(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return _step_flops() / solo / 1e9, min(1.0, solo / shared)


def _transport_ops(rank: int, world: int, reps: int) -> tuple[float, float]:
    """Median (CPU, wall) seconds per dispatch/combine of the flat transport on this process."""
    import torch.distributed as dist

    from hai_llm.parallel.transport import build_transport

    torch.set_num_threads(1)
    m = bench_cfg(2, 2, 2, "dualpipe").model
    T, K, E = MICRO_BATCH * SEQ, m.n_activated_experts, m.n_routed_experts
    groups = [list(range(i, i + 2)) for i in range(0, world, 2)]  # EP groups of 2, as the runs
    pgs = [dist.new_group(g) for g in groups]
    mine = rank // 2
    tr = build_transport("flat", pgs[mine], groups[mine], 8, all_ep_ranks=groups)
    g = torch.Generator().manual_seed(rank)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    x, w = torch.randn(T, m.dim), torch.rand(T * K, 1)

    def block():  # what one MoE block of one micro-batch issues: 4 all-to-alls, one plan
        plan = tr.plan(idx, E)
        rows, aux = tr.scatter_async(plan, x, w).wait()
        out, _ = tr.gather_async(plan, rows, None, op="combine").wait()
        grad, _ = tr.scatter_async(plan, out, None, op="combine_bwd").wait()
        tr.gather_async(plan, grad, aux, op="dispatch_bwd").wait()

    block()
    cpu, wall = [], []
    for _ in range(reps):
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        block()
        cpu.append((time.process_time() - c0) / 4)
        wall.append((time.perf_counter() - t0) / 4)
    return statistics.median(cpu), statistics.median(wall)


def transport_op_us(reps: int = 40, world: int = 4) -> tuple[float, float]:
    """(CPU us, wall us beyond the CPU) per dispatch/combine of the flat transport: ``world``
    processes in EP groups of 2 exchanging at once (the EP runs' world and groups)."""
    from hai_llm.parallel.spawn import run_ranks

    res = run_ranks(_transport_ops, world, reps, timeout=600)
    cpu = statistics.mean(c for c, _ in res)
    wall = max(w for _, w in res)
    return cpu * 1e6, max(0.0, wall - cpu) * 1e6


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


def _p2p_cpu(rank: int, world: int, n: int, reps: int) -> float:
    """Median CPU seconds of one send (rank 0) or receive (rank 1) of ``n`` floats, the receiver
    already waiting (rank 0 sleeps 2 ms first), as a pipeline's activations and gradients."""
    import torch.distributed as dist

    t, out = torch.zeros(n), []
    for _ in range(reps):
        if rank == 0:
            time.sleep(2e-3)
        c0 = time.process_time()
        dist.send(t, 1) if rank == 0 else dist.recv(t, 0)
        out.append(time.process_time() - c0)
    return statistics.median(out)


def p2p_cpu_us() -> float:
    """CPU per pipeline message (send and receive averaged) of one micro-batch's activations."""
    from hai_llm.parallel.spawn import run_ranks

    m = bench_cfg(2, 2, 2, "dualpipe").model
    return statistics.mean(run_ranks(_p2p_cpu, 2, MICRO_BATCH * SEQ * m.dim, 60, timeout=600)) * 1e6


def _pipeline_cpu(rank: int, world: int, reps: int) -> float:
    """Median CPU seconds of this rank's training step in a pp2 1F1B pipeline (no EP, no DP)."""
    from bench_predict import build_run, train_step

    torch.set_num_threads(1)
    layout, rt, model, opt, batch = build_run(bench_cfg(2, 1, 1, "1f1b"), world)
    train_step(rt, layout, model, opt, batch)
    out = []
    for _ in range(reps):
        c0 = time.process_time()
        train_step(rt, layout, model, opt, batch)
        out.append(time.process_time() - c0)
    return statistics.median(out)


def pipeline_message_cpu_us(m: dict) -> float:
    """CPU per pipeline message as a pipeline spends it (gloo send/recv and the executor's work
    around each: activation bookkeeping, piece graphs, the loss stage): a 2-rank pp2 1F1B run
    (no expert or data parallelism; 2 ranks on >= 2 cores, no time-sharing; not one of the
    predicted runs) minus the compute the profile measured so far prices for it, per message."""
    from bench_predict import predict

    from hai_llm.parallel.spawn import run_ranks
    from hai_llm.planner.hardware import profile_from_dict

    measured = statistics.mean(run_ranks(_pipeline_cpu, 2, 5, timeout=900))
    hw = profile_from_dict(yaml.safe_load(profile_text({**m, "p2p_cpu_us": 0.0})), "calibration")
    cfg = bench_cfg(2, 1, 1, "1f1b")
    compute = predict(cfg, 2, hw)["cpu"]
    from hai_llm.layout import build_layout

    messages = 2 * build_layout(cfg, 2).n_micro  # per rank: activations out + gradients in (or back)
    return max(m["p2p_cpu_us"], (measured - compute) / messages * 1e6)


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
    bare, ffn_s = model_gflops()
    rate, share = runtime_gflops()
    lat_us, bw = gloo_link()
    a2a_cpu, a2a_wait = transport_op_us()
    p2p_cpu = p2p_cpu_us()
    out = {"peak": peak, "rate": rate, "bare": bare, "share": share, "ffn_s": ffn_s, "lat_us": lat_us,
            "bw": bw, "a2a_us": a2a_wait, "a2a_cpu_us": a2a_cpu, "p2p_cpu_us": p2p_cpu, "mem": copy_gbps(),
            "scale": link_time_scale(ffn_s, rate * 1e9), "load": os.getloadavg()[0]}
    out["pipe_msg_us"] = pipeline_message_cpu_us(out)
    return out


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
  fp32: {eff:.4f}   # one rank's training step (runtime path): {rate:.3f} GFLOP/s achieved / matmul peak
attn_efficiency_fwd: {eff:.4f}   # attention priced at the same achieved rate (one measurement)
attn_efficiency_bwd: {eff:.4f}
nongemm_fraction: 0.0   # already inside the achieved rate above
core_share: {m['share']:.3f}   # per-process rate with all {os.cpu_count()} cores running the step / alone
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
  a2a_latency_us: {m['a2a_us']:.1f}   # flat transport, 4 processes in EP groups of 2: wall per dispatch/combine beyond its CPU
  a2a_cpu_us: {m['a2a_cpu_us']:.1f}   # the same: CPU per dispatch/combine on the issuing process (plan included)
  p2p_cpu_us: {m.get('pipe_msg_us', m['p2p_cpu_us']):.1f}   # CPU per pipeline message in a pp2 pipeline (see measured)
shared_cores: {os.cpu_count()}
measured:
  matmul_gflops: {peak:.3f}
  model_gflops: {rate:.4f}   # runtime step, CPU seconds
  bare_model_gflops: {m['bare']:.4f}   # model.loss + backward of one micro-batch, wall, best of 7
  moe_ffn_forward_ms: {m['ffn_s'] * 1e3:.4f}
  gloo_latency_us: {m['lat_us']:.1f}
  gloo_gbps: {m['bw']:.3f}
  transport_op_cpu_us: {m['a2a_cpu_us']:.1f}
  transport_op_wait_us: {m['a2a_us']:.1f}
  gloo_p2p_cpu_us: {m['p2p_cpu_us']:.1f}   # one bare send/recv
  pipeline_message_cpu_us: {m.get('pipe_msg_us', 0.0):.1f}   # pp2 1F1B run: CPU beyond compute, per message
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
