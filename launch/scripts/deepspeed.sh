#!/usr/bin/env bash
# Launch hai-llm with DeepSpeed's launcher, for clusters whose jobs start with `deepspeed`.
#
#   launch/scripts/deepspeed.sh [deepspeed options --] <hai-llm-train Hydra overrides>
#
# e.g. two nodes of 8 GPUs listed in a hostfile (launch/scripts/hostfile.example), and 2 CPU
# ranks on this machine (what tests/test_deepspeed_launch.py runs):
#   HOSTFILE=hosts launch/scripts/deepspeed.sh parallel=single parallel.dp=16 parallel.ep=8
#   NUM_ACCELERATORS=2 launch/scripts/deepspeed.sh model=tiny train.device=cpu parallel=single parallel.dp=2
#
# The deepspeed command reads the hostfile, starts `deepspeed.launcher.launch` on every host
# (over pdsh, its default back-end, when there are several; directly when there is one), and
# that starts one `python -m hai_llm.launch.train` per slot with torchrun's variables RANK,
# LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (hai_llm/launch/external.py maps the two
# things it does differently: its --local_rank argument and LOCAL_SIZE). Ranks are numbered
# host by host in hostfile order, so rank // ranks-per-node is the host's line: the layout's
# node size (parallel.gpus_per_node, auto) is the slots of a host, which must be equal.
#
# Settings, from the environment (a value you set wins over the default):
#   HOSTFILE          DeepSpeed hostfile, one "<host> slots=<ranks>" line per node
#                     (default: none, this machine only)
#   NUM_ACCELERATORS  ranks on this machine without a hostfile, and the most per host with one
#                     (default: every GPU DeepSpeed sees; required on a CPU-only machine, where
#                     DeepSpeed's CPU accelerator counts NUMA nodes, not ranks)
#   MASTER_ADDR       address of the first host, reachable by all (default: DeepSpeed's choice,
#                     127.0.0.1 without a hostfile, else `hostname -I` of the first host over ssh)
#   MASTER_PORT       a free TCP port on MASTER_ADDR                       (default 29500)
#   OMP_NUM_THREADS   threads per rank                                     (default 1, as torchrun)
# Variables reach the other hosts only through DeepSpeed's rules: those starting with NCCL,
# PYTHON, MV2 or UCX, and every line of ~/.deepspeed_env or ./.deepspeed_env (KEY=VALUE).
set -euo pipefail

ds_args=()
if [[ " $* " == *" -- "* ]]; then  # deepspeed's own options come before a `--`
  while [[ $# -gt 0 && "$1" != "--" ]]; do ds_args+=("$1"); shift; done
  shift
fi
[[ -n "${HOSTFILE:-}" ]] && ds_args+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_ACCELERATORS:-}" ]] && ds_args+=(--num_accelerators "$NUM_ACCELERATORS")
[[ -n "${MASTER_ADDR:-}" ]] && ds_args+=(--master_addr "$MASTER_ADDR")
ds_args+=(--master_port "${MASTER_PORT:-29500}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "deepspeed.sh: $(hostname): deepspeed ${ds_args[*]}, OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2
# python -m deepspeed.launcher.runner is the deepspeed command, from the interpreter that has hai_llm
exec python -m deepspeed.launcher.runner "${ds_args[@]}" --module hai_llm.launch.train "$@"
