"""hai-llm-train under DeepSpeed's launcher (launch/scripts/deepspeed.sh, launch/external.py).

* unit tests of the launcher-environment mapping (no processes): the ``--local_rank`` argument
  the deepspeed launcher appends is removed, its ``LOCAL_SIZE`` becomes torchrun's
  ``LOCAL_WORLD_SIZE``, torchrun and simulated ranks are left alone, and copies started by an
  MPI launcher or an srun step without torchrun's variables are refused with one line;
* a real run: ``launch/scripts/deepspeed.sh`` with ``NUM_ACCELERATORS=2`` starts the deepspeed
  command on localhost (CPU accelerator, gloo), which starts 2 ranks of the tiny model with
  dp=2 x ep=2; the losses must equal those of the simulated-rank launcher
  (``parallel.nprocs=2``) with the same layout, bit for bit: the same ops run on the same
  shapes in the same order, one thread per rank on both sides.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hai_llm.launch.external import adopt, foreign_launch_error, launcher_env, launcher_name, strip_local_rank

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "scripts" / "deepspeed.sh"
# what deepspeed.launcher.launch sets for local rank 1 of 2 on one host (deepspeed/launcher/launch.py)
DS_ENV = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
          "LOCAL_SIZE": "2", "CROSS_RANK": "0", "CROSS_SIZE": "1"}
TORCHRUN_ENV = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_deepspeed_local_rank_argument_is_removed():
    argv = ["train.py", "--local_rank=1", "model=tiny"]
    assert strip_local_rank(argv, DS_ENV) == ["train.py", "model=tiny"]
    assert strip_local_rank(["train.py", "--local-rank", "1", "a=b"], DS_ENV) == ["train.py", "a=b"]
    with pytest.raises(ValueError, match="LOCAL_RANK=1"):
        strip_local_rank(["train.py", "--local_rank=0"], DS_ENV)
    # outside a launcher nothing is removed: Hydra names the unknown argument itself
    assert strip_local_rank(argv, {}) == argv


def test_deepspeed_environment_reads_as_torchrun():
    assert launcher_name(DS_ENV) == "deepspeed" and launcher_name(TORCHRUN_ENV) == "torchrun"
    assert launcher_env(DS_ENV) == {"LOCAL_WORLD_SIZE": "2"}
    assert launcher_env(TORCHRUN_ENV) == {}
    assert launcher_env({**DS_ENV, "HAI_LLM_SIMULATED": "1"}) == {}  # our own simulated ranks
    argv, env = adopt(["train.py", "--local_rank=1", "x=1"], DS_ENV)
    assert argv == ["train.py", "x=1"] and env == {"LOCAL_WORLD_SIZE": "2"}


def test_copies_without_torchrun_variables_are_refused():
    assert foreign_launch_error({}) is None
    assert foreign_launch_error({"SLURM_STEP_NUM_TASKS": "1"}) is None
    assert foreign_launch_error({**TORCHRUN_ENV, "SLURM_STEP_NUM_TASKS": "4"}) is None  # torchrun under srun
    msg = foreign_launch_error({"OMPI_COMM_WORLD_SIZE": "4"})
    assert msg and "OMPI_COMM_WORLD_SIZE=4" in msg and "deepspeed.sh" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="SLURM_STEP_NUM_TASKS=2"):
        adopt(["train.py"], {"SLURM_STEP_NUM_TASKS": "2"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


# the layout and the short run both launchers train (as tests/test_cluster_launch.py's FAST)
ARGS = ["model=tiny", "train.device=cpu", "train.precision=fp32", "parallel=single", "parallel.dp=2",
        "parallel.ep=2", "train.steps=3", "data.seq_len=32", "train.global_batch=4", "train.micro_batch=1",
        "logging.wandb=disabled", "logging.progress=false", "logging.plot=false"]


@pytest.mark.dist
@pytest.mark.slow  # ~60 s on 2 busy cores: 2 deepspeed ranks importing torch, then 2 simulated ranks
def test_deepspeed_launcher_trains_as_simulated_ranks(tmp_path, corpus_dir):
    pytest.importorskip("deepspeed", reason="deepspeed cannot be imported; pip install -e .[test]")
    work, ds_out, sim_out = tmp_path / "work", tmp_path / "ds", tmp_path / "sim"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "HOSTFILE")}
    env.update(NUM_ACCELERATORS="2", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    args = ARGS + [f"data.path={corpus_dir}"]
    r = subprocess.run(["bash", str(SCRIPT), *args, f"train.out_dir={ds_out}"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    log = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, log
    assert "deepspeed.launcher.launch" in log and "--local_rank=" in log, log  # DeepSpeed started the ranks
    assert len(list((work / "runs").glob("*/*"))) == 1  # only rank 0 let Hydra make a run folder

    r = subprocess.run([sys.executable, "-m", "hai_llm.launch.train", *args, "parallel.nprocs=2",
                        "parallel.gpus_per_node=2", f"train.out_dir={sim_out}"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ds, sim = _losses(ds_out), _losses(sim_out)
    assert len(ds) == len(sim) == 3
    assert ds == sim, (ds, sim)

    # the node size came from the launcher (LOCAL_SIZE -> LOCAL_WORLD_SIZE): another one is refused
    r = subprocess.run(["bash", str(SCRIPT), *args, "parallel.gpus_per_node=1", f"train.out_dir={tmp_path / 'bad'}"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "parallel.gpus_per_node=1" in r.stderr and "LOCAL_WORLD_SIZE=2" in r.stderr, \
        (r.stdout + r.stderr)[-4000:]
