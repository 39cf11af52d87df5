"""Faults of the launch layer, injected from outside (issue 13, sections 1 and 2;
docs/failures_launch.md says what the user sees in each case).

* A simulated rank is SIGKILLed: ``RankError`` leads with that rank, its signal and its last
  stderr lines; the survivor's "Connection reset by peer" comes after, as a consequence.
* A deliberate hang (rank 1 skips a collective and waits in another group) with a 3 s
  ``collective_timeout_s``: both ranks report their last collectives (op, group, shapes,
  sequence number), the call ends.
* The flight recorder (``CollectiveRing``) keeps the last K records with their sequence
  numbers and lets a ``CollectiveRecorder`` stack on it (fake process group, no processes).
* torchrun's restarts: ``process_group_store`` gives each attempt its own namespace in the
  shared agent store (the stale-address "Connection refused"), and ``run_dir_overrides``
  sends rank 0 of a restarted attempt back into the first attempt's folder.
* Slow: ``hai-llm-train`` with 2 simulated ranks, then SIGKILL / SIGTERM to the launcher, or
  SIGINT to its process group (Ctrl-C): no rank survives, metrics.jsonl stops growing, the
  exit code and the one line are as documented.
* Slow: ``torchrun --max-restarts K`` with static, c10d and ``--standalone`` rendezvous and
  K (``HAI_LLM_FAULT_REPS``, default 10) SIGKILLs of one or both workers at random steps,
  from outside (psutil children of the agent; nothing in the trainer helps): every restart
  resumes from the latest complete checkpoint of the same run folder, and the per-step
  losses and final weights equal a straight run's bit for bit (same ops in the same order
  on the same 2 gloo ranks), so no sample was repeated or skipped.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hai_llm.parallel.spawn import RankError, free_port, run_ranks

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = ["model=tiny", "train.device=cpu", "parallel=single", "parallel.dp=2", "data.seq_len=32",
             "train.global_batch=4", "train.micro_batch=1", "train.ckpt_every=1", "logging.wandb=disabled",
             "logging.progress=false", "logging.plot=false"]


# =========================================================================================
# run_ranks: who died, and how; a hang that reports
# =========================================================================================
def _dies_after_one_step(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    x = torch.ones(4)
    dist.all_reduce(x)
    if rank == 1:
        print("rank 1: about to be killed", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(100):  # rank 0 goes on and loses its peer
        dist.all_reduce(x)
        time.sleep(0.05)


@pytest.mark.dist
def test_dead_rank_is_named_with_its_signal_and_last_lines():
    with pytest.raises(RankError) as e:
        run_ranks(_dies_after_one_step, 2, timeout=120)
    msg = str(e.value)
    head = msg.splitlines()[0]
    assert head == "rank 1 of 2 died: killed by SIGKILL; its last lines:", msg
    assert "rank 1: about to be killed" in msg.splitlines()[1], msg
    # the survivor's error is a consequence, after the cause, one line
    conseq = msg.index("then rank(s) [0] failed because their peer went away")
    assert conseq > msg.index("about to be killed") and len(msg.splitlines()) <= 6, msg


def _skips_a_collective(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    other = dist.new_group([0, 1])  # a second communicator over the same ranks
    for _ in range(2):
        dist.all_reduce(torch.ones(4))
    if rank == 0:
        dist.all_reduce(torch.ones(3))  # rank 1 never issues this one ...
    else:
        dist.broadcast(torch.ones(5), src=0, group=other)  # ... it waits here instead


@pytest.mark.dist
def test_collective_timeout_reports_every_ranks_last_collectives():
    with pytest.raises(RankError) as e:
        run_ranks(_skips_a_collective, 2, timeout=120, collective_timeout_s=3.0)
    msg = str(e.value)
    assert msg.startswith("collective timeout on rank(s) [0] of 2"), msg
    # rank 0 timed out in its all_reduce #2 (gloo's timeout); rank 1 sat in broadcast #2 on the
    # other group until rank 0 left (or its watchdog fired): both show their last collectives
    assert re.search(r"#2 all_reduce\(\(3,\); float32; SUM\) on group \(0, 1\)\s+<-- failed here", msg), msg
    assert re.search(r"#2 broadcast\(\(5,\); float32; root 0\) on group \(0, 1\)\s+<-- (failed|blocked) here", msg), msg
    assert msg.count("#1 all_reduce((4,); float32; SUM) on group (0, 1)") == 2, msg


def _stalls_after_a_step(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    from hai_llm.parallel.watchdog import heartbeat

    for step in range(2):  # two quick steps, then one that never ends outside any collective
        heartbeat(step)
        dist.all_reduce(torch.ones(2))
    heartbeat(2)
    time.sleep(120)  # what a host sync on a hung NCCL collective looks like to Python


@pytest.mark.dist
def test_a_step_that_never_ends_is_reported_with_the_last_collectives():
    with pytest.raises(RankError) as e:
        run_ranks(_stalls_after_a_step, 2, timeout=120, collective_timeout_s=1.0)
    msg = str(e.value)
    assert msg.startswith("collective timeout on rank(s) ["), msg
    assert re.search(r"has been in step 3 for \d+ s \(parallel\.collective_timeout_s=1;", msg), msg
    assert "#1 all_reduce((2,); float32; SUM) on group (0, 1)" in msg, msg


def _bad_input_on_every_rank(rank: int, world: int) -> None:
    raise ValueError(f"data.path=/nowhere has no meta.json: run hai-llm-prepare --out /nowhere (rank {rank})")


@pytest.mark.dist
def test_bad_input_inside_ranks_is_one_line_without_traceback(monkeypatch):
    monkeypatch.delenv("HAI_LLM_TRACEBACK", raising=False)
    with pytest.raises(RankError) as e:
        run_ranks(_bad_input_on_every_rank, 2, timeout=120)
    assert e.value.bad_input == ("rank 0 of 2: data.path=/nowhere has no meta.json: run hai-llm-prepare --out "
                                 "/nowhere (rank 0)"), e.value.bad_input
    assert "Traceback" not in str(e.value) and "rank 1 of 2 failed: ValueError: data.path" in str(e.value), str(e.value)


def _exits_by_itself(rank: int, world: int, folder: str) -> int:
    import atexit

    # runs only if the rank's interpreter ends normally: a SIGKILL after its result skips it
    atexit.register(lambda: Path(folder, f"exited_{rank}").write_text("ok"))
    return rank


@pytest.mark.dist
def test_successful_ranks_exit_on_their_own(tmp_path):
    assert run_ranks(_exits_by_itself, 2, str(tmp_path), timeout=120) == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exited_0", "exited_1"]


@pytest.mark.dist
def test_launcher_prints_a_bad_input_found_inside_ranks_as_one_line(tmp_path, corpus_dir):
    import shutil

    import numpy as np

    data = tmp_path / "corpus"
    shutil.copytree(corpus_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    tokens = np.memmap(data / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r+")
    tokens[100] = 400  # beyond the tiny model's vocabulary (320); meta.json still claims less
    tokens.flush()
    del tokens
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HAI_LLM_TRACEBACK", None)
    r = subprocess.run([sys.executable, "-m", "hai_llm.launch.train", *SMALL_RUN, "parallel.nprocs=2",
                        "train.steps=2", f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("hai-llm-train: error: ") and "holds token id 400" in lines[0], lines


# =========================================================================================
# The flight recorder, without processes
# =========================================================================================
@pytest.mark.filterwarnings("ignore:`torch.distributed.all_gather_into_tensor` is deprecated")
def test_ring_keeps_the_last_collectives_and_a_recorder_stacks_on_it():
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from hai_llm.parallel.collective_trace import CollectiveRecorder, CollectiveRing

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        with CollectiveRing(capacity=4) as ring:
            for i in range(6):
                dist.all_reduce(torch.ones(i + 1))
            with CollectiveRecorder() as rec:
                dist.all_gather_into_tensor(torch.empty(4), torch.ones(2))
            with pytest.raises(RuntimeError, match="already active"):
                CollectiveRing().__enter__()
        last = ring.last()
        assert [r.index for r in last] == [3, 4, 5, 6] and last[-1].op == "all_gather_into_tensor"
        assert [r.op for r in rec.traces[1]] == ["all_gather_into_tensor"]  # once, not also as _single
        assert ring.in_flight() is None and "#6 all_gather_into_tensor((4,), (2,); float32)" in ring.report(1)
        assert dist.all_reduce.__name__ == "all_reduce" and not hasattr(dist.all_reduce, "_collective_recorder")
    finally:
        dist.destroy_process_group()


# =========================================================================================
# torchrun restarts, the parts that need no torchrun
# =========================================================================================
def test_each_restart_gets_its_own_namespace_in_the_agent_store():
    from datetime import timedelta

    from torch.distributed import TCPStore

    from hai_llm.launch import elastic

    server = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port),
           "RANK": "0"}
    old = dict(os.environ)
    try:
        os.environ.update(env, TORCHELASTIC_RESTART_COUNT="0")
        first = [elastic.process_group_store(elastic.agent_store(10), 2, 10) for _ in range(2)]
        first[0].set("rank_0", "old address")  # what gloo publishes: fixed keys
        assert elastic.remember_run_dir(server, "/runs/first") == "/runs/first"
        os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"
        again = elastic.process_group_store(elastic.agent_store(10), 2, 10)
        assert not again.check(["rank_0"]) and first[1].get("rank_0") == b"old address"
        assert elastic.remember_run_dir(server, "/runs/second") == "/runs/first"  # the first one stays
        assert elastic.run_dir_overrides(["model=tiny"], dict(os.environ)) == ["hydra.run.dir='/runs/first'"]
        for argv, extra in ((["train.out_dir=x"], {}), (["-m", "a=1,2"], {}), ([], {"RANK": "1"}),
                            ([], {"TORCHELASTIC_RESTART_COUNT": "0"})):
            assert elastic.run_dir_overrides(argv, {**os.environ, **extra}) == [], (argv, extra)
    finally:
        os.environ.clear()
        os.environ.update(old)


# =========================================================================================
# Slow: signals to the launcher of simulated ranks
# =========================================================================================
def _metrics_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _children(pid: int, marker: str, recursive: bool = False) -> list:
    """Live child processes of ``pid`` whose command line contains ``marker``."""
    import psutil

    out = []
    for c in psutil.Process(pid).children(recursive=recursive):
        try:
            if marker in " ".join(c.cmdline()):
                out.append(c)
        except psutil.Error:  # ended while we looked
            pass
    return out


def _rank_pids(launcher) -> list[int]:
    return [c.pid for c in _children(launcher.pid, "multiprocessing.spawn", recursive=True)]


def _alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.dist
@pytest.mark.slow  # ~20 s each on 2 busy cores: a 2-rank run started, signalled after 3 steps
@pytest.mark.parametrize("sig, to_group, code, line", [
    (signal.SIGKILL, False, -signal.SIGKILL, None),
    (signal.SIGTERM, False, 143, "hai-llm-train: stopped by SIGTERM: "),
    (signal.SIGINT, True, 130, "hai-llm-train: interrupted (Ctrl-C): "),  # a terminal's Ctrl-C: the whole group
])
def test_launcher_signals_leave_no_rank_running(tmp_path, corpus_dir, sig, to_group, code, line):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hai_llm.launch.train", *SMALL_RUN, "parallel.nprocs=2", "train.steps=500",
           f"train.out_dir={out}", f"data.path={corpus_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    end = time.monotonic() + 240
    while _metrics_lines(metrics) < 3 and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    ranks = _rank_pids(proc)
    assert len(ranks) == 2, ranks
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    deadline = time.monotonic() + 10  # PDEATHSIG is immediate; the parent poll within 0.5 s
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(ranks), f"orphan ranks {ranks} after {sig!r} to the launcher"
    n = _metrics_lines(metrics)
    time.sleep(2.0)
    assert _metrics_lines(metrics) == n < 500, "the run folder grew after the launcher's death"
    if line is not None:
        assert stderr.strip().splitlines() == [f"{line}{out} keeps its last complete checkpoint; "
                                               f"resume with train.out_dir={out}"], stderr
    from hai_llm.checkpoint import store as ckpt

    assert ckpt.latest_checkpoint(out / "checkpoints") is not None  # the pointer names a complete one


# =========================================================================================
# Slow: torchrun --max-restarts K, K kills at random steps, K exact resumes
# =========================================================================================
REPS = int(os.environ.get("HAI_LLM_FAULT_REPS", "10"))


def _rendezvous(mode: str) -> list[str]:
    port = str(free_port())
    return {"static": ["--master-addr", "127.0.0.1", "--master-port", port],
            "c10d": ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "faults"],
            "standalone": ["--standalone"]}[mode]


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _final_weights(run_dir: Path, cfg_overrides: list[str]):
    import torch

    from hai_llm.checkpoint import store as ckpt
    from hai_llm.config.load import load_model_args
    from hai_llm.model.transformer import build_model

    model = build_model(load_model_args("tiny"), device="cpu")
    ckpt.load_weights(ckpt.latest_checkpoint(run_dir / "checkpoints"), model)
    return {n: p.detach().clone() for n, p in model.named_parameters()} | \
        {n: b.clone() for n, b in model.named_buffers() if isinstance(b, torch.Tensor)}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, corpus_dir):
    """The same 2-rank run without faults (simulated gloo ranks: the same ops in the same order)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    steps = 4 * REPS + 8
    r = subprocess.run([sys.executable, "-m", "hai_llm.launch.train", *SMALL_RUN, "parallel.nprocs=2",
                        f"train.steps={steps}", f"train.out_dir={out}", f"data.path={corpus_dir}"],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, steps


def _latest_step(pointer: Path) -> int:
    try:
        return int(pointer.read_text().strip().split("_")[-1])
    except (FileNotFoundError, ValueError):  # being replaced right now
        return 0


def _workers(agent) -> list:
    return _children(agent.pid, "hai_llm.launch.train")


@pytest.mark.dist
@pytest.mark.slow  # per mode ~15 s + K restarts x ~8 s on 2 quiet cores (K=10: ~100 s)
@pytest.mark.parametrize("mode", ["static", "c10d", "standalone"])
def test_torchrun_restarts_resume_the_same_run_exactly(tmp_path, corpus_dir, straight_run, mode):
    import psutil

    straight, steps = straight_run
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    log = tmp_path / "torchrun.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", *_rendezvous(mode), "--nproc-per-node", "2",
           "--max-restarts", str(REPS), "-m", "hai_llm.launch.train", *SMALL_RUN, f"train.steps={steps}",
           f"data.path={corpus_dir}"]  # no train.out_dir: the folder Hydra names after the start time
    agent = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    ctx = f"mode {mode}, seed {seed}"

    def text() -> str:
        return log.read_text(errors="replace")

    try:
        resumed_at = 0
        for kill in range(REPS):
            target = resumed_at + rng.randint(1, 3)
            end = time.monotonic() + 300
            while True:  # wait for the target step's checkpoint in the run folder
                runs = list((tmp_path / "runs" / "tiny").glob("*/checkpoints/latest"))
                saved = _latest_step(runs[0]) if len(runs) == 1 else 0
                if saved >= target and len(_workers(agent)) == 2:
                    break
                assert agent.poll() is None and time.monotonic() < end, f"{ctx}: stuck before kill {kill}\n{text()[-4000:]}"
                time.sleep(0.02)
            victims = rng.sample(_workers(agent), rng.choice([1, 1, 2]))  # one worker, sometimes both
            latest_before = _latest_step(runs[0])
            for v in victims:
                v.kill()
            psutil.wait_procs(victims, timeout=30)
            end = time.monotonic() + 300
            while len(re.findall(r"resumed from \S+ at step (\d+)", text())) < kill + 1:
                assert agent.poll() is None and time.monotonic() < end, f"{ctx}: no resume after kill {kill}\n{text()[-4000:]}"
                time.sleep(0.05)
            resumed_at = int(re.findall(r"resumed from \S+ at step (\d+)", text())[kill])
            # the latest complete checkpoint: the one before the kill, or one the survivor
            # finished renaming in the same instant
            assert latest_before <= resumed_at <= latest_before + 1, (ctx, kill, latest_before, resumed_at)
        agent.wait(timeout=300)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    out = text()
    assert agent.returncode == 0, f"{ctx}\n{out[-4000:]}"
    assert len(re.findall(r"continuing the run in ", out)) == REPS, ctx
    folders = list((tmp_path / "runs" / "tiny").iterdir())
    assert len(folders) == 1, (ctx, folders)  # one run folder across all restarts
    run_dir = folders[0]
    assert f"done: {steps} steps" in out and "Connection refused" not in out, ctx
    mine, ref = _losses(run_dir), _losses(straight)
    assert sorted(mine) == list(range(1, steps + 1)), ctx  # each step once: nothing repeated or skipped
    assert mine == ref, (ctx, [s for s in ref if mine.get(s) != ref[s]][:5])  # the same samples, bit for bit
    a, b = _final_weights(run_dir, []), _final_weights(straight, [])
    assert all(a[n].equal(b[n]) for n in b), ctx
