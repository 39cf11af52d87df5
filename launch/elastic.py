"""torchrun restarts that resume: the same run folder, a fresh rendezvous namespace per
attempt, and a time limit with a message on every set-up step.

Under ``torchrun --max-restarts N`` a failed worker group is stopped and started again by
the agent(s), which stay alive; the workers of the new attempt must find the previous
attempt's run folder and its latest complete checkpoint, and must not trip over what the
previous attempt left behind. Three things go wrong without this module:

* **Stale addresses.** torchrun's workers connect to the agent's TCPStore
  (``TORCHELASTIC_USE_AGENT_STORE=True``; static, c10d and ``--standalone`` rendezvous all
  share one store server across restarts), and ``init_process_group("env://")`` uses it
  without any per-attempt prefix. Gloo publishes each rank's listening address under
  fixed keys, so a restarted rank can read the DEAD rank's address before the new one
  overwrites it, and fails with "Connection refused" to an old port (or waits on a key
  that never changes). ``process_group_store`` puts every attempt under its own prefix:
  ``hai_llm/pg/<TORCHELASTIC_RESTART_COUNT>/<generation>``, where the generation counts
  complete joins of that restart count (``store.add``), in case the agents restart a group
  without counting a failure (a membership change under c10d).
* **A new run folder.** With no ``train.out_dir``, Hydra names the folder after the start
  time, and a restart starts later. Rank 0 of the first attempt records its folder in the
  agent's store (``remember_run_dir``); rank 0 of a later attempt reads it before Hydra
  starts and runs in it (``run_dir_overrides``: ``hydra.run.dir=<that folder>``), so the
  trainer's resume (``train.resume=true``) finds the checkpoints.
* **Silent hangs.** The store client, the join counter and ``init_process_group`` all get
  ``parallel.collective_timeout_s`` and fail with a message that names the step.

The store lives as long as torchrun's agent: a new ``torchrun`` command starts a new run
(give ``train.out_dir`` to continue an old one).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import timedelta

RUN_DIR_KEY = "hai_llm/run_dir"


def uses_agent_store(env=os.environ) -> bool:
    return env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in env and "MASTER_PORT" in env


def restart_count(env=os.environ) -> int:
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


@contextmanager
def setup_step(what: str, timeout_s: float):
    """Re-raise a failure of one set-up step with its name, the time it took and the limit."""
    t0 = time.monotonic()
    try:
        yield
    except Exception as e:
        rank = os.environ.get("RANK", "?")
        raise RuntimeError(f"torchrun worker rank {rank} (restart {restart_count()}): {what} failed after "
                           f"{time.monotonic() - t0:.0f} s (limit parallel.collective_timeout_s={timeout_s:g}): "
                           f"{type(e).__name__}: {e}") from e


def agent_store(timeout_s: float):
    """A client of torchrun's agent store, or None when torchrun does not share one."""
    if not uses_agent_store():
        return None
    from torch.distributed import TCPStore

    with setup_step(f"connecting to torchrun's store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                    timeout_s):
        return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                        timeout=timedelta(seconds=timeout_s))


def process_group_store(store, world: int, timeout_s: float):
    """The store for ``init_process_group``: ``store`` under a prefix of this attempt's own."""
    from torch.distributed import PrefixStore

    attempt = restart_count()
    with setup_step("joining this attempt's rendezvous namespace", timeout_s):
        joined = store.add(f"hai_llm/joined/{attempt}", 1)  # 1..world for the first group of this count
    generation = (joined - 1) // world
    return PrefixStore(f"hai_llm/pg/{attempt}/{generation}", store)


def remember_run_dir(store, run_dir: str) -> str:
    """Record ``run_dir`` as this torchrun job's run folder unless one is recorded already;
    returns the recorded one."""
    return store.compare_set(RUN_DIR_KEY, "", run_dir).decode()


def remembered_run_dir(store) -> str | None:
    return store.get(RUN_DIR_KEY).decode() if store.check([RUN_DIR_KEY]) else None


def run_dir_overrides(argv: list[str], env=os.environ, timeout_s: float = 60.0) -> list[str]:
    """Hydra overrides that put rank 0 of a restarted torchrun attempt into the first
    attempt's run folder: ``["hydra.run.dir=<folder>"]``, or [] (first attempt, not torchrun,
    an explicit ``train.out_dir`` / ``hydra.run.dir``, a sweep, other ranks: their folder
    comes from rank 0 by broadcast)."""
    if (env.get("RANK") not in (None, "0") or env.get("HAI_LLM_SIMULATED") or restart_count(env) == 0
            or not uses_agent_store(env) or {"-m", "--multirun"} & set(argv)):
        return []
    if any(a.split("=", 1)[0].lstrip("+") in ("train.out_dir", "hydra.run.dir") for a in argv):
        return []
    run_dir = remembered_run_dir(agent_store(timeout_s))
    if not run_dir:
        return []  # the first attempt failed before it chose a folder: nothing to resume
    print(f"hai-llm-train: torchrun restart {restart_count(env)}: continuing the run in {run_dir}", flush=True)
    return [f"hydra.run.dir={_quoted(run_dir)}"]


def _quoted(path: str) -> str:
    """A Hydra override value for ``path`` (quoted: spaces and ``=`` stay part of it)."""
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
