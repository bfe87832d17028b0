"""The embedding API (dimat.Node) driven by a user's own loop gives exactly what ``dimat run`` gives.

The loop below is written the way a user would write it (plain PyTorch training, one Node per agent over the
in-process transport); it only reproduces the runner's *choices* (seeds, which local batches the merge reads,
Adam with a fresh optimizer per round), not its code. The runner seeds torch's global RNG before every phase; the
loop here does not, so equal weights also show that nothing in a round depends on that global state.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import dimat
from dimat import checkpoint, cli
from dimat.data import Batches, load_dataset, partition_dataset
from dimat.models import build
from dimat.topology import Topology
from dimat.transport.inproc import make_inproc

CONFIG = {
    "seed": 3,
    "agents": 4,
    "rounds": 3,
    "topology": "ring",
    "data": {"dataset": "digits", "partition": "dirichlet:1.0"},
    "model": {"name": "cnn", "width": 0.25},
    "train": {"optimizer": "adam", "lr": 0.003, "epochs": 1, "batch_size": 64, "pretrain_epochs": 1},
    "merge": {"stat_batches": 3, "bn_batches": None},
}


def user_loop(cfg: dict, method: str) -> list:
    """The agents trained and merged by a hand-written loop around dimat.Node; final state_dicts."""
    seed, n, bs = cfg["seed"], cfg["agents"], cfg["train"]["batch_size"]
    ds = load_dataset(cfg["data"]["dataset"], seed=seed)
    topology = Topology.from_spec(cfg["topology"], n, seed=seed)
    parts = partition_dataset(ds, n, cfg["data"]["partition"], seed=seed)
    transports = make_inproc([topology.neighbors(k) for k in range(n)])
    nodes, data, gens = [], [], []
    for k, (train_idx, _) in enumerate(parts):
        torch.manual_seed(seed + k)
        model = build(cfg["model"]["name"], ds.num_classes, width=cfg["model"]["width"],
                      in_channels=ds.in_channels, image_size=ds.image_size)
        # The runner lets the merge read the local data in one fixed shuffled order (sorted rows would show a
        # merge a single class); a user may pass any batches, this one passes the same ones.
        order = np.random.default_rng([seed, k, 2]).permutation(train_idx)
        local = Batches(ds.x_train, ds.y_train, order, batch_size=bs)
        m = cfg["merge"]
        nodes.append(dimat.Node(model, topology, k, transports[k], local, method=method,
                                stat_batches=m["stat_batches"], bn_batches=m["bn_batches"]))
        data.append((ds.x_train[torch.as_tensor(train_idx)], ds.y_train[torch.as_tensor(train_idx)]))
        gens.append(torch.Generator().manual_seed(seed + k))

    def train(node, x, y, gen, epochs):
        opt = torch.optim.Adam(node.model.parameters(), lr=cfg["train"]["lr"])
        node.model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(bs):
                opt.zero_grad()
                F.cross_entropy(node.model(x[idx]), y[idx]).backward()
                opt.step()

    for node, (x, y), gen in zip(nodes, data, gens):
        train(node, x, y, gen, cfg["train"]["pretrain_epochs"])
    rounds = cfg["rounds"]
    for r in range(rounds):
        for node in nodes:
            node.post(r)
        for node in nodes:
            result = node.merge_round(r)
            assert result.received == sorted(topology.neighbors(node.rank)) and not result.missing
        if r < rounds - 1:  # DIMAT: no training after the last merge
            for node, (x, y), gen in zip(nodes, data, gens):
                train(node, x, y, gen, cfg["train"]["epochs"])
    for t in transports:
        t.close()
    return [node.model.state_dict() for node in nodes]


def dimat_run(cfg: dict, method: str, tmp_path: Path) -> list:
    """The same config through the ``dimat run`` command; the agents' final state_dicts from the checkpoints."""
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({**cfg, "merge": {**cfg["merge"], "method": method}}))
    out = tmp_path / "out"
    assert cli.main(["run", str(cfg_file), "--out", str(out), "--quiet"]) == 0
    last = cfg["rounds"] - 1
    return [checkpoint.load(out / "checkpoints", k, last)["model"] for k in range(cfg["agents"])]


# dimat with the operator's own BN reset and REPAIR (the default), wa with the node's separate BN-reset budget.
@pytest.mark.parametrize("method, bn_batches", [("dimat", None), ("wa", 2)])
def test_node_loop_gives_the_same_weights_as_dimat_run(method, bn_batches, tmp_path, capsys):
    cfg = {**CONFIG, "merge": {**CONFIG["merge"], "bn_batches": bn_batches}}
    mine = user_loop(cfg, method)
    theirs = dimat_run(cfg, method, tmp_path)
    assert "final mean accuracy" in capsys.readouterr().out
    for k, (a, b) in enumerate(zip(mine, theirs)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"agent {k}: {name} differs (max {(a[name] - b[name]).abs().max()})"
    # The comparison is not vacuous: agents differ from each other and from a fresh model.
    assert not torch.equal(mine[0]["features.0.weight"], mine[1]["features.0.weight"])


def test_node_merges_in_place_and_keeps_the_parameter_tensors():
    ds = load_dataset("digits")
    topology = Topology.from_spec("ring", 3)
    transports = make_inproc([topology.neighbors(k) for k in range(3)])
    models = []
    for k in range(3):
        torch.manual_seed(k)
        models.append(build("mlp", ds.num_classes, width=0.25, in_channels=1, image_size=8))
    nodes = [dimat.Node(m, topology, k, transports[k], None, method="wa") for k, m in enumerate(models)]
    params = [p for p in models[0].parameters()]
    before = {k: v.clone() for k, v in models[0].state_dict().items()}
    for n in nodes:
        n.post(0)
    result = nodes[0].merge_round(0)
    assert nodes[0].model is models[0] and list(models[0].parameters()) == params
    expected = sum(w * {0: before, 1: models[1].state_dict(), 2: models[2].state_dict()}[j]["fc1.weight"]
                   for j, w in result.weights.items())
    torch.testing.assert_close(models[0].fc1.weight, expected, rtol=0, atol=1e-6)
    assert sum(result.weights.values()) == pytest.approx(1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grpc_transports(topology: Topology, n: int) -> list:
    from dimat.transport import create

    for _ in range(3):  # a probed port can be taken by another program before we bind it: try new ports
        peers = {k: f"127.0.0.1:{_free_port()}" for k in range(n)}
        made = []
        try:
            for k in range(n):
                made.append(create("grpc", k, topology, {"deadline_s": 20.0, "secret": "test"}, peers=peers))
            return made
        except Exception:
            for t in made:
                t.close()
    pytest.fail("could not bind gRPC servers on 127.0.0.1")


def test_node_over_grpc_gives_the_same_weights_as_over_inproc():
    ds = load_dataset("digits")
    topology = Topology.from_spec("ring", 4)
    batches = [(ds.x_train[i * 50:(i + 1) * 50], ds.y_train[i * 50:(i + 1) * 50]) for i in range(3)]

    def run(transports):
        nodes = []
        for k in range(4):
            torch.manual_seed(k)
            model = build("mlp", ds.num_classes, width=0.25, in_channels=1, image_size=8)
            nodes.append(dimat.Node(model, topology, k, transports[k], batches, method="dimat"))
        for r in range(2):
            for node in nodes:
                node.post(r)
            for node in nodes:
                result = node.merge_round(r)
                assert not result.missing and result.bytes_received > 0
            for node in nodes:  # some local change between the rounds
                with torch.no_grad():
                    node.model.fc1.weight.mul_(1.0 + 0.1 * node.rank)
        for t in transports:
            t.close()
        return [node.model.state_dict() for node in nodes]

    over_inproc = run(make_inproc([topology.neighbors(k) for k in range(4)]))
    over_grpc = run(_grpc_transports(topology, 4))
    for a, b in zip(over_inproc, over_grpc):
        assert all(torch.equal(a[k], b[k]) for k in a)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embed_loop.py"


def test_embed_loop_example_runs(capsys):
    spec = importlib.util.spec_from_file_location("embed_loop", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    accs = mod.main(["--rounds", "2", "--epochs", "1", "--method", "dimat"])
    out = capsys.readouterr().out
    assert out.count("test accuracy after merge") == 2
    assert len(accs) == 3 and min(accs) > 0.3  # 2 epochs on digits: far above chance (0.1)
