"""Save and load time of one training checkpoint: hai-llm's format (DCP's safetensors storage +
trainer.json, ``hai_llm.checkpoint.store``) against DCP's former default (pickle ``.metadata`` +
``.distcp``), the same state (fp32 master weights and both AdamW moments of every parameter, the
routing biases), in one process, best of 3.

    python benchmarks/bench_checkpoint.py --model small

Numbers in docs/perf.md ("Checkpoint format"). Timings are wall-clock on whatever else the
machine is doing: re-run on a quiet machine for publication.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _trainer(tmp: Path, model_name: str):
    from omegaconf import OmegaConf

    from hai_llm.config.load import config_dir
    from hai_llm.config.schema import Config, to_config
    from hai_llm.data import prepare_corpus
    from hai_llm.train.trainer import Trainer

    src = tmp / "src"
    src.mkdir()
    for f in sorted((REPO / "hai_llm" / "model").glob("*.py")):  # this repository's model source as text
        (src / (f.stem + ".txt")).write_text(f.read_text())
    corpus = prepare_corpus([str(src)], tmp / "corpus", pattern="*.txt", max_bytes=200_000)
    cfg = OmegaConf.merge(
        OmegaConf.structured(Config), {"model": OmegaConf.load(config_dir() / "model" / f"{model_name}.yaml")},
        OmegaConf.from_dotlist([f"data.path={corpus}", "data.seq_len=32", "train.global_batch=2",
                                "train.micro_batch=2", "train.device=cpu", "train.steps=1",
                                f"train.out_dir={tmp / 'run'}", "logging.wandb=disabled", "logging.progress=false",
                                "logging.plot=false"]))
    return Trainer(to_config(cfg))


def run(model_name: str, repeats: int = 3) -> list[dict]:
    import torch.distributed.checkpoint as dcp

    from hai_llm.checkpoint import store
    from hai_llm.checkpoint.zero_state import dcp_state

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as d, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        t = _trainer(Path(d), model_name)
        t.train_step()  # moments exist and are non-zero
        n = sum(p.numel() for p in t.model.parameters())
        for fmt in ("safetensors", "pickle (former)"):
            save_s = load_s = float("inf")
            for _ in range(repeats):
                root = Path(d) / "ckpt"
                shutil.rmtree(root, ignore_errors=True)
                t0 = time.perf_counter()
                if fmt == "safetensors":
                    path = store.save_checkpoint(root, 1, dcp_state(t.optimizer), t._buffers(), {"step": 1})
                else:
                    path = root / "step"
                    dcp.save({"weights": dcp_state(t.optimizer), "buffers": t._buffers()}, checkpoint_id=str(path))
                save_s = min(save_s, time.perf_counter() - t0)
                t0 = time.perf_counter()
                if fmt == "safetensors":
                    store.load_checkpoint(path, dcp_state(t.optimizer), t._buffers())
                else:
                    dcp.load({"weights": dcp_state(t.optimizer), "buffers": t._buffers()}, checkpoint_id=str(path))
                load_s = min(load_s, time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            rows.append({"model": model_name, "params": n, "format": fmt, "mib": size / 2**20,
                         "save_s": save_s, "load_s": load_s})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print("| model | format | size | save | load |")
    print("|---|---|---|---|---|")
    for r in run(args.model, args.repeats):
        print(f"| {r['model']} ({r['params'] / 1e6:.1f}M params) | {r['format']} | {r['mib']:.0f} MiB | "
              f"{r['save_s']:.2f} s | {r['load_s']:.2f} s |")


if __name__ == "__main__":
    main()
