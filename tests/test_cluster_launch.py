"""The cluster launch scripts, run for real: ``launch/scripts/slurm.sbatch`` under a SLURM
started here, and ``launch/scripts/multinode.sh`` as two nodes on localhost.

* Fast (no SLURM, no torch processes): the sbatch script run as sbatch runs it (a spooled
  copy, from another folder) against stand-in ``srun``/``scontrol`` commands, so its choices
  are checked everywhere: where it finds multinode.sh, ranks per node from GPUS_PER_NODE /
  the allocated GPUs / the tasks of a CPU job, the run folder derived from the job id.
  multinode.sh the same way against a stand-in ``python``. And ``rank_overrides``: under
  torchrun only rank 0 lets Hydra make a run folder.
* Slow, two nodes: two ``multinode.sh`` invocations with NNODES=2 meet through c10d on
  127.0.0.1 and train dp=4 x ep=2 with 2 ranks per node. A ``sitecustomize`` on PYTHONPATH
  records every worker's RANK / LOCAL_RANK / GROUP_RANK, to check that the ranks of one
  invocation are contiguous and that node = RANK // parallel.gpus_per_node (the layout's
  rule, hai_llm/layout/dims.py) is the agent torchrun put them on. Losses are compared
  with one process on the same config.
* Slow, SLURM: Debian's slurm-wlm and munge (installed with apt-get when missing; skipped
  with the reason when not root, without apt, or when the daemons cannot start), munged,
  slurmctld and slurmd on localhost in the foreground, stopped by PID. Two GPUs are gres on
  character devices (``mknod c 1 3``; a count-only gres line leaves the node INVAL), with
  settings for a container without cgroups. The shipped slurm.sbatch is submitted
  unmodified from a scratch folder, requeued with ``scontrol requeue`` once its first
  checkpoint exists, and must resume from that checkpoint and finish.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "launch" / "scripts"
SBATCH = SCRIPTS / "slurm.sbatch"
MULTINODE = SCRIPTS / "multinode.sh"
# settings a caller's shell may hold; the tests choose them explicitly
LAUNCH_VARS = ("GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "RDZV_ID", "RUN_DIR",
               "HAI_LLM_ROOT", "HAI_LLM_ACTIVATE", "OMP_NUM_THREADS")
# the commands of README.md's "Many ranks", as written there (test_readme_shows_the_tested_commands)
TWO_NODES_ENV = {"NNODES": "2", "GPUS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1"}
TWO_NODES_ARGS = ["model=tiny", "train.device=cpu", "parallel=single", "parallel.dp=4", "parallel.ep=2"]
SBATCH_OPTS = ["--nodes=1", "--gpus-per-node=2", "--cpus-per-task=2"]
SBATCH_ARGS = ["model=tiny", "train.device=cpu", "parallel=single", "parallel.dp=2", "train.steps=40",
               "train.ckpt_every=4"]
# what the tests add: the session corpus, short sequences, no logging services (as conftest)
FAST = ["data.seq_len=32", "train.global_batch=4", "train.micro_batch=1", "logging.wandb=disabled",
        "logging.progress=false", "logging.plot=false"]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


# =========================================================================================
# Fast: the scripts' choices against stand-in commands
# =========================================================================================
def _run_sbatch_copy(tmp_path: Path, args: list[str], **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run slurm.sbatch the way slurmd does (a copy in a spool folder, cwd = the submit
    folder) with stub scontrol/srun; returns the result and the srun command line."""
    bin_dir, spool, submit = tmp_path / "bin", tmp_path / "spool", tmp_path / "submit dir"
    for d in (bin_dir, spool, submit):
        d.mkdir(exist_ok=True)
    shutil.copy(SBATCH, spool / "slurm_script")
    # scontrol: Command= is the submitted script's absolute path followed by its arguments
    _stub(bin_dir, "scontrol", f"""case "$1 $2" in
  "show job") echo "   Command={SBATCH} {' '.join(args)}";;
  "show hostnames") echo node-a; echo node-b;;
esac
""")
    _stub(bin_dir, "srun", 'printf "%s\\n" "$@" > "$SRUN_ARGS"; env > "$SRUN_ENV"\n')
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(submit),
            "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_CPUS_PER_NODE": "8(x2)",
            "SRUN_ARGS": str(tmp_path / "srun.args"), "SRUN_ENV": str(tmp_path / "srun.env")}
    r = subprocess.run(["bash", str(spool / "slurm_script"), *args], cwd=submit, env=_clean_env(**base, **env),
                       capture_output=True, text=True, timeout=60)
    srun = (tmp_path / "srun.args").read_text().splitlines() if r.returncode == 0 else []
    return r, srun


@pytest.mark.dist
@pytest.mark.parametrize("env, nproc", [
    ({"SLURM_GPUS_ON_NODE": "4"}, "4"),                             # --gpus-per-node=4 / --gres=gpu:4
    ({"SLURM_JOB_GPUS": "0,1,2"}, "3"),                             # GPUs listed, no count
    ({"SLURM_GPUS_ON_NODE": "4", "GPUS_PER_NODE": "2"}, "2"),       # the user's setting wins
    ({"SLURM_NTASKS_PER_NODE": "2"}, "2"),                          # CPU partition: one rank per task
    ({}, "1"),                                                      # nothing asked for
])
def test_sbatch_finds_launcher_and_sizes_nodes(tmp_path, env, nproc):
    r, srun = _run_sbatch_copy(tmp_path, ["model=tiny", "parallel.dp=2"], **env)
    assert r.returncode == 0, r.stderr
    launcher = srun.index(str(MULTINODE))  # next to the submitted script, not the spool copy
    run_dir = f"{tmp_path / 'submit dir'}/runs/slurm-42"
    assert srun[launcher + 1:] == ["--nproc-per-node", nproc, f"hydra.run.dir={run_dir}", f"train.out_dir={run_dir}",
                                   "model=tiny", "parallel.dp=2"]
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=8", "--kill-on-bad-exit=1",
            f"--output={run_dir}/logs/node%n.out"} <= set(srun[:launcher])
    job_env = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert (job_env["MASTER_ADDR"], job_env["MASTER_PORT"], job_env["NNODES"]) == ("node-a", "20042", "2")
    assert job_env.get("GPUS_PER_NODE") == env.get("GPUS_PER_NODE")  # never set for the user


@pytest.mark.dist
def test_sbatch_user_settings_win(tmp_path):
    own = tmp_path / "own run"
    r, srun = _run_sbatch_copy(tmp_path, ["model=tiny", f"train.out_dir={own}"], MASTER_PORT="31000")
    assert r.returncode == 0, r.stderr
    assert srun[-1] == f"train.out_dir={own}" and (own / "logs").is_dir()  # Hydra: the last value wins
    assert f"--output={own}/logs/node%n.out" in srun
    assert "MASTER_PORT=31000" in (tmp_path / "srun.env").read_text()


@pytest.mark.dist
def test_sbatch_outside_slurm_says_so():
    r = subprocess.run(["bash", str(SBATCH)], env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "submit it with sbatch" in r.stderr


@pytest.mark.dist
def test_multinode_passes_node_size_to_torchrun(tmp_path):
    _stub(tmp_path, "python", 'if [[ $1 == -c ]]; then echo 1; else printf "%s\\n" "$@" > "$PY_ARGS"; '
                              'echo "$OMP_NUM_THREADS $ACTIVATED" > "$PY_ENV"; fi\n')
    (tmp_path / "activate").write_text("export ACTIVATED=yes\n")
    env = _clean_env(PATH=f"{tmp_path}:{os.environ['PATH']}", PY_ARGS=str(tmp_path / "args"),
                     PY_ENV=str(tmp_path / "env"), SLURM_CPUS_ON_NODE="8", GPUS_PER_NODE="4",
                     HAI_LLM_ACTIVATE=str(tmp_path / "activate"), NNODES="2", MASTER_ADDR="n0", SLURM_JOB_ID="7")

    def run(*args):
        r = subprocess.run(["bash", str(MULTINODE), *args], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return (tmp_path / "args").read_text().splitlines(), (tmp_path / "env").read_text().split()

    args, (omp, activated) = run("--nproc-per-node", "2", "parallel.dp=4")
    assert args == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "n0:29500", "--rdzv-id", "7", "-m", "hai_llm.launch.train",
                    "parallel.gpus_per_node=2", "parallel.dp=4"]
    assert (omp, activated) == ("4", "yes")  # 8 CPUs / 2 ranks; HAI_LLM_ACTIVATE was sourced
    args, (omp, _) = run("parallel.dp=8")     # no flag: the user's GPUS_PER_NODE
    assert args[args.index("--nproc-per-node") + 1] == "4" and "parallel.gpus_per_node=4" in args and omp == "2"


@pytest.mark.dist
def test_readme_shows_the_tested_commands():
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    two_nodes = " ".join([*(f"{k}={v}" for k, v in TWO_NODES_ENV.items()), "launch/scripts/multinode.sh",
                          *TWO_NODES_ARGS])
    sbatch = " ".join(["sbatch", *SBATCH_OPTS, "launch/scripts/slurm.sbatch", *SBATCH_ARGS])
    squeezed = re.sub(r" +", " ", text)
    assert two_nodes in squeezed and sbatch in squeezed, "README.md's Many ranks must show the tested commands"


def test_only_rank_zero_makes_a_hydra_run_folder():
    from hai_llm.launch.train import rank_overrides

    quiet = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    assert rank_overrides(["model=tiny"], {"RANK": "3", "WORLD_SIZE": "4"}) == quiet
    assert rank_overrides(["model=tiny"], {"RANK": "0", "WORLD_SIZE": "4"}) == []
    assert rank_overrides(["model=tiny"], {}) == []
    assert rank_overrides(["model=tiny"], {"RANK": "1", "HAI_LLM_SIMULATED": "1"}) == []
    assert rank_overrides(["-m", "optim.lr=1e-3,3e-3"], {"RANK": "1"}) == []


# =========================================================================================
# Slow: two nodes on localhost
# =========================================================================================
PROBE = '''import json, os
if "LOCAL_RANK" in os.environ and "PROBE_NODE" in os.environ:  # a torchrun worker of this test
    keys = ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "PROBE_NODE")
    with open(os.path.join(os.environ["PROBE_DIR"], "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump({k: os.environ[k] for k in keys}, f)
'''


def _free_port(low: int = 20001, high: int = 39999) -> int:
    for port in random.sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free TCP port on 127.0.0.1")


def _stop(procs) -> None:
    """Stop what this test started: each by its PID (its own session's process group)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.dist
@pytest.mark.slow  # ~50 s on 2 busy cores: 2 torchrun agents + 4 ranks importing torch
def test_two_nodes_on_localhost(tmp_path, corpus_dir):
    probe, work, out = tmp_path / "probe", tmp_path / "work", tmp_path / "out"
    for d in (probe, work):
        d.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    port = _free_port()
    overrides = TWO_NODES_ARGS + FAST + ["train.steps=3", f"data.path={corpus_dir}", f"train.out_dir={out}"]
    procs, logs = [], []
    try:
        for node in ("a", "b"):  # two "nodes": one multinode.sh each, as on two machines
            logs.append(open(tmp_path / f"node_{node}.log", "w"))
            env = _clean_env(**TWO_NODES_ENV, MASTER_PORT=str(port), PROBE_NODE=node, PROBE_DIR=str(probe),
                             PYTHONPATH=os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")])))
            procs.append(subprocess.Popen(["bash", str(MULTINODE), *overrides], cwd=work, env=env,
                                          stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        _stop(procs)
        for f in logs:
            f.close()
    text = "\n".join((tmp_path / f"node_{n}.log").read_text()[-3000:] for n in "ab")
    assert codes == [0, 0], text

    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(4)]
    gpn = int(TWO_NODES_ENV["GPUS_PER_NODE"])
    for r, info in enumerate(ranks):
        # c10d numbers the agents (GROUP_RANK) by sorted (host, pid), not NODE_RANK; each
        # agent's ranks are a contiguous block, so the layout's node = rank // gpus_per_node
        # is the agent the rank runs on
        assert (int(info["GROUP_RANK"]), int(info["LOCAL_RANK"])) == (r // gpn, r % gpn), ranks
        assert info["LOCAL_WORLD_SIZE"] == str(gpn)
        assert info["PROBE_NODE"] == ranks[r // gpn * gpn]["PROBE_NODE"], ranks  # same invocation
    assert ranks[0]["PROBE_NODE"] != ranks[2]["PROBE_NODE"]

    from omegaconf import OmegaConf

    saved = OmegaConf.load(out / "config.yaml")
    assert saved.parallel.gpus_per_node == gpn
    # only rank 0 let Hydra make a run folder (both "nodes" share this cwd)
    assert len(list((work / "runs").glob("*/*"))) == 1, list((work / "runs").rglob("*"))

    # the same config in one process: same losses up to fp32 rounding (rtol 1e-5 at step 1,
    # 1e-4 later, as tests/test_parallel_equivalence.py measured for the same layouts)
    from hai_llm.config.schema import Config, to_config
    from hai_llm.train.trainer import Trainer

    one = OmegaConf.merge(OmegaConf.structured(Config), saved, {"parallel": {"dp": 1, "ep": 1, "gpus_per_node": 8},
                                                               "train": {"out_dir": str(tmp_path / "single")}})
    single = [r.loss for r in Trainer(to_config(one)).fit()]
    two = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert len(two) == len(single) == 3
    for s, (a, b) in enumerate(zip(two, single)):
        assert abs(a - b) <= (1e-5 if s == 0 else 1e-4) * abs(b), (two, single)


# =========================================================================================
# Slow: a real SLURM on localhost
# =========================================================================================
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
SBIN = "/usr/sbin:/usr/bin:/sbin"


def _slurm_binaries() -> None:
    """Install Debian's slurm-wlm and munge when missing; skip (with the reason) only where
    that is impossible: not root, or no apt-get."""
    path = f"{os.environ['PATH']}:{SBIN}"
    if all(shutil.which(b, path=path) for b in DAEMONS):
        return
    if os.geteuid() != 0:
        pytest.skip("slurm-wlm/munge are not installed and installing them needs root")
    if shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm/munge are not installed and apt-get is unavailable here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:  # an old package list: refresh it once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=900)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        # root with apt-get, yet no install: a real failure, not a reason to skip
        pytest.fail(f"apt-get install slurm-wlm munge failed: {(r.stderr or r.stdout).strip()[-300:]}")


SLURM_CONF = """\
ClusterName=haitest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
FirstJobId={first_job}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# no cgroups in a container: track processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """munged + slurmctld + slurmd on localhost, in the foreground, all files under ``root``."""

    def __init__(self, root: Path):
        self.root, self.procs, self.logs = root, [], []
        self.port = _free_port()
        self.env = _clean_env(SLURM_CONF=str(root / "slurm.conf"), PATH=f"{os.environ['PATH']}:{SBIN}")

    def _start(self, name: str, *cmd: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.logs.append(log)
        self.procs.append(subprocess.Popen(list(cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait(self, what: str, ok, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not ok():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > end:
                raise RuntimeError(f"{what}: {'exited: ' + ', '.join(dead) if dead else 'timed out'}\n{self.tail()}")
            time.sleep(0.5)

    def start(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "dev"):
            (r / d).mkdir(parents=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for i in range(2):  # fake GPUs: character devices with /dev/null's numbers
            os.mknod(r / "dev" / f"gpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        # the job's default port is 20000 + job id % 20000 (slurm.sbatch): make it a free one
        (r / "slurm.conf").write_text(SLURM_CONF.format(root=r, ctld_port=_free_port(40000, 45000),
                                                        slurmd_port=_free_port(45000, 50000),
                                                        first_job=self.port - 20000))
        (r / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={r}/dev/gpu[0-1]\n")
        self._start("munged", "munged", "--foreground", "--force", f"--socket={r}/munge.sock",
                    f"--key-file={key}", f"--pid-file={r}/munged.pid", f"--seed-file={r}/munge.seed")
        self._wait("munged", lambda: (r / "munge.sock").exists(), 30)
        self._start("slurmctld", "slurmctld", "-D", "-i")
        self._start("slurmd", "slurmd", "-D", "-N", "localhost")
        self._wait("the node to become idle", lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle",
                   90)

    def run(self, *cmd: str, check: bool = False, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60, check=check,
                              cwd=cwd)

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def tail(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted((self.root / "log").glob("*")))

    def stop(self) -> None:
        if any(p.poll() is None for p in self.procs[1:]):
            self.run("scancel", "--user=root")  # no job outlives the test
            end = time.monotonic() + 30
            while self.run("squeue", "-h").stdout.strip() and time.monotonic() < end:
                time.sleep(1)
        _stop(list(reversed(self.procs)))
        for f in self.logs:
            f.close()


@pytest.fixture
def slurm(tmp_path_factory):
    _slurm_binaries()
    if os.geteuid() != 0:
        pytest.skip("the SLURM test runs slurmd as root (SlurmdUser=root) and mknod's fake GPUs: needs root")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()  # installed and root: daemons that do not start are a failure
        yield cluster
    finally:
        cluster.stop()


def _wait_job(slurm: LocalSlurm, job_id: str, done, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = slurm.job(job_id)
        if done(job):
            return job
        if job.get("JobState") == "PENDING" and job.get("Reason") == "BeginTime":
            # a requeued job waits ~2 minutes before it may start again: not in a test
            slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not done in {timeout} s: {slurm.job(job_id)}\n{slurm.tail()}")


@pytest.mark.dist
@pytest.mark.slow  # ~100 s on 2 busy cores: two attempts of a 2-rank torchrun job
def test_slurm_job_trains_and_resumes_when_requeued(slurm, tmp_path, corpus_dir):
    submit = tmp_path / "elsewhere"  # not the repository: the script must find multinode.sh
    submit.mkdir()
    steps = 40
    assert f"train.steps={steps}" in SBATCH_ARGS
    r = slurm.run("sbatch", "--parsable", *SBATCH_OPTS, str(SBATCH), *SBATCH_ARGS, *FAST, f"data.path={corpus_dir}",
                  cwd=submit)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().split(";")[0]
    run_dir = submit / "runs" / f"slurm-{job_id}"
    batch_log, node_log = submit / f"hai-llm-{job_id}.out", run_dir / "logs" / "node0.out"

    def logs() -> str:
        return "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in (batch_log, node_log) if p.exists())

    # the first checkpoint is there: requeue, as SLURM does after a node failure
    _wait_job(slurm, job_id, lambda j: (run_dir / "checkpoints" / "latest").exists()
              or j.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"), 240)
    assert slurm.job(job_id)["JobState"] in ("RUNNING", "COMPLETED"), logs()
    slurm.run("scontrol", "requeue", job_id, check=True)
    job = _wait_job(slurm, job_id, lambda j: j.get("Restarts") == "1" and j.get("JobState") in
                    ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY"), 240)
    assert job["JobState"] == "COMPLETED", logs() + slurm.tail()

    text = node_log.read_text()
    assert "attempt 1" in batch_log.read_text() and "attempt 2" in batch_log.read_text(), logs()
    resumed = re.findall(r"resumed from \S+step_(\d+) at step (\d+)", text)
    assert len(resumed) == 1 and int(resumed[0][1]) >= 4, logs()  # the second attempt, from a checkpoint
    at = int(resumed[0][1])
    print(f"requeued job {job_id} resumed at step {at} of {steps}")  # shown with -s / -rP
    assert f"done: {steps} steps" in text, logs()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps, summary
    # each step once: the requeued job continued after its checkpoint instead of starting over
    logged = [m["step"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert logged == list(range(1, steps + 1)), logged
    if at < steps:  # requeued mid-run (else the first attempt had already finished: resumed at the end)
        assert summary["final_loss"] == summary["final_loss"], summary  # trained: a finite loss
    # one run folder, named after the job; nothing timestamped from other ranks
    assert [p.name for p in (submit / "runs").iterdir()] == [f"slurm-{job_id}"]
    assert not list(submit.glob("runs/*/*/*.log")) and (run_dir / ".hydra").is_dir()
