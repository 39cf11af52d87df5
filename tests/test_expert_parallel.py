"""Expert parallelism against a single process, flat vs hierarchical transports, traffic
accounting, async handles, link emulation, FP8 dispatch and the global expert load.

Spawning gloo ranks costs seconds on this machine, so ONE 4-rank spawn (a module fixture) runs
every distributed scenario and returns plain tensors; the tests compare them against the
single-process model in the test process:

* pure EP2 inside each pair of ranks {0,1}, {2,3} (hierarchical: two 1-rank virtual nodes);
* pure EP4 over two virtual nodes of 2 ranks (gpus_per_node=2), model and MoE-level checks;
* EP2 x EDP2 from ParallelDims (expert replicas summed over the edp group).
"""
import os
import time

import pytest
import torch

if not torch.cuda.is_available():  # use_triton=True checks run the Triton CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hai_llm.config.load import load_model_args  # noqa: E402
from hai_llm.model.transformer import Transformer  # noqa: E402
from hai_llm.parallel.spawn import run_ranks  # noqa: E402
from helpers import rel_err  # noqa: E402

# 8 experts in 2 groups (= 2 nodes in the world-4 layout), top-3 over up to 2 groups
CFG = ["n_activated_experts=3", "n_expert_groups=2", "n_limited_groups=2"]
# node-limited routing: top-4 inside ONE group (= node)
CFG_NODE_LIMITED = ["n_activated_experts=4", "n_expert_groups=2", "n_limited_groups=1"]
SEQ, GLOBAL_B, SEED = 16, 4, 0


def _args(cfg=CFG):
    return load_model_args("tiny", list(cfg))


def _build(args):
    """Same weights as ``build_model(args, "cpu", seed=SEED)`` (init_weights overwrites every
    tensor), without the meta-device path, whose first ``normal_`` imports torch._dynamo (seconds
    per spawned rank on this machine)."""
    model = Transformer(args)
    model.init_weights(SEED)
    return model


def _global_tokens(args):
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, args.vocab_size, (GLOBAL_B, SEQ + 1 + args.n_mtp_layers), generator=g)


def _grads(model):
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------ rank code
def _ep_step(model, tokens, rank, world):
    """Loss + local backward on this rank's slice of the global batch."""
    per = tokens.shape[0] // world
    model.zero_grad(set_to_none=True)
    out = model.loss(tokens[rank * per:(rank + 1) * per])
    out.loss.backward()
    return out


def _reduced(model, loss, dense_group=None, edp_group=None, ep_group=None):
    """Loss averaged over ranks, reduced dense grads, gathered expert grads, EP grad norm."""
    import torch.distributed as dist

    from helpers import gather_expert_grads, grad_norm_ep, reduce_ep_gradients

    from hai_llm.parallel.expert import expert_param_slices

    loss = loss.detach().clone()
    dist.all_reduce(loss, group=dense_group)
    loss /= dist.get_world_size(dense_group)
    reduce_ep_gradients(model, dense_group, edp_group)
    slices = expert_param_slices(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n not in slices}
    grads.update(gather_expert_grads(model, ep_group))
    return loss, grads, grad_norm_ep(model, ep_group)


def _equivalence_part(group, all_ep_ranks, gpn, hier_gpn):
    """Pure EP over ``group`` (its ranks share the global batch): flat loss/grads reduced over the
    group, flat vs hierarchical bit-identity, global expert load and bias update."""
    import torch.distributed as dist

    from helpers import global_expert_load

    from hai_llm.parallel.expert import apply_expert_parallel, expert_param_slices, set_expert_transport
    from hai_llm.parallel.transport import build_transport

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ep_ranks = [dist.get_global_rank(group, i) for i in range(world)] if group is not None else list(range(world))
    args = _args()
    tokens = _global_tokens(args)
    model = _build(args)
    flat = apply_expert_parallel(model, group, rank, world, transport="flat", gpus_per_node=gpn)
    slices = expert_param_slices(model)
    assert len(slices) == 3 * len(model.moe_layers())
    for name, (shape, off) in slices.items():
        assert shape[0] == args.n_routed_experts and off == rank * args.n_routed_experts // world, name
        assert dict(model.named_parameters())[name].shape[0] == args.n_routed_experts // world
    out = _ep_step(model, tokens, rank, world)
    local_flat = (out.loss.detach(), _grads(model))
    hier = build_transport("hierarchical", group, ep_ranks, hier_gpn, all_ep_ranks)
    set_expert_transport(model, hier)
    out_h = _ep_step(model, tokens, rank, world)
    local_hier = (out_h.loss.detach(), _grads(model))
    # bit-exact (legitimately): flat and hierarchical transports deliver the same rows to the same
    # expert GEMMs and combine in the same order; only the routes of the bytes differ
    bit_identical = torch.equal(local_flat[0], local_hier[0]) and all(
        torch.equal(local_flat[1][n], local_hier[1][n]) for n in local_flat[1])
    assert hier.stats["dispatch"]["calls"] == len(model.moe_layers())
    assert hier.stats["dispatch_bwd"]["calls"] == len(model.moe_layers())
    set_expert_transport(model, flat)
    out = _ep_step(model, tokens, rank, world)
    loss, grads, norm = _reduced(model, out.loss, group, None, group)
    # aux-loss-free balancing: the load of the whole batch, identical bias step everywhere
    load = global_expert_load(out.expert_counts, group)
    model.update_expert_bias(load)
    bias = torch.stack([m.gate.bias.clone() for m in model.moe_layers()])
    return model, {"loss": loss, "grads": grads, "norm": norm, "bit_identical": bit_identical,
                   "load": load, "bias": bias}


def _triton_part(rank):
    """Triton data movement (the CPU interpreter here) gives the reference path's bits."""
    from hai_llm.model.moe import MoE
    from hai_llm.parallel.expert import apply_expert_parallel

    args = _args()
    torch.manual_seed(7)
    moe = MoE(args)
    moe.reset_parameters(0.1)
    x = torch.randn(12, args.dim, generator=torch.Generator().manual_seed(rank))
    outs = []
    for use_triton in (False, True):
        m = MoE(args)
        m.load_state_dict(moe.state_dict())
        apply_expert_parallel(m, None, transport="flat", gpus_per_node=2, use_triton=use_triton)
        xx = x.clone().requires_grad_()
        y = m(xx.view(1, 12, -1))
        y.square().sum().backward()
        outs.append((y.detach(), xx.grad, m.gate.weight.grad, m.experts.w2.grad))
    # bit-exact: Triton vs torch data movement feeds the same values to the same compute
    return all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def _moe_pair(args, scale=0.1, seed=3):
    """An EP MoE layer (slice of a seeded full layer) and the full layer as local reference."""
    from hai_llm.model.moe import MoE

    torch.manual_seed(seed)
    full = MoE(args)
    full.reset_parameters(scale)
    ep = MoE(args)
    ep.load_state_dict(full.state_dict())
    return ep, full


def _routed_ref(full, x, w, idx):
    full.dispatcher = None
    return full.routed(x, w, idx)


def _mechanisms(rank, world, flat, hier):
    """MoE-level checks on 2 virtual nodes x 2 ranks (E=8: 2 experts per rank, 4 per node)."""
    from hai_llm.parallel.expert import ExpertParallelDispatcher, apply_expert_parallel
    from hai_llm.parallel.transport import LinkModel, build_transport

    res = {}
    args = _args(CFG_NODE_LIMITED)
    ep, full = _moe_pair(args)
    apply_expert_parallel(ep, None, transport=flat)
    g = torch.Generator().manual_seed(50 + rank)
    T, D = 24, args.dim
    x = torch.randn(T, D, generator=g)
    w, idx, _ = full.gate(x)
    res["idx"] = idx
    disp = {name: ExpertParallelDispatcher(t, args.n_routed_experts) for name, t in (("flat", flat), ("hier", hier))}

    # node-limited routing: <= 1 node per token, one inter-node copy per (token, remote node)
    ref = _routed_ref(full, x, w, idx)
    outs = {}
    for name, d in disp.items():
        d.transport.stats.reset()
        plan = d.transport.plan(idx, args.n_routed_experts)
        res[f"{name}_nodes_per_token"] = plan.nodes_per_token()
        res[f"{name}_remote_nodes"] = plan.remote_nodes_per_token()
        res[f"{name}_inter_copies_per_token"] = plan.inter_copies_per_token()
        outs[name] = d(x, w, idx, ep.experts)
        res[f"{name}_stats"] = d.transport.stats.snapshot()
    res["routed_err"] = rel_err(outs["flat"], ref)
    res["node_limited_equal"] = torch.equal(outs["flat"], outs["hier"])  # same shapes/ops: bit-exact

    # all-local tokens never leave the rank; mixed routing moves exactly the remote ones
    own = torch.tensor([2 * rank, 2 * rank + 1])
    far = (own + 4) % 8  # the rank with the same local index on the other node
    w2 = torch.rand(T, 2, generator=g)
    for name, d in disp.items():
        d.transport.stats.reset()
        d(x, w2, own.expand(T, 2), ep.experts)
        st = d.transport.stats.snapshot()
        res[f"{name}_local_only_bytes"] = sum(st[o]["intra_bytes"] + st[o]["inter_bytes"]
                                              for o in ("dispatch", "combine"))
        mixed = torch.cat([own.expand(T // 2, 2), far.expand(T - T // 2, 2)])
        d.transport.stats.reset()
        y = d(x, w2, mixed, ep.experts)
        res[f"{name}_mixed_err"] = rel_err(y, _routed_ref(full, x, w2, mixed))
        res[f"{name}_mixed_stats"] = d.transport.stats.snapshot()

    # async: issue, compute something else, wait -> same result; two in flight, waited out of order
    d = disp["hier"]
    sync = d(x, w, idx, ep.experts)
    h1 = d.dispatch_async(x, w, idx)
    h2 = d.dispatch_async(x * 2, w, idx)
    busy = torch.randn(128, 128, generator=g)
    for _ in range(5):
        busy = torch.tanh(busy @ busy)
    b2, b1 = h2.wait(), h1.wait()
    c1 = d.combine_async(d.compute(b1, ep.experts), b1)
    c2 = d.combine_async(d.compute(b2, ep.experts), b2)
    res["async_equal"] = torch.equal(c1.wait(), sync)  # same ops, same shapes: bit-exact
    res["async2_err"] = rel_err(c2.wait(), _routed_ref(full, x * 2, w, idx))

    # link emulation: wait() returns no earlier than the modeled time after the issue
    link = LinkModel(intra_gbps=4e-4, inter_gbps=2e-4, latency_us=40_000, time_scale=1.0)
    for name, kind in (("flat", "flat"), ("hier", "hierarchical")):
        t = build_transport(kind, None, list(range(world)), 2, link=link)
        dd = ExpertParallelDispatcher(t, args.n_routed_experts)
        h = dd.dispatch_async(x, w, idx)
        comm = h.comm
        h.wait()
        res[f"{name}_link"] = (time.perf_counter() - comm.issued_at, comm.delay_s, comm.modeled_s,
                               t.stats["dispatch"]["modeled_s"])
    # overlapped "compute" (a sleep as long as the modeled transfer) hides the delay: issue to
    # return takes ~1x the delay, not 2x (which is what a delay added after the compute would take)
    t = build_transport("flat", None, list(range(world)), 2, link=LinkModel(latency_us=300_000))
    h = ExpertParallelDispatcher(t, args.n_routed_experts).dispatch_async(x, w, idx)
    comm = h.comm
    time.sleep(comm.delay_s)
    slept, real_sleep = [], time.sleep  # record what wait() still sleeps (deterministic, no timing)
    time.sleep = lambda s: (slept.append(s), real_sleep(s))[1]
    try:
        h.wait()
    finally:
        time.sleep = real_sleep
    res["overlap_wait"] = (time.perf_counter() - comm.issued_at, comm.delay_s, sum(slept))

    # FP8 dispatch: close to the full-precision path, identical across transports, backward runs
    args3 = _args()
    x3 = torch.randn(T, args3.dim, generator=g) * 2
    results = {}
    for fp8 in (False, True):
        for name, t in (("flat", flat), ("hier", hier)):
            m, _ = _moe_pair(args3, scale=0.2)
            apply_expert_parallel(m, None, transport=t, fp8_dispatch=fp8)
            t.stats.reset()
            xx = x3.clone().requires_grad_()
            y = m(xx.view(2, T // 2, -1))
            y.square().sum().backward()
            results[(fp8, name)] = (y.detach(), xx.grad.clone(), m.gate.weight.grad.clone(),
                                    m.experts.w1.grad.clone(), t.stats["dispatch"]["inter_bytes"])
    a, b = results[(False, "flat")], results[(True, "flat")]
    res["fp8_err"] = [rel_err(b[i], a[i]) for i in range(4)]
    res["fp8_bytes"] = (a[4], b[4])
    # flat vs hierarchical: same rows, same ops, same order -> bit-exact
    res["fp8_transport_equal"] = all(torch.equal(p, q) for p, q in zip(results[(True, "flat")][:4],
                                                                       results[(True, "hier")][:4], strict=True))
    # the FP8 routed output IS the local computation on the FP8-rounded tokens (only the payload
    # is quantised): 1x128 tiles, power-of-2 scales
    from hai_llm.kernels.moe_permute import dequantize_ref, permute_ref

    ep8, full8 = _moe_pair(args3, scale=0.2)
    apply_expert_parallel(ep8, None, transport=hier, fp8_dispatch=True)
    w8, idx8, _ = full8.gate(x3)
    xq = dequantize_ref(*permute_ref(x3, torch.arange(T), quant_fp8=True, block=128), block=128)
    res["fp8_vs_rounded"] = rel_err(ep8.dispatcher(x3, w8, idx8, ep8.experts), _routed_ref(full8, xq, w8, idx8))

    # bf16: flat and hierarchical stay bit-identical (partials rounded to bf16 in both)
    epb, _ = _moe_pair(args3)
    epb = epb.to(torch.bfloat16)
    apply_expert_parallel(epb, None, transport=flat)
    xb = x3.to(torch.bfloat16)
    outs = []
    for t in (flat, hier):
        epb.dispatcher.transport = t
        epb.zero_grad()
        xx = xb.clone().requires_grad_()
        y = epb(xx.view(2, T // 2, -1))
        y.float().square().sum().backward()
        outs.append((y.detach(), xx.grad.clone(), epb.experts.w3.grad.clone()))
    res["bf16_equal"] = all(torch.equal(p, q) for p, q in zip(*outs, strict=True))  # flat vs hier: bit-exact
    return res


def _worker(rank, world):
    """Everything on one 4-rank spawn (spawning is the expensive part on this machine)."""
    import torch.distributed as dist

    from hai_llm.layout.dims import ParallelDims
    from hai_llm.parallel.expert import apply_expert_parallel
    from hai_llm.parallel.transport import build_transport

    cpu0, wall = time.process_time(), [("start", time.time())]
    res = {}
    # (1) pure EP2 inside each pair {0,1}, {2,3}; hierarchical over two 1-rank virtual nodes
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    _, res["ep2"] = _equivalence_part(pairs[rank // 2], [[0, 1], [2, 3]], gpn=1, hier_gpn=1)
    wall.append(("ep2", time.time()))
    # (2) pure EP4 over 2 virtual nodes x 2 ranks (flat and hierarchical on the same nodes)
    model, res["ep4"] = _equivalence_part(None, [[0, 1, 2, 3]], gpn=2, hier_gpn=2)
    wall.append(("ep4", time.time()))
    flat = model.moe_layers()[0].dispatcher.transport
    hier = build_transport("hierarchical", None, list(range(world)), 2)
    res.update(_mechanisms(rank, world, flat, hier))
    wall.append(("mechanisms", time.time()))
    res["triton_equal"] = _triton_part(rank)
    wall.append(("triton", time.time()))
    # (3) EP2 x EDP2 from ParallelDims: expert replicas are summed over edp
    mesh = ParallelDims(world_size=4, dp=4, ep=2, gpus_per_node=2).build_mesh()
    args = _args()
    m2 = _build(args)
    apply_expert_parallel(m2, mesh, transport="flat")
    out = _ep_step(m2, _global_tokens(args), rank, world)
    loss, grads, norm = _reduced(m2, out.loss, mesh.group("dp_sp"), mesh.group("edp"), mesh.group("ep"))
    res["edp"] = {"loss": loss, "grads": grads, "norm": norm}
    dist.barrier()
    wall.append(("edp", time.time()))
    res["cpu_s"] = time.process_time() - cpu0
    res["wall_s"] = {k: round(t - t0, 2) for (k, t), (_, t0) in zip(wall[1:], wall[:-1])}
    return res


# ------------------------------------------------------------------------------ reference
@pytest.fixture(scope="module")
def reference():
    """The single-process run: loss, gradients, their norm, expert load and updated biases."""
    args = _args()
    model = _build(args)
    out = model.loss(_global_tokens(args))
    out.loss.backward()
    grads = _grads(model)
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))
    model.update_expert_bias(out.expert_counts)
    bias = torch.stack([m.gate.bias.clone() for m in model.moe_layers()])
    return {"loss": out.loss.detach(), "grads": grads, "norm": norm, "counts": out.expert_counts,
            "bias": bias}


def _check_against_reference(got, ref, tag):
    assert abs(float(got["loss"]) - float(ref["loss"])) <= 1e-5 * abs(float(ref["loss"])), tag
    assert set(got["grads"]) == set(ref["grads"]), tag
    n_experts = _args().n_routed_experts
    for name, g in got["grads"].items():
        r = ref["grads"][name]
        assert g.shape == r.shape, (tag, name)
        if ".experts." in name:  # every expert separately: an "ep x" bug cannot hide in a norm
            assert g.shape[0] == n_experts
            for e in range(n_experts):
                if r[e].norm() == 0:
                    assert g[e].norm() == 0, (tag, name, e)
                else:
                    assert rel_err(g[e], r[e]) < 1e-5, (tag, name, e, rel_err(g[e], r[e]))
        else:
            assert rel_err(g, r) < 1e-5, (tag, name, rel_err(g, r))
    assert abs(float(got["norm"]) - float(ref["norm"])) < 1e-5 * float(ref["norm"]), tag


def _check_bias(results, ref, key):
    for r in results:
        # exact: integer counts (a top-k flip needs a score tie within fp32 rounding)
        assert torch.equal(r[key]["load"], ref["counts"])  # every rank sees the whole batch's load
        assert torch.equal(r[key]["bias"], results[0][key]["bias"])  # identical updates: same load, same op
        assert torch.allclose(r[key]["bias"], ref["bias"])


# ------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def ranks():
    t0 = time.time()
    results = run_ranks(_worker, 4, timeout=400)
    print(f"\n4-rank spawn: {time.time() - t0:.1f} s wall, "
          f"{max(r['cpu_s'] for r in results):.1f} s CPU in the slowest rank; rank 0 phases "
          f"{results[0]['wall_s']}")
    return results


@pytest.mark.dist
def test_ep2_matches_single_process(ranks, reference):
    for rank, r in enumerate(ranks):
        _check_against_reference(r["ep2"], reference, f"ep2 rank {rank}")


@pytest.mark.dist
def test_ep4_matches_single_process(ranks, reference):
    for rank, r in enumerate(ranks):
        _check_against_reference(r["ep4"], reference, f"ep4 rank {rank}")


@pytest.mark.dist
def test_ep2_edp2_matches_single_process(ranks, reference):
    for rank, r in enumerate(ranks):
        _check_against_reference(r["edp"], reference, f"ep2 x edp2 rank {rank}")


@pytest.mark.dist
def test_flat_and_hierarchical_bit_identical(ranks):
    for rank, r in enumerate(ranks):
        assert r["ep2"]["bit_identical"], f"rank {rank}: 2 nodes x 1 rank"
        assert r["ep4"]["bit_identical"], f"rank {rank}: 2 nodes x 2 ranks"
        assert r["node_limited_equal"] and r["bf16_equal"] and r["fp8_transport_equal"], rank


@pytest.mark.dist
def test_global_load_and_bias(ranks, reference):
    _check_bias(ranks, reference, "ep2")
    _check_bias(ranks, reference, "ep4")


@pytest.mark.dist
def test_node_limited_cross_node_copies(ranks):
    El, L, D = 2, 2, _args().dim
    T = ranks[0]["idx"].shape[0]
    tot = {k: 0 for k in ("flat_inter", "hier_inter", "flat_intra", "hier_intra")}
    for rank, r in enumerate(ranks):
        node = rank // L
        nodes = r["idx"] // (El * L)  # node of each chosen expert
        # M = 1: every token's experts on exactly one node; hierarchical sends at most one copy
        # per remote node, flat one per remote expert
        assert torch.equal(r["flat_nodes_per_token"], torch.ones(T, dtype=torch.long))
        assert r["hier_remote_nodes"].max() <= 1
        remote_experts = (nodes != node).sum(1)
        remote_node = (nodes[:, 0] != node).long()
        assert torch.equal(r["flat_inter_copies_per_token"], remote_experts)
        assert torch.equal(r["hier_inter_copies_per_token"], remote_node)
        fs, hs = r["flat_stats"]["dispatch"], r["hier_stats"]["dispatch"]
        assert fs["inter_copies"] == int(remote_experts.sum())
        assert hs["inter_copies"] == int(remote_node.sum())
        # bytes: fp32 rows of D + one fp32 routing weight per (token, expert)
        assert fs["inter_bytes"] == int(remote_experts.sum()) * (4 * D + 4)
        assert hs["inter_bytes"] == int(remote_node.sum()) * 4 * D + int(remote_experts.sum()) * 4
        for k in tot:
            tot[k] += (fs if k.startswith("flat") else hs)["inter_copies" if "inter" in k else "intra_copies"]
        assert r["routed_err"] < 1e-6  # routing weights honoured: sum_k w_k expert_k(x)
    # hierarchical trades inter-node copies for intra-node forwarding
    assert tot["hier_inter"] < tot["flat_inter"]
    assert tot["hier_intra"] >= tot["flat_intra"]


@pytest.mark.dist
def test_local_tokens_never_leave_and_exact_bytes(ranks):
    D = _args().dim
    for r in ranks:
        T = r["idx"].shape[0]
        assert r["flat_local_only_bytes"] == 0 and r["hier_local_only_bytes"] == 0
        half = T - T // 2  # tokens routed to the same local index on the other node (2 experts)
        for name in ("flat", "hier"):
            assert r[f"{name}_mixed_err"] < 1e-6
            st = r[f"{name}_mixed_stats"]
            assert st["dispatch"]["intra_bytes"] == 0 and st["combine"]["intra_bytes"] == 0
        assert r["flat_mixed_stats"]["dispatch"]["inter_bytes"] == half * 2 * (4 * D + 4)
        assert r["hier_mixed_stats"]["dispatch"]["inter_bytes"] == half * (4 * D + 2 * 4)
        assert r["flat_mixed_stats"]["combine"]["inter_bytes"] == half * 2 * 4 * D
        assert r["hier_mixed_stats"]["combine"]["inter_bytes"] == half * 4 * D  # pre-summed per node


@pytest.mark.dist
def test_async_handles(ranks):
    for r in ranks:
        assert r["async_equal"] and r["async2_err"] < 1e-6


@pytest.mark.dist
def test_link_emulation(ranks):
    for r in ranks:
        for name in ("flat", "hier"):
            elapsed, delay, modeled, recorded = r[f"{name}_link"]
            assert delay > 0.04 and abs(delay - modeled) < 1e-12 and abs(recorded - modeled) < 1e-9
            # never early (a guarantee of the monotonic clock, not a timing bound; no upper bound:
            # wall-clock limits measure the machine's load, timings belong in benchmarks)
            assert delay <= elapsed, (name, elapsed, delay)
        total, delay, slept = r["overlap_wait"]
        # hidden, not added: after compute as long as the transfer, wait() requests no further sleep
        # (computed, not measured; < 1% of the delay only absorbs float rounding of the deadline)
        assert delay > 0.29 and delay <= total and slept < 0.01 * delay, (total, delay, slept)


@pytest.mark.dist
def test_fp8_dispatch(ranks):
    for r in ranks:
        assert r["fp8_err"][0] < 5e-2 and max(r["fp8_err"]) < 1e-1, r["fp8_err"]  # e4m3: 3 mantissa bits
        assert r["fp8_vs_rounded"] < 1e-6, r["fp8_vs_rounded"]
        full_bytes, fp8_bytes = r["fp8_bytes"]
        assert 0 < fp8_bytes < full_bytes / 3


@pytest.mark.dist
def test_triton_data_movement_same_bits(ranks):
    assert all(r["triton_equal"] for r in ranks)
