"""The symmetric-memory transport on simulated ranks: its intra-node exchange against gloo's
``all_to_all_single`` on the same payloads, and the exposed all-to-all time of DualPipe with it.

Part 1 (``--part exchange``): 4 and 8 gloo ranks, one virtual node and two, the small model's
MoE layer (configs/model/small.yaml: dim 128, 16 experts, top-4 of 2 kept groups out of 4) routing
``--tokens`` random tokens per rank, bf16 with FP8 dispatch payload (what the trainer sends under
the FP8 recipe).  For the intra-node stage of a dispatch and of a combine (the stage the
symmetric transport replaces; the inter-node stage is the same gloo exchange in both):

* gloo: ``all_to_all_single`` of the packed stage-2 rows on the node's process group (the
  hierarchical transport's stage 2; the combine direction moves the expert outputs back);
* symm: the symmetric transport's stage 2 on CPU tensors (one block copy per peer into its
  shared-memory buffer, signal, wait for the peers' signals, copy the received rows out;
  combine: expose own rows, signal, wait, read the blocks from the peers' buffers).

The per-(token, node) sum that follows the combine exchange is the same op in both (timed alone
as "partial sum").  "d+c": a whole dispatch + combine through each transport, plan included.

Both start from the same packed send rows (built once, not timed).

The two run interleaved in the same process group (gloo, symm, gloo, ...) after a barrier each;
an exchange's time is the slowest rank's; medians over ``--iters``.  Also reported: the CPU
time one exchange costs a rank (process time, gloo's I/O threads included; median, mean over
ranks), which oversubscribed cores do not inflate the way they inflate wall time.  The kernels run as their
torch references on CPU tensors (``use_triton=None``); under ``TRITON_INTERPRET`` they would be
interpreted Python.  Also timed: the whole dispatch + combine through the flat, hierarchical and
symmetric transports on the same routing.

Part 2 (``--part overlap``): ``benchmarks/bench_pipeline.py --part overlap``'s "ep" layout
(DualPipe pp2 x dp2 x ep2, tiny model, overlap on) with ``parallel.transport`` flat, hierarchical
and symmetric
in one process group, round-robin; exposed fraction = (T_with_link - T_without_link) / emulated
all-to-all time (1 = nothing hidden).

    OMP_NUM_THREADS=1 python benchmarks/bench_symm_a2a.py [--part exchange|overlap|all]
        [--tokens 256] [--iters 30] [--steps 3]

Timings on a shared machine are noisy: re-run on a quiet one for numbers to quote.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_pipeline (part 2)


# ============================================================================ part 1
def _exchange_body(rank: int, world: int, gpn: int, tokens: int, iters: int) -> dict:
    import torch.distributed as dist

    from hai_llm.config.load import load_model_args
    from hai_llm.kernels.symm_a2a import symm_get_blocks, symm_put_blocks
    from hai_llm.model.moe import Gate
    from hai_llm.parallel.a2a_wire import _pack, _Stage
    from hai_llm.parallel.transport import build_transport

    args = load_model_args("small")
    torch.manual_seed(0)
    gate = Gate(args)
    gate.reset_parameters(args.init_std * 5)
    x = torch.randn(tokens, args.dim, generator=torch.Generator().manual_seed(100 + rank))
    with torch.no_grad():
        w, idx, _ = gate(x)
    x = x.to(torch.bfloat16)
    E = args.n_routed_experts
    tps = {k: build_transport(k, None, list(range(world)), gpn) for k in ("flat", "hierarchical", "symmetric")}
    sym = tps["symmetric"]
    plan = sym.plan(idx, E)
    # the stage-2 input of a dispatch: one FP8 copy per (token, node) (+ routing weights), after stage 1
    packed, _ = _pack(sym._gather_tokens(x, plan.copy_token, True))
    slot_w = w.reshape(-1, 1).float()
    if sym.n_nodes > 1:
        st = _Stage(sym, "bench")
        copies = st.a2a(sym.inter, packed, plan.copy_splits, plan.copy_recv_splits)
        aux1 = st.a2a(sym.inter, slot_w[plan.row_slot].contiguous(), plan.row_splits, plan.row_recv_splits)
        st.wait()
    else:
        copies, aux1 = packed, slot_w[plan.row_slot].contiguous()
    width = copies.shape[1] + 4
    send = torch.cat([copies[plan.s2_copy], aux1[plan.s2_order].view(torch.uint8)], 1)  # gloo payload
    n_recv = plan.node_recv[sym.local]
    y_rows = torch.randn(n_recv, args.dim).to(torch.bfloat16)  # expert outputs, received order
    cw = args.dim * 2
    buf = sym.buffer(torch.device("cpu"))
    pg = sym.intra.pg

    def gloo_dispatch():
        recv = send.new_empty(n_recv, width)
        dist.all_to_all_single(recv, send, plan.s2_recv_splits, plan.s2_splits, group=pg)
        return recv

    def symm_dispatch():
        seq, slot = buf.begin()
        peers = buf.peers(slot, [n * width for n in plan.node_recv])
        symm_put_blocks(send, peers, plan.s2_splits, plan.s2_base, width)
        buf.arrive(seq)
        buf.wait_arrived(seq)
        out = peers[sym.local][:n_recv * width].view(n_recv, width).clone()
        buf.done(seq)
        return out

    def gloo_combine():
        back = y_rows.new_empty(len(plan.s2_copy), args.dim)
        dist.all_to_all_single(back, y_rows, plan.s2_splits, plan.s2_recv_splits, group=pg)
        return back

    def symm_comb():
        seq, slot = buf.begin()
        peers = buf.peers(slot, [n * cw for n in plan.node_recv])
        peers[sym.local][:n_recv * cw].view(n_recv, cw).copy_(y_rows.view(torch.uint8))
        buf.arrive(seq)
        buf.wait_arrived(seq)
        back = symm_get_blocks(peers, plan.s2_splits, plan.s2_base, cw).view(torch.bfloat16)
        buf.done(seq)
        return back

    def partial_sum():  # what both combines do next (the same op): partial[t, n], for scale
        return sym._sum_rows(y_back, plan.s2_copy, plan.n_fwd_copies)

    def full(tp):
        p = tp.plan(idx, E)
        rows, _ = tp.scatter_async(p, x, slot_w, quant_fp8=True).wait()
        return tp.gather_async(p, rows, None).wait()[0]

    # same results (a check, not timed): symm == gloo for both directions
    y_back = gloo_combine()
    ok = torch.equal(gloo_dispatch(), symm_dispatch()) and torch.equal(y_back, symm_comb())
    ok = ok and torch.equal(full(tps["flat"]), full(tps["symmetric"]))
    fns = {"gloo dispatch": gloo_dispatch, "symm dispatch": symm_dispatch, "gloo combine": gloo_combine,
           "symm combine": symm_comb, "partial sum": partial_sum, "flat d+c": lambda: full(tps["flat"]),
           "hierarchical d+c": lambda: full(tps["hierarchical"]), "symmetric d+c": lambda: full(tps["symmetric"])}
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for i in range(iters + 3):  # 3 warm-up rounds; interleaved
        for k, f in fns.items():
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            # process time counts every thread of the rank (gloo's I/O threads too)
            dt = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64)
            wall = dt[:1].clone()
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # the exchange ends when its slowest rank does
            if i >= 3:
                times[k].append(float(wall))
                cpu[k].append(float(dt[1]))
    rows = int(sum(plan.s2_splits))
    return {"ok": ok, "median_us": {k: statistics.median(v) * 1e6 for k, v in times.items()},
            "cpu_us": {k: statistics.median(v) * 1e6 for k, v in cpu.items()},
            "rows": rows, "bytes": rows * width}


def part_exchange(a) -> list:
    from hai_llm.parallel.spawn import run_ranks

    out = []
    for world, gpn in ((4, 4), (4, 2), (8, 8), (8, 4)):
        t0 = time.time()
        res = run_ranks(_exchange_body, world, gpn, a.tokens, a.iters, timeout=3600)
        med = res[0]["median_us"]
        assert all(r["ok"] for r in res), "symmetric results differ from gloo's"
        cpu = {k: statistics.mean(r["cpu_us"][k] for r in res) for k in med}
        out.append({"world": world, "nodes": world // gpn, "med": med, "cpu": cpu,
                    "bytes": statistics.mean(r["bytes"] for r in res)})
        print(f"  [{world} ranks, {world // gpn} node(s): {time.time() - t0:.0f} s]", file=sys.stderr)
    return out


def print_exchange(rows, a) -> None:
    print(f"\nPart 1: intra-node exchange, small-model MoE shapes, {a.tokens} tokens per rank, bf16 + FP8 "
          f"dispatch; median over {a.iters} interleaved rounds of the slowest rank, microseconds")
    hdr = ("ranks", "nodes", "stage-2 bytes/rank", "gloo dispatch", "symm dispatch", "speed-up",
           "gloo combine", "symm combine", "speed-up", "partial sum", "flat d+c", "hier d+c", "symm d+c",
           "CPU us/rank: gloo d / symm d / gloo c / symm c")
    print("| " + " | ".join(hdr) + " |")
    print("| " + " | ".join("---" for _ in hdr) + " |")
    for r in rows:
        m = r["med"]
        print("| " + " | ".join([
            str(r["world"]), str(r["nodes"]), f"{r['bytes']:.0f}", f"{m['gloo dispatch']:.0f}",
            f"{m['symm dispatch']:.0f}", f"{m['gloo dispatch'] / m['symm dispatch']:.1f}x",
            f"{m['gloo combine']:.0f}", f"{m['symm combine']:.0f}",
            f"{m['gloo combine'] / m['symm combine']:.1f}x", f"{m['partial sum']:.0f}", f"{m['flat d+c']:.0f}",
            f"{m['hierarchical d+c']:.0f}", f"{m['symmetric d+c']:.0f}",
            " / ".join(f"{r['cpu'][k]:.0f}" for k in ("gloo dispatch", "symm dispatch", "gloo combine",
                                                      "symm combine"))]) + " |")


# ============================================================================ part 2
def part_overlap(a) -> list:
    from bench_pipeline import make_cfg, overlap_body

    from hai_llm.parallel.spawn import run_ranks

    lay = dict(pp=2, dp=2, ep=2, n_micro=a.n_micro)
    transports = ("flat", "hierarchical", "symmetric")
    cfgs = [make_cfg(schedule="dualpipe", layers=a.layers, seq=a.seq, mb=a.micro_batch, transport=t, **lay)
            for t in transports]
    variants = [("dualpipe", True)] * len(transports)
    per_rank = run_ranks(overlap_body, 4, cfgs, variants, a.steps, "auto", timeout=3600)
    rows = []
    for i, t in enumerate(transports):
        t0 = statistics.mean(min(r["res"][i]["nolink"]) for r in per_rank)
        t1 = statistics.mean(min(r["res"][i]["link"]) for r in per_rank)
        comm = statistics.mean(r["res"][i]["modeled"] for r in per_rank) * per_rank[0]["scale"]
        rows.append({"transport": t, "T_nolink": t0, "T_link": t1, "comm": comm,
                     "exposed": (t1 - t0) / comm if comm else float("nan"), "scale": per_rank[0]["scale"]})
    return rows


def print_overlap(rows, a) -> None:
    print(f"\nPart 2: DualPipe pp2 x dp2 x ep2, overlap on, tiny model n_layers={a.layers}, seq {a.seq}, "
          f"micro-batch {a.micro_batch}, {a.n_micro} micro-batches; min over {a.steps} rounds, mean over "
          f"ranks; EP link time_scale={rows[0]['scale']:.4g}")
    hdr = ("transport", "T no link s", "T link s", "emulated a2a s", "exposed")
    print("| " + " | ".join(hdr) + " |")
    print("| " + " | ".join("---" for _ in hdr) + " |")
    for r in rows:
        print(f"| {r['transport']} | {r['T_nolink']:.3f} | {r['T_link']:.3f} | {r['comm']:.3f} | {r['exposed']:.2f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("exchange", "overlap", "all"), default="all")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank (part 1)")
    ap.add_argument("--iters", type=int, default=30, help="timed rounds (part 1)")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds (part 2)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--n-micro", type=int, default=8)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("command: OMP_NUM_THREADS=1 python benchmarks/bench_symm_a2a.py " + " ".join(sys.argv[1:]))
    if a.part in ("exchange", "all"):
        print_exchange(part_exchange(a), a)
    if a.part in ("overlap", "all"):
        print_overlap(part_overlap(a), a)


if __name__ == "__main__":
    main()
