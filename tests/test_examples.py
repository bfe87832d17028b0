"""The shipped example files stay valid as the schema grows, and the example scripts run."""

import runpy
import sys
from pathlib import Path

import pytest

from dimat.config import load_config
from dimat.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(
    [*ROOT.glob("examples/*.yaml"), *ROOT.glob("docs/benchmarks/*.yaml"), *ROOT.glob("launch/**/cluster.yaml")]
)
TOPOLOGIES = sorted([*ROOT.glob("examples/topologies/*.yaml"), *ROOT.glob("examples/topologies/*.json")])


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_run_config_loads(path):
    cfg = load_config(path)
    assert cfg["agents"] >= 1 and cfg["rounds"] >= 1


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_topology_loads(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an example may be asymmetric on purpose
        topo = Topology.load(path)
    assert topo.num_agents >= 2


def test_there_are_examples_to_check():
    assert any(p.name == "quickstart.yaml" for p in RUN_CONFIGS) and TOPOLOGIES


def test_disjoint_merge_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["disjoint_merge.py", "--data", "digits", "--epochs", "1", "--width", "0.25"])
    runpy.run_path(str(ROOT / "examples" / "disjoint_merge.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "endpoints (full test set)" in out
    assert out.count("activation_match") == 2  # own half and union
