"""`hai-llm-train`: the Hydra entry point of every training run.

    hai-llm-train                                  # embedded default
    hai-llm-train model=tiny train.steps=20        # any override
    hai-llm-train -m optim.lr=1e-3,3e-3            # a sweep: one output folder per job

With ``parallel.nprocs=1`` the run happens in this process. Larger layouts go through
``hai_llm.launch.ranks`` (simulated gloo ranks on one machine) or torchrun.
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


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
