"""Tests for the Flower App in examples/flower-app and the dimat.flower pieces it uses (telemetry, client alignment).

Default suite: no servers. The app's pyproject.toml passes Flower's own validator, the ClientApp's train function
and MessageDimatFedAvg's aggregation run in this process on Flower Messages, and the helpers' bad inputs fail
clearly. Flower's simulation runtime is not used: in flwr 1.41/1.42 its only backend is Ray, which dimat does not
install.

Slow (``python -m pytest -q -m slow tests/test_flower_app.py``): a real deployment on 127.0.0.1 (free ports, FLWR_HOME
in a temp dir): a SuperLink and 3 SuperNodes, `flwr run` for 3 rounds, insecure and with TLS; every process is
stopped at the end.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from dimat import flower
from dimat.flower import ModelAggregator, align_to_local, alignment_telemetry

from test_flower import CALIBRATION, assert_same_weights, make_model, permuted

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower-app"


# ------------------------------------------------------------------------------------------------ telemetry
def test_telemetry_of_permuted_copies_finds_every_moved_unit():
    m = make_model(30)
    t = alignment_telemetry([m, permuted(m, 1), permuted(m, 2)], CALIBRATION)
    assert t["groups"] == 2 and t["units"] == 16 + 10 and len(t["per_model"]) == 2
    assert t["moved_fraction"] > 0.8  # random permutations of 16 and 10 units leave few units in place
    assert t["corr_matched"] == pytest.approx(1.0, abs=1e-6)  # every unit found its exact counterpart
    assert t["corr_identity"] < 0.5


def test_telemetry_of_identical_models_moves_nothing():
    m = make_model(31)
    t = alignment_telemetry([m, copy.deepcopy(m)], CALIBRATION)
    assert t["moved_fraction"] == 0.0 and t["corr_identity"] == pytest.approx(1.0, abs=1e-6)


def test_aggregator_report_says_whether_units_were_matched():
    m = make_model(32)
    results = [(m.state_dict(), 3), (permuted(m, 4).state_dict(), 5)]
    agg = ModelAggregator(make_model(0), CALIBRATION, telemetry=True)
    agg.merge(results)
    r = agg.last_report
    assert r["method"] == "dimat" and r["reference"] == 1 and r["weights"] == [5 / 8, 3 / 8]
    assert {"stats_s", "assign_s"} <= set(r["operator_profile"])  # the operator's matching stages ran
    assert r["alignment"]["moved_fraction"] > 0.5
    wa = ModelAggregator(make_model(0), CALIBRATION, method="wa")
    wa.merge(results)
    assert "stats_s" not in wa.last_report["operator_profile"] and "alignment" not in wa.last_report


def test_telemetry_without_calibration_is_an_error():
    with pytest.raises(ValueError, match="telemetry .* needs calibration"):
        ModelAggregator(make_model(0), telemetry=True)


# ------------------------------------------------------------------------------------ client-side alignment
def test_align_to_local_permutes_the_received_model_into_the_local_units():
    local = make_model(33)
    received = permuted(local, 5)
    out = align_to_local(received, local, CALIBRATION)
    assert_same_weights(out, local, atol=1e-5)  # the received units, put back in the local model's order


def test_align_to_local_keeps_the_received_function():
    local, received = make_model(34), make_model(35)
    out = align_to_local(received, local, CALIBRATION)
    x = torch.cat(CALIBRATION)
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), received.eval()(x), rtol=0, atol=1e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(out.state_dict().values(),
                                                          received.state_dict().values())) > 0.01


def test_align_to_local_with_keep_averages_in_the_local_model():
    local = make_model(36)
    out = align_to_local(permuted(local, 6), local, CALIBRATION, keep=0.5)
    # both halves are the same model once aligned, so the average is that model (BN statistics recomputed)
    for k in ("0.weight", "3.weight", "6.weight"):
        torch.testing.assert_close(out.state_dict()[k], local.state_dict()[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("keep", [-0.1, 1.0, True, "0.5", float("nan")])
def test_align_to_local_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        align_to_local(make_model(1), make_model(2), CALIBRATION, keep=keep)


# -------------------------------------------------------------------------------------- the app, in process
@pytest.fixture
def app_modules(monkeypatch):
    pytest.importorskip("flwr.serverapp.strategy", reason="flwr not installed (see dimat.flower.FLOWER_HINT)")
    monkeypatch.syspath_prepend(str(APP))
    names = ["dimat_flower_app.task", "dimat_flower_app.client_app", "dimat_flower_app.server_app"]
    return [importlib.import_module(n) for n in names]


def run_config(**overrides):
    try:
        import tomllib
    except ImportError:  # Python 3.10; flwr depends on tomli
        import tomli as tomllib

    cfg = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**cfg, **overrides}


def test_app_config_passes_flowers_validator(app_modules):
    from flwr.cli.config_utils import load_and_validate

    config, warnings = load_and_validate(APP / "pyproject.toml", check_module=True)
    assert warnings == []
    assert config["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "dimat_flower_app.server_app:app", "clientapp": "dimat_flower_app.client_app:app"}
    assert "federations" not in config["tool"]["flwr"]  # flwr >= 1.42 would migrate (rewrite) such a section


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(strategy="fedprox"), "'strategy' must be one of both, dimat, fedavg"),
        (dict(merge="x"), "'merge' must be one of"),
        (dict(seed="0"), "'seed' must be a int"),
        (dict(width=True), "'width' must be a float"),
        (dict(**{"client-keep": 1.0}), "'client-keep' is out of range"),
        (dict(**{"calibration-fraction": 0.0}), "'calibration-fraction' is out of range"),
        (dict(**{"num-server-rounds": 0}), "'num-server-rounds' is out of range"),
    ],
)
def test_app_rejects_bad_run_config(app_modules, overrides, match):
    task = app_modules[0]
    with pytest.raises(ValueError, match=f"run config: {match}"):
        task.Settings.from_run_config(run_config(**overrides))


def test_app_rejects_a_missing_key_and_a_bad_partition_id(app_modules):
    task = app_modules[0]
    cfg = run_config()
    del cfg["dataset"]
    with pytest.raises(ValueError, match="run config: missing key 'dataset'"):
        task.Settings.from_run_config(cfg)
    s = task.Settings.from_run_config(run_config())
    with pytest.raises(ValueError, match="partition-id=3 is not in 0..2"):
        task.client_indices(s, 3, 3)


def test_app_split_is_disjoint_and_covers_the_training_set(app_modules):
    task = app_modules[0]
    s = task.Settings.from_run_config(run_config())
    held, pool = task.split(s)
    parts = [task.client_indices(s, k, 3) for k in range(3)]
    every = sorted(int(i) for p in [held, *parts] for i in p)
    assert every == list(range(len(task.dataset(s.dataset).y_train)))


def train_message(arrays, server_round, strategy="dimat", node_id=1):
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    md = Metadata(run_id=1, message_id=f"q{node_id}", src_node_id=0, dst_node_id=node_id, reply_to_message_id="",
                  group_id=str(server_round), created_at=0.0, ttl=600.0, message_type="train")
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round,
                                                                    "strategy": strategy})})
    return Message(metadata=md, content=content)


def test_app_round_in_process_client_train_and_aligned_aggregation(app_modules):
    """One round of the app without a runtime: 3 ClientApp replies (one with client-side alignment) merged by
    MessageDimatFedAvg, which logs the round's alignment telemetry."""
    from flwr.app import ArrayRecord, Context, RecordDict

    task, client_app, _ = app_modules
    cfg = run_config(**{"local-epochs": 1, "client-align": "align"})
    s = task.Settings.from_run_config(cfg)
    global_model = task.new_model(s, s.seed)
    replies = []
    for k in range(3):
        ctx = Context(run_id=1, node_id=10 + k, node_config={"partition-id": k, "num-partitions": 3},
                      state=RecordDict(), run_config=cfg)
        msg = train_message(ArrayRecord(global_model.state_dict()), 1, node_id=10 + k)
        reply = client_app.train(msg, ctx)
        assert "dimat.previous-local" in ctx.state  # kept for next round's client-side alignment
        assert reply.content["metrics"]["num-examples"] == len(task.client_indices(s, k, 3))
        if k == 0:  # round 2 on this node: the received model is first aligned to the node's round-1 model
            reply = client_app.train(train_message(reply.content["arrays"], 2, node_id=10), ctx)
        assert reply.metadata.src_node_id == 10 + k  # a reply comes from the node the instruction went to
        replies.append(reply)
    strategy = flower.MessageDimatFedAvg(model=lambda: task.new_model(s, s.seed),
                                         calibration=task.calibration_batches(s), telemetry=True)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["train-loss"] > 0
    (entry,) = strategy.merge_log
    assert entry["round"] == 1 and entry["method"] == "dimat" and entry["clients"] == 3
    assert 0 <= entry["alignment"]["moved_fraction"] <= 1 and "assign_s" in entry["operator_profile"]


def test_app_client_trains_on_an_npz_from_the_run_config(app_modules, tmp_path):
    import numpy as np
    from flwr.app import ArrayRecord, Context, RecordDict

    from dimat.errors import UserError

    task, client_app, _ = app_modules
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.integers(0, 255, (120, 8, 8, 3), dtype=np.uint8), y_train=np.arange(120) % 4,
             x_test=rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8), y_test=np.arange(40) % 4)
    cfg = run_config(dataset=f"npz:{path}", partition="iid", **{"local-epochs": 1})
    s = task.Settings.from_run_config(cfg)
    model = task.new_model(s, 0)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 4)  # built for the file's images and classes
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                  run_config=cfg)
    reply = client_app.train(train_message(ArrayRecord(model.state_dict()), 1), ctx)
    assert reply.content["metrics"]["num-examples"] == 54  # half of the 108 samples the server does not keep
    bad = run_config(dataset=f"npz:{tmp_path / 'absent.npz'}")
    with pytest.raises(UserError, match="absent.npz: no such file"):
        task.new_model(task.Settings.from_run_config(bad), 0)


def test_app_client_rejects_a_supernode_without_partition(app_modules):
    from flwr.app import ArrayRecord, Context, RecordDict

    task, client_app, _ = app_modules
    s = task.Settings.from_run_config(run_config())
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config())
    with pytest.raises(ValueError, match="node config: missing 'partition-id'"):
        client_app.train(train_message(ArrayRecord(task.new_model(s, 0).state_dict()), 1), ctx)


# ------------------------------------------------------------------------------ the app on Flower's runtime
def deployment_module():
    if "local_deployment" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("local_deployment", APP / "local_deployment.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["local_deployment"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["local_deployment"]


@pytest.fixture
def deploy_env(monkeypatch):
    pytest.importorskip("flwr.serverapp.strategy", reason="flwr not installed (see dimat.flower.FLOWER_HINT)")
    pytest.importorskip("cryptography")
    # The ServerApp and ClientApps run in subprocesses: they must import this checkout's dimat.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return deployment_module()


def check_run(res, out: Path, rounds: int, names):
    assert res["status"] == "finished:completed", res["log"][-3000:]
    results = check_results(out, rounds, names)
    if "dimat" in names:
        assert "units moved, unit correlation" in res["log"]
        assert "DimatFedAvg(dimat): test accuracy after each round" in res["log"]
    return results


def check_results(out: Path, rounds: int, names):
    """results.json of the ServerApp: accuracy after every round, and every DimatFedAvg round matched units."""
    results = json.loads((out / "results.json").read_text())
    for name in names:
        run = results["runs"][name]
        assert run["rounds"] == list(range(rounds + 1)), run["rounds"]
        accs = run["accuracy"]
        assert len(accs) == rounds + 1 and all(0.0 <= a <= 1.0 for a in accs)
        assert accs[-1] > accs[0] + 0.2, accs  # the federation learned something (10 classes: chance 0.1)
    if "dimat" in names:
        log = results["runs"]["dimat"]["merge_log"]
        assert [e["round"] for e in log] == list(range(1, rounds + 1))
        for e in log:
            # The merge went through activation matching: the operator timed its statistics and assignment
            # stages, and the telemetry saw every SuperNode's model against the reference's units.
            assert e["method"] == "dimat" and e["clients"] == 3 and len(set(e["client_ids"])) == 3
            assert e["operator_profile"]["stats_s"] > 0 and e["operator_profile"]["assign_s"] > 0
            a = e["alignment"]
            assert a["units"] > 0 and len(a["per_model"]) == 2 and 0 <= a["moved_fraction"] <= 1
            assert a["corr_matched"] >= a["corr_identity"] - 1e-9
    return results


@pytest.mark.slow
def test_flower_deployment_insecure_three_rounds(deploy_env, tmp_path):
    out = tmp_path / "out"
    d = deploy_env.Deployment(tmp_path / "deploy", supernodes=3)
    with d:
        assert (tmp_path / "deploy" / "flwr-home" / "config.toml").read_text().count("insecure = true") == 1
        res = d.run_app(run_config=f"num-server-rounds=3 strategy='dimat' out-dir='{out}'", timeout=900)
        ports = [d.port, *d.node_ports]
    check_run(res, out, 3, ["dimat"])
    assert all(p.poll() is not None for p in d.procs) and deploy_env._processes_using(ports) == []


@pytest.mark.slow
def test_flower_deployment_tls_both_strategies(deploy_env, tmp_path):
    out = tmp_path / "out"
    d = deploy_env.Deployment(tmp_path / "deploy", supernodes=3, tls=True)
    with d:
        res = d.run_app(run_config=f"num-server-rounds=2 strategy='both' out-dir='{out}'", timeout=900)
        ports = [d.port, *d.node_ports]
    assert f"running on https://127.0.0.1:{d.port}" in d.tail("superlink", 10_000)
    results = check_run(res, out, 2, ["dimat", "fedavg"])
    assert "FedAvg: test accuracy after each round" in res["log"] and results["runs"]["fedavg"]["merge_log"] == []
    assert all(p.poll() is not None for p in d.procs) and deploy_env._processes_using(ports) == []


def in_process_module():
    if "flower_app_in_process" not in sys.modules:
        spec = importlib.util.spec_from_file_location("flower_app_in_process", APP / "in_process.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["flower_app_in_process"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["flower_app_in_process"]


def test_app_on_an_in_process_grid_two_rounds_of_both_strategies(app_modules, tmp_path):
    """The ServerApp's main and the ClientApp on a Grid that calls the ClientApp in this process (Flower's
    simulation runtime would need Ray): the default suite's stand-in for the slow deployment tests."""
    ip = in_process_module()
    ip.run(ip.app_run_config(f"num-server-rounds=2 local-epochs=1 out-dir='{tmp_path}'"), nodes=3)
    results = check_results(tmp_path, 2, ["dimat", "fedavg"])
    assert results["runs"]["fedavg"]["merge_log"] == [] and results["settings"]["local_epochs"] == 1


def test_in_process_run_config_rejects_an_unknown_key(app_modules):
    with pytest.raises(ValueError, match="--run-config: unknown key 'roundz'"):
        in_process_module().app_run_config("roundz=3")


def test_deployment_needs_a_supernode(tmp_path):
    with pytest.raises(ValueError, match="supernodes must be >= 1"):
        deployment_module().Deployment(tmp_path, supernodes=0).start()


def test_cleanup_sweep_matches_only_our_whole_addresses():
    """stop() kills leftover processes naming our ports: 127.0.0.1:4000 must not catch 127.0.0.1:40001."""
    import subprocess
    import time

    mod = deployment_module()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--addr", "127.0.0.1:40001"])
    try:
        deadline = time.monotonic() + 10
        while p.pid not in mod._processes_using([40001]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert p.pid in mod._processes_using([40001])
        assert p.pid not in mod._processes_using([4000, 400])
    finally:
        p.kill()
        p.wait(timeout=10)
