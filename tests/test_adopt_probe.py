"""benchmarks/adopt_probe.py: the probe's rule, and the script on a run folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks.adopt_probe import features, probe_accuracy
from dimat.config import resolve
from dimat.runner import run

ROOT = Path(__file__).resolve().parents[1]


def test_probe_separates_informative_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    informative = torch.nn.functional.one_hot(y, 4).double() * 3 + 0.1 * torch.randn(400, 4, generator=g).double()
    noise = torch.randn(400, 8, generator=g).double()
    assert probe_accuracy(informative[:200], y[:200], informative[200:], y[200:]) == 1.0
    assert probe_accuracy(noise[:200], y[:200], noise[200:], y[200:]) < 0.45  # chance is 0.25


def test_features_are_the_input_of_the_last_linear_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(12, 5)
    torch.testing.assert_close(features(model, x, batch=5), torch.relu(model[0](x)).double())


def _run(tmp_path: Path, rounds: int) -> Path:
    cfg = resolve({"agents": 3, "rounds": rounds, "threads": 1, "seed": 0,
                   "data": {"dataset": "synthetic:train=300,test=90,features=16", "partition": "classes"},
                   "model": {"width": 0.25}, "train": {"epochs": 1, "pretrain_epochs": 1, "batch_size": 50},
                   "merge": {"stat_batches": 2}})
    out = tmp_path / f"r{rounds}"
    run(cfg, out, quiet=True)
    return out


def test_script_reports_every_agent_and_refuses_a_run_past_its_first_round(tmp_path):
    ok = subprocess.run([sys.executable, "benchmarks/adopt_probe.py", str(_run(tmp_path, 1))], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert sum(line.startswith("  agent ") for line in lines) == 3
    assert "ratio neighbour / own" in lines[-1]
    bad = subprocess.run([sys.executable, "benchmarks/adopt_probe.py", str(_run(tmp_path, 2))], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--set rounds=1" in bad.stderr
