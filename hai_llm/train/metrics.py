"""Where training metrics go: a JSONL file (always; the source of truth for plots and
tests), wandb (offline by default so no network is needed), a tqdm progress bar on
rank 0, and a loss-curve PNG at the end of the run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from hai_llm.config.schema import LoggingConfig


class MetricsLogger:
    def __init__(self, out_dir: str | Path, cfg: LoggingConfig, run_config: dict, total_steps: int,
                 start_step: int = 0, is_main: bool = True):
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        self.is_main = is_main
        self.path = self.out_dir / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and self.path.exists():
            self.path.unlink()  # a fresh run does not append to an old run's curve
        elif start_step > 0 and self.path.exists():
            self._truncate_after(start_step)
        if cfg.wandb != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=cfg.project, mode=cfg.wandb, dir=str(self.out_dir),
                                     config=run_config, name=self.out_dir.name, reinit="finish_previous")
        if cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be redone)."""
        keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                                  tok_s=f"{row.get('tokens_per_s', 0):.0f}",
                                  lr=f"{row.get('lr', 0):.2e}",
                                  imbal=f"{row.get('expert_load_max_over_mean', 0):.2f}")

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.cfg.plot and self.path.exists():
            plot_loss(self.path, self.out_dir / "loss.png")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_loss(metrics_path: str | Path, png_path: str | Path, labels: dict | None = None) -> Path:
    """Loss curve(s) of one or more runs: ``labels`` maps a label to a metrics.jsonl path.

    A run that logged validation (``train.eval_every``) also gets its held-out ``val_loss``
    (main-head cross-entropy) with markers, next to the training ``ce`` it compares with (the
    training ``loss`` adds the weighted MTP and balance terms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = labels or {"train loss": metrics_path}
    fig, ax = plt.subplots(figsize=(7, 4))
    any_val = False
    for label, path in runs.items():
        rows = read_metrics(path)
        train = [r for r in rows if "loss" in r]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        val = [r for r in rows if "val_loss" in r]
        if val:
            any_val = True
            prefix = f"{label}: " if labels else ""
            line, = ax.plot([r["step"] for r in train if "ce" in r], [r["ce"] for r in train if "ce" in r],
                            alpha=0.6, lw=1, label=f"{prefix}train ce (main head)")
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=line.get_color(),
                    label=f"{prefix}val ce (held-out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss, validation cross-entropy" if any_val else "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return Path(png_path)
