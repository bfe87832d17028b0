"""``dimat run``: a working run from the command line, and every bad input as exit 2 with one line, no output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dimat.cli import main

TINY = """\
agents: 3
threads: 1
rounds: 2
data:
  dataset: synthetic:train=150,test=30,features=8
model:
  width: 0.25
merge:
  method: wa
train:
  epochs: 1
  batch_size: 50
"""


def write(path, text):
    path.write_text(text)
    return path


def run_cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_run_with_set_and_out(tmp_path, capsys):
    cfg = write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["run", str(cfg), "--set", "train.lr=0.01", "--set", "seed=3", "--out", str(out),
                               "--quiet"], capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(stdout.splitlines()[0]) == summary
    resolved = (out / "config.yaml").read_text()
    assert "lr: 0.01" in resolved and "seed: 3" in resolved and f"out: {out}" in resolved


def test_resume_flag(tmp_path, capsys):
    cfg = write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "run"
    assert run_cli(["run", str(cfg), "--out", str(out), "-q"], capsys)[0] == 0
    first = json.loads((out / "summary.json").read_text())
    assert run_cli(["run", str(cfg), "--out", str(out), "-q", "--resume"], capsys)[0] == 0
    again = json.loads((out / "summary.json").read_text())
    first.pop("wall_s"), again.pop("wall_s")
    assert first == again
    rc, _, err = run_cli(["run", str(cfg), "--out", str(out), "-q", "--resume", "--set", "rounds=3"], capsys)
    assert rc == 2 and "key 'rounds'" in err


def _topology_file(tmp_path, text):
    return write(tmp_path / "topo.json", text)


def _npz(tmp_path, **arrays):
    p = tmp_path / "data.npz"
    np.savez(p, **arrays)
    return p


RING3 = {"graph_type": "ring", "num_agents": 3, "connectivity": [[1, 1, 1]] * 3, "pi": [[1 / 3] * 3] * 3}


def bad_inputs(tmp_path):
    """(name, config text, extra argv, strings the one-line error must contain)."""
    yield "malformed yaml", "agents: [3\n", [], ["tiny.yaml", "malformed YAML"]
    yield "unknown key", TINY + "merge_method: dimat\n", [], ["tiny.yaml", "unknown key 'merge_method'",
                                                              "did you mean 'merge.method'"]
    yield "unknown set key", TINY, ["--set", "train.epoch=2"], ["unknown key 'train.epoch'", "'train.epochs'"]
    yield "unknown dataset", TINY, ["--set", "data.dataset=mnist"], \
        ["tiny.yaml: data.dataset: unknown dataset 'mnist'"]
    yield "unknown model", TINY, ["--set", "model.name=transformer"], \
        ["tiny.yaml: model.name: unknown model 'transformer'"]
    yield "unknown method", TINY, ["--set", "merge.method=magic"], ["tiny.yaml", "merge.method", "magic"]
    yield "unknown topology", TINY, ["--set", "topology=hypercube"], \
        ["tiny.yaml: topology: unknown topology kind 'hypercube'"]
    yield "unknown partition", TINY, ["--set", "data.partition=halves"], \
        ["tiny.yaml: data.partition: unknown partition 'halves'"]
    topo = _topology_file(tmp_path, "{not json")
    yield "malformed topology file", TINY, ["--set", f"topology={topo}"], [str(topo)]
    bad = dict(RING3, pi=[[0.5, 0.3, 0.1]] + [[1 / 3] * 3] * 2)
    topo = write(tmp_path / "sum.json", json.dumps(bad))
    yield "inconsistent topology file", TINY, ["--set", f"topology={topo}"], [str(topo), "pi"]
    topo = write(tmp_path / "four.json", json.dumps(dict(RING3, num_agents=4)))
    yield "topology field mismatch", TINY, ["--set", f"topology={topo}"], [str(topo), "num_agents"]
    topo = write(tmp_path / "ok3.json", json.dumps(RING3))
    yield "agents differ from topology", TINY, ["--set", f"topology={topo}", "--set", "agents=4"], [str(topo),
                                                                                                   "num_agents"]
    yield "missing data path", TINY, ["--set", f"data.dataset=npz:{tmp_path}/nope.npz"], ["data.dataset", "nope.npz"]
    npz = _npz(tmp_path, x_train=np.zeros((10, 8, 8, 3), np.uint8), y_train=np.zeros(10, np.int64),
               x_test=np.zeros((4, 8, 8, 3), np.uint8))
    yield "npz without y_test", TINY, ["--set", f"data.dataset=npz:{npz}"], [str(npz), "y_test"]
    yield "bad type", TINY, ["--set", "train.lr=fast"], ["train.lr", "must be a number"]
    yield "cnn on flat features", TINY, ["--set", "model.name=cnn"], ["model.name", "cnn"]
    yield "unknown device", TINY, ["--set", "device=tpu"], ["tiny.yaml", "key 'device'", "tpu"]
    # No machine has 100 GPUs: refused with or without CUDA, before anything is written.
    yield "absent gpu", TINY, ["--set", "device=cuda:99"], ["tiny.yaml: device:", "cuda"]


CASES = ["malformed yaml", "unknown key", "unknown set key", "unknown dataset", "unknown model", "unknown method",
         "unknown topology", "unknown partition", "malformed topology file", "inconsistent topology file",
         "topology field mismatch", "agents differ from topology", "missing data path", "npz without y_test",
         "bad type", "cnn on flat features", "unknown device", "absent gpu"]


def test_every_case_is_listed(tmp_path):
    assert [c[0] for c in bad_inputs(tmp_path)] == CASES


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    name, text, extra, needles = next(c for c in bad_inputs(tmp_path) if c[0] == case)
    cfg = write(tmp_path / "tiny.yaml", text)
    out = tmp_path / "run"
    rc, _, err = run_cli(["run", str(cfg), "--out", str(out), "-q", *extra], capsys)
    assert rc == 2, name
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dimat: error: "), (name, err)
    for needle in needles:
        assert needle in lines[0], (name, lines[0])
    assert not out.exists(), name


def test_existing_run_folder_is_refused_without_resume(tmp_path, capsys):
    cfg = write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "run"
    assert run_cli(["run", str(cfg), "--out", str(out), "-q"], capsys)[0] == 0
    rc, _, err = run_cli(["run", str(cfg), "--out", str(out), "-q"], capsys)
    assert rc == 2 and "already holds a run" in err


def test_no_traceback_from_the_real_command(tmp_path):
    cfg = write(tmp_path / "tiny.yaml", "agents: 3\nmerge:\n  metod: wa\n")
    p = subprocess.run([sys.executable, "-m", "dimat", "run", str(cfg), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == f"dimat: error: {cfg}: unknown key 'merge.metod' (did you mean 'merge.method'?)"
    assert not (tmp_path / "r").exists()


TIN20 = Path(os.environ.get("DIMAT_TIN20", Path(__file__).resolve().parents[2] / "shared/data/tin20-dev.npz"))

USER_VIT = """\
import torch
from torch import nn


class ViT(nn.Module):
    def __init__(self, num_classes, dim, depth=2, heads=2, patch=8, in_channels=3, image_size=32):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


def vit(num_classes, width=1, in_channels=3, image_size=32):
    return ViT(num_classes, dim=max(2, int(16 * width)) * 2, in_channels=in_channels, image_size=image_size)
"""


@pytest.mark.skipif(not TIN20.exists(), reason="tin20-dev.npz not available")
def test_run_with_a_user_vit_factory_on_tin20(tmp_path, capsys, monkeypatch):
    # A transformer written by the user (package.module:factory), merged by activation matching, end to end.
    (tmp_path / "user_vit.py").write_text(USER_VIT)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = write(tmp_path / "vit.yaml", f"""\
agents: 2
threads: 1
rounds: 1
topology: fc
data:
  dataset: npz:{TIN20}
model:
  name: user_vit:vit
  width: 0.5
train:
  epochs: 1
  batch_size: 100
merge:
  method: dimat
  stat_batches: 2
""")
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(stdout.splitlines()[0]) == summary
    assert "user_vit:vit" in (out / "config.yaml").read_text()
    accs = [v for k, v in summary.items() if "acc" in k and isinstance(v, (int, float))]
    assert accs and all(0.0 <= a <= 1.0 for a in accs), summary
