#!/usr/bin/env bash
# Several nodes, torch.distributed under torchrun. Run this once on EVERY node, with the same CONFIG:
#
#   MASTER_ADDR=node0.example.org NNODES=2 NODE_RANK=0 launch/torchrun-multi-node.sh CONFIG [OUT] [flags]   # node 0
#   MASTER_ADDR=node0.example.org NNODES=2 NODE_RANK=1 launch/torchrun-multi-node.sh CONFIG [OUT] [flags]   # node 1
#
# NPROC agents per node (default: agents / NNODES); the config's `agents` must equal NNODES * NPROC.
# Static rendezvous (--node-rank, --master-addr, --master-port) makes global rank = NODE_RANK * NPROC + local
# rank on every start, so that `--resume` finds each agent's checkpoint on the node that wrote it (a dynamic c10d
# rendezvous could hand ranks out in another order). Each node writes its own agents' files under OUT; the
# MASTER_PORT (default 29500) must be reachable from every node. The torch transport uses gloo (see
# docs/transport.md for nccl on GPU nodes).
set -euo pipefail
config=${1:?usage: $0 CONFIG [OUT] [dimat agent flags...]}
out=${2:-runs/$(basename "${config%.*}")-torch}
shift $(( $# >= 2 ? 2 : 1 ))
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of node 0}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to the index of this node, 0..NNODES-1}"
python=${PYTHON:-python}
agents=$("$python" -c "import sys; from dimat.config import load_config; print(load_config(sys.argv[1]).agents)" "$config")
nproc=${NPROC:-$(( agents / NNODES ))}
if (( nproc * NNODES != agents )); then
    echo "$0: the config has $agents agents, which is not NNODES ($NNODES) x NPROC ($nproc)" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$python" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$nproc" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" \
    -m dimat agent "$config" --transport torch --out "$out" "$@"
