"""Ranks started by an external launcher: torchrun, or the deepspeed launcher.

Both start one process per rank and describe it with torchrun's variables: ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (the process group then comes
from ``env://``, ``hai_llm.launch.ranks``). The deepspeed launcher
(``deepspeed.launcher.launch``, which the ``deepspeed`` command runs on each node of the
hostfile over pdsh, or directly for a single host) differs from torchrun in two places, and
:func:`adopt` makes both torchrun's before Hydra parses anything:

* it appends ``--local_rank=<n>`` to the script's arguments (unless given ``--no_local_rank``),
  which Hydra would reject as an override: the argument is removed (its value is checked
  against ``LOCAL_RANK``, which the launcher sets to the same number);
* it names the ranks of this node ``LOCAL_SIZE`` (the node's index and the node count
  ``CROSS_RANK`` / ``CROSS_SIZE``) where torchrun sets ``LOCAL_WORLD_SIZE``, which the layout
  reads as the node size (``hai_llm.layout.layout.resolve_gpus_per_node``): it is copied over.

The deepspeed command's other back-ends (``--launcher openmpi|mpich|impi|mvapich|slurm``) start
the script directly under ``mpirun`` or ``srun``, with neither ``RANK`` nor ``MASTER_ADDR``:
DeepSpeed's own ``deepspeed.init_distributed`` discovers those through mpi4py, and hai-llm does
not run DeepSpeed's engine. Such a process would train alone, N times over, so
:func:`foreign_launch_error` refuses it with the supported alternatives (pdsh, torchrun, or
``launch/scripts/slurm.sbatch``). Simulated ranks (``HAI_LLM_SIMULATED``, set by
``hai_llm.parallel.spawn``) are never external.
"""
from __future__ import annotations

from collections.abc import Mapping

# what deepspeed.launcher.launch sets besides torchrun's variables (deepspeed/launcher/launch.py)
DEEPSPEED_MARKERS = ("LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")
# the number of processes an MPI launcher or an srun step started (without torchrun's variables)
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def is_external_launch(env: Mapping[str, str]) -> bool:
    """This process is one rank of a job that torchrun or the deepspeed launcher started."""
    return "WORLD_SIZE" in env and not env.get("HAI_LLM_SIMULATED")


def launcher_name(env: Mapping[str, str]) -> str:
    """'deepspeed' under the deepspeed launcher, else 'torchrun' (for messages)."""
    return "deepspeed" if is_external_launch(env) and all(k in env for k in DEEPSPEED_MARKERS) else "torchrun"


def strip_local_rank(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """``argv`` without the deepspeed launcher's ``--local_rank=<n>`` (or ``--local_rank <n>``,
    ``--local-rank=<n>``). Outside an external launch nothing is removed: there Hydra's own
    message about the unknown argument is the right one."""
    if not is_external_launch(env):
        return list(argv)
    out, i = [argv[0]] if argv else [], 1
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in ("--local_rank", "--local-rank"):
            if not eq:  # the value is the next argument
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if value != env.get("LOCAL_RANK", value):
                raise ValueError(f"{flag}={value} but LOCAL_RANK={env['LOCAL_RANK']}: the launcher's rank "
                                 f"argument and environment disagree; start the job with one launcher")
        else:
            out.append(arg)
        i += 1
    return out


def launcher_env(env: Mapping[str, str]) -> dict[str, str]:
    """Variables to add so that the deepspeed launcher's environment reads as torchrun's:
    ``LOCAL_WORLD_SIZE`` from ``LOCAL_SIZE``. Empty under torchrun and for simulated ranks."""
    if launcher_name(env) != "deepspeed" or "LOCAL_WORLD_SIZE" in env:
        return {}
    return {"LOCAL_WORLD_SIZE": env["LOCAL_SIZE"]}


def foreign_launch_error(env: Mapping[str, str]) -> str | None:
    """A message when several copies of this process were started without torchrun's
    variables (mpirun, srun with several tasks, the deepspeed command's MPI or SLURM
    back-ends), None otherwise."""
    if is_external_launch(env) or env.get("HAI_LLM_SIMULATED"):
        return None
    for var in MPI_SIZE_VARS:
        value = env.get(var, "")
        if value.isdigit() and int(value) > 1:
            return (f"{var}={value}: this process is one of {value} copies started without torchrun's "
                    f"RANK/WORLD_SIZE/MASTER_ADDR, so each would train alone; launch with torchrun "
                    f"(launch/scripts/multinode.sh, launch/scripts/slurm.sbatch) or with the deepspeed "
                    f"command's default pdsh back-end (launch/scripts/deepspeed.sh), see docs/cluster.md")
    return None


def adopt(argv: list[str], env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(argv without the launcher's rank argument, variables to add to the environment), or
    ``ValueError`` for a launch that cannot work (:func:`foreign_launch_error`)."""
    err = foreign_launch_error(env)
    if err:
        raise ValueError(err)
    return strip_local_rank(argv, env), launcher_env(env)
