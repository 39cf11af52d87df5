#!/usr/bin/env bash
# One-GPU smoke of hai-llm: what must hold before a multi-GPU run, in under 8 minutes on one H200.
#
#   benchmarks/gpu_smoke.sh                     # on a CUDA machine: every part
#   benchmarks/gpu_smoke.sh --cpu-only --quick  # CPU: the CPU-capable parts, small (CI runs this)
#   options: --cpu-only (hide the GPUs)  --quick (smaller CPU checks)  --out DIR (logs, runs)
#            --budget SECONDS (whole-script time limit, default 450)
#
# Parts, in order, each printing a table:
#   1 kernel-tests   pytest tests/kernels compiled on the GPU (TRITON_INTERPRET unset); on the CPU
#                    the same tests on the Triton interpreter
#   2 fp8-gemm       benchmarks/bench_fp8_gemm_gpu.py: Fprop/Dgrad/Wgrad and grouped TFLOPS vs
#                    torch._scaled_mm and bf16; on the CPU its --smoke correctness run
#   3 grouped-d2h    torch grouped_mm fp32 vs bf16 timing, and a torch.profiler check that the FP8
#                    expert + Linear forward/backward make no device-to-host copy (CPU: host-read
#                    count on the interpreter)
#   4 sync-census    synchronising calls of one MoE layer forward/backward (bf16 and FP8) under
#                    torch.cuda.set_sync_debug_mode("warn") (CPU: host-read count by call site)
#   5 nccl-world1    torchrun world of 1 on the GPU with EMA, save and resume
#   6 gloo-2ranks    2 simulated gloo ranks on cuda:0: pp2 DualPipe and dp2 x ep2, bf16 and fp8,
#                    save and resume (collectives staged through host memory by
#                    hai_llm.parallel.gloo_staging, which the launcher installs on such ranks)
#   7 mfu            a 1-GPU training run of the small model; MFU from summary.json
# Parts 5-7 run the launcher (hai-llm-train) as it exists; on a CPU they print
# "SKIP (no CUDA): <what>". Exit status: 1 if a part failed or timed out, else 0.
set -u -o pipefail

CPU_ONLY=0
QUICK=0
OUT=""
BUDGET=450
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-only) CPU_ONLY=1 ;;
        --quick) QUICK=1 ;;
        --out) OUT="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python}
if [ "$CPU_ONLY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
fi
HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$HAS_CUDA" = 0 ]; then
    export TRITON_INTERPRET=1  # every Triton kernel on the CPU interpreter
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    unset TRITON_INTERPRET  # compile the kernels for real
fi
if [ -z "$OUT" ]; then
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")
fi
mkdir -p "$OUT"
if command -v hai-llm-train >/dev/null 2>&1; then
    TRAIN="hai-llm-train"
else
    TRAIN="$PY -m hai_llm.launch.train"
fi
Q=""
[ "$QUICK" = 1 ] && Q="--quick"
export REPO PY HAS_CUDA OUT TRAIN Q QUICK

skip_no_cuda() {  # what -> exit status 77 (skipped)
    echo "SKIP (no CUDA): $1"
    return 77
}

# common flags of the launcher runs: quiet, no wandb, Hydra's own files inside the run folder
train_flags() {  # out_dir
    echo "logging.wandb=disabled logging.progress=false logging.plot=false" \
         "train.out_dir=$1 hydra.run.dir=$1/hydra"
}

part_kernel_tests() {
    local sel=(tests/kernels --ignore=tests/kernels/test_gpu_smoke_cpu.py)
    if [ "$HAS_CUDA" = 1 ]; then
        echo "pytest tests/kernels compiled on $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
    else
        echo "SKIP (no CUDA): compiled kernel tests; running them on the Triton CPU interpreter"
        if [ "$QUICK" = 1 ]; then
            sel=(tests/kernels/test_fp8_quant.py::test_act_quant_nan_and_inf_give_nan_tiles
                 tests/kernels/test_fp8_gemm.py::test_launch_config_policy)
        fi
    fi
    "$PY" -m pytest -q -p no:cacheprovider "${sel[@]}" --junitxml="$OUT/kernels.xml" \
        > "$OUT/kernels.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT/kernels.log"
    "$PY" benchmarks/gpu_smoke_checks.py pytest-table "$OUT/kernels.xml" || rc=1
    return $rc
}

part_fp8_gemm() {
    if [ "$HAS_CUDA" = 1 ]; then
        "$PY" benchmarks/bench_fp8_gemm_gpu.py --quick
    else
        echo "SKIP (no CUDA): FP8 GEMM TFLOPS vs torch._scaled_mm and bf16;" \
             "running the benchmark's correctness checks at tiny shapes (--smoke)"
        "$PY" benchmarks/bench_fp8_gemm_gpu.py --smoke $Q
    fi
}

part_grouped_d2h() {
    local rc=0
    "$PY" benchmarks/gpu_smoke_checks.py grouped-mm $Q || rc=1
    echo
    "$PY" benchmarks/gpu_smoke_checks.py d2h $Q || rc=1
    return $rc
}

part_sync_census() {
    "$PY" benchmarks/gpu_smoke_checks.py sync-census $Q
}

part_nccl_world1() {
    [ "$HAS_CUDA" = 1 ] || { skip_no_cuda "torchrun world-of-1 run on cuda (EMA, save, resume)"; return; }
    local d="$OUT/nccl-world1" rc=0
    local common="model=tiny parallel=single train.device=cuda train.ema_decay=0.9 train.ckpt_every=2 $(train_flags "$d")"
    # shellcheck disable=SC2086
    torchrun --standalone --nproc-per-node 1 -m hai_llm.launch.train $common train.steps=4 \
        > "$d.log" 2>&1 || rc=1
    # shellcheck disable=SC2086
    torchrun --standalone --nproc-per-node 1 -m hai_llm.launch.train $common train.steps=6 \
        >> "$d.log" 2>&1 || rc=1
    grep -q "resumed from" "$d.log" || rc=1
    tail -n 3 "$d.log"
    "$PY" - "$d/summary.json" "$rc" <<'EOF'
import json, sys
from pathlib import Path
p, rc = Path(sys.argv[1]), sys.argv[2]
s = json.loads(p.read_text()) if p.exists() else {}
print("run             steps  final loss  tokens/s  status")
print("-------------------------------------------------------")
print(f"world-of-1 EMA  {s.get('steps', '-'):>5}  {s.get('final_loss', float('nan')):10.4f}  "
      f"{s.get('tokens_per_s', 0):8.0f}  {'ok' if rc == '0' and s.get('steps') == 6 else 'FAILED'}")
EOF
    return $rc
}

part_gloo_2ranks() {
    [ "$HAS_CUDA" = 1 ] || { skip_no_cuda "2 gloo ranks sharing cuda:0 (pp2 DualPipe, dp2 x ep2; bf16, fp8; save, resume)"; return; }
    local rc=0 rows=""
    for prec in bf16 fp8; do
        for lay in "pp2-dualpipe:parallel.pp=2 parallel.schedule=dualpipe" \
                   "dp2-ep2:parallel.dp=2 parallel.ep=2"; do
            local name=${lay%%:*} flags=${lay#*:}
            local d="$OUT/gloo2-$name-$prec" st=ok
            local common="model=tiny parallel=single parallel.nprocs=2 $flags train.device=cuda train.precision=$prec train.global_batch=4 train.micro_batch=1 data.seq_len=64 train.ckpt_every=1 $(train_flags "$d")"
            # shellcheck disable=SC2086
            $TRAIN $common train.steps=2 > "$d.log" 2>&1 || st=FAILED
            # shellcheck disable=SC2086
            [ "$st" = ok ] && { $TRAIN $common train.steps=3 >> "$d.log" 2>&1 || st=FAILED; }
            [ "$st" = ok ] && { grep -q "resumed from" "$d.log" || st="no resume"; }
            [ "$st" = ok ] || { rc=1; tail -n 5 "$d.log"; }
            rows+="$name $prec $st $d.log"$'\n'
        done
    done
    printf "%-14s %-6s %-10s %s\n" layout prec status log
    echo "--------------------------------------------------------------"
    printf "%s" "$rows" | while read -r a b c e; do printf "%-14s %-6s %-10s %s\n" "$a" "$b" "$c" "$e"; done
    return $rc
}

part_mfu() {
    [ "$HAS_CUDA" = 1 ] || { skip_no_cuda "1-GPU training run of the small model and its MFU"; return; }
    local d="$OUT/mfu"
    # shellcheck disable=SC2086
    $TRAIN model=small parallel=single train.device=cuda train.precision=bf16 train.steps=20 \
        $(train_flags "$d") > "$d.log" 2>&1 || { tail -n 20 "$d.log"; return 1; }
    tail -n 1 "$d.log"
    "$PY" benchmarks/gpu_smoke_checks.py mfu "$d/summary.json" --model small
}

export -f skip_no_cuda train_flags part_kernel_tests part_fp8_gemm part_grouped_d2h \
    part_sync_census part_nccl_world1 part_gloo_2ranks part_mfu

START=$(date +%s)
RESULTS=""
FAILED=0
run_part() {  # name cap_seconds function
    local name=$1 cap=$2 fn=$3
    local left=$((BUDGET - ($(date +%s) - START)))
    echo
    echo "=== $name ==="
    if [ "$left" -lt 15 ]; then
        echo "SKIP (time budget of ${BUDGET}s used up): $name"
        RESULTS+="$name|SKIP (budget)|0"$'\n'
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    local t0
    t0=$(date +%s)
    timeout -k 10 "$cap" bash -c "$fn"
    local rc=$? st
    case $rc in
        0) st=PASS ;;
        77) st=SKIP ;;
        124|137) st="TIMEOUT (${cap}s)"; FAILED=1 ;;
        *) st="FAIL (rc $rc)"; FAILED=1 ;;
    esac
    [ "$HAS_CUDA" = 0 ] && [ "$st" = PASS ] && st="PASS (cpu)"
    RESULTS+="$name|$st|$(($(date +%s) - t0))"$'\n'
}

echo "hai-llm GPU smoke: $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $REPO, outputs in $OUT"
echo "cuda: $HAS_CUDA, quick: $QUICK, budget: ${BUDGET}s, git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
# caps in seconds; the budget (default 450 s) cuts the later parts short if the earlier ones ran
# long (first compilation of every kernel variant), so the whole script stays under 8 minutes
run_part kernel-tests 270 part_kernel_tests
run_part fp8-gemm 100 part_fp8_gemm
run_part grouped-d2h 50 part_grouped_d2h
run_part sync-census 40 part_sync_census
run_part nccl-world1 60 part_nccl_world1
run_part gloo-2ranks 150 part_gloo_2ranks
run_part mfu 80 part_mfu

echo
echo "=== summary ($(($(date +%s) - START)) s) ==="
printf "%-14s %-20s %s\n" part status seconds
echo "------------------------------------------"
printf "%s" "$RESULTS" | while IFS='|' read -r n s t; do printf "%-14s %-20s %s\n" "$n" "$s" "$t"; done
exit $FAILED
