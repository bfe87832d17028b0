"""dimat plot: accuracy curves (mean, min, max per round) of one or more run folders."""

from __future__ import annotations

import json

import pytest

from dimat.cli import main
from dimat.errors import UserError
from dimat.plot import run_curve


def fake_run(path, accs_by_round, method="dimat", per_agent_files=False):
    """A run folder whose 'merge' records hold the given accuracies (one list of agents per round)."""
    path.mkdir()
    lines = {}
    for r, accs in enumerate(accs_by_round):
        for k, acc in enumerate(accs):
            for phase, a in (("merge", acc), ("train", 0.0)):
                rec = {"round": r, "agent": k, "phase": phase, "test_acc": a}
                lines.setdefault(k, []).append(json.dumps(rec))
    if per_agent_files:
        for k, ls in lines.items():
            (path / f"metrics-agent-{k}.jsonl").write_text("\n".join(ls) + "\n")
    else:
        (path / "metrics.jsonl").write_text("\n".join(sum(lines.values(), [])) + "\n")
    (path / "summary.json").write_text(json.dumps({"method": method}))
    return path


def test_curve_is_mean_min_max_of_merge_records(tmp_path):
    run = fake_run(tmp_path / "a", [[0.2, 0.4, 0.6], [0.5, 0.7, 0.9]])
    rounds, mean, lo, hi = run_curve(run)
    assert rounds == [0, 1]
    assert mean == pytest.approx([0.4, 0.7]) and lo == [0.2, 0.5] and hi == [0.6, 0.9]


def test_per_agent_metric_files_are_read_together(tmp_path):
    run = fake_run(tmp_path / "a", [[0.2, 0.4], [0.5, 0.7]], per_agent_files=True)
    assert run_curve(run)[1] == pytest.approx([0.3, 0.6])


def test_plot_several_runs(tmp_path, capsys):
    a = fake_run(tmp_path / "a", [[0.1, 0.2], [0.3, 0.4]])
    b = fake_run(tmp_path / "b", [[0.2, 0.2], [0.5, 0.6]], method="wa")
    out = tmp_path / "figs" / "acc.png"
    assert main(["plot", str(a), str(b), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(a)]) == 0
    assert (a / "accuracy.png").exists()


def test_bad_runs(tmp_path, capsys):
    with pytest.raises(UserError, match="not a run folder"):
        run_curve(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        run_curve(tmp_path / "empty")
    good = fake_run(tmp_path / "good", [[0.5]])
    out = tmp_path / "acc.png"
    assert main(["plot", str(good), str(tmp_path / "empty"), "-o", str(out)]) == 2
    assert "dimat: error:" in capsys.readouterr().err
    assert not out.exists()  # nothing is drawn unless every run is readable
