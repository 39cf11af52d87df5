"""MoE all-to-all traffic: flat vs hierarchical (DeepEP-style) dispatch/combine.

Two parts:

(a) REAL transports: 8 gloo ranks run the small model's MoE layer (configs/model/small.yaml:
    16 experts, top-4 of 2 kept groups out of 4) in bf16 with FP8 dispatch, forward + backward,
    on a simulated 2-node (gpus_per_node=4) and 4-node (gpus_per_node=2) layout.  Traffic comes
    from the transports' CommStats and is cross-checked against the analytic model of (b) on the
    same routing.
(b) ANALYTIC, one process: a DeepSeek-V3-like router (256 experts, top-8, 8 groups = 8 nodes,
    4 kept; EP64 = 8 nodes x 8 GPUs, 4 experts per GPU) with random gate weights on random tokens
    (routing dimension --v3-dim instead of 7168: only the routing statistics matter), hidden
    7168, FP8 dispatch payload (7168 B + 56 fp32 tile scales + a 4 B routing weight per row) and
    BF16 combine (14336 B per row or per node partial).  No all-to-all runs: it counts what each
    transport would send.

Columns: inter/intra copies = hidden-size rows a token sends across / inside nodes in the
dispatch (hierarchical intra rows include the forwarding hop); bytes are per source token;
"IB us" = inter-node bytes / 50 GB/s for 4096 tokens per GPU (dispatch + combine); "modeled us" =
LinkModel (NVLink 160 GB/s, IB 50 GB/s, 5 us latency per stage) time of dispatch + combine for
4096 tokens per GPU, flat = one stage with both links concurrent, hierarchical = IB
stage then NVLink stage (not chunk-pipelined, so an upper bound for DeepEP-style overlap).

    python benchmarks/bench_dispatch.py [--tokens 256] [--v3-tokens 8192] [--skip-real]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from hai_llm.parallel.transport import LinkModel

FP8_TILE = 128
LINK = LinkModel()  # H800: NVLink 160 GB/s, IB 50 GB/s


# ------------------------------------------------------------------------------ analytic model
def analytic_traffic(idx_TK: torch.Tensor, src_rank_T: torch.Tensor, experts_per_rank: int,
                     ranks_per_node: int, dispatch_row_bytes: int, combine_row_bytes: int) -> dict:
    """Per-transport traffic of one dispatch + combine, summed over the tokens, exactly as
    hai_llm.parallel.transport moves it (one row per (token, expert); hierarchical: one copy per
    (token, remote node) then one row per expert inside the node, one partial per node back)."""
    L = ranks_per_node
    rank = idx_TK // experts_per_rank
    node = rank // L
    src_node = (src_rank_T // L)[:, None]
    remote = node != src_node
    same_node_other_rank = (~remote) & (rank != src_rank_T[:, None])
    # distinct remote nodes per token
    n_nodes = int(max(node.max(), src_node.max())) + 1
    onehot = torch.zeros(idx_TK.shape[0], n_nodes, dtype=torch.bool)
    onehot.scatter_(1, node, True)
    onehot.scatter_(1, src_node, False)
    remote_nodes = onehot.sum(1)
    fwd_rank = node * L + (src_rank_T % L)[:, None]  # same local index on the target node
    hier_intra = rank != fwd_rank
    w = 4  # fp32 routing weight per (token, expert) row
    flat_inter, flat_intra = int(remote.sum()), int(same_node_other_rank.sum())
    h_inter, h_intra = int(remote_nodes.sum()), int(hier_intra.sum())
    return {
        "tokens": idx_TK.shape[0],
        "remote_nodes_max": int(remote_nodes.max()) if remote_nodes.numel() else 0,
        "flat": {"inter_copies": flat_inter, "intra_copies": flat_intra,
                 "d_inter": flat_inter * (dispatch_row_bytes + w), "d_intra": flat_intra * (dispatch_row_bytes + w),
                 "c_inter": flat_inter * combine_row_bytes, "c_intra": flat_intra * combine_row_bytes},
        "hierarchical": {"inter_copies": h_inter, "intra_copies": h_intra,
                         "d_inter": h_inter * dispatch_row_bytes + flat_inter * w,
                         "d_intra": h_intra * (dispatch_row_bytes + w),
                         "c_inter": h_inter * combine_row_bytes, "c_intra": h_intra * combine_row_bytes},
    }


def modeled_us(kind: str, per_token: dict, tokens_per_gpu: int = 4096) -> float:
    """LinkModel time of dispatch + combine for tokens_per_gpu tokens (balanced load assumed)."""
    n = tokens_per_gpu
    if kind == "flat":
        t = LINK.stage_seconds(per_token["d_intra"] * n, per_token["d_inter"] * n) \
            + LINK.stage_seconds(per_token["c_intra"] * n, per_token["c_inter"] * n)
    else:
        t = sum(LINK.stage_seconds(0, per_token[k + "_inter"] * n) + LINK.stage_seconds(per_token[k + "_intra"] * n, 0)
                for k in ("d", "c"))
    return t * 1e6


def ib_us(per_token: dict, tokens_per_gpu: int = 4096) -> float:
    """Inter-node link time alone (dispatch + combine), the bottleneck DeepEP hides."""
    return (per_token["d_inter"] + per_token["c_inter"]) * tokens_per_gpu / (LINK.inter_gbps * 1e9) * 1e6


# ------------------------------------------------------------------------------ real transports
def _real_worker(rank: int, world: int, tokens: int, layouts: list[int]):
    from hai_llm.config.load import load_model_args
    from hai_llm.model.moe import MoE
    from hai_llm.parallel.expert import apply_expert_parallel, set_expert_transport
    from hai_llm.parallel.transport import build_transport

    args = load_model_args("small")
    torch.manual_seed(0)
    moe = MoE(args)
    moe.reset_parameters(args.init_std * 5)
    moe = moe.to(torch.bfloat16)
    x = torch.randn(tokens, args.dim, generator=torch.Generator().manual_seed(100 + rank)).to(torch.bfloat16)
    _, idx, _ = moe.gate(x)
    out = {"idx": idx, "rank": rank, "dim": args.dim}
    first = True
    for gpn in layouts:
        for kind in ("flat", "hierarchical"):
            link = LinkModel(time_scale=0.0)  # record modeled time, never sleep
            tp = build_transport(kind, None, list(range(world)), gpn, link=link)
            if first:
                apply_expert_parallel(moe, None, transport=tp, fp8_dispatch=True)
                first = False
            else:
                set_expert_transport(moe, tp)
            xx = x.clone().requires_grad_()
            t0 = time.perf_counter()
            y = moe(xx.view(1, tokens, -1))
            y.float().square().mean().backward()
            out[(gpn, kind)] = {"stats": tp.stats.snapshot(), "wall_s": time.perf_counter() - t0,
                                "y": y.detach()}
    return out


def run_real(tokens: int, world: int = 8, layouts=(4, 2)) -> list[dict]:
    from hai_llm.parallel.spawn import run_ranks

    return run_ranks(_real_worker, world, tokens, list(layouts), timeout=600)


# ------------------------------------------------------------------------------ V3-like router
def v3_routing(n_tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    from hai_llm.model.args import ModelArgs
    from hai_llm.model.moe import Gate

    args = ModelArgs(dim=dim)  # defaults: 256 experts, top-8, 8 groups, 4 kept, sigmoid
    torch.manual_seed(seed)
    gate = Gate(args)
    gate.reset_parameters(args.init_std)
    x = torch.randn(n_tokens, dim)
    with torch.no_grad():
        _, idx, _ = gate(x)
    return idx


# ------------------------------------------------------------------------------ table
HEAD = ("case", "transport", "nodes", "inter copies/tok", "max remote nodes", "intra copies/tok",
        "disp inter B/tok", "disp intra B/tok", "comb inter B/tok", "comb intra B/tok", "IB us", "modeled us")


def _fmt_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank for the real 8-rank runs")
    ap.add_argument("--v3-tokens", type=int, default=8192)
    ap.add_argument("--v3-dim", type=int, default=512)
    ap.add_argument("--skip-real", action="store_true")
    a = ap.parse_args(argv)
    print("command: python benchmarks/bench_dispatch.py " + " ".join(sys.argv[1:] if argv is None else argv))
    rows = []

    if not a.skip_real:
        t0 = time.time()
        res = run_real(a.tokens)
        D = res[0]["dim"]
        d_row, c_row = D + 4 * -(-D // FP8_TILE), 2 * D
        for gpn in (4, 2):
            L, world = gpn, len(res)
            idx = torch.cat([r["idx"] for r in res])
            src = torch.cat([torch.full((r["idx"].shape[0],), r["rank"]) for r in res])
            ana = analytic_traffic(idx, src, 16 // world, L, d_row, c_row)
            for kind in ("flat", "hierarchical"):
                tot = {k: 0 for k in ("tokens", "intra_copies", "inter_copies")}
                by = {"d_inter": 0, "d_intra": 0, "c_inter": 0, "c_intra": 0}
                for r in res:
                    st = r[(gpn, kind)]["stats"]
                    tot["tokens"] += st["dispatch"]["tokens"]
                    tot["inter_copies"] += st["dispatch"]["inter_copies"]
                    tot["intra_copies"] += st["dispatch"]["intra_copies"]
                    by["d_inter"] += st["dispatch"]["inter_bytes"]
                    by["d_intra"] += st["dispatch"]["intra_bytes"]
                    by["c_inter"] += st["combine"]["inter_bytes"]
                    by["c_intra"] += st["combine"]["intra_bytes"]
                want = ana[kind]
                for k in ("inter_copies", "intra_copies"):
                    assert tot[k] == want[k], (gpn, kind, k, tot[k], want[k])
                for k in by:
                    assert by[k] == want[k], (gpn, kind, k, by[k], want[k])
                per = {k: v / tot["tokens"] for k, v in by.items()}
                rows.append((f"small (real, EP{world})", kind, world // gpn,
                             f"{tot['inter_copies'] / tot['tokens']:.2f}", ana["remote_nodes_max"],
                             f"{tot['intra_copies'] / tot['tokens']:.2f}",
                             *(f"{per[k]:.0f}" for k in ("d_inter", "d_intra", "c_inter", "c_intra")),
                             f"{ib_us(per):.0f}", f"{modeled_us(kind, per):.0f}"))
            # the two transports computed the same outputs
            for r in res:
                assert torch.equal(r[(gpn, "flat")]["y"], r[(gpn, "hierarchical")]["y"])
        print(f"real 8-rank runs: {time.time() - t0:.1f} s (counts match the analytic model; "
              f"flat == hierarchical outputs bit for bit)")

    # DeepSeek-V3-like: EP64 = 8 nodes x 8 GPUs, 4 experts per GPU
    t0 = time.time()
    idx = v3_routing(a.v3_tokens, a.v3_dim)
    src = torch.arange(a.v3_tokens) % 64
    D = 7168
    ana = analytic_traffic(idx, src, 4, 8, D + 4 * (D // FP8_TILE), 2 * D)
    for kind in ("flat", "hierarchical"):
        w = ana[kind]
        n = ana["tokens"]
        per = {k: w[k] / n for k in ("d_inter", "d_intra", "c_inter", "c_intra")}
        rows.append(("V3-like (analytic, EP64)", kind, 8, f"{w['inter_copies'] / n:.2f}",
                     ana["remote_nodes_max"], f"{w['intra_copies'] / n:.2f}",
                     *(f"{per[k]:.0f}" for k in ("d_inter", "d_intra", "c_inter", "c_intra")),
                     f"{ib_us(per):.0f}", f"{modeled_us(kind, per):.0f}"))
    print(f"V3-like routing of {a.v3_tokens} tokens: {time.time() - t0:.1f} s")
    print()
    print(_fmt_row(HEAD))
    print(_fmt_row(["---"] * len(HEAD)))
    for r in rows:
        print(_fmt_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
