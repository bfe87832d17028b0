"""Config schema: defaults, YAML loading, --set overrides, unknown keys with suggestions, type and range checks."""

from __future__ import annotations

import pytest

from dimat import config
from dimat.config import DEFAULTS, Config, diff, dump, flatten, load_config, resolve
from dimat.errors import UserError


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_agents_and_rounds_alone_resolve_to_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "agents: 3\nrounds: 4\n"))
    assert cfg.agents == 3 and cfg.rounds == 4
    assert cfg.data.dataset == "digits" and cfg.model.name == "mlp" and cfg.topology == "ring"
    assert cfg.merge.method == DEFAULTS["merge"]["method"]
    assert cfg.train.optimizer == "adam" and cfg.train.lr == 1e-3 and cfg.train.batch_size == 100
    assert cfg.train.epochs == 2 and cfg.train.keep_optimizer_state is False
    assert cfg.out == "runs/cfg"  # named after the config file
    assert cfg["train"]["lr"] == cfg.train.lr  # dict and attribute access agree


def test_every_default_key_is_reported_by_flatten():
    flat = flatten(DEFAULTS)
    for key in ("seed", "agents", "rounds", "topology", "data.dataset", "data.partition", "model.name",
                "model.width", "train.optimizer", "train.lr", "train.epochs", "train.batch_size",
                "train.pretrain_epochs", "merge.method", "merge.stat_batches", "out", "transport.name",
                "transport.deadline_s"):
        assert key in flat


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")).agents == DEFAULTS["agents"]


@pytest.mark.parametrize("text, suggestion", [
    ("merge:\n  metod: wa\n", "merge.method"),
    ("agnets: 3\n", "agents"),
    ("train:\n  learning_rate: 0.1\n", None),
    ("modle:\n  name: mlp\n", "model"),
])
def test_unknown_key_names_file_and_suggests(tmp_path, text, suggestion):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: unknown key")
    if suggestion:
        assert f"did you mean {suggestion!r}" in msg
    else:
        assert "did you mean" not in msg


def test_malformed_yaml_names_file(tmp_path):
    p = write(tmp_path, "agents: [3\nrounds: 2\n")
    with pytest.raises(UserError, match=rf"^{p}: malformed YAML"):
        load_config(p)


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(write(tmp_path, "- agents\n- 3\n"))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, key", [
    ("train:\n  lr: fast\n", "train.lr"),
    ("agents: true\n", "agents"),
    ("agents: 2.5\n", "agents"),
    ("data:\n  flip: 1\n", "data.flip"),
    ("merge: wa\n", "merge"),
    ("model:\n  width: '2'\n", "model.width"),
])
def test_wrong_type_names_file_and_key(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: key {key!r}")


@pytest.mark.parametrize("text, key", [
    ("agents: 0\n", "agents"),
    ("rounds: -1\n", "rounds"),
    ("train:\n  lr: 0\n", "train.lr"),
    ("train:\n  optimizer: rmsprop\n", "train.optimizer"),
    ("merge:\n  method: magic\n", "merge.method"),
    ("merge:\n  stat_batches: 0\n", "merge.stat_batches"),
    ("merge:\n  basis: theirs\n", "merge.basis"),
    ("transport:\n  name: carrier-pigeon\n", "transport.name"),
    ("model:\n  width: 0\n", "model.width"),
    ("transport:\n  staleness: -1\n", "transport.staleness"),
    ("transport:\n  staleness: 1.5\n", "transport.staleness"),
    ("transport:\n  sync: maybe\n", "transport.sync"),
    ("transport:\n  startup_s: 0\n", "transport.startup_s"),
])
def test_bad_values(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(UserError, match=rf"^{p}: key '{key}'"):
        load_config(p)


def test_int_for_a_float_key_becomes_float_and_nulls_are_allowed(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\nmerge:\n  stat_batches: null\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.merge.stat_batches is None


def test_set_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "agents: 3\n"), ["train.lr=0.01", "data.flip=true", "merge.method=none",
                                                       "merge.stat_batches=null", "topology=fc"])
    assert cfg.train.lr == 0.01 and cfg.data.flip is True and cfg.merge.method == "none"
    assert cfg.merge.stat_batches is None and cfg.topology == "fc"


@pytest.mark.parametrize("assignment, match", [
    ("merge.metod=wa", r"^--set: unknown key 'merge.metod' \(did you mean 'merge.method'\?\)"),
    ("train.lr", "expected KEY=VALUE"),
    ("train=3", "is a section"),
    ("train.lr=[1", "not valid YAML"),
    ("agents=many", "key 'agents' must be an integer"),
    ("nothere.x=1", "unknown key 'nothere.x'"),
])
def test_bad_set(assignment, match):
    with pytest.raises(UserError, match=match):
        load_config(None, [assignment])


def test_adding_a_key_to_defaults_is_all_it_takes(monkeypatch, tmp_path):
    monkeypatch.setitem(DEFAULTS["transport"], "port", 7000)
    cfg = load_config(write(tmp_path, "transport:\n  port: 7100\n"), ["transport.port=7200"])
    assert cfg.transport.port == 7200
    with pytest.raises(UserError, match="must be an integer"):
        load_config(write(tmp_path, "transport:\n  port: high\n"))


def test_dump_round_trips_and_diff_ignores_out(tmp_path):
    cfg = load_config(write(tmp_path, "agents: 3\ntrain:\n  lr: 0.5\n"))
    again = load_config(write(tmp_path, dump(cfg), "again.yaml"))
    assert diff(cfg, again) == []
    again["out"] = "elsewhere"
    again["train"]["lr"] = 0.25
    assert diff(cfg, again) == ["train.lr"]


def test_config_attribute_access_errors_cleanly():
    cfg = resolve({"agents": 2})
    assert isinstance(cfg.train, Config)
    with pytest.raises(AttributeError):
        cfg.nope
    assert cfg.to_dict()["train"] == dict(cfg.train)


def test_method_list_comes_from_the_merge_registry(monkeypatch):
    from dimat import merge

    monkeypatch.setitem(merge.METHODS, "mine", merge.average)
    assert "mine" in config.known_methods() and "none" in config.known_methods()
    assert resolve({"merge": {"method": "mine"}}).merge.method == "mine"


@pytest.mark.parametrize("data, key", [
    # a merge in a neighbour's unit order would meet Adam moments / momentum kept in the old order
    ({"merge": {"identity_prior": -0.1}}, "merge.identity_prior"),
    ({"merge": {"method": "wa", "identity_prior": 0.1}}, "merge.identity_prior"),
    ({"merge": {"method": "wm", "keep_margin": 0.1}}, "merge.keep_margin"),
    ({"merge": {"combine": "median"}}, "merge.combine"),
    ({"merge": {"regmean_alpha": 2.0}}, "merge.regmean_alpha"),
    ({"merge": {"fisher_samples": 0}}, "merge.fisher_samples"),
    ({"model": {"init": "shared"}}, "model.init"),
    ({"merge": {"stats": "all"}}, "merge.stats"),
    ({"merge": {"head": "classes"}}, "merge.head"),
    ({"merge": {"head": "label_counts", "combine": "fisher"}}, "merge.head"),
    ({"merge": {"head": "label_counts", "method": "none"}}, "merge.head"),
    ({"merge": {"head": "label_counts", "method": "cdsgd"}}, "merge.head"),
    ({"merge": {"stats": "both", "method": "wa"}}, "merge.stats"),
    ({"merge": {"stats": "both", "basis": "own"}, "transport": {"name": "grpc", "sync": False}}, "merge.stats"),
])
def test_merge_and_init_keys_are_checked(data, key):
    with pytest.raises(UserError, match=f"run.yaml: key '{key}'"):
        resolve(data, where="run.yaml")


def test_kept_optimizer_state_is_fine_where_no_merge_reorders_units():
    for data in ({"merge": {"basis": "own"}, "train": {"keep_optimizer_state": True}},
                 {"merge": {"basis": "shared"}, "train": {"keep_optimizer_state": True}},  # see test_runner
                 {"merge": {"basis": "shared", "method": "wa"}, "train": {"keep_optimizer_state": True}}):
        assert resolve(data).train.keep_optimizer_state is True
    for name in ("inproc", "grpc", "torch"):  # each carries the second message (torch: gloo; see test_node)
        assert resolve({"merge": {"stats": "both", "basis": "own"}, "transport": {"name": name}}).merge.stats == "both"
    assert (resolve({}).merge.stats, resolve({}).merge.basis) == ("own", "shared")
    assert resolve({"merge": {"stats": "both"}}).merge.basis == "shared"  # both with the default basis too
    assert resolve({}).merge.head == "auto" and resolve({"merge": {"method": "wa", "head": "label_counts"}})
    cfg = resolve({"merge": {"keep_margin": 0.02, "identity_prior": 0.1, "combine": "regmean"},
                   "model": {"init": "same"}})
    assert (cfg.merge.keep_margin, cfg.merge.identity_prior, cfg.merge.combine, cfg.model.init) == \
        (0.02, 0.1, "regmean", "same")
def test_asynchronous_rounds_need_the_grpc_transport(tmp_path):
    """transport.sync: false is refused, in one line, where it cannot be honoured (dimat run, torch, inproc)."""
    from dimat.runner import run
    from dimat.transport import create

    cfg = load_config(write(tmp_path, "agents: 2\nrounds: 1\ntransport:\n  sync: false\n  staleness: 2\n"))
    assert cfg.transport.sync is False and cfg.transport.staleness == 2
    with pytest.raises(UserError, match="transport.sync: false .* needs the grpc transport"):
        run(cfg, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for name in ("inproc", "torch"):
        with pytest.raises(ValueError, match=f"needs the grpc transport, not '{name}'"):
            create(name, 0, transport_cfg=cfg.transport, neighbors=[1])
