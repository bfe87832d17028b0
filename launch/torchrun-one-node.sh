#!/usr/bin/env bash
# One node, one process per agent, torch.distributed (gloo on CPU, nccl on GPUs) under torchrun.
#
#   launch/torchrun-one-node.sh CONFIG [OUT] [extra dimat agent flags, e.g. --resume]
#
# NPROC (default: the config's `agents`) processes are started; torchrun gives each its RANK and WORLD_SIZE and
# picks a free rendezvous port (--standalone). Every rank writes OUT/metrics/agent-K.jsonl and
# OUT/checkpoints/agent-K.pt; `dimat launch CONFIG --transport torch` does the same without torchrun and also
# aggregates OUT/metrics.jsonl and OUT/summary.json.
set -euo pipefail
config=${1:?usage: $0 CONFIG [OUT] [dimat agent flags...]}
out=${2:-runs/$(basename "${config%.*}")-torch}
shift $(( $# >= 2 ? 2 : 1 ))
python=${PYTHON:-python}
nproc=${NPROC:-$("$python" -c "import sys; from dimat.config import load_config; print(load_config(sys.argv[1]).agents)" "$config")}
# One intra-op thread per process unless told otherwise: N processes share the node's cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$python" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$nproc" \
    -m dimat agent "$config" --transport torch --out "$out" "$@"
