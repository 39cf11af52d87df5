"""Pipeline runtime on simulated CPU ranks: step time of DualPipe with the overlapped F&B pairs,
with the overlap disabled, and of 1F1B; how much emulated all-to-all time stays exposed; and a
side-by-side run of torch.distributed.pipelining's ScheduleDualPipeV / ScheduleZBVZeroBubble on
the same stages and micro-batches.

Part 1 (``--part overlap``): the variants of a layout share one process group and are timed
round-robin, ``--steps`` rounds after a warm-up (this 2-core machine is shared, so load drift
must hit all variants alike); each reports its fastest step of ``PipelineRuntime.forward_backward``
on synthetic tokens.  With expert parallelism the MoE
all-to-alls go through ``hai_llm.parallel.transport`` with a :class:`LinkModel`: ``wait()``
returns no earlier than ``issue + time_scale * modeled transfer time``, so the emulated
communication is hidden exactly when compute runs between issue and wait.  Each layout runs
twice, without and with the link model::

    exposed fraction = (T_with_link - T_without_link) / emulated all-to-all time per step

(1 = every emulated microsecond adds to the step, 0 = all hidden).  ``--time-scale auto``
picks the scale that makes the emulated all-to-all time per step about equal to the step's
compute time (DeepSeek-V3's 1:1 computation : communication ratio).  Pipeline P2P transfers are
real gloo transfers and are not link-emulated.

Part 2 (``--part torch``): the same model cut into the same 2*pp stages, the same micro-batches
and the same loss (MTP and the balance loss off: torch's stage API has one output tensor and a
loss_fn of (output, target)) under torch's ScheduleDualPipeV and ScheduleZBVZeroBubble and under
our DualPipeV: step time (the three timed round-robin in one process group), peak RSS growth per
rank over setup + one step (one spawn per implementation), and the relative difference of every
gradient against our run.

The simulated bubble numbers of the schedules (Table 2 of the report) are produced by
``benchmarks/bench_bubbles.py``; docs/pipeline.md quotes both.

    OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py [--part overlap|torch|all] [--steps 3]
        [--time-scale auto|FLOAT] [--layers 8] [--seq 64] [--micro-batch 2] [--n-micro 8]
        [--groups ep,pp4,pp2]
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time

import torch


# ============================================================================ configs
def make_cfg(pp: int, dp: int, ep: int, schedule: str, n_micro: int, layers: int, seq: int, mb: int,
             model_overrides: list | None = None, transport: str = "flat"):
    from hai_llm.config.load import load_model_args
    from hai_llm.config.schema import Config, DataConfig, ParallelConfig, TrainConfig

    ov = [f"n_layers={layers}", "n_dense_layers=1"] + (model_overrides or [])
    return Config(model=load_model_args("tiny", ov), data=DataConfig(path="unused", seq_len=seq),
                  train=TrainConfig(global_batch=n_micro * mb * dp, micro_batch=mb, seed=7, device="cpu"),
                  parallel=ParallelConfig(nprocs=pp * dp, pp=pp, dp=dp, ep=ep, schedule=schedule,
                                          n_micro=n_micro, transport=transport))


def _tokens(cfg, dp_rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + dp_rank)
    local = cfg.train.global_batch // cfg.parallel.dp
    T = cfg.data.seq_len + 1 + cfg.model.n_mtp_layers
    return torch.randint(0, cfg.model.vocab_size, (local, T), generator=g)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ============================================================================ part 1
def overlap_body(rank: int, world: int, cfgs: list, variants: list, rounds: int, time_scale) -> dict:
    """All variants of one layout in one process group, timed round-robin (link off / on per
    variant, toggled on the live transport) so that load drift hits all of them alike; the
    minimum over rounds is reported."""
    import torch.distributed as dist

    from hai_llm.model.transformer import build_model
    from hai_llm.parallel.transport import LinkModel
    from hai_llm.layout import build_layout
    from hai_llm.runtime.pipeline import PipelineRuntime

    runs = []
    for cfg, (schedule, overlap) in zip(cfgs, variants):
        rt = PipelineRuntime(cfg, build_layout(cfg, world), overlap=overlap)
        pm = rt.prepare_model(build_model(cfg.model, device="cpu", seed=cfg.train.seed))
        runs.append((rt, pm, _tokens(cfg, rt.dp_rank)))
    has_ep = runs[0][0].transport is not None

    def step(i, link):
        rt, pm, batch = runs[i]
        if rt.transport is not None:
            rt.transport.link = link
            rt.transport.stats.reset()
        pm.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        rt.forward_backward(pm, batch, rt.n_micro, contextlib.nullcontext)
        dist.barrier()
        dt = time.perf_counter() - t0
        modeled = rt.transport.stats.total("modeled_s") if rt.transport is not None else 0.0
        return dt, modeled, rt.last_stats.comm_wait_s

    for i in range(len(runs)):  # warm-up
        step(i, None)
    scale = 0.0
    if has_ep:
        if time_scale == "auto":  # emulated all-to-all per step ~ compute time (1:1)
            t_plain = min(step(0, None)[0] for _ in range(2))
            modeled = step(0, LinkModel(time_scale=0.0))[1]
            v = torch.tensor([t_plain / max(modeled, 1e-12)], dtype=torch.float64)
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
            scale = float(v)
        else:
            scale = float(time_scale)
    link = LinkModel(time_scale=scale) if has_ep else None
    res = {i: {"nolink": [], "link": [], "modeled": 0.0, "wait": []} for i in range(len(runs))}
    for _ in range(rounds):
        for i in range(len(runs)):
            dt, _, w = step(i, None)
            res[i]["nolink"].append(dt)
            res[i]["wait"].append(w)
            if has_ep:
                dt, modeled, _ = step(i, link)
                res[i]["link"].append(dt)
                res[i]["modeled"] = modeled
    return {"scale": scale, "res": res}


def part_overlap(args) -> list:
    from hai_llm.parallel.spawn import run_ranks

    rows, scale_used = [], 0.0
    L, S, MB = args.layers, args.seq, args.micro_batch
    M = args.n_micro
    groups = [g for g in (("ep", "pp2 dp2 ep2", 4, dict(pp=2, dp=2, ep=2, n_micro=M)),
                          ("pp4", "pp4", 4, dict(pp=4, dp=1, ep=1, n_micro=M)),
                          ("pp2", "pp2", 2, dict(pp=2, dp=1, ep=1, n_micro=M)))
              if g[0] in args.groups.split(",")]
    variants = [("dualpipe", True), ("dualpipe", False), ("1f1b", False)]
    for _, label, world, lay in groups:
        cfgs = [make_cfg(schedule=s, layers=L, seq=S, mb=MB, **lay) for s, _ in variants]
        t = time.time()
        per_rank = run_ranks(overlap_body, world, cfgs, variants, args.steps, args.time_scale, timeout=3600)
        scale = per_rank[0]["scale"]
        if scale:
            scale_used = scale
        for i, (s, ov) in enumerate(variants):
            t0 = statistics.mean(min(r["res"][i]["nolink"]) for r in per_rank)
            row = {"layout": label, "schedule": s, "overlap": ov, "T_nolink": t0,
                   "p2p_wait": statistics.mean(min(r["res"][i]["wait"]) for r in per_rank)}
            if scale:
                t1 = statistics.mean(min(r["res"][i]["link"]) for r in per_rank)
                comm = statistics.mean(r["res"][i]["modeled"] for r in per_rank) * scale
                row.update(T_link=t1, comm=comm, exposed=(t1 - t0) / comm if comm else float("nan"))
            rows.append(row)
        print(f"  [{label}: {time.time() - t:.0f} s]", file=sys.stderr)
    return rows, scale_used


def print_overlap(rows, scale, args) -> None:
    print(f"\nPart 1: step time (min over {args.steps} interleaved rounds, mean over ranks), tiny model "
          f"n_layers={args.layers}, seq {args.seq}, micro-batch {args.micro_batch}, {args.n_micro} "
          f"micro-batches per dp rank; EP link time_scale={scale:.4g}")
    hdr = ("layout", "schedule", "overlap", "T no link s", "T link s", "emulated a2a s", "exposed", "P2P wait s")
    print(" | ".join(hdr))
    print(" | ".join("---" for _ in hdr))
    for r in rows:
        cells = [r["layout"], r["schedule"], "on" if r["overlap"] else "off", f"{r['T_nolink']:.3f}",
                 f"{r['T_link']:.3f}" if "T_link" in r else "-", f"{r['comm']:.3f}" if "comm" in r else "-",
                 f"{r['exposed']:.2f}" if "exposed" in r else "-", f"{r['p2p_wait']:.3f}"]
        print(" | ".join(cells))


# ============================================================================ part 2
class _TorchStage(torch.nn.Module):
    """A StageModule as torch.distributed.pipelining wants it: forward(x) -> tensor.

    First stage: tokens -> hidden; last stage: hidden -> logits (norm + head).  Uses the same
    modules (same parameters) as our pieces; MTP and the balance loss are off in this part."""

    def __init__(self, stage, pm, pos):
        super().__init__()
        self.stage = stage
        self.rope = pm.rope(pos)
        self.pos = pos

    def forward(self, x):
        st = self.stage
        h = st.embed(x[:, self.pos]) if st.is_first else x
        for b in st.blocks():
            h = b(h, self.rope)
        if st.is_last:
            h = st.head(st.norm(h))
        return h


def torch_body(rank: int, world: int, cases: list) -> list:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import ScheduleDualPipeV, ScheduleZBVZeroBubble

    from hai_llm.layout import build_layout
    from hai_llm.model.transformer import build_model
    from hai_llm.pipeline.stage import build_pipeline_model
    from hai_llm.runtime.pipeline import PipelineRuntime

    out = []
    for cfg, which, steps in cases:
        n_micro = cfg.parallel.n_micro
        full = build_model(cfg.model, device="cpu", seed=cfg.train.seed)
        batch = _tokens(cfg, 0)
        S = cfg.data.seq_len
        rss0 = _rss_mb()
        times = []
        layout = build_layout(cfg, world)
        if which == "ours":
            rt = PipelineRuntime(cfg, layout)
            pm = rt.prepare_model(full)
            for s in range(steps + 1):
                pm.zero_grad(set_to_none=True)
                dist.barrier()
                t0 = time.perf_counter()
                rt.forward_backward(pm, batch, n_micro, contextlib.nullcontext)
                dist.barrier()
                if s:
                    times.append(time.perf_counter() - t0)
            grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        else:
            sched = layout.schedule  # DualPipeV: the configs of this part use it
            pm = build_pipeline_model(full, sched, rank, layout.stages)
            pos = torch.arange(S)
            stages = [PipelineStage(_TorchStage(pm.stages[c], pm, pos), sched.stage_of(rank, c),
                                    2 * world, torch.device("cpu")) for c in range(2)]

            def loss_fn(logits, tokens):
                return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:S + 1].flatten())

            cls = ScheduleDualPipeV if which == "torch-dualpipev" else ScheduleZBVZeroBubble
            # scale_grads: gradients divided by n_micro, i.e. the mean loss (what ours computes)
            schedule = cls(stages, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=True)
            for s in range(steps + 1):
                pm.zero_grad(set_to_none=True)
                dist.barrier()
                t0 = time.perf_counter()
                kw = {}
                if rank == 0:  # rank 0 holds stage 0 (input) and stage 2pp-1 (loss) of the V
                    kw = {"target": batch}
                    schedule.step(batch, **kw)
                else:
                    schedule.step()
                dist.barrier()
                if s:
                    times.append(time.perf_counter() - t0)
            grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        out.append({"step": statistics.median(times), "rss_growth_mb": _rss_mb() - rss0, "grads": grads})
        dist.barrier()
    return out


def torch_timing_body(rank: int, world: int, cfg, rounds: int) -> dict:
    """All three implementations in one process group, one step each per round (round-robin),
    so that load drift hits them alike; returns every step time per implementation."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import ScheduleDualPipeV, ScheduleZBVZeroBubble

    from hai_llm.layout import build_layout
    from hai_llm.model.transformer import build_model
    from hai_llm.pipeline.stage import build_pipeline_model
    from hai_llm.runtime.pipeline import PipelineRuntime

    n_micro, S = cfg.parallel.n_micro, cfg.data.seq_len
    batch = _tokens(cfg, 0)
    layout = build_layout(cfg, world)
    rt = PipelineRuntime(cfg, layout)
    ours = rt.prepare_model(build_model(cfg.model, device="cpu", seed=cfg.train.seed))

    def loss_fn(logits, tokens):
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:S + 1].flatten())

    impls = {"ours": None}
    sched = layout.schedule  # DualPipeV
    for name, cls in (("torch-dualpipev", ScheduleDualPipeV), ("torch-zbv", ScheduleZBVZeroBubble)):
        pm = build_pipeline_model(build_model(cfg.model, device="cpu", seed=cfg.train.seed), sched, rank,
                                  layout.stages)
        stages = [PipelineStage(_TorchStage(pm.stages[c], pm, torch.arange(S)), sched.stage_of(rank, c),
                                2 * world, torch.device("cpu")) for c in range(2)]
        impls[name] = (pm, cls(stages, n_microbatches=n_micro, loss_fn=loss_fn, scale_grads=True))

    def step(name):
        dist.barrier()
        t0 = time.perf_counter()
        if name == "ours":
            ours.zero_grad(set_to_none=True)
            rt.forward_backward(ours, batch, n_micro, contextlib.nullcontext)
        else:
            pm, schedule = impls[name]
            pm.zero_grad(set_to_none=True)
            if rank == 0:
                schedule.step(batch, target=batch)
            else:
                schedule.step()
        dist.barrier()
        return time.perf_counter() - t0

    times = {k: [] for k in impls}
    for r in range(rounds + 1):
        for name in impls:
            dt = step(name)
            if r:
                times[name].append(dt)
    return times


def part_torch(args) -> list:
    from hai_llm.parallel.spawn import run_ranks

    rows = []
    for pp in (2,):
        ov = ["n_mtp_layers=0", "seq_aux_alpha=0.0"]
        cfg = make_cfg(pp=pp, dp=1, ep=1, schedule="dualpipev", n_micro=8, layers=args.layers, seq=args.seq,
                       mb=args.micro_batch, model_overrides=ov)
        results = {}
        for which in ("ours", "torch-dualpipev", "torch-zbv"):  # one spawn each: separate peak RSS
            try:
                results[which] = run_ranks(torch_body, pp, [(cfg, which, 1)], timeout=1800)
            except Exception as e:  # report, keep going
                results[which] = e
        try:
            timing = run_ranks(torch_timing_body, pp, cfg, args.steps, timeout=1800)
        except Exception as e:
            timing = None
            print(f"interleaved timing failed: {str(e).splitlines()[0]}", file=sys.stderr)
        ref = results["ours"]
        for which, res in results.items():
            if isinstance(res, Exception):
                rows.append({"pp": pp, "impl": which, "error": str(res).splitlines()[0][:120]})
                continue
            worst = 0.0
            for r, rr in zip(res, ref):
                for n, g in r[0]["grads"].items():
                    b = rr[0]["grads"][n]
                    worst = max(worst, float((g.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)))
            step = statistics.mean(min(t[which]) for t in timing) if timing else float("nan")
            rows.append({"pp": pp, "impl": which, "step": step,
                         "rss": [round(r[0]["rss_growth_mb"], 1) for r in res], "grad_rel": worst})
    return rows


def print_torch(rows, args) -> None:
    print(f"\nPart 2: DualPipeV-family schedules, same stages / micro-batches (MTP and balance loss off), "
          f"n_layers={args.layers}, seq {args.seq}, micro-batch {args.micro_batch}, 8 micro-batches")
    hdr = ("pp", "implementation", f"step s (min of {args.steps} interleaved rounds)",
           "peak RSS growth per rank MB", "max grad rel. diff vs ours")
    print(" | ".join(hdr))
    print(" | ".join("---" for _ in hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['pp']} | {r['impl']} | failed: {r['error']} | | ")
            continue
        print(f"{r['pp']} | {r['impl']} | {r['step']:.3f} | {r['rss']} | {r['grad_rel']:.2e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("overlap", "torch", "all"), default="all")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds (part 1) / steps (part 2)")
    ap.add_argument("--time-scale", default="auto")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--n-micro", type=int, default=8, help="micro-batches per dp rank (part 1)")
    ap.add_argument("--groups", default="ep,pp4,pp2", help="part 1 layouts: ep (pp2 dp2 ep2), pp4, pp2")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("command: OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py " + " ".join(sys.argv[1:]))
    if args.part in ("overlap", "all"):
        rows, scale = part_overlap(args)
        print_overlap(rows, scale, args)
    if args.part in ("torch", "all"):
        print_torch(part_torch(args), args)
    print("\nSimulated bubbles vs Table 2: python benchmarks/bench_bubbles.py (see docs/pipeline.md)")


if __name__ == "__main__":
    main()
