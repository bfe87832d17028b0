#!/usr/bin/env bash
# Start one `dimat agent` per host of a gRPC cluster, over ssh, from the peers file.
#
#   launch/grpc-cluster/start-agents.sh CONFIG PEERS [OUT]          # start every agent
#   RANKS="2" RESUME=1 launch/grpc-cluster/start-agents.sh ...     # restart agent 2 from its checkpoint; it rejoins
#   DRY_RUN=1 launch/grpc-cluster/start-agents.sh ...              # print the commands instead of running them
#
# PEERS maps every rank to host:port (the port the agent's server listens on); agent K runs on the host of
# rank K. Each host needs this repository (or `pip install dimat`) at REMOTE_DIR with CONFIG and PEERS at the same
# relative paths, and a Python with dimat installed (PYTHON, default: REMOTE_DIR/.venv/bin/python).
# The agent's log is OUT/logs/agent-K.log on its host; OUT/pids/agent-K.pid holds its pid.
# Authenticate the agents: copy one secret file to every host (chmod 600) and name it in the config
# (transport.secret_file), or export DIMAT_SECRET in the hosts' environment; add TLS with transport.tls_*.
set -euo pipefail
config=${1:?usage: $0 CONFIG PEERS [OUT]}
peers=${2:?usage: $0 CONFIG PEERS [OUT]}
out=${3:-runs/$(basename "${config%.*}")}
remote_dir=${REMOTE_DIR:-\$HOME/dimat}
python=${PYTHON:-.venv/bin/python}
ssh_cmd=${SSH:-ssh -o BatchMode=yes}
resume=${RESUME:+--resume}

# "rank host" per line, validated the way dimat itself reads the file (a bad file stops the script here).
table_text=$(python3 - "$peers" <<'PY'
import json, sys
raw = json.load(open(sys.argv[1]))
peers = raw.get("peers", raw)
ranks = sorted(int(k) for k in peers)
if ranks != list(range(len(ranks))):
    sys.exit(f"{sys.argv[1]}: ranks must be 0..{len(ranks) - 1}, got {ranks}")
for k in ranks:
    host, _, port = peers[str(k)].rpartition(":")
    print(k, host.strip("[]"))
PY
)
mapfile -t table <<<"$table_text"

for line in "${table[@]}"; do
    read -r rank host <<<"$line"
    if [[ -n "${RANKS:-}" && " $RANKS " != *" $rank "* ]]; then
        continue
    fi
    remote="cd $remote_dir && mkdir -p $out/logs && nohup $python -m dimat agent $config --rank $rank \
--transport grpc --peers $peers --out $out $resume >>$out/logs/agent-$rank.log 2>&1 </dev/null &"
    if [[ -n "${DRY_RUN:-}" ]]; then
        echo "$ssh_cmd $host '$remote'"
    else
        echo "starting agent $rank on $host"
        $ssh_cmd "$host" "$remote"
    fi
done
