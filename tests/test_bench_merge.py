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


def test_bad_seeds_are_user_errors(capsys):
    assert cli.main(["bench", "merge", "--seeds", "1,x"]) == 2
    assert "--seeds: expected comma-separated integers" in capsys.readouterr().err


def _tiny_npz(path):
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), y_train=rng.integers(0, 3, 40),
             x_test=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), y_test=rng.integers(0, 3, 20))


USER_NET = """\
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x, return_features=False):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return (self.fc(h), h) if return_features else self.fc(h)


def tiny_net(num_classes, width=1, in_channels=3, image_size=32):
    return Tiny(num_classes, in_channels)
"""


def test_accuracy_run_takes_a_user_model_and_keeps_its_endpoints(tmp_path, capsys, monkeypatch):
    # a user factory (package.module:factory), a given data file, seeds, and endpoints reused by a second run
    (tmp_path / "bench_user_net.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    _tiny_npz(tmp_path / "tiny.npz")
    argv = ["bench", "merge", "--part", "accuracy", "--data", str(tmp_path / "tiny.npz"),
            "--models", "bench_user_net:tiny_net", "--epochs", "1", "--seeds", "3,4",
            "--stat-batches", "2", "--batch-size", "10", "--endpoints", str(tmp_path / "ends"),
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    assert "trained, trained" in first.err and "| endpoints (seed 3 / seed 4) |" in first.out
    assert len(list((tmp_path / "ends").glob("*.pt"))) == 2
    assert cli.main(argv) == 0
    second = capsys.readouterr()
    assert f"loaded from {tmp_path / 'ends'}, loaded from" in second.err
    table = lambda out: [line for line in out.splitlines() if line.startswith("| endpoints")]  # noqa: E731
    assert table(first.out) == table(second.out)
    report = json.loads((tmp_path / "out" / "merge.json").read_text())
    res = report["accuracy"]["results"]["bench_user_net:tiny_net"]
    assert res["seeds"] == [3, 4] and res["epochs"] == 1 and "activation_match" in res
