"""Build on meta, materialise only what the rank owns (``hai_llm.runtime.parallelize``, step 6).

Every rank receives the model on the meta device; ``parallelize`` cuts stages, swaps classes and
slices experts on meta tensors, then allocates and initialises only the parameters its rank
keeps. Initial values are a function of (seed, global name, global expert row)
(``hai_llm.model.transformer.init_parameters``), so each rank's tensors must equal the
corresponding slices of the single-process model, bit for bit, whatever the layout.

One 4-rank spawn covers pp2 x dp2 x ep2 (1F1B: the last rank keeps its own copy of the embedding
for MTP) and pp2 x sp2 x ep2 under the FP8 recipe (DualPipe: every rank holds both ends). It
counts the bytes of every real tensor created while ``prepare_model`` runs, and checks the EMA
keeps only the rank's ZeRO shard.
"""
from __future__ import annotations

import pytest
import torch

from hai_llm.parallel.spawn import run_ranks
from helpers import layout_config

SLACK = 64 * 1024  # RoPE tables computed on the host, small collectives' buffers


def _cases(tmp):
    return [
        layout_config(str(tmp), str(tmp / "a"), parallel=dict(nprocs=4, pp=2, dp=2, ep=2, schedule="1f1b")),
        layout_config(str(tmp), str(tmp / "b"), precision="fp8",
                    parallel=dict(nprocs=4, pp=2, sp=2, ep=2, schedule="dualpipe")),
    ]


def _alloc_counter():
    """A dispatch mode summing the bytes of every new non-meta storage created under it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: dict[int, object] = {}  # id -> storage (kept alive: ids stay unique)
            self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    st = t.untyped_storage()
                    if id(st) not in self.seen:
                        self.seen[id(st)] = st
                        self.total += st.nbytes()
            return out

    return Counter()


def _rank(rank: int, world: int, cfgs) -> list[dict]:
    from hai_llm.layout import build_layout
    from hai_llm.model.transformer import build_model
    from hai_llm.parallel.expert import expert_param_slices
    from hai_llm.parallel.zero import owned_pieces
    from hai_llm.runtime.pipeline import PipelineRuntime
    from hai_llm.train.ema import CPUEma

    out = []
    for cfg in cfgs:
        rt = PipelineRuntime(cfg, build_layout(cfg, world))
        meta = build_model(cfg.model, device="meta")
        counter = _alloc_counter()
        # the params that exist before prepare_model (the meta model) hold no storage at all
        with counter:
            model = rt.prepare_model(meta, device="cpu")
        seen_bytes = counter.total
        counter.seen.clear()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = rt.build_optimizer(model, cfg)
        ema = CPUEma(opt, 0.9)
        # the EMA holds exactly the master shard this rank owns, equal to those weights
        ema_ok = True
        for b in opt.buckets:
            flat = {n: p.detach().reshape(-1) for n, p in zip(b.names, b.params)}
            for pc in owned_pieces(b):
                ema_ok &= torch.equal(ema.piece(b, pc), flat[pc.name][pc.param_lo:pc.param_hi])
        out.append({
            "allocated": seen_bytes,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
            "meta_left": [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta],
            "params": params,
            "slices": expert_param_slices(model),
            "ema_bytes": sum(s.numel() * s.element_size() for s in ema.shards),
            "master_bytes": sum(b.master.numel() * 4 for b in opt.buckets),
            "ema_ok": ema_ok,
            "fp8": sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Fp8")}),
        })
    return out


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    cfgs = _cases(tmp_path_factory.mktemp("materialize"))
    return cfgs, run_ranks(_rank, 4, cfgs, timeout=600)


@pytest.mark.dist
@pytest.mark.parametrize("case", [0, 1], ids=["pp2_dp2_ep2_1f1b", "pp2_sp2_ep2_dualpipe_fp8"])
def test_rank_allocates_only_its_share_with_single_process_values(spawned, case):
    from hai_llm.model.transformer import build_model

    cfgs, per_rank = spawned
    cfg = cfgs[case]
    ref = dict(build_model(cfg.model, device="cpu", seed=cfg.train.seed).named_parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in ref.values())
    covered: dict[str, torch.Tensor] = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in ref.items()}
    for rank, res in enumerate(r[case] for r in per_rank):
        assert not res["meta_left"], (rank, res["meta_left"][:3])
        # the rank's share: its stages' parameters, 1/ep of their experts (DualPipe: all stages)
        ep = cfg.parallel.ep
        share = sum(ref[n].numel() * 4 // (ep if n in res["slices"] else 1) for n in res["params"])
        assert res["param_bytes"] == share < full_bytes, (rank, res["param_bytes"], share, full_bytes)
        # nothing beyond that share was ever allocated (no full model, then sliced)
        assert res["allocated"] <= res["param_bytes"] + res["buffer_bytes"] + SLACK, (rank, res)
        for name, t in res["params"].items():
            want = ref[name].detach()
            if name in res["slices"]:
                _, off = res["slices"][name]
                want = want[off:off + t.shape[0]]
                covered[name][off:off + t.shape[0]] = True
            else:
                covered[name][...] = True
            # bit-exact: the same generator, seed and shape draw the same numbers on any rank
            assert torch.equal(t, want), (rank, name)
        assert res["ema_ok"] and res["ema_bytes"] == res["master_bytes"] < res["param_bytes"], (rank, res)
        if cfg.train.precision == "fp8":
            assert res["fp8"] == ["Fp8GroupedExperts", "Fp8Linear"], res["fp8"]
    # the ranks together hold every parameter and every expert row
    assert all(bool(c.all()) for c in covered.values()), [n for n, c in covered.items() if not c.all()]


def test_single_process_meta_path_equals_build_model():
    """SingleProcessRuntime.prepare_model(meta model, device) = build_model(args, device, seed)."""
    from hai_llm.model.transformer import build_model
    from hai_llm.runtime import SingleProcessRuntime

    cfg = layout_config("unused", "unused")  # the tiny model
    got = SingleProcessRuntime(cfg).prepare_model(build_model(cfg.model, device="meta"), device="cpu")
    want = build_model(cfg.model, device="cpu", seed=cfg.train.seed)
    for (n, a), (m, b) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        assert n == m and torch.equal(a, b), n  # bit-exact: same draws
    for (n, a), (m, b) in zip(got.named_buffers(), want.named_buffers(), strict=True):
        assert n == m and torch.equal(a, b), n


def test_init_depends_on_seed_name_and_row_only(tiny_args):
    """Values are a function of (seed, global name, expert row): another seed changes every
    matrix, the same seed reproduces them, and each expert row is its own draw."""
    from hai_llm.model.transformer import build_model, param_seed

    a = dict(build_model(tiny_args, device="cpu", seed=5).named_parameters())
    b = dict(build_model(tiny_args, device="cpu", seed=5).named_parameters())
    c = dict(build_model(tiny_args, device="cpu", seed=6).named_parameters())
    for n in a:
        assert torch.equal(a[n], b[n]), n
        if a[n].ndim >= 2:
            assert not torch.equal(a[n], c[n]), n
    w = a["layers.1.ffn.experts.w1"]
    g = torch.Generator().manual_seed(param_seed(5, "layers.1.ffn.experts.w1", 3))
    row = torch.empty_like(w[3]).normal_(0.0, tiny_args.init_std, generator=g)
    assert torch.equal(w[3], row)
    assert param_seed(5, "x") != param_seed(5, "x", 0) != param_seed(5, "x", 1)
