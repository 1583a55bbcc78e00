#!/usr/bin/env bash
# Multi-node PT-PEFT training with torchrun. Run it once on every node, with the same arguments:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-0 MASTER_PORT=29500 NPROC_PER_NODE=4 \
#       launchers/multinode_torchrun.sh --ds ds_configs/zero3.json run_name=exp1 output_dir=/shared/runs
#   (the same on node-1 with NODE_RANK=1)
#
# Environment: NNODES, NODE_RANK, MASTER_ADDR (required); MASTER_PORT (29500); NPROC_PER_NODE (ranks on
# this node, default 1); MAX_RESTARTS (3); PYTHON (python). Everything after the script name goes to
# launchers/train.py.
#
# Fault tolerance: torchrun restarts the workers up to MAX_RESTARTS times after a worker fails, and the
# whole job can be started again after a node is lost; both run train.py with --resume auto, so either
# continues from the newest complete checkpoint. That needs run_name=... (so "newest" means this run, not
# another one under output_dir) and output_dir on a filesystem every node sees (rank 0 writes the
# checkpoints; every rank reads them on resume). See docs/multinode.md.
set -euo pipefail

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1, this node)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0, reachable from every node)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
PYTHON="${PYTHON:-python}"

if ! printf '%s\n' "$@" | grep -q '^run_name='; then
    echo "multinode_torchrun.sh: pass run_name=NAME; --resume auto must find this run's checkpoints" >&2
    exit 2
fi
for arg in "$@"; do
    if [ "$arg" = "--resume" ]; then
        echo "multinode_torchrun.sh: --resume is set here (auto); do not pass it" >&2
        exit 2
    fi
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# exec: the caller's signals (and a SIGKILL of this process group) reach torchrun and its workers.
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --max-restarts "$MAX_RESTARTS" \
    "$here/train.py" --resume auto "$@"
