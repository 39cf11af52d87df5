"""The time-and-cost planner: DeepSeek-V3's reported cost reproduced from first principles, the
step simulator walking the executor's own action lists and piece order, the hardware profiles,
the CPU profile driving a prediction, and the CLI.

No timing assertions: every number here is computed, not measured (the measured side of the
CPU check is ``benchmarks/bench_predict.py``, docs/perf.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hai_llm.config.load import load_model_args
from hai_llm.layout import ParallelDims, build_layout, make_schedule
from hai_llm.planner.cost import PAPER, Setting, cost_report, plan_setting
from hai_llm.planner.hardware import available_profiles, load_profile, profile_from_dict
from hai_llm.planner.step_sim import SimPiece, compute_order, simulate_step, walk_schedule


@pytest.fixture(scope="module")
def v3_report():
    args = load_model_args("deepseek_v3_671b", [])
    hw = load_profile("h800")
    dims = ParallelDims(world_size=2048, pp=16, dp=128, sp=1, ep=64, gpus_per_node=8)
    setting = Setting(dims=dims, balance_ranks=True)  # PP16 EP64 DualPipe FP8 4K, 15360 seqs
    plan = plan_setting(args, setting, hw)
    return plan, cost_report(plan, args, hw)


def test_deepseek_v3_cost_lands_near_the_paper_on_its_own(v3_report):
    """Check 2 of the issue: H800 constants from a kernel trace and datasheets, nothing fitted to
    the totals; the paper's layout (PP16, EP64 over 8 nodes, ZeRO-1, DualPipe, FP8, M=4, 4K x
    15360) with the stage split balanced per rank."""
    plan, r = v3_report
    assert plan.dims.world_size == PAPER["gpus"] and plan.global_batch_sequences == 15360
    assert abs(r.gpu_hours_per_trillion / PAPER["gpu_hours_per_trillion"] - 1) < 0.15
    pretrain = r.gpu_hours_per_trillion * PAPER["pretrain_tokens"] / 1e12
    assert abs(pretrain / PAPER["pretrain_gpu_hours"] - 1) < 0.15
    assert 0 < r.mfu < 1 and 0 <= r.bubble < 1 and r.exposed_inside >= 0 and r.exposed_outside >= 0
    assert r.run_cost == pytest.approx(r.run_gpu_hours * 2.0)


def test_fb_piece_order_is_the_executors():
    """``compute_order`` for an overlapped pair equals what ``overlap.run_overlapped`` runs on
    real tapes (B pieces recorded by its tracer; W needs split modules and is not traced)."""
    from hai_llm.pipeline.overlap import Piece, Tape, run_overlapped
    from hai_llm.pipeline.wgrad_split import WeightGradStore

    slots = ["attn", "mlp", "attn", "mlp", "attn", "mlp", "other"]

    def fn(i):
        def run(env, tape):
            h = env["h"] * (1.0 + i)
            if i == len(slots) - 1:
                tape.add_loss(h.sum(), torch.ones(()))
                return {"out": h.detach()}
            return {"h": h}
        return run

    pieces = [Piece(f"p{i}", s, fn(i)) for i, s in enumerate(slots)]

    class Tracer:
        def __init__(self):
            self.log = []

        def piece(self, name, kind, t0, t1):
            if kind in ("F", "B"):
                self.log.append((kind, int(name.split(".p")[-1])))

    tr = Tracer()
    b_tape = Tape(pieces, {"h": torch.ones(3, requires_grad=True)}, label="b")
    b_tape.run_forward()
    f_tape = Tape(pieces, {"h": torch.ones(3, requires_grad=True)}, tracer=tr, label="f")
    b_tape.tracer = tr
    run_overlapped(f_tape, b_tape, lambda: None, WeightGradStore(), lambda: None, tracer=tr)
    sim = [SimPiece(f"p{i}", s, 1, 1, 1) for i, s in enumerate(slots)]
    ours = [(k, i) for k, i in compute_order("FB", sim, sim) if k != "W"]
    assert ours == tr.log
    # steady state of a MoE block pair: MLP(B) MLP(W) MLP(F) ATTN(B) ATTN(W) ATTN(F)
    full = compute_order("FB", sim, sim)
    names = [f"{slots[i]}({k})" for k, i in full]
    assert "mlp(B) mlp(W) mlp(F) attn(B) attn(W) attn(F)" in " ".join(names)


@pytest.mark.parametrize("name,pp,n_micro", [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8),
                                             ("dualpipev", 2, 8)])
def test_walk_matches_the_pipeline_simulator(name, pp, n_micro):
    """One piece per chunk, no all-to-all: the walk over the same action lists gives the
    pipeline simulator's makespan when weight gradients cost nothing (``Costs(F=1, B=2, W=0)``)
    and no pair overlaps; otherwise it can only be earlier, because the executor sends a BW's
    input gradient before its W closures and a pair's forward output before the pair ends."""
    from hai_llm.pipeline.simulator import Costs, simulate

    sched = make_schedule(name, pp, n_micro)
    for w in (0.0, 1.0):
        piece = [SimPiece("p", "attn", 1.0, 2.0, w)]
        _, clock, _ = walk_schedule(sched, lambda r, c: piece, pp_send_s=0.25)
        ref = simulate(sched, Costs(F=1.0, B=2.0 + w, W=w, comm=0.25)).makespan
        if w == 0.0 and name in ("1f1b", "zb1p"):
            assert max(clock) == pytest.approx(ref)
        assert max(clock) <= ref + 1e-9


def test_plan_and_simulation_follow_the_trainers_stage_split():
    """Check 4: the planner's stages are ``build_layout``'s, default or user-given, and the
    simulated chunks hold exactly those layers."""
    from hai_llm.config.schema import Config, DataConfig, ParallelConfig, TrainConfig

    args = load_model_args("tiny", ["n_layers=4", "n_dense_layers=1"])
    cfg = Config(model=args, data=DataConfig(path="unused", seq_len=64),
                 train=TrainConfig(global_batch=8, micro_batch=1, device="cpu"),
                 parallel=ParallelConfig(nprocs=4, pp=2, dp=2, ep=2, schedule="dualpipe", stage_layers=[1, 3]))
    from hai_llm.planner.plan import plan_config

    layout = build_layout(cfg, 4)
    plan = plan_config(cfg, 4)
    assert plan.layout.stages == layout.stages == [[0], [1, 2, 3]]
    assert [s.n_layers for s in plan.stages] == [1, 3]
    sim = simulate_step(plan, cfg.model, load_profile("h800"))
    attn = {k: sum(p.slot == "attn" for p in v) for k, v in sim.piece_table.items()}
    assert attn == {"0": 1, "1": 3 + cfg.model.n_mtp_layers}


def test_hardware_profiles_load_with_sources():
    names = available_profiles()
    for need in ("h800", "h100", "h200", "a100", "b200", "cpu_measured"):
        assert need in names
    root = Path(__file__).resolve().parents[1] / "configs" / "hardware"
    for n in names:
        hw = load_profile(n)
        assert hw.gemm_flops_per_s(hw.gemm_dtype("fp8") if "fp8" in hw.peak_tflops else "fp32") > 0
        assert "#" in (root / f"{n}.yaml").read_text()  # every profile cites its sources
    assert load_profile("a100").gemm_dtype("fp8") == "bf16"  # no FP8 tensor cores
    with pytest.raises(ValueError, match="unknown keys"):
        profile_from_dict({"name": "x", "bogus": 1})
    import yaml

    for section in ("net", "ep_link"):  # a misspelt key inside a section: one line naming it
        d = yaml.safe_load((root / "h800.yaml").read_text())
        d[section]["bogus_gbps"] = 1.0
        with pytest.raises(ValueError, match=f"unknown keys \\['bogus_gbps'\\] in {section}"):
            profile_from_dict(d, "h800")


def test_cpu_profile_drives_a_prediction():
    """Check 3's machinery (the timing comparison itself is benchmarks/bench_predict.py)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_predict.py"
    spec = importlib.util.spec_from_file_location("bench_predict_for_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    RUNS, bench_cfg, predict = bench.RUNS, bench.bench_cfg, bench.predict

    hw = load_profile("cpu_measured")
    for label, pp, dp, ep, schedule in RUNS:
        p = predict(bench_cfg(pp, dp, ep, schedule), pp * dp, hw)
        assert p["link"] > 0 and p["nolink"] > 0 and 0 <= p["bubble"] < 1
        if ep > 1:
            assert p["link"] >= p["nolink"] and p["a2a"] > 0 and 0 <= p["exposed"] <= 1


def test_cli_report_what_if_json_and_timeline(tmp_path, capsys):
    from hai_llm.launch.cost import main

    out, png = tmp_path / "cost.json", tmp_path / "step.png"
    rc = main(["--model", "tiny", "--set", "n_layers=4", "--world", "8", "--pp", "2", "--ep", "2",
               "--n-micro", "8", "--seq-len", "128", "--what-if", "--timeline", str(png), "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "GPU-hours per trillion tokens" in text and "schedule 1f1b" in text
    d = json.loads(out.read_text())
    assert d["report"]["step_s"] > 0 and any(r["variant"] == "precision bf16" for r in d["what_if"])
    assert png.stat().st_size > 1000
    assert main(["--model", "tiny", "--world", "6", "--pp", "4"]) == 2  # one line naming the fix
    assert "hai-llm-cost:" in capsys.readouterr().err


def test_symmetric_transport_is_priced_like_hierarchical(tmp_path, capsys):
    """parallel.transport=symmetric moves the hierarchical transport's bytes over the same links
    (identical CommStats, tests/test_symm_a2a.py), so the simulated step is the same number; EP 4
    over two nodes of 2 makes flat differ (one IB copy per target GPU, not per node)."""
    from hai_llm.launch.cost import main

    step = {}
    for kind in ("hierarchical", "symmetric", "flat"):
        out = tmp_path / f"{kind}.json"
        assert main(["--model", "tiny", "--set", "n_layers=4", "--set", "n_expert_groups=2", "--world", "8",
                     "--pp", "2", "--ep", "4", "--gpus-per-node", "2", "--n-micro", "8", "--seq-len", "128",
                     "--transport", kind, "--json", str(out)]) == 0
        step[kind] = json.loads(out.read_text())["report"]["step_s"]
    capsys.readouterr()
    assert step["symmetric"] == step["hierarchical"] != step["flat"]
