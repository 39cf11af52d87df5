"""Locating and loading config files outside of a Hydra app (tools, tests, benchmarks).

The YAML tree lives in the repository's ``configs/`` folder; the package finds it next
to itself (editable install) or through ``HAI_LLM_CONFIGS``. Loading merges the YAML
into the typed dataclass, so unknown keys fail exactly as under Hydra.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from hai_llm.model.args import ModelArgs


def config_dir() -> Path:
    env = os.environ.get("HAI_LLM_CONFIGS")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[2] / "configs"
    if not here.is_dir():
        raise FileNotFoundError(f"cannot find the configs/ folder at {here}; set HAI_LLM_CONFIGS to its path")
    return here


def load_model_args(name_or_path: str, overrides: list[str] | None = None) -> ModelArgs:
    path = Path(name_or_path)
    if not path.suffix:
        path = config_dir() / "model" / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
        raise FileNotFoundError(f"model config '{name_or_path}' not found (looked at {path}); "
                                f"known names: {', '.join(names)}")
    schema = OmegaConf.structured(ModelArgs)
    merged = OmegaConf.merge(schema, OmegaConf.load(path), OmegaConf.from_dotlist(overrides or []))
    return OmegaConf.to_object(merged)
