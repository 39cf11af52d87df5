"""FP8 training recipe: accuracy against a high-precision run, activation and optimizer memory.

1. Accuracy. Trains the ``small`` model (configs/model/small.yaml) for N steps from the same
   initial weights and data order through the real ``Trainer``: fp32, a noise-floor run (fp32
   from initial weights perturbed by a relative 1e-3: how far trajectories drift apart from a
   tiny change alone), optionally bf16 autocast, and fp8 (``train.precision=fp8``). Reports each
   run's relative gap to fp32 of the mean loss over the last 10 steps (the paper's bound for fp8
   vs bf16 is 0.25 %) and saves the loss curves to docs/fp8_loss.png.
2. Activation memory. Bytes saved for backward by one dense block and one MoE block
   (batch x seq tokens), counted with ``torch.autograd.graph.saved_tensors_hooks`` over unique
   storages, without parameters and without bf16 copies of weights (autocast's weight casts), in
   fp32, bf16 autocast, fp8, and fp8 under bf16 autocast. "GEMM modules" is what the Linears and
   routed experts keep (inputs of the GEMMs; for the routed experts also their SwiGLU).
3. Optimizer memory per rank: fp32 master + AdamW moments with fp32 or bf16 moments, measured on
   the small model's ZeroOptimizer after one step, and computed for DeepSeek-V3 671B under the
   production layout (PP16, EP64, ZeRO-1 over DP128: dense params sharded 128 ways per stage,
   expert params 64-way EP x 2 expert-data-parallel replicas).

    python benchmarks/bench_fp8.py            # 60 steps, seq 128, batch 8: fp32, noise floor, fp8
    python benchmarks/bench_fp8.py --steps 300 --baselines fp32,fp32-perturbed,bf16
    python benchmarks/bench_fp8.py --skip-train   # memory tables only (seconds)

The fp8 runs use the torch reference kernels on a CPU (real E4M3 rounding through
torch.float8_e4m3fn, fp32 accumulation per 128-block) and the Triton kernels on a GPU.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------


def make_cfg(model: str, precision: str, steps: int, seq: int, batch: int, micro: int,
             out_dir: Path, seed: int, moments: str, device: str):
    from hai_llm.config.load import load_model_args
    from hai_llm.config.schema import (Config, DataConfig, LoggingConfig, OptimConfig,
                                       TrainConfig, validate_config)

    cfg = Config(
        model=load_model_args(model),
        data=DataConfig(seq_len=seq, cache_dir=str(REPO / "data_cache")),
        optim=OptimConfig(warmup_steps=max(1, steps // 10), moments_dtype=moments),
        train=TrainConfig(steps=steps, global_batch=batch, micro_batch=micro, seed=seed,
                          device=device, precision=precision, out_dir=str(out_dir), resume=False),
        logging=LoggingConfig(wandb="disabled", progress=False, plot=False),
    )
    validate_config(cfg)
    return cfg


def train(cfg, perturb: float = 0.0) -> tuple[list, float, Path]:
    """Train with the real Trainer; ``perturb`` > 0 multiplies every initial weight by
    (1 + perturb * N(0, 1)) (then rebuilds the optimizer from the perturbed weights)."""
    from hai_llm.train.trainer import Trainer

    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    if perturb > 0:
        g = torch.Generator().manual_seed(cfg.train.seed + 1)
        with torch.no_grad():
            for p in tr.model.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, generator=g).to(p))
        tr.optimizer = tr.rt.build_optimizer(tr.model, cfg)
    res = tr.fit()
    return res, time.perf_counter() - t0, Path(cfg.train.out_dir) / "metrics.jsonl"


def accuracy(args) -> tuple[list[tuple], dict]:
    from hai_llm.train.metrics import plot_loss

    tmp = Path(tempfile.mkdtemp(prefix="bench_fp8_"))
    runs, curves = {}, {}
    precisions = [p for p in args.baselines.split(",") if p] + ["fp8"]
    for prec in precisions:
        perturb = args.perturb if prec.endswith("-perturbed") else 0.0
        cfg = make_cfg(args.model, prec.removesuffix("-perturbed"), args.steps, args.seq,
                       args.batch, args.micro, tmp / prec, args.seed, args.moments, args.device)
        res, secs, metrics = train(cfg, perturb)
        runs[prec] = (res, secs)
        curves[prec] = metrics
        last = [r.loss for r in res[-10:]]
        print(f"  {prec:5s}: {len(res)} steps in {secs:6.1f} s, first loss {res[0].loss:.4f}, "
              f"mean of last 10 {statistics.fmean(last):.4f}", flush=True)
    rows = []
    ref_name = precisions[0]
    ref = runs[ref_name][0]
    r_last = statistics.fmean(r.loss for r in ref[-10:])
    r_ce = statistics.fmean(r.ce for r in ref[-10:])
    for name in precisions:
        res, secs = runs[name]
        last = statistics.fmean(r.loss for r in res[-10:])
        ce = statistics.fmean(r.ce for r in res[-10:])
        rows.append((name, last, 100 * (last - r_last) / r_last, ce, 100 * (ce - r_ce) / r_ce,
                     100 * (res[0].loss - ref[0].loss) / ref[0].loss, secs / len(res)))
    if args.plot:
        out = Path(args.plot)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_loss(None, out, labels={p: curves[p] for p in precisions})
        print(f"  loss curves: {out}")
    return rows, runs


# ----------------------------------------------------------------------------------------------
# activation memory
# ----------------------------------------------------------------------------------------------


class SavedBytes:
    """Unique storages saved for backward during a forward, split into GEMM-module / other."""

    def __init__(self, module: nn.Module, gemm_types: tuple):
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        shapes = set()
        for p in module.parameters():
            for s in (tuple(p.shape), tuple(p.shape[1:])):
                shapes |= {s, s[::-1]}
        self.weight_shapes = shapes
        self.seen: dict[int, tuple[int, str]] = {}
        self.stack: list[str] = []
        self.handles = []
        for name, m in module.named_modules():
            if isinstance(m, gemm_types):
                self.handles.append(m.register_forward_pre_hook(self._enter))
                self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module, args) -> None:
        self.stack.append(module)

    def _leave(self, module, args, out) -> None:
        self.stack.pop()

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.params or ptr in self.seen:
            return t
        if t.dtype in (torch.bfloat16, torch.float16) and tuple(t.shape) in self.weight_shapes:
            kind = "weight copy"  # autocast's cached low-precision weight, not an activation
        else:
            kind = "gemm" if self.stack else "other"
        self.seen[ptr] = (st.nbytes(), kind)
        return t

    def totals(self) -> dict:
        out = {"gemm": 0, "other": 0, "weight copy": 0}
        for n, k in self.seen.values():
            out[k] += n
        for h in self.handles:
            h.remove()
        return out


def block_saved_bytes(block: nn.Module, x: torch.Tensor, rope, autocast: bool) -> dict:
    from hai_llm.fp8 import Fp8GroupedExperts, Fp8Linear  # noqa: F401  (subclasses of the below)
    from hai_llm.model.moe import GroupedExperts

    counter = SavedBytes(block, (nn.Linear, GroupedExperts))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), ctx:
        y = block(x, rope)
    del y
    return counter.totals()


def activation_memory(args) -> list[tuple]:
    from hai_llm.config.load import load_model_args
    from hai_llm.fp8 import convert_to_fp8
    from hai_llm.model.transformer import build_model

    margs = load_model_args(args.model)
    model = build_model(margs, device="cpu", seed=0)
    rope = model.rope(torch.arange(args.seq))
    x = torch.randn(args.batch, args.seq, margs.dim, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    rows = []
    for layer_id, kind in ((0, "dense"), (margs.n_dense_layers, "MoE")):
        base = model.layers[layer_id]
        res = {}
        for mode in ("fp32", "bf16", "fp8", "fp8+bf16"):
            blk = copy.deepcopy(base)
            if mode.startswith("fp8"):
                convert_to_fp8(blk, use_triton=False)
            res[mode] = block_saved_bytes(blk, x, rope, autocast=mode.endswith("bf16"))
        for mode, r in res.items():
            rows.append((f"layer {layer_id} ({kind})", mode, r["gemm"], r["other"],
                         r["gemm"] + r["other"], r["weight copy"]))
    return rows


# ----------------------------------------------------------------------------------------------
# optimizer memory
# ----------------------------------------------------------------------------------------------


def optimizer_memory(args) -> list[tuple]:
    from hai_llm.config.load import load_model_args
    from hai_llm.model.params import parameter_table
    from hai_llm.model.transformer import build_model
    from hai_llm.parallel.zero import ZeroOptimizer

    rows = []
    margs = load_model_args(args.model)
    for moments in (torch.float32, torch.bfloat16):
        model = build_model(margs, device="cpu", seed=0)
        opt = ZeroOptimizer(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            moments_dtype=moments)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.reduce_gradients()
        opt.step()
        st = opt.inner.state
        master = sum(b.master.numel() * b.master.element_size() for b in opt.buckets)
        mom = sum(s[k].numel() * s[k].element_size() for s in st.values()
                  for k in ("exp_avg", "exp_avg_sq") if k in s)
        n = sum(b.numel for b in opt.buckets)
        rows.append((f"{args.model} (1 rank, measured)", str(moments).replace("torch.", ""), n,
                     master, mom, master + mom))
    # DeepSeek-V3 671B under PP16 x EP64 x ZeRO-1 DP128 (average stage)
    v3 = load_model_args("deepseek_v3_671b")
    t = parameter_table(v3)["rows"]
    experts = sum(n for (part, role), n in t.items() if role == "routed experts")
    dense = sum(t.values()) - experts
    pp, ep, dp = 16, 64, 128
    per_rank = dense / pp / dp + experts / pp / ep / (dp // ep)
    for name, mb in (("float32", 4), ("bfloat16", 2)):
        master, mom = 4 * per_rank, 2 * mb * per_rank
        rows.append(("671B, PP16 EP64 DP128 (per rank)", name, int(per_rank), int(master),
                     int(mom), int(master + mom)))
    return rows


# ----------------------------------------------------------------------------------------------


def table(headers, rows, fmts) -> str:
    cells = [[f.format(v) if isinstance(f, str) else f(v) for f, v in zip(fmts, r)] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def mib(v) -> str:
    return f"{v / 2**20:.2f} MiB"


def gib(v) -> str:
    return f"{v / 2**30:.3f} GiB" if v >= 2**30 else f"{v / 2**20:.2f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=8, help="micro-batch (sequences per forward)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--baselines", default="fp32,fp32-perturbed",
                    help="comma list of fp32, bf16 (autocast; ~5x slower than fp32 on a CPU) and "
                         "fp32-perturbed (the noise floor: fp32 from init weights perturbed by "
                         "--perturb); the first one is the reference of the gaps")
    ap.add_argument("--perturb", type=float, default=1e-3,
                    help="relative N(0,1) perturbation of the initial weights of *-perturbed runs")
    ap.add_argument("--moments", default="float32", choices=["float32", "bfloat16"],
                    help="AdamW moments dtype of every training run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plot", default=str(REPO / "docs" / "fp8_loss.png"),
                    help="loss-curve PNG ('' to skip)")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("command: python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
    print(f"torch {torch.__version__}, device {args.device}, model {args.model}, seq {args.seq}, "
          f"batch {args.batch}")

    print("\n== activation bytes saved for backward, one block, "
          f"{args.batch} x {args.seq} tokens ==")
    act = activation_memory(args)
    print(table(("layer", "precision", "GEMM modules", "other", "total", "(weight copies)"), act,
                ["{}", "{}", mib, mib, mib, mib]))
    base = {(r[0], r[1]): r[4] for r in act}
    for layer in dict.fromkeys(r[0] for r in act):
        print(f"  {layer}: fp8 / fp32 = {base[layer, 'fp8'] / base[layer, 'fp32']:.2f}, "
              f"fp8+bf16 / bf16 = {base[layer, 'fp8+bf16'] / base[layer, 'bf16']:.2f}")

    print("\n== optimizer state bytes per rank: fp32 master + AdamW moments ==")
    print(table(("model / layout", "moments", "params", "master", "moments", "total"),
                optimizer_memory(args), ["{}", "{}", "{:,}", gib, gib, gib]))

    if not args.skip_train:
        print(f"\n== accuracy: {args.steps} steps, seq {args.seq}, batch {args.batch}, "
              f"same init and data ==", flush=True)
        rows, _ = accuracy(args)
        print(table(("run", "loss", "gap %", "ce", "ce gap %", "step-1 gap %", "s/step"), rows,
                    ["{}", "{:.4f}", "{:+.3f}", "{:.4f}", "{:+.3f}", "{:+.4f}", "{:.2f}"]))
        print(f"  loss, ce: means over the last 10 steps (loss = ce + 0.3 * MTP + balance); gaps "
              f"relative to {rows[0][0]}. The paper's bound for fp8 vs bf16: |gap| < 0.25 %. "
              f"fp32-perturbed is the noise floor: the gap a {args.perturb:g} relative change of "
              f"the initial weights alone produces after {args.steps} steps.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
