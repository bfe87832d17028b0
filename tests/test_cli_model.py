"""``dimat model show`` and the coverage report of ``dimat run``: what merges align, and one warning when not all."""

from __future__ import annotations

import json

import torch
from torch import nn

from dimat.cli import main


class CumsumNet(nn.Module):
    """A cumulative sum across hidden units: no permutation of them keeps the function, so they stay unaligned."""

    def __init__(self, num_classes=3, width=1.0, in_channels=1, image_size=8, features=8):
        super().__init__()
        self.fc1 = nn.Linear(features, 16)
        self.fc2 = nn.Linear(16, 12)
        self.out = nn.Linear(12, num_classes)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        h = torch.cumsum(h, dim=1)
        return self.out(torch.relu(self.fc2(h)))


def cumsum_net(num_classes, width=1.0, in_channels=1, image_size=8):
    return CumsumNet(num_classes)


def test_model_show_zoo(capsys):
    assert main(["model", "show", "cnn", "--input-shape", "1,8,8", "--classes", "4"]) == 0
    out = capsys.readouterr().out
    assert "coverage: 100.0% of hidden-unit parameters in permuted groups" in out
    assert "group 0 [features.0] size 32, permuted" in out and "FROZEN: reaches the network output" in out


def test_model_show_factory_names_what_is_frozen_and_why(capsys):
    assert main(["model", "show", "test_cli_model:cumsum_net", "--input-shape", "8", "--classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "[fc1] size 16, FROZEN: aten op cumsum is not understood" in out
    assert "[fc2] size 12, permuted" in out
    cov = next(line for line in out.splitlines() if line.startswith("coverage:"))
    assert "fc1: aten op cumsum is not understood" in cov and not cov.startswith("coverage: 100")


def test_model_show_bad_input(capsys):
    assert main(["model", "show", "cnn", "--input-shape", "a,b"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["model", "show", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["model", "show", "mlp", "--input-shape", "5"]) == 2  # the mlp wants 3 x 32 x 32 images
    assert "cannot run on inputs of shape" in capsys.readouterr().err


RUN = """\
agents: 2
threads: 1
rounds: 1
data:
  dataset: synthetic:train=80,test=20,features=8
model:
  name: {model}
merge:
  method: dimat
train:
  epochs: 1
  batch_size: 40
"""


def test_run_warns_once_and_records_coverage(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(RUN.format(model="test_cli_model:cumsum_net"))
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "can align only" in line]
    assert len(lines) == 1 and "fc1: aten op cumsum is not understood" in lines[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    cov = summary["merge_coverage"]
    assert 0 < cov["fraction"] < 1 and cov["not_permuted"][0]["group"] == "fc1"


def test_run_of_an_aligned_model_does_not_warn(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(RUN.format(model="mlp") + "  \n")
    cfg.write_text(cfg.read_text().replace("model:\n  name: mlp", "model:\n  name: mlp\n  width: 0.125"))
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 0
    assert "can align only" not in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["merge_coverage"]["fraction"] == 1.0
