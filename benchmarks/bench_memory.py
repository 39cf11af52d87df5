"""Activation memory of one forward + backward of the small model with recompute
none / selective / full, the memory of the optimizer step (ZeRO-1 gradient buckets, master
shard, AdamW moments and temporaries) and the cost of the host-side EMA.

    python benchmarks/bench_memory.py                 # small model, seq 256, batch 4, fp32, CPU
    python benchmarks/bench_memory.py --seq 128 --batch 2 --no-rss --no-ema
    python benchmarks/bench_memory.py --opt-only      # only the optimizer-step table

What is measured (CPU, so no allocator statistics to read):

* saved for bwd: bytes of the distinct storages that autograd saves for backward outside
  of recomputed regions, counted by a ``torch.autograd.graph.saved_tensors_hooks`` pack
  hook (dedup by storage). Inside a recomputed region the checkpoint's own hooks replace
  the tensors by placeholders, so they do not appear: that is the point of recomputation.
* live after fwd: bytes of every storage created during the forward (by any op, seen by a
  ``TorchDispatchMode``) that is still alive when the loss is returned, i.e. everything the
  graph keeps for backward, checkpoint inputs included (weakref finalizers track frees).
* peak fwd+bwd: the high-water mark of those live bytes over forward AND backward
  (recomputed activations and parameter gradients included).
* RSS delta: growth of the resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs) of a fresh subprocess over one forward + backward, after a short
  warm-up pass (lazy imports) and with the parameter gradients already allocated; glibc's
  mmap threshold is pinned at 64 KiB so that freed tensors go back to the OS. Coarse, but
  independent of the two hook-based counts.

The optimizer part builds the trainer's ``ZeroOptimizer`` over the model (a world of one:
the shard is the whole bucket), runs two forward + backward + optimizer steps and, during the
second (moments already allocated), counts the storages created by ``reduce_gradients`` (the
fp32 gradient bucket, the reduce-scatter result, the float64 norm temporaries) and by the AdamW
update (its scratch), with the same dispatch-mode tracker, ignoring the tensors that existed
before (parameters, gradients, master shard, moments). ``--opt-chunk`` sets the slice size of
the norm and of AdamW (``ZeroOptimizer(chunk=...)``): temporaries are bounded by it.

The EMA part trains the same model for a few steps with and without ``train.ema_decay``
and reports the EMA's host bytes (this rank's ZeRO master shard), the step times, the time
the training thread spends in ``CPUEma.update`` (queueing the snapshot copy) and the time
of the fold that runs on the worker thread: if the EMA overlaps with the next step, (step
with EMA - step without) is about the snapshot time, not snapshot + fold.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "selective", "full")


def mib(n: float) -> str:
    return f"{n / 2**20:9.2f}"


class LiveStorageTracker(TorchDispatchMode):
    """Bytes of storages created under this mode that are still alive, and their peak.
    ``known``: tensors that existed before (their storages are not counted when an in-place
    op returns them)."""

    def __init__(self, known=()):
        super().__init__()
        self.known = list(known)  # kept alive, so their storages' ids stay theirs
        self.known_ids = {id(t.untyped_storage()) for t in self.known}
        self.live: dict[int, int] = {}
        self.cur = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.cur -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = id(st)
                if key in self.live or key in self.known_ids or st.nbytes() == 0:
                    continue
                self.live[key] = st.nbytes()
                self.cur += st.nbytes()
                self.peak = max(self.peak, self.cur)
                weakref.finalize(st, self._free, key)
        return out


def build(args_model, mode: str, seed: int = 0):
    from hai_llm.model.transformer import build_model

    return build_model(dataclasses.replace(args_model, recompute=mode), device="cpu", seed=seed)


def measure_mode(model_args, mode: str, batch: int, seq: int) -> dict:
    model = build(model_args, mode)
    tokens = torch.randint(0, model_args.vocab_size, (batch, seq + 1 + model_args.n_mtp_layers),
                           generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):  # saved-for-backward storages outside recomputed regions (dedup)
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    tr = LiveStorageTracker()
    t0 = time.perf_counter()
    with tr:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.loss(tokens)
        after_fwd = tr.cur
        out.loss.backward()
        loss = float(out.loss.detach())
        del out
    dt = time.perf_counter() - t0
    return {"mode": mode, "saved": sum(seen.values()), "after_fwd": after_fwd, "peak": tr.peak, "loss": loss,
            "time_s": dt}


def optimizer_memory(model_args, batch: int, seq: int, moments: torch.dtype, chunk: int) -> dict:
    """Bytes of the ZeRO-1 optimizer step of a world of one (module docstring), second step."""
    from hai_llm.parallel.zero import ZeroOptimizer

    model = build(model_args, "none")
    zo = ZeroOptimizer(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, moments_dtype=moments,
                       chunk=chunk)
    tokens = torch.randint(0, model_args.vocab_size, (batch, seq + 1 + model_args.n_mtp_layers),
                           generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        zo.zero_grad()
        model.loss(tokens).loss.backward()
        known = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
        known += [b.master for b in zo.buckets] + [t for st in zo.inner.state.values() for t in st.values()]
        tr = LiveStorageTracker(known)
        with tr:
            norm = zo.reduce_gradients()
            reduce_peak, reduce_live = tr.peak, tr.cur  # live: the reduced shard (master.grad)
            tr.peak = tr.cur
            zo.clip(float(norm), 1.0)
            zo.step()
            adam_peak = tr.peak - reduce_live
    mom = 2 if moments == torch.bfloat16 else 4
    return {"moments": "bf16" if moments == torch.bfloat16 else "fp32", "chunk": chunk,
            "master": sum(b.master.numel() * 4 for b in zo.buckets),
            "moment_bytes": sum(2 * b.master.numel() * mom for b in zo.buckets),
            "bucket": sum(b.shard * b.world * 4 for b in zo.buckets),
            "reduce_peak": reduce_peak, "reduce_live": reduce_live, "adam_peak": adam_peak,
            "step_peak": max(reduce_peak, reduce_live + adam_peak)}


def print_optimizer_table(model_args, batch: int, seq: int, chunks: list[int]) -> None:
    rows = [optimizer_memory(model_args, batch, seq, m, c) for c in chunks for m in (torch.float32, torch.bfloat16)]
    print()
    print("optimizer step (ZeRO-1, world of one; MiB; created during the step, besides params/grads/state)")
    print(f"{'moments':<8} {'chunk':>9} {'master':>8} {'moments':>8} {'grad bucket':>11} {'reduce peak':>11} "
          f"{'AdamW tmp':>9} {'step peak':>9}")
    for r in rows:
        print(f"{r['moments']:<8} {r['chunk']:>9} {mib(r['master'])} {mib(r['moment_bytes'])} "
              f"{mib(r['bucket']):>11} {mib(r['reduce_peak']):>11} {mib(r['adam_peak'])} {mib(r['step_peak'])}")
    print("reduce peak = grad bucket + float64 norm temporaries; AdamW tmp = its scratch buffers; step peak =\n"
          "the largest of the two phases (the reduced shard stays alive through the AdamW update)")


def _vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child_rss(model_name: str, mode: str, batch: int, seq: int) -> None:
    """Run in a fresh process: print the resident-memory high-water growth of one
    forward + backward (VmHWM reset through /proc/self/clear_refs when allowed, else the
    ru_maxrss growth)."""
    from hai_llm.config.load import load_model_args

    torch.set_num_threads(1)
    args = load_model_args(model_name)
    model = build(args, mode)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1 + args.n_mtp_layers),
                           generator=torch.Generator().manual_seed(0))
    # warm-up on a short window: lazy imports and one-off initialisation (torch.utils.checkpoint
    # pulls in ~100 MiB of modules on first use) must not count as activation memory
    model.loss(tokens[:1, :18]).loss.backward()
    for p in model.parameters():  # parameter gradients are part of the baseline
        p.grad = torch.zeros_like(p)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        before = _vm("VmRSS")
        hwm = lambda: _vm("VmHWM")  # noqa: E731
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        hwm = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    out = model.loss(tokens)
    out.loss.backward()
    print(json.dumps({"mode": mode, "rss_delta": hwm() - before}))


def rss_per_mode(model_name: str, batch: int, seq: int) -> dict[str, int]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    out = {}
    for mode in MODES:
        r = subprocess.run([sys.executable, __file__, "--child", mode, "--model", model_name,
                            "--batch", str(batch), "--seq", str(seq)],
                           capture_output=True, text=True, env=env, check=True)
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])["rss_delta"]
    return out


def ema_benchmark(model_name: str, batch: int, seq: int, steps: int) -> dict:
    from omegaconf import OmegaConf

    from hai_llm.config.load import config_dir
    from hai_llm.config.schema import Config, to_config
    from hai_llm.data import prepare_corpus
    from hai_llm.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench_memory_") as d:
        return _ema_benchmark(Path(d), model_name, batch, seq, steps, OmegaConf, config_dir, Config, to_config,
                              prepare_corpus, Trainer)


def _ema_benchmark(tmp, model_name, batch, seq, steps, OmegaConf, config_dir, Config, to_config, prepare_corpus,
                   Trainer) -> dict:
    src = tmp / "src"
    src.mkdir()
    pkg = REPO / "hai_llm"
    for f in sorted(pkg.rglob("*.py")):  # this repository's own source text as the corpus
        (src / (str(f.relative_to(pkg)).replace("/", "_") + ".txt")).write_text(f.read_text())
    corpus = prepare_corpus([str(src)], tmp / "corpus", pattern="*.txt", max_bytes=400_000)

    def trainer(ema: float, out: str):
        cfg = OmegaConf.merge(
            OmegaConf.structured(Config),
            {"model": OmegaConf.load(config_dir() / "model" / f"{model_name}.yaml")},
            OmegaConf.from_dotlist([
                f"data.path={corpus}", f"data.seq_len={seq}", f"train.global_batch={batch}",
                f"train.micro_batch={batch}", "train.device=cpu", f"train.steps={2 * steps + 1}",
                f"train.out_dir={tmp / out}", f"train.ema_decay={ema}", "logging.wandb=disabled",
                "logging.progress=false", "logging.plot=false"]))
        return Trainer(to_config(cfg))

    res = {}
    runs = {"without EMA": trainer(0.0, "no_ema"), "with EMA": trainer(0.99, "ema")}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for t in runs.values():  # warm-up
        t.train_step()
    for _ in range(steps):  # alternate blocks of 2 consecutive steps so that noise hits both
        for label, t in runs.items():
            for _ in range(2):
                t0 = time.perf_counter()
                t.train_step()
                times[label].append(time.perf_counter() - t0)
    res["range"] = {}
    for label, ts in times.items():
        res[label] = sorted(ts)[len(ts) // 2]
        res["range"][label] = (min(ts), max(ts))
    t = runs["with EMA"]
    t.ema.wait()
    res["ema_bytes"] = sum(v.numel() * v.element_size() for v in t.ema.shards)
    res["param_bytes"] = sum(p.numel() * p.element_size() for p in t.model.parameters())
    # one update split into the part on the training thread and the background fold
    t0 = time.perf_counter()
    t.ema.update()
    res["snapshot_s"] = time.perf_counter() - t0
    t.ema.wait()
    t0 = time.perf_counter()
    t.ema._fold(None)  # the fold alone, on the snapshot already staged
    res["fold_s"] = time.perf_counter() - t0
    res["n_steps"] = 2 * steps
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ema-steps", type=int, default=3, help="blocks of 2 timed steps per variant")
    ap.add_argument("--ema-seq", type=int, default=128, help="sequence length of the EMA step timing")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-mode subprocess RSS measurement")
    ap.add_argument("--no-ema", action="store_true", help="skip the EMA timing")
    ap.add_argument("--opt-chunk", type=int, action="append",
                    help="slice size(s) of the optimizer step (default: ZeroOptimizer's, and 2**18)")
    ap.add_argument("--opt-only", action="store_true", help="only the optimizer-step table")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child_rss(a.model, a.child, a.batch, a.seq)
        return 0

    from hai_llm.config.load import load_model_args

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cmd = ["python", os.path.relpath(__file__, os.getcwd())] + list(sys.argv[1:] if argv is None else argv)
    print("$ " + " ".join(shlex.quote(x) for x in cmd))
    margs = load_model_args(a.model)
    n_params = sum(p.numel() for p in build(margs, "none").parameters())
    print(f"model {a.model}: {n_params:,} parameters, batch {a.batch} x seq {a.seq}, fp32, CPU, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    chunks = a.opt_chunk or [1 << 22, 1 << 18]
    if a.opt_only:
        print_optimizer_table(margs, a.batch, a.seq, chunks)
        return 0
    rows = [measure_mode(margs, m, a.batch, a.seq) for m in MODES]
    rss = rss_per_mode(a.model, a.batch, a.seq) if not a.no_rss else {}
    ref = rows[0]
    print()
    print(f"{'recompute':<10} {'saved for bwd':>14} {'live after fwd':>15} {'peak fwd+bwd':>13} "
          f"{'RSS delta':>10} {'vs none':>8} {'fwd+bwd s':>9}  loss")
    # fwd+bwd s: wall time of the tracked pass (dispatch-mode overhead included; first row warms up)
    print(f"{'':<10} {'MiB':>14} {'MiB':>15} {'MiB':>13} {'MiB':>10} {'(live)':>8}")
    for r in rows:
        rs = mib(rss[r['mode']]) if r["mode"] in rss else "       -"
        print(f"{r['mode']:<10} {mib(r['saved']):>14} {mib(r['after_fwd']):>15} {mib(r['peak']):>13} "
              f"{rs:>10} {r['after_fwd'] / ref['after_fwd']:>8.2f} {r['time_s']:>9.2f}  {r['loss']:.6f}")
    same = all(r["loss"] == ref["loss"] for r in rows)
    print(f"losses identical across modes: {same}")
    print_optimizer_table(margs, a.batch, a.seq, chunks)

    if not a.no_ema:
        e = ema_benchmark(a.model, a.batch, a.ema_seq, a.ema_steps)
        diff = e["with EMA"] - e["without EMA"]
        print()
        print(f"EMA (decay 0.99) of this rank's fp32 master shard, in host memory: {e['ema_bytes']:,} bytes = "
              f"{e['ema_bytes'] / e['param_bytes']:.2f} x the fp32 parameters ({e['param_bytes']:,} bytes; "
              f"1/W of them on each of W ZeRO ranks)")
        print(f"trainer step, batch {a.batch} x seq {a.ema_seq}, median of {e['n_steps']}: "
              f"without EMA {e['without EMA'] * 1e3:.1f} ms, with EMA {e['with EMA'] * 1e3:.1f} ms "
              f"(difference {diff * 1e3:+.1f} ms)")
        print(f"step-time range (min..max): without EMA {e['range']['without EMA'][0] * 1e3:.0f}.."
              f"{e['range']['without EMA'][1] * 1e3:.0f} ms, with EMA {e['range']['with EMA'][0] * 1e3:.0f}.."
              f"{e['range']['with EMA'][1] * 1e3:.0f} ms")
        print(f"EMA work per step: snapshot copy on the training thread {e['snapshot_s'] * 1e3:.2f} ms, "
              f"fold on the worker thread {e['fold_s'] * 1e3:.2f} ms (runs while the next step computes); "
              f"together {(e['snapshot_s'] + e['fold_s']) / e['without EMA'] * 100:.1f}% of a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
