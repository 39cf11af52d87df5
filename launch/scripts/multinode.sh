#!/usr/bin/env bash
# Multi-node launch of hai-llm: one torchrun agent per node, one rank per GPU.
#
# Run the same command on every node (slurm.sbatch does it through srun), e.g. on two nodes:
#   NNODES=2 MASTER_ADDR=node0 launch/scripts/multinode.sh parallel=single parallel.dp=16 parallel.ep=8
# Everything after the script name is passed to hai-llm-train as Hydra overrides; a leading
# `--nproc-per-node N` (what slurm.sbatch passes, from the allocation) sets the ranks per node.
#
# Settings, from the environment (a value you set always wins over the default):
#   NNODES            number of nodes                                    (default 1)
#   MASTER_ADDR       host that serves the rendezvous, reachable by all  (default 127.0.0.1)
#   MASTER_PORT       a free TCP port on MASTER_ADDR                     (default 29500)
#   GPUS_PER_NODE     ranks per node              (default: the GPUs torch sees, else 1 on CPU)
#   RDZV_ID           one id shared by the nodes of a job     (default: SLURM_JOB_ID, else hai-llm)
#   OMP_NUM_THREADS   threads per rank           (default: this node's CPUs / ranks per node)
#   HAI_LLM_ACTIVATE  a file each node sources first: a venv's bin/activate, or your own file
#                     of `module load ...` lines followed by the activation
#
# Which node gets rank 0: the rendezvous is c10d, which ignores NODE_RANK. It numbers the
# agents (GROUP_RANK) in sorted order of (FQDN of the host, agent pid), so node ranks follow the
# sorted host names, not the order of the node list or of the start. Global ranks are then
# contiguous per agent: RANK = GROUP_RANK * ranks per node + LOCAL_RANK (torch.distributed.elastic
# gives each agent the block of ranks after those of the agents sorted before it). Hence
# rank // parallel.gpus_per_node == GROUP_RANK when parallel.gpus_per_node equals the ranks
# per node, which this script passes: expert groups (hai_llm/layout/dims.py) stay on one node.
set -euo pipefail

ranks=""
case "${1:-}" in
  --nproc-per-node=*) ranks=${1#*=}; shift ;;
  --nproc-per-node) ranks=${2:?--nproc-per-node needs a number}; shift 2 ;;
esac

if [[ -n "${HAI_LLM_ACTIVATE:-}" ]]; then
  # activation scripts (venv, environment modules) are not written for `set -u`
  set +u
  # shellcheck disable=SC1090
  source "$HAI_LLM_ACTIVATE"
  set -u
fi

NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-hai-llm}}
if [[ -z "$ranks" ]]; then
  ranks=${GPUS_PER_NODE:-$(python -c "import torch; print(torch.cuda.device_count() or 1)")}
fi
if ! [[ "$ranks" =~ ^[1-9][0-9]*$ ]]; then
  echo "multinode.sh: error: ranks per node '$ranks' is not a positive integer: set GPUS_PER_NODE" >&2
  exit 2
fi

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  # the CPUs this node gives the job (SLURM: the step's CPUs here), shared by its ranks
  cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
  OMP_NUM_THREADS=$(( cpus / ranks > 0 ? cpus / ranks : 1 ))
fi
export OMP_NUM_THREADS

echo "multinode.sh: $(hostname): $ranks ranks, $NNODES nodes, rendezvous $MASTER_ADDR:$MASTER_PORT" \
     "id $RDZV_ID, OMP_NUM_THREADS=$OMP_NUM_THREADS"
# python -m torch.distributed.run is torchrun, from the same interpreter that has hai_llm
exec python -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$ranks" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  -m hai_llm.launch.train parallel.gpus_per_node="$ranks" "$@"
