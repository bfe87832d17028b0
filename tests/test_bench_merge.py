"""Smoke tests for ``dimat bench merge`` (tiny settings; the benchmark itself is never a timed test)."""

from __future__ import annotations

import json

import pytest

from dimat import cli


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "cnn6"], "--epochs: expected name:epochs"),
        (["--widths", "a"], "--widths: expected comma-separated integers"),
        (["--neighbours", "0"], "--neighbours: expected positive integers"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--part", "accuracy", "--data", "/nonexistent/tin20.npz"], "tin20-dev.npz not found"),
    ],
)
def test_bad_flags_are_user_errors(argv, message, capsys):
    assert cli.main(["bench", "merge", *argv]) == 2
    assert message in capsys.readouterr().err


def test_tiny_timing_run_writes_its_tables(tmp_path, capsys):
    argv = ["bench", "merge", "--part", "timing", "--widths", "1", "--neighbours", "1", "--stat-batches", "1",
            "--batch-size", "4", "--repeats", "1", "--epoch-images", "8", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "merge.json").read_text())
    (row,) = report["timing"]["rows"]
    assert row["width"] == 1 and row["neighbours"] == 1 and row["total_s"] > 0
    assert row["total_s"] >= row["stats_s"] + row["bn_reset_s"]
    assert "| 1 | 1 |" in (tmp_path / "merge.md").read_text()
    assert "dimat bench merge --part timing" in capsys.readouterr().out
