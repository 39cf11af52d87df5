"""What the context-extension stages buy: the next-token loss on long windows of the checkpoints
of the documented small-model workflow (docs/training_recipe.md#long-context-extension).

    python benchmarks/bench_yarn_extension.py runs/yarn_demo --length 2048 --windows 4

For each row a full model is built with the given RoPE config, the run's checkpoint is loaded
into it (``hai_llm.checkpoint.store.load_weights``) and the mean cross-entropy of the main head
over ``--windows`` windows of ``--length`` tokens is printed, with the same windows for every row
(the last ``windows x length`` tokens of the corpus, forward only). The rows: the stage-0 model
as pre-trained (plain RoPE, no YaRN), the stage-0 model with the stage's YaRN settings but no
training, and the stage-1 and stage-2 models. Run it on a quiet machine; nothing is timed.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from hai_llm.checkpoint.store import latest_checkpoint, load_weights
from hai_llm.config.schema import Config
from hai_llm.data import TokenDataset
from hai_llm.model.transformer import build_model


def _config(run: Path) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run / "config.yaml")))


@torch.no_grad()
def _loss(args, ckpt: Path, windows: torch.Tensor) -> float:
    model = build_model(args, device="cpu")
    load_weights(ckpt, model)
    model.eval()
    total = 0.0
    for w in windows:
        logits = model(w[None, :-1])
        total += float(F.cross_entropy(logits[0].float(), w[1:]))
    return total / len(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="folder holding the stage0, stage1, stage2 run folders")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(1)
    runs = {s: a.root / s for s in ("stage0", "stage1", "stage2")}
    cfgs = {s: _config(r) for s, r in runs.items()}
    data = TokenDataset(cfgs["stage0"].data.path or next(Path(cfgs["stage0"].data.cache_dir).glob("stdlib_*")))
    n = a.windows * (a.length + 1)
    tail = torch.from_numpy(data.tokens[data.n_tokens - n:].astype("int64"))
    windows = tail.view(a.windows, a.length + 1)
    yarn = cfgs["stage2"].model
    plain = dataclasses.replace(cfgs["stage0"].model, max_seq_len=a.length, original_seq_len=a.length)
    rows = [("stage 0, plain RoPE (as pre-trained)", plain, "stage0"),
            ("stage 0 + YaRN, no extension training", dataclasses.replace(yarn, max_seq_len=a.length), "stage0"),
            ("stage 1 (YaRN, trained at 8x)", dataclasses.replace(yarn, max_seq_len=a.length), "stage1"),
            ("stage 2 (YaRN, trained at 32x)", dataclasses.replace(yarn, max_seq_len=a.length), "stage2")]
    print(f"| model | loss on {a.windows} windows of {a.length} tokens |\n|---|---|")
    for name, args, stage in rows:
        print(f"| {name} | {_loss(args, latest_checkpoint(runs[stage] / 'checkpoints'), windows):.4f} |")


if __name__ == "__main__":
    main()
