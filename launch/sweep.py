"""Hydra callback that prints one table for a sweep (``hai-llm-train -m ...``): the
overrides of every job with its final loss and tokens/s, read from the ``summary.json``
each job writes into its own output folder. Also saved as ``summary.md`` in the sweep
folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def sweep_table(sweep_dir: str | Path) -> str:
    rows = []
    for job in sorted(Path(sweep_dir).iterdir(), key=lambda p: (len(p.name), p.name)):
        summ, over = job / "summary.json", job / ".hydra" / "overrides.yaml"
        if not summ.is_file():
            continue
        s = json.loads(summ.read_text())
        overrides = " ".join(ln[2:].strip() for ln in over.read_text().splitlines() if ln.startswith("- ")) \
            if over.is_file() else ""
        rows.append((job.name, overrides, s.get("final_loss", float("nan")), s.get("tokens_per_s", 0.0),
                     s.get("steps", 0)))
    if not rows:
        return f"no finished jobs under {sweep_dir}"
    w = max(len(r[1]) for r in rows)
    lines = [f"| job | {'overrides':<{w}} | steps | final loss | tokens/s |",
             f"|---|{'-' * (w + 2)}|---|---|---|"]
    lines += [f"| {j} | {o:<{w}} | {st} | {fl:.4f} | {tp:.0f} |" for j, o, fl, tp, st in rows]
    return "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = sweep_table(sweep_dir)
        (sweep_dir / "summary.md").write_text(table + "\n")
        print(f"\nsweep summary ({sweep_dir}):\n{table}")
