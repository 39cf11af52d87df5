"""`hai-llm-train`: the Hydra entry point of every training run.

    hai-llm-train                                  # embedded default
    hai-llm-train model=tiny train.steps=20        # any override
    hai-llm-train -m optim.lr=1e-3,3e-3            # a sweep: one output folder per job

With ``parallel.nprocs=1`` the run happens in this process. Larger layouts go through
``hai_llm.launch.ranks`` (simulated gloo ranks on one machine) or torchrun (or the deepspeed
launcher, made to look like torchrun by ``hai_llm.launch.external``); under torchrun
only rank 0 makes a Hydra run folder (``rank_overrides``), and rank 0 of a restarted
torchrun attempt makes none but continues in the first attempt's (``hai_llm.launch.elastic``).

Stopping: Ctrl-C prints one line and exits 130; SIGTERM stops the ranks at once and exits
143. Either way the run folder keeps its last complete checkpoint (checkpoints are renamed
into place only when complete) and the same command with ``train.out_dir=<folder>``
resumes it. A failed simulated rank is reported without a Python traceback of the launcher
(``hai_llm.parallel.spawn.RankError`` names the rank and the cause); a bad input that only the
ranks could find (vocabulary, meta.json, ``train.init_from``, a resume mismatch) is printed
as one line with exit code 2, like one found here (``HAI_LLM_TRACEBACK=1`` shows tracebacks).
"""
from __future__ import annotations

import os
import signal
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from hai_llm.config.load import config_dir
from hai_llm.config.schema import register_configs, to_config

register_configs()


class Terminated(BaseException):
    """SIGTERM, as an exception (like KeyboardInterrupt for SIGINT): it unwinds through
    ``run_ranks``, which kills the ranks, and Hydra's ``except Exception`` lets it pass."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run(cfg: DictConfig) -> dict:
    """Train with a composed config; returns a summary (final loss, tokens/s)."""
    if not cfg.train.out_dir:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ValueError("train.out_dir is empty and there is no Hydra run folder: set train.out_dir")
        cfg.train.out_dir = HydraConfig.get().runtime.output_dir
    conf = to_config(cfg)
    from hai_llm.launch.ranks import launch

    return launch(conf, OmegaConf.to_yaml(cfg, resolve=True))


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    from hai_llm.parallel.spawn import RankError

    try:
        summary = run(cfg)
    except (KeyboardInterrupt, Terminated) as e:
        e.out_dir = cfg.train.out_dir  # for main's one line
        raise
    except RankError as e:
        # a simulated rank failed: the message names it and how (the launcher's own stack says nothing)
        if os.environ.get("HAI_LLM_TRACEBACK"):
            raise
        if e.bad_input:  # a bad input found inside the ranks: its one line, as if found here
            print(f"hai-llm-train: error: {e.bad_input}", file=sys.stderr)
            sys.exit(2)
        print(f"hai-llm-train: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError) as e:
        # bad input (config values, layout, data paths): the message names the fix; a
        # traceback from deep inside would only hide it (HAI_LLM_TRACEBACK=1 shows it)
        if os.environ.get("HAI_LLM_TRACEBACK"):
            raise
        print(f"hai-llm-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    return summary.get("final_loss", float("nan"))


def rank_overrides(argv: list[str], env: dict) -> list[str]:
    """Hydra overrides that keep a torchrun rank other than 0 from writing anything.

    Every rank runs Hydra, and Hydra makes a run folder (``hydra.run.dir``, timestamped by
    default) with ``.hydra/`` and a log file in it: on a multi-node job every node's ranks
    would leave one, empty but for those, and ranks sharing a folder would write the same
    files. Rank 0's folder is the run (``launch.ranks`` broadcasts its ``train.out_dir``); the
    others take Hydra's documented way of not making one: ``hydra.run.dir=.`` (the current
    folder, which exists), ``hydra.output_subdir=null`` (no ``.hydra/``) and the ``stdout``
    job logging (the default's console handler without its file). They come after the
    user's overrides, since Hydra's last value of a key wins. A sweep (``-m``) is left alone.
    """
    rank = env.get("RANK")
    if rank in (None, "", "0") or env.get("HAI_LLM_SIMULATED") or {"-m", "--multirun"} & set(argv):
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def main() -> None:
    from hai_llm.launch import external
    from hai_llm.launch.elastic import run_dir_overrides

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # the deepspeed launcher's --local_rank argument and LOCAL_SIZE, as torchrun's (launch/external.py)
        sys.argv, env = external.adopt(sys.argv, os.environ)
    except ValueError as e:
        print(f"hai-llm-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    os.environ.update(env)
    try:
        sys.argv += rank_overrides(sys.argv[1:], dict(os.environ))
        sys.argv += run_dir_overrides(sys.argv[1:], dict(os.environ))
        _hydra_main()
    except (KeyboardInterrupt, Terminated) as e:
        what = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else "stopped by SIGTERM"
        folder = getattr(e, "out_dir", "") or ""
        where = (f"{folder} keeps its last complete checkpoint; resume with train.out_dir={folder}" if folder
                 else "nothing was trained")
        print(f"hai-llm-train: {what}: {where}", file=sys.stderr, flush=True)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 143)


if __name__ == "__main__":
    main()
