#!/usr/bin/env bash
# Multi-node PT-PEFT training with torchrun. Run it once on every node, with the same arguments:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-0 MASTER_PORT=29500 NPROC_PER_NODE=4 \
#       launchers/multinode_torchrun.sh --ds ds_configs/zero3.json run_name=exp1 output_dir=/shared/runs
#   (the same on node-1 with NODE_RANK=1)
#
# Environment: NNODES, NODE_RANK, MASTER_ADDR (required); MASTER_PORT (29500); NPROC_PER_NODE (ranks on
# this node, default 1); MAX_RESTARTS (torchrun --max-restarts, default 0); PYTHON (python). Everything
# after the script name goes to launchers/train.py.
#
# train.py always gets --resume auto: a first start finds no checkpoint and starts fresh; a restart
# continues from the newest complete checkpoint. That needs run_name=... (so "newest" means this run)
# and output_dir on a filesystem every node sees (rank 0, on node 0, writes the checkpoints; every rank
# reads them on resume). After a failure, start the script again on every node (checked by
# tests/training/test_multinode.py). MAX_RESTARTS > 0 lets torchrun restart the workers in place
# instead, but on this project's CPU/gloo machine the restarted workers could not reconnect across
# nodes (gloo: connection refused to the dead workers' old addresses); see docs/multinode.md.
set -euo pipefail

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1, this node)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0, reachable from every node)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
PYTHON="${PYTHON:-python}"

run_name=""
for arg in "$@"; do
    case "$arg" in
        run_name=*) run_name="${arg#run_name=}" ;;
        --resume|--resume=*)
            echo "multinode_torchrun.sh: --resume is set here (auto); do not pass it" >&2
            exit 2 ;;
    esac
done
if [ -z "$run_name" ]; then
    echo "multinode_torchrun.sh: pass run_name=NAME; --resume auto must find this run's checkpoints" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# exec: signals sent to this script reach torchrun itself. SIGTERM / SIGINT make torchrun stop its
# workers; a SIGKILL of torchrun does not (torch elastic starts each worker in a session of its own).
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --max-restarts "$MAX_RESTARTS" \
    "$here/train.py" --resume auto "$@"
