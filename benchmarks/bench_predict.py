"""Predicted vs measured step time of simulated-rank runs: the cost planner's check on CPU.

The planner's step simulator (``hai_llm.planner.step_sim``) is given the CPU hardware profile
that ``benchmarks/bench_calibrate_cpu.py`` measured on this machine (matmul and model
throughput, gloo bandwidth and latency, the link emulation's parameters) and predicts three
runs that are then measured:

* ``dp2``: two data-parallel ranks (ZeRO-1), no pipeline;
* ``pp2 dp2 ep2 dualpipe``: DualPipe with overlapped F&B pairs, expert all-to-alls through the
  transport with a :class:`LinkModel` (link emulation);
* ``pp2 dp2 ep2 1f1b``: the same mesh under 1F1B (nothing overlaps the all-to-alls).

A measured step is ``train_step`` below: the runtime and optimizer calls of
``Trainer.train_step`` in its order (zero_grad, ``reduce_metrics(forward_backward)`` over the
layout's ``local_batch`` in ``layout.n_micro`` micro-batches, ``reduce_gradients``, the one
host read of loss terms and norm, clip, step), the data sampler and logging left out. Runs with
expert parallelism are timed without and with the link model, interleaved step by step; the
table reports the min and the median over ``--steps`` per rank (slowest rank). The exposed
fraction is the share of the step the emulated links add, measured and predicted alike::

    exposed = (T_with_link - T_without_link) / T_with_link

(the planner's own split of exposed waits inside / outside F&B pairs is printed next to it).
Timings on a shared 2-core machine are noisy: re-run on a quiet machine with

    OMP_NUM_THREADS=1 python benchmarks/bench_calibrate_cpu.py    # writes configs/hardware/cpu_measured.yaml
    OMP_NUM_THREADS=1 python benchmarks/bench_predict.py [--steps 5] [--json out.json]
    OMP_NUM_THREADS=1 python benchmarks/bench_predict.py --fresh   # re-measure the profile before each run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
import sys
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_calibrate_cpu (--fresh)
LAYERS, SEQ, MICRO_BATCH, N_MICRO = 4, 64, 2, 8
RUNS = (  # label, pp, dp, ep, schedule
    ("dp2", 1, 2, 1, "1f1b"),
    ("pp2 dp2 ep2 dualpipe", 2, 2, 2, "dualpipe"),
    ("pp2 dp2 ep2 1f1b", 2, 2, 2, "1f1b"),
)


def bench_cfg(pp: int, dp: int, ep: int, schedule: str):
    """The benchmark model (tiny with 4 layers: 1 dense + 3 MoE, MTP) on pp x dp ranks."""
    from hai_llm.config.load import load_model_args
    from hai_llm.config.schema import Config, DataConfig, ParallelConfig, TrainConfig

    args = load_model_args("tiny", [f"n_layers={LAYERS}", "n_dense_layers=1"])
    return Config(model=args, data=DataConfig(path="unused", seq_len=SEQ),
                  train=TrainConfig(global_batch=N_MICRO * MICRO_BATCH * dp, micro_batch=MICRO_BATCH, seed=7,
                                    device="cpu", precision="fp32"),
                  parallel=ParallelConfig(nprocs=pp * dp, pp=pp, dp=dp, ep=ep, schedule=schedule,
                                          n_micro=N_MICRO, transport="flat"))


def _tokens(cfg, layout, dp_rank: int) -> torch.Tensor:
    """This data-parallel rank's batch: ``layout.local_batch`` sequences (the layout's split)."""
    g = torch.Generator().manual_seed(1000 + dp_rank)
    T = cfg.data.seq_len + 1 + cfg.model.n_mtp_layers
    return torch.randint(0, cfg.model.vocab_size, (layout.local_batch, T), generator=g)


def build_run(cfg, world: int):
    """(layout, runtime, model, optimizer, batch) of this rank, as the trainer builds them."""
    from hai_llm.layout import build_layout
    from hai_llm.model.transformer import build_model
    from hai_llm.runtime import build_runtime

    layout = build_layout(cfg, world)
    rt = build_runtime(cfg, layout)
    model = rt.prepare_model(build_model(cfg.model, device="cpu", seed=cfg.train.seed))
    opt = rt.build_optimizer(model, cfg)
    return layout, rt, model, opt, _tokens(cfg, layout, rt.dp_rank)


def train_step(rt, layout, model, opt, batch) -> float:
    """The runtime/optimizer calls of ``Trainer.train_step``, in its order; returns the loss."""
    import contextlib

    opt.zero_grad(set_to_none=True)
    tot = rt.reduce_metrics(rt.forward_backward(model, batch, layout.n_micro, contextlib.nullcontext))
    norm = opt.reduce_gradients()
    loss, grad_norm = torch.cat([tot["terms"][:1], norm.reshape(1).to(tot["terms"])]).tolist()
    opt.clip(grad_norm, 1.0)
    opt.step()
    return loss


def measure_body(rank: int, world: int, cfg, link_params: dict, steps: int) -> dict:
    """Time ``train_step``, link emulation off / on (interleaved); wall and CPU seconds."""
    import torch.distributed as dist

    from hai_llm.parallel.a2a_wire import LinkModel

    torch.set_num_threads(1)
    layout, rt, model, opt, batch = build_run(cfg, world)
    transport = getattr(rt, "transport", None)
    link = LinkModel(**link_params) if transport is not None else None

    def step(with_link: bool) -> tuple[float, float]:
        if transport is not None:
            transport.link = link if with_link else None
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(rt, layout, model, opt, batch)
        c1 = time.process_time()
        dist.barrier()
        return time.perf_counter() - t0, c1 - c0

    step(False)
    if link is not None:
        step(True)
    out = {"nolink": [], "link": [], "cpu": []}
    for _ in range(steps):
        dt, cpu = step(False)
        out["nolink"].append(dt)
        out["cpu"].append(cpu)
        if link is not None:
            out["link"].append(step(True)[0])
    return out


def predict(cfg, world: int, hw) -> dict:
    """The planner's prediction for ``cfg`` on ``hw`` (link emulation on and off)."""
    from dataclasses import replace

    from hai_llm.planner.plan import plan_config
    from hai_llm.planner.step_sim import simulate_step

    plan = plan_config(cfg, world, precision="bf16", optim_dtype="fp32" if cfg.optim.moments_dtype != "bfloat16"
                       else "bf16", recompute=cfg.model.recompute)
    kw = dict(transport=cfg.parallel.transport, gemm_dtype="fp32", act_bytes=4.0)
    on = simulate_step(plan, cfg.model, hw, **kw)
    off = simulate_step(plan, cfg.model, replace(hw, ep_link=replace(hw.ep_link, time_scale=0.0)), **kw)
    a2a = sum(r.a2a_s for r in on.ranks) / len(on.ranks)
    busy = world / plan.dims.pp * sum(r.busy for r in off.ranks) / world  # CPU s per rank
    return {"link": on.step_s, "nolink": off.step_s, "a2a": a2a, "cpu": busy,
            "exposed": (on.step_s - off.step_s) / on.step_s,
            "bubble": on.bubble_fraction, "inside": on.fraction("comm_inside"),
            "outside": on.fraction("comm_outside"), "cpu_bound": on.pipeline_s > on.critical_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu_measured", help="hardware profile (configs/hardware/)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", default="all", help="comma-separated labels prefixes (dp2,dualpipe,1f1b) or all")
    ap.add_argument("--fresh", action="store_true",
                    help="re-measure the CPU profile (bench_calibrate_cpu.measure) right before each "
                         "run, so that load drift on a shared machine hits calibration and run alike")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import yaml

    from hai_llm.parallel.spawn import run_ranks
    from hai_llm.planner.hardware import load_profile, profile_from_dict

    hw = load_profile(a.profile)
    rows = []
    for label, pp, dp, ep, schedule in RUNS:
        if a.runs != "all" and not any(k in label for k in a.runs.split(",")):
            continue
        if a.fresh:
            from bench_calibrate_cpu import measure, profile_text

            hw = profile_from_dict(yaml.safe_load(profile_text(measure())), "fresh measurement")
        link = {"intra_gbps": hw.ep_link.intra_gbps, "inter_gbps": hw.ep_link.inter_gbps,
                "latency_us": hw.ep_link.latency_us, "time_scale": hw.ep_link.time_scale}
        cfg = bench_cfg(pp, dp, ep, schedule)
        world = pp * dp
        pred = predict(cfg, world, hw)
        t = time.time()
        per_rank = run_ranks(measure_body, world, cfg, link, a.steps, timeout=3600)
        has_link = bool(per_rank[0]["link"])
        off = [max(v) for v in zip(*(r["nolink"] for r in per_rank))]  # per step: the slowest rank
        on = [max(v) for v in zip(*(r["link"] for r in per_rank))] if has_link else off
        cpu = statistics.median(c for r in per_rank for c in r["cpu"])
        med_on, med_off = statistics.median(on), statistics.median(off)
        predicted = pred["link"] if has_link else pred["nolink"]
        rows.append({"run": label, "world": world, "measured_s": med_on, "measured_min_s": min(on),
                     "predicted_s": predicted, "error": predicted / med_on - 1,
                     "error_min": predicted / min(on) - 1, "measured_nolink_s": med_off,
                     "predicted_nolink_s": pred["nolink"], "measured_cpu_s": cpu, "predicted_cpu_s": pred["cpu"],
                     "measured_exposed": (med_on - med_off) / med_on if has_link else None,
                     "predicted_exposed": pred["exposed"] if has_link else None,
                     "predicted_inside": pred["inside"], "predicted_outside": pred["outside"],
                     "cpu_bound": pred["cpu_bound"], "predicted_bubble": pred["bubble"], "wall_s": time.time() - t,
                     "profile_gflops": hw.gemm_flops_per_s("fp32") / 1e9, "time_scale": hw.ep_link.time_scale,
                     "load_average": os.getloadavg()[0]})
    print(f"profile {hw.name}: {hw.gemm_flops_per_s('fp32') / 1e9:.2f} GFLOP/s per rank, core share "
          f"{hw.core_share:.2f}, a2a CPU {hw.net.a2a_cpu_us:.0f} us, link time_scale {hw.ep_link.time_scale:g}, "
          f"{hw.shared_cores} shared cores; measured = median (min) over {a.steps} steps, slowest rank")
    hdr = (f"{'run':<22} {'measured s':>15} {'predicted s':>11} {'error':>14} {'CPU s/rank m|p':>14} "
           f"{'exposed m|p':>12} {'in|out pred':>11}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        f = lambda x: "-" if x is None else f"{100 * x:.0f}%"
        print(f"{r['run']:<22} {r['measured_s']:>7.3f} ({r['measured_min_s']:.3f}) {r['predicted_s']:>11.3f} "
              f"{100 * r['error']:>+6.1f}% ({100 * r['error_min']:+.0f}%) "
              f"{r['measured_cpu_s']:>6.3f}|{r['predicted_cpu_s']:.3f} "
              f"{f(r['measured_exposed']):>5}|{f(r['predicted_exposed']):<5} "
              f"{f(r['predicted_inside']):>4}|{f(r['predicted_outside'])}"
              + ("  (CPU-bound)" if r["cpu_bound"] else ""))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
