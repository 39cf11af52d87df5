"""Interop with other model formats. ``hf``: Hugging Face / DeepSeek safetensors (rename table,
streaming load/save; config mapping in ``hf_config``, shard reading in ``shards``), re-exported here
so callers write ``from hai_llm.interop import ...``. Training checkpoints live in ``hai_llm.checkpoint``."""
from .hf import (CheckpointMismatchError, LoadReport, args_from_hf_config, check_config_matches,
                 convert_state_dict_from_hf, convert_state_dict_to_hf, hf_config_from_args, load_hf_checkpoint,
                 save_hf_checkpoint)
from .shards import DamagedCheckpointError

__all__ = ["CheckpointMismatchError", "DamagedCheckpointError", "LoadReport", "args_from_hf_config",
           "check_config_matches", "convert_state_dict_from_hf", "convert_state_dict_to_hf", "hf_config_from_args",
           "load_hf_checkpoint", "save_hf_checkpoint"]
