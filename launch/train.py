"""`hai-llm-train`: the Hydra entry point of every training run.

    hai-llm-train                                  # embedded default
    hai-llm-train model=tiny train.steps=20        # any override
    hai-llm-train -m optim.lr=1e-3,3e-3            # a sweep: one output folder per job

With ``parallel.nprocs=1`` the run happens in this process. Larger layouts go through
``hai_llm.launch.ranks`` (simulated gloo ranks on one machine) or torchrun; under torchrun
only rank 0 makes a Hydra run folder (``rank_overrides``).
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from hai_llm.config.load import config_dir
from hai_llm.config.schema import register_configs, to_config

register_configs()


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
    try:
        summary = run(cfg)
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
    sys.argv += rank_overrides(sys.argv[1:], dict(os.environ))
    _hydra_main()


if __name__ == "__main__":
    main()
