"""`hai-llm-params`: print the parameter table of a model config without allocating it.

    hai-llm-params deepseek_v3_671b          # a name from configs/model/
    hai-llm-params path/to/model.yaml        # or any YAML with ModelArgs keys
"""
from __future__ import annotations

import argparse
import sys

from hai_llm.config.load import load_model_args
from hai_llm.model.params import format_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hai-llm-params", description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="deepseek_v3_671b",
                    help="model config name in configs/model/ or a YAML path")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. n_layers=4")
    a = ap.parse_args(argv)
    print(format_table(load_model_args(a.model, a.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
