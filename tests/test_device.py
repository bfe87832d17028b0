"""The ``device`` key: where the agents' models live (data stay on the CPU and move per batch)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from dimat.cli import main
from dimat.errors import UserError
from dimat.build import resolve_device

CUDA = torch.cuda.is_available()

DIGITS_CNN = """\
agents: 3
threads: 1
rounds: 3
data:
  dataset: digits
  partition: iid
model:
  name: cnn
  width: 0.5
train:
  epochs: 1
  pretrain_epochs: 1
  batch_size: 50
merge:
  method: dimat
  stat_batches: 4
"""


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu_is_a_user_error():
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_run_folder_written_before_the_device_key_resumes(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(DIGITS_CNN.replace("rounds: 3", "rounds: 2").replace("pretrain_epochs: 1", "pretrain_epochs: 0"))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "-q"]) == 0
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored.pop("device") == "cpu"
    (out / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    assert main(["run", str(cfg), "--out", str(out), "-q", "--resume"]) == 0
    stored["device"] = "cuda"
    (out / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    assert main(["run", str(cfg), "--out", str(out), "-q", "--resume"]) == 2
    assert "key 'device'" in capsys.readouterr().err


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["dimat", "wm", "wa", "cdsgd"])
def test_gpu_run_learns_like_the_cpu_run(tmp_path, method):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(DIGITS_CNN)
    acc = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        argv = ["run", str(cfg), "--out", str(out), "-q", "--set", f"device={device}", "--set", f"merge.method={method}"]
        assert main(argv) == 0
        acc[device] = json.loads((out / "summary.json").read_text())["final_mean_acc"]
        state = torch.load(out / "checkpoints" / "agent-0.pt", map_location="cpu", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    # GPU kernels sum in another order: the runs differ in the last bits, then drift apart; not in quality.
    assert acc["cuda"] > 0.5 and abs(acc["cuda"] - acc["cpu"]) < 0.06, acc


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_resume_ends_like_the_uninterrupted_run(tmp_path):
    from dimat.config import resolve
    from dimat.runner import run

    cfg = resolve(yaml.safe_load(DIGITS_CNN + "device: cuda\n"))
    full = run(cfg, tmp_path / "full", quiet=True)
    assert run(cfg, tmp_path / "cut", quiet=True, stop_after_round=0) is None
    resumed = run(cfg, tmp_path / "cut", resume=True, quiet=True)  # loads CPU-mapped checkpoints onto the GPU
    # Same rounds from the same checkpoint; GPU kernels are not bit-reproducible, so compare with a tolerance.
    assert abs(full["final_mean_acc"] - resumed["final_mean_acc"]) < 0.03
    assert full["rounds"] == resumed["rounds"] == 3
