"""The symmetric-memory transport (``parallel.transport=symmetric``) against the flat one.

One 4-rank spawn (a module fixture; spawning is the expensive part here) runs every scenario on
one virtual node of 4 ranks (``gpus_per_node=4``: everything through the kernels) and on two
virtual nodes of 2 (``gpus_per_node=2``: the inter-node stage over gloo, then the kernels), and
returns plain values the tests check:

* the transport's dispatch-shaped and combine-shaped movements (rows, routing-weight columns,
  sums) bit-identical to the flat transport over random ragged routings, empty destinations, one
  rank receiving every row, a rank without tokens, FP8 payloads and bf16; with the torch
  references and with the Triton kernels (``TRITON_INTERPRET=1``: the interpreter runs the
  kernels against the shared-memory buffers the other rank processes write);
* a MoE layer's output and every gradient bit-identical to the flat transport (fp32, FP8
  dispatch, bf16), async handles waited out of order, the in-flight limit, byte accounting equal
  to the hierarchical transport's, and the link emulation.

Bit-exact comparisons are legitimate: the transports deliver the same rows to the same ops and
sum in the same canonical order; only the route of the bytes differs.  Kernel checks that need
no ranks (argument validation, tunables) run in the test process.
"""
import os
import time

import pytest
import torch

if not torch.cuda.is_available():  # use_triton=True runs the Triton CPU interpreter in the ranks
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hai_llm.parallel.spawn import run_ranks  # noqa: E402

E, K, D = 8, 3, 160  # 2 experts per rank; D not a multiple of the 128-wide FP8 tile


def _routings(rank: int):
    """name -> (idx [T, k], T): the routing cases, different on every rank."""
    g = torch.Generator().manual_seed(10 + rank)
    T = 5 + 7 * rank  # ragged token counts
    rand = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    empty = torch.tensor([0, 1, 4, 5])[torch.stack([torch.randperm(4, generator=g)[:K] for _ in range(T)])]
    one = torch.tensor([2, 3]).expand(T, 2).contiguous()  # EP rank 1 receives every row
    none = rand[:0] if rank == 3 else rand  # rank 3 has no tokens
    return {"random": rand, "empty_dest": empty, "one_receiver": one, "no_tokens": none}


def _movement(tp, idx, x, w, fp8):
    plan = tp.plan(idx, E)
    rows, aux = tp.scatter_async(plan, x, w, quant_fp8=fp8).wait()
    y = (rows.float() * 1.5 + 0.25).to(rows.dtype)  # stands in for the experts
    back, baux = tp.gather_async(plan, y, aux * 2).wait()
    return rows, aux, back, baux


def _transport_cases(rank, world, gpn):
    from hai_llm.kernels.symm_a2a import SymmKernelConfig
    from hai_llm.parallel.transport import build_transport
    from hai_llm.parallel.transport_symmetric import SymmetricTransport

    flat = build_transport("flat", None, list(range(world)), gpn)
    hier = build_transport("hierarchical", None, list(range(world)), gpn)
    ref = build_transport("symmetric", None, list(range(world)), gpn, use_triton=False)
    # small tiles and 3 programs: several row blocks per program and column tiles per row
    tri = SymmetricTransport(None, list(range(world)), gpn, use_triton=True,
                             kernel=SymmKernelConfig(block_rows=4, channels=3, block_cols=16))
    res = {}
    for name, idx in _routings(rank).items():
        T = idx.shape[0]
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(T, D, generator=g)
        w = torch.rand(T * idx.shape[1], 1, generator=g)
        variants = [("fp32", x, False), ("fp8", x, True), ("bf16", x.to(torch.bfloat16), False)]
        for vname, xx, fp8 in variants:
            want = _movement(flat, idx, xx, w, fp8)
            for tname, tp in (("ref", ref), ("triton", tri)):
                if tname == "triton" and name == "empty_dest" and vname == "bf16":
                    continue  # interpreter time: one case less
                got = _movement(tp, idx, xx, w, fp8)
                res[(name, vname, tname)] = all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    # byte accounting: exactly the hierarchical transport's (the same rows cross the same links)
    idx = _routings(rank)["random"]
    x, w = torch.randn(idx.shape[0], D), torch.rand(idx.numel(), 1)
    for tp in (hier, ref):
        tp.stats.reset()
        _movement(tp, idx, x, w, True)
    keys = ("intra_bytes", "inter_bytes", "local_bytes", "intra_copies", "inter_copies")
    res["stats_equal"] = all(hier.stats[op][k] == ref.stats[op][k] for op in ("dispatch", "combine") for k in keys)
    res["stats"] = ref.stats.snapshot()
    for tp in (ref, tri):
        tp.close()
    return res


def _moe_cases(rank, world, gpn):
    """A MoE layer under EP: flat vs symmetric output and gradients, fp32 / FP8 / bf16."""
    from hai_llm.config.load import load_model_args
    from hai_llm.model.moe import MoE
    from hai_llm.parallel.expert import apply_expert_parallel
    from hai_llm.parallel.transport import build_transport

    args = load_model_args("tiny", ["n_activated_experts=3", "n_expert_groups=2", "n_limited_groups=2"])
    res = {}
    g = torch.Generator().manual_seed(50 + rank)
    x0 = torch.randn(4 + 3 * rank, args.dim, generator=g) * 2
    for fp8, dtype, use_triton in ((False, torch.float32, False), (True, torch.float32, True),
                                   (False, torch.bfloat16, False)):
        outs = []
        for kind in ("flat", "symmetric"):
            torch.manual_seed(3)
            m = MoE(args)
            m.reset_parameters(0.2)
            m = m.to(dtype)
            tp = build_transport(kind, None, list(range(world)), gpn, use_triton=use_triton)
            apply_expert_parallel(m, None, transport=tp, fp8_dispatch=fp8)
            xx = x0.to(dtype).clone().requires_grad_()
            y = m(xx.view(1, xx.shape[0], -1))
            y.float().square().sum().backward()
            outs.append([y.detach(), xx.grad] + [p.grad for p in m.parameters() if p.grad is not None])
        res[(fp8, str(dtype))] = len(outs[0]) == len(outs[1]) and all(
            torch.equal(a, b) for a, b in zip(*outs, strict=True))
    return res


def _handles(rank, world, gpn):
    """Async handles out of order, the in-flight limit, link emulation, file clean-up."""
    import glob

    import torch.distributed as dist

    from hai_llm.parallel.transport import LinkModel, SymmSizing, build_transport

    res = {}
    idx = _routings(rank)["random"]
    T = idx.shape[0]
    x = torch.randn(T, D)
    # the config's sizing (parallel.symm_slot_mb / symm_slots / symm_programs) reaches the transport
    tp = build_transport("symmetric", None, list(range(world)), gpn, symm=SymmSizing(slot_mb=3, slots=4, programs=2))
    res["sizing"] = (tp.slot_bytes, tp.n_slots, tp.kernel.channels)
    # the node's shared-memory files are unlinked once every rank mapped them (each rank unlinks
    # its own right after set-up: wait for all of them)
    dist.barrier()
    res["no_files"] = glob.glob(f"/dev/shm/{tp.buffer(torch.device('cpu')).name}*") == []
    plan = tp.plan(idx, E)
    sync, sync2 = tp.scatter_async(plan, x).wait()[0], tp.scatter_async(plan, x * 2).wait()[0]
    h1, h2 = tp.scatter_async(plan, x), tp.scatter_async(plan, x * 2)
    b2, b1 = h2.wait()[0], h1.wait()[0]  # two in flight, waited out of order
    res["out_of_order"] = torch.equal(b1, sync) and torch.equal(b2, sync2)
    # more exchanges in flight than slots: a clear error, and the transport stays usable
    hs = [tp.scatter_async(plan, x) for _ in range(4)]
    try:
        tp.scatter_async(plan, x)
        res["limit"] = "no error"
    except RuntimeError as e:
        res["limit"] = str(e)
    for h in hs:
        h.wait()
    res["after_limit"] = torch.equal(tp.scatter_async(plan, x).wait()[0], sync)
    # link emulation: wait() returns no earlier than the modeled time after the issue
    tp.link = LinkModel(intra_gbps=4e-4, inter_gbps=2e-4, latency_us=40_000)
    h = tp.scatter_async(plan, x)
    h.wait()
    res["link"] = (time.perf_counter() - h.issued_at, h.delay_s, h.modeled_s)
    tp.close()
    return res


def _worker(rank, world):
    res = {}
    for gpn in (4, 2):
        res[gpn] = {"transport": _transport_cases(rank, world, gpn), "moe": _moe_cases(rank, world, gpn),
                    "handles": _handles(rank, world, gpn)}
    return res


@pytest.fixture(scope="module")
def ranks():
    t0 = time.time()
    out = run_ranks(_worker, 4, timeout=900)
    print(f"\n4-rank spawn: {time.time() - t0:.1f} s")
    return out


@pytest.mark.dist
@pytest.mark.parametrize("gpn", [4, 2], ids=["one-node", "two-nodes"])
def test_movements_bit_identical_to_flat(ranks, gpn):
    for rank, r in enumerate(ranks):
        cases = {k: v for k, v in r[gpn]["transport"].items() if isinstance(k, tuple)}
        assert len(cases) == 4 * 3 * 2 - 1
        bad = [k for k, ok in cases.items() if not ok]
        assert not bad, (rank, bad)


@pytest.mark.dist
@pytest.mark.parametrize("gpn", [4, 2], ids=["one-node", "two-nodes"])
def test_moe_output_and_gradients_bit_identical_to_flat(ranks, gpn):
    for rank, r in enumerate(ranks):
        assert all(r[gpn]["moe"].values()), (rank, r[gpn]["moe"])


@pytest.mark.dist
@pytest.mark.parametrize("gpn", [4, 2], ids=["one-node", "two-nodes"])
def test_byte_accounting_matches_hierarchical(ranks, gpn):
    for r in ranks:
        assert r[gpn]["transport"]["stats_equal"]
    st = ranks[0][gpn]["transport"]["stats"]
    if gpn == 4:  # one node: nothing crosses nodes, the intra-node rows are counted
        assert st["dispatch"]["inter_bytes"] == 0 and st["dispatch"]["intra_bytes"] > 0
    else:
        assert st["dispatch"]["inter_bytes"] > 0


@pytest.mark.dist
@pytest.mark.parametrize("gpn", [4, 2], ids=["one-node", "two-nodes"])
def test_async_handles_slots_and_link(ranks, gpn):
    for r in ranks:
        h = r[gpn]["handles"]
        assert h["out_of_order"] and h["after_limit"] and h["no_files"]
        assert h["sizing"] == (3 << 20, 4, 2)
        if gpn == 4:  # the slot is taken at issue: the 5th exchange in flight is refused
            assert "n_slots=4" in h["limit"] and "parallel.symm_slots" in h["limit"], h["limit"]
        else:  # two nodes: a slot is taken when the intra-node stage starts, inside wait()
            assert h["limit"] == "no error"
        # the emulated delay is the link model's (no wall-clock comparison: timing is not asserted)
        _elapsed, delay, modeled = h["link"]
        assert delay > 0.04 and abs(delay - modeled) < 1e-12


# ------------------------------------------------------------------------------ no spawn
def test_kernel_arguments_are_validated():
    from hai_llm.kernels.symm_a2a import SymmKernelConfig, symm_combine, symm_scatter

    peers = [torch.zeros(4096, dtype=torch.uint8) for _ in range(2)]
    d = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="do not fit"):
        symm_scatter(torch.zeros(1, 40), d, peers, d, d, width=64)
    with pytest.raises(ValueError, match="uint8"):
        symm_scatter(torch.zeros(1, 4), d, [p.float() for p in peers], d, d, width=64)
    with pytest.raises(ValueError, match="dtype must be"):
        symm_combine(peers, d, d, 64, torch.int32, 4, d, 1)
    with pytest.raises(ValueError, match="power of two"):
        SymmKernelConfig(block_rows=3)
    assert SymmKernelConfig(block_rows=16, channels=4).grid(1000) == (4, 63)


def test_sizing_keys_are_validated_and_named_in_errors():
    """parallel.symm_* defaults equal the transport's, bad values fail naming the key, and a
    CUDA slot too small for an exchange names parallel.symm_slot_mb and the value that fits."""
    from hai_llm.config.schema import Config, validate_config
    from hai_llm.kernels.symm_a2a import SymmKernelConfig
    from hai_llm.parallel.symm_buffer import DEFAULT_SLOT_BYTES, DEFAULT_SLOTS, check_slot_capacity
    from hai_llm.parallel.transport import SymmSizing

    cfg = Config()
    sz = SymmSizing.from_config(cfg.parallel)
    assert sz == SymmSizing()
    assert (sz.slot_mb << 20, sz.slots, sz.programs) == (DEFAULT_SLOT_BYTES, DEFAULT_SLOTS, SymmKernelConfig().channels)
    for key, bad in (("symm_slot_mb", 0), ("symm_slots", 1), ("symm_programs", -1)):
        cfg = Config()
        setattr(cfg.parallel, key, bad)
        with pytest.raises(ValueError, match=f"parallel.{key} must be"):
            validate_config(cfg)
    check_slot_capacity(64 << 20, 64 << 20)  # exactly full fits
    with pytest.raises(ValueError, match="set parallel.symm_slot_mb=241 or more"):
        check_slot_capacity((240 << 20) + 1, 64 << 20)


def test_references_follow_the_memory_protocol():
    """The references on local buffers: rows land at offset * width + col of their peer, and the
    combine equals unpermute_combine with unit weights (the flat transport's sum)."""
    from hai_llm.kernels.moe_permute import unpermute_combine_ref
    from hai_llm.kernels.symm_a2a import symm_combine_ref, symm_gather_ref, symm_scatter_ref

    peers = [torch.zeros(4096, dtype=torch.uint8) for _ in range(3)]
    src = torch.randn(5, 6)
    dest, off, ri = torch.tensor([2, 0, 2, 1, 0]), torch.tensor([0, 3, 1, 0, 1]), torch.tensor([4, 3, 2, 1, 0])
    width = 6 * 4 + 8
    symm_scatter_ref(src, ri, peers, dest, off, width, col=0)
    for r in range(5):
        got = peers[int(dest[r])][int(off[r]) * width:int(off[r]) * width + 24].view(torch.float32)
        assert torch.equal(got, src[int(ri[r])])
    back = symm_gather_ref(peers, dest, off, width, 0, 24).view(torch.float32)
    assert torch.equal(back, src[ri])
    dst = torch.tensor([1, 0, 1, -1, 1])
    want = unpermute_combine_ref(src[ri], dst, torch.ones(5), 2)
    assert torch.equal(symm_combine_ref(peers, dest, off, width, torch.float32, 6, dst, 2), want)


def test_shared_memory_buffer_protocol_on_one_rank(tmp_path):
    """The CPU buffer without ranks (a one-rank node): files unlinked right after set-up, buffers
    grow on demand and keep their bytes, slots come round, the in-flight limit names n_slots."""
    import glob

    from hai_llm.parallel.symm_buffer import ShmSymmBuffer

    buf = ShmSymmBuffer(None, [0], 0, n_slots=2)
    assert glob.glob(f"/dev/shm/{buf.name}*") == []  # nothing to clean up, even after a crash
    seq, slot = buf.begin()
    (peer,) = buf.peers(slot, [100])
    peer[:100] = torch.arange(100, dtype=torch.uint8)
    (grown,) = buf.peers(slot, [1 << 20])  # a larger exchange: the file grows, bytes stay
    assert grown.numel() >= 1 << 20 and torch.equal(grown[:100], torch.arange(100, dtype=torch.uint8))
    buf.arrive(seq)
    buf.wait_arrived(seq)
    seq2, _ = buf.begin()
    with pytest.raises(RuntimeError, match="n_slots=2.*parallel.symm_slots"):
        buf.begin()  # two exchanges unread: a third would overwrite the first's slot
    buf.done(seq2)  # read out of order: the contiguous mark waits for seq
    with pytest.raises(RuntimeError, match="n_slots=2"):
        buf.begin()
    buf.done(seq)
    assert buf.begin() == (3, 1)
    buf.close()
