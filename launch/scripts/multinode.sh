#!/usr/bin/env bash
# Multi-node launch of hai-llm with torchrun, one process per GPU.
#
# Run the same command on every node; the rendezvous comes from the environment:
#   NNODES        number of nodes                  (default 1)
#   NODE_RANK     this node's index, 0..NNODES-1   (default 0)
#   MASTER_ADDR   host name / IP of node 0         (default 127.0.0.1)
#   MASTER_PORT   a free TCP port on node 0        (default 29500)
#   GPUS_PER_NODE processes per node               (default: number of visible GPUs, else 8)
# Everything after the script name is passed to hai-llm-train as Hydra overrides, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/scripts/multinode.sh \
#       parallel=single parallel.dp=16 parallel.ep=8
# parallel.gpus_per_node is set from GPUS_PER_NODE so expert groups line up with nodes.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 8)")
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  -m hai_llm.launch.train parallel.gpus_per_node="$GPUS_PER_NODE" "$@"
