"""``dimat bench accuracy`` on a tiny digits grid: outputs parse, bytes are what the methods send, cells resume."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dimat import models
from dimat.cli import main
from dimat.node import with_basis_tag
from dimat.transport.base import snapshot_nbytes

CONFIG = """\
agents: 3
rounds: 2
topology: ring
model: {name: mlp, width: 0.25}
train: {epochs: 1, batch_size: 200, lr: 0.01}
merge: {stat_batches: 2, bn_batches: 2}
"""


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    (d / "c.yaml").write_text(CONFIG)
    out = d / "out"
    argv = ["bench", "accuracy", str(d / "c.yaml"), "--methods", "dimat,cdsgd,centralised", "--out", str(out)]
    assert main(argv) == 0
    return d, out, argv


def test_results_json_holds_one_row_per_method_with_parsable_figures(bench):
    _, out, _ = bench
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["results"]}
    assert list(rows) == ["dimat", "cdsgd", "centralised"]
    for r in rows.values():
        assert 0 <= r["final_acc_mean"] <= 1 and r["final_acc_std"] == 0.0 and r["seeds"] == [0]
        assert r["partition"] == "iid" and r["topology"] == "ring"
        assert r["rounds"] == [0, 1] and len(r["acc_by_round"]) == 2
        assert r["train_s"] > 0 and r["wall_s"] > 0
    assert rows["centralised"]["agents"] == 1 and rows["centralised"]["comm_bytes_per_agent"] == 0
    assert len(res["cells"]) == 3 and "bench accuracy" in res["command"]


def test_bytes_per_agent_are_the_snapshots_each_method_exchanges(bench):
    _, out, _ = bench
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    snap = snapshot_nbytes(models.build("mlp", 10, width=0.25, in_channels=64, image_size=1).state_dict())
    tag = snapshot_nbytes(with_basis_tag({}, 0))  # dimat's snapshots carry the basis tag (basis shared)
    counts = 10 * 8  # and the agent's samples per class (merge.head auto: label_counts), 10 float64 values
    # Ring of 3: each agent sends to 2 neighbours and receives from 2, per exchange.
    assert rows["dimat"]["comm_bytes_per_agent"] == 2 * 4 * (snap + tag + counts)  # one merge per round, 2 rounds
    cells = {c["method"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    lines = (out / "cells" / "cdsgd-iid-ring-seed0" / "metrics.jsonl").read_text().splitlines()
    train = next(r for r in map(json.loads, lines) if r["phase"] == "train" and r["agent"] == 0)
    steps = train["comm_bytes"] // (4 * snap)  # one exchange per local step of the one training round
    assert steps >= 2 and train["comm_bytes"] == steps * 4 * snap
    assert cells["cdsgd"]["comm_bytes_per_agent"] == steps * 4 * snap


def test_markdown_table_and_plots_are_written(bench):
    _, out, _ = bench
    md = (out / "results.md").read_text()
    assert md.count("\n| ") >= 4 and "| dimat | iid | ring | 1 |" in md
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_rerunning_skips_finished_cells(bench, capsys):
    _, out, argv = bench
    before = json.loads((out / "results.json").read_text())["results"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("done already, skipped") == 3
    after = json.loads((out / "results.json").read_text())["results"]
    assert [r["final_acc_mean"] for r in after] == [r["final_acc_mean"] for r in before]


@pytest.mark.parametrize("flags, msg", [
    (["--methods", "dimat,sgpp"], "unknown method 'sgpp'"),
    (["--methods", ""], "--methods: give at least one value"),
    (["--methods", "wa,wa"], "'wa' is listed twice"),
    (["--methods", "wa", "--seeds", "0,x"], "seeds must be integers"),
    (["--methods", "wa", "--partitions", "dirichlet:abc"], "bench cell wa/dirichlet:abc/ring/seed 0"),
    (["--methods", "wa", "--topologies", "moebius"], "moebius"),
])
def test_bad_input_is_one_error_line_and_runs_nothing(tmp_path, capsys, flags, msg):
    (tmp_path / "c.yaml").write_text(CONFIG)
    out = tmp_path / "out"
    assert main(["bench", "accuracy", str(tmp_path / "c.yaml"), *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dimat: error:") and msg in err
    assert not out.exists()


def test_out_that_is_a_file_is_an_error(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(CONFIG)
    (tmp_path / "out").write_text("")
    assert main(["bench", "accuracy", str(tmp_path / "c.yaml"), "--methods", "wa", "--out", str(tmp_path / "out")]) == 2
    assert "must be a folder" in capsys.readouterr().err
