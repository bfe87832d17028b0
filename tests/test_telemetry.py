"""Merge telemetry: alignment figures, units moved, distances, and their place in a run's merge records."""

import json
import math

import pytest
import torch

from dimat.merge import telemetry

T = torch.tensor


def test_alignment_by_hand():
    c = {0: T([[0.2, 0.9], [0.8, 0.1]], dtype=torch.float64), 1: T([[1.0]], dtype=torch.float64)}
    got = telemetry.alignment(c, {0: T([1, 0])})  # group 1 missing: identity
    # before: (0.2 + 0.1 + 1.0) / 3; after: (0.9 + 0.8 + 1.0) / 3; moved 2 of 3 units
    assert got == pytest.approx({"corr_before": 1.3 / 3, "corr_after": 2.7 / 3, "moved": 2 / 3})
    assert math.isnan(telemetry.alignment({}, {})["corr_before"])


def test_units_moved_and_distance_by_hand():
    assert telemetry.units_moved({0: T([0, 2, 1]), 1: T([0, 1])}, {0: 3, 1: 2}) == pytest.approx(2 / 5)
    assert telemetry.units_moved({}, {}) == 0.0
    a = {"w": T([3.0, 4.0]), "n": T(1), "rm": T([100.0])}
    b = {"w": T([3.0, 0.0]), "n": T(7), "rm": T([0.0])}
    assert telemetry.distance(a, b, {"w"}) == pytest.approx(4 / 5)  # integers and unnamed tensors left out


def test_run_writes_per_edge_telemetry_and_plot_draws_it(tmp_path):
    from dimat.config import resolve
    from dimat.plot import plot_accuracy, run_curve
    from dimat.runner import run

    cfg = resolve({"agents": 3, "rounds": 2, "threads": 1, "train": {"epochs": 1},
                   "merge": {"stat_batches": 2, "basis": "own"}})  # every edge aligned in every round
    run(cfg, out_dir=tmp_path / "r", quiet=True)
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    merges = [r for r in recs if r["phase"] == "merge"]
    assert len(merges) == 6
    for r in merges:
        assert sorted(r["edges"]) == sorted(str(j) for j in r["received"])
        for e in r["edges"].values():
            assert 0 <= e["moved"] <= 1 and -1 <= e["corr_before"] <= e["corr_after"] + 1e-9 <= 1 + 1e-9
            assert e["dist"] > 0
        assert r["units_moved"] == pytest.approx(sum(e["moved"] for e in r["edges"].values()) / 2)
        assert r["align_corr_after"] > r["align_corr_before"]  # different inits: alignment gains correlation
    # the accuracy change across a merge: against the agent's previous (training) record
    for r in (x for x in merges if x["round"] == 1):
        prev = next(x for x in recs if x["phase"] == "train" and x["round"] == 0 and x["agent"] == r["agent"])
        assert r["acc_change"] == pytest.approx(r["test_acc"] - prev["test_acc"])
    rounds, mean, lo, hi = run_curve(tmp_path / "r", metric="units_moved")
    assert rounds == [0, 1] and all(0 < m <= 1 for m in mean)
    out = plot_accuracy([tmp_path / "r"], tmp_path / "m.png", metric="consensus_dist")
    assert out.stat().st_size > 0
    from dimat.cli import main as cli_main
    from dimat.errors import UserError

    with pytest.raises(UserError, match="no 'merge' records with 'nope'"):
        run_curve(tmp_path / "r", metric="nope")
    assert cli_main(["plot", str(tmp_path / "r"), "--metric", "align_corr_after"]) == 0
    assert (tmp_path / "r" / "align_corr_after.png").stat().st_size > 0
    assert cli_main(["plot", str(tmp_path / "r"), "--metric", "nope"]) != 0
