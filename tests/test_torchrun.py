"""`torchrun --standalone --nproc-per-node 4 -m dimat agent CONFIG --transport torch` completes (issue 4, CLI):
every rank runs its rounds over torch.distributed (gloo), writes its metrics and checkpoint, and rank 0 writes the
run's metrics.jsonl and summary.json once all ranks are done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dimat import launcher
from dimat.metrics import read_metrics

CONFIG = {
    "agents": 4,
    "rounds": 2,
    "topology": "ring",
    "data": {"dataset": "synthetic:train=800,test=200"},
    "model": {"name": "mlp", "width": 0.25},
    "train": {"epochs": 1},
    "transport": {"deadline_s": 30},
}


def test_torchrun_four_agents(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps(CONFIG))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "-m", "dimat", "agent", str(cfg), "--transport", "torch", "--out", str(out)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:]

    recs = read_metrics([launcher.agent_metrics_path(out, k) for k in range(4)])
    merges = [(r["agent"], r["round"]) for r in recs if r["phase"] == "merge"]
    assert sorted(merges) == [(k, r) for k in range(4) for r in range(2)]
    # Every neighbour's snapshot arrived: torch.distributed exchanges are not skipped.
    assert all(len(r["received"]) == 2 and not r["missing"] for r in recs if r["phase"] == "merge")
    for k in range(4):
        state = torch.load(out / "checkpoints" / f"agent-{k}.pt", map_location="cpu", weights_only=True)
        assert state["round"] == 1
    assert len(read_metrics([out / "metrics.jsonl"])) == len(recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["agents"] == 4 and None not in summary["per_agent_acc"]


@pytest.mark.slow
def test_multi_node_script_two_nodes_on_localhost(tmp_path):
    """launch/torchrun-multi-node.sh run twice (NODE_RANK 0 and 1, two agents each) as two 'nodes' of one job."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps(CONFIG))
    out = tmp_path / "out"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(launcher.free_ports(1)[0]), NNODES="2",
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    script = str(Path(__file__).resolve().parents[1] / "launch" / "torchrun-multi-node.sh")
    nodes = [subprocess.Popen(["bash", script, str(cfg), str(out)], env=dict(env, NODE_RANK=str(k)), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (1, 0)]
    try:
        texts = [p.communicate(timeout=150)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(texts)[-6000:]
    recs = read_metrics([launcher.agent_metrics_path(out, k) for k in range(4)])
    assert sorted((r["agent"], r["round"]) for r in recs if r["phase"] == "merge") == [(k, r) for k in range(4)
                                                                                      for r in range(2)]
