#!/usr/bin/env bash
# Multi-node training with torchrun and no scheduler. Run the SAME command on every node:
#
#   NNODES=2 MASTER_ADDR=10.0.0.1 launch/torchrun_multinode.sh --config CONFIG.yaml [dotted overrides...] [--no-resume]
#
# Each node starts one torchrun agent; the agents meet in a c10d rendezvous hosted on MASTER_ADDR (the agent whose
# host matches it serves the store) and number the nodes themselves, so no node rank is needed. Arguments are passed
# to pretrain_llama.py unchanged.
#
#   NNODES          number of nodes (required)
#   MASTER_ADDR     address of the node hosting the rendezvous, reachable from every node (required)
#   MASTER_PORT     its TCP port, open between the nodes (default 29500)
#   NPROC_PER_NODE  processes per node (default: the node's CUDA device count, 1 without CUDA)
#   RUN_ID          rendezvous id, the same on every node of one job (default: llama)
#   PYTHON          the interpreter of the environment to train in (default: python)
#
# checkpoint.dir must be on a file system that every node sees: rank 0 assembles each checkpoint from all ranks'
# files, and a restarted job resumes from it (whichever node then gets which rank).
set -euo pipefail

: "${NNODES:?set NNODES to the number of nodes (see the header of launch/torchrun_multinode.sh)}"
: "${MASTER_ADDR:?set MASTER_ADDR to an address of the rendezvous node that every node reaches}"
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-llama}
PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}

cd "$(dirname "$0")/.."
echo "torchrun agent on $(hostname): $NNODES nodes x $NPROC_PER_NODE processes, rendezvous $RUN_ID at" \
    "$MASTER_ADDR:$MASTER_PORT" >&2
# exec: the agent replaces this shell, so a scheduler's SIGTERM reaches it and it forwards it to the trainers,
# which save a checkpoint and exit (it waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, default 30, before SIGKILL).
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv_id "$RUN_ID" \
    --max_restarts 0 \
    pretrain_llama.py "$@"
