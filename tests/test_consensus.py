"""model.init (same or different initialisations) and the simulation's per-round consensus model."""

import json
import math

import pytest
import torch

from dimat.build import build_agent, prepare
from dimat.config import resolve
from dimat.errors import UserError
from dimat.runner import run


@pytest.mark.parametrize("init, same", [("same", True), ("different", False)])
def test_model_init_same_gives_every_agent_one_initialisation(init, same):
    cfg = resolve({"agents": 3, "rounds": 1, "model": {"init": init}})
    setup = prepare(cfg)
    from dimat.transport.inproc import make_inproc

    ts = make_inproc([setup.topology.neighbors(k) for k in range(3)])
    states = [build_agent(cfg, setup, k, ts[k]).model.state_dict() for k in range(3)]
    equal = all(torch.equal(states[0][n], s[n]) for s in states[1:] for n in states[0])
    assert equal is same


def test_consensus_records_one_merged_model_per_round(tmp_path):
    cfg = resolve({"agents": 3, "rounds": 2, "threads": 1, "train": {"epochs": 1}, "merge": {"stat_batches": 2},
                   "eval": {"consensus": True}})
    summary = run(cfg, out_dir=tmp_path / "r", quiet=True)
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    cons = [r for r in recs if r["phase"] == "consensus"]
    assert [r["round"] for r in cons] == [0, 1] and all(r["agent"] == -1 for r in cons)
    assert all(0.2 < r["test_acc"] <= 1 and math.isfinite(r["test_loss"]) for r in cons)  # 10 digit classes
    assert len(summary["per_agent_acc"]) == 3 and None not in summary["per_agent_acc"]


@pytest.mark.parametrize("extra", [{"transport": {"name": "grpc"}}, {"merge": {"method": "cdsgd"}}])
def test_consensus_outside_the_simulation_is_refused(extra):
    with pytest.raises(UserError, match="eval.consensus"):
        resolve({"eval": {"consensus": True}, **extra}, where="run.yaml")
