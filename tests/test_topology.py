"""Tests for dimat.topology and the ``dimat topology`` command."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from dimat.cli import main as cli_main
from dimat.errors import UserError
from dimat.topology import KINDS, Topology, TopologyWarning, metropolis_hastings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "topologies"


def _build(kind, n, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TopologyWarning)
        return Topology.build(kind, n, **kw)


def _reference_dict(graph_type, c, pi, eid):
    # the layout the DIMAT reference generator writes: float 0/1 connectivity and an "experiment id" key
    return {"graph_type": graph_type, "experiment id": eid, "num_agents": len(c),
            "connectivity": [[float(v) for v in row] for row in c], "pi": [[float(v) for v in row] for row in pi]}


def _write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=4))
    return path


# ---------------------------------------------------------------------- builders
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12])
def test_builders_give_valid_symmetric_doubly_stochastic_weights(kind, n):
    if kind == "bipartite" and n == 1:
        with pytest.raises(UserError, match="at least 2 agents"):
            Topology.build(kind, n)
        return
    t = _build(kind, n)
    assert t.num_agents == n and t.graph_type == kind
    assert t.connectivity.dtype == np.int64 and set(np.unique(t.connectivity)) <= {0, 1}
    assert np.all(np.diag(t.connectivity) == 1)
    np.testing.assert_allclose(t.pi.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(t.pi.sum(axis=0), 1.0, atol=1e-12)
    assert np.all(t.pi >= 0) and not np.any((t.pi > 0) & (t.connectivity == 0))
    assert t.is_symmetric()
    assert t.is_connected() == (kind != "disconnected" or n == 1)
    for i in range(n):
        nb = t.neighbors(i)
        assert nb == sorted(nb) and i not in nb
        w = t.weights(i)
        assert sorted(w) == sorted(nb + [i]) and abs(sum(w.values()) - 1) < 1e-12


def test_builder_shapes():
    assert _build("ring", 6).neighbors(0) == [1, 5]
    assert all(_build("fc", 5).degree(i) == 4 for i in range(5))
    assert _build("disconnected", 4).neighbors(2) == []
    b = _build("bipartite", 6)  # last two agents are the hubs, as in the reference
    assert b.neighbors(0) == [4, 5] and b.neighbors(5) == [0, 1, 2, 3]
    t = _build("torus", 12)  # 3 x 4 grid with wrap-around
    assert [t.degree(i) for i in range(12)] == [4] * 12 and t.neighbors(0) == [1, 3, 4, 8]
    assert _build("torus", 12, rows=2).neighbors(0) == [1, 5, 6]  # 2 x 6: up and down coincide
    e = _build("exponential", 8)  # i <-> i +- 1, 2, 4
    assert e.neighbors(0) == [1, 2, 4, 6, 7]
    d = _build("exponential", 8, directed=True)
    assert d.neighbors(0) == [1, 2, 4] and not d.is_symmetric() and d.is_doubly_stochastic()


def test_metropolis_hastings_values():
    # ring: every degree 2 -> 1/3 everywhere; fc: 1/N everywhere (as in the reference files)
    np.testing.assert_allclose(_build("ring", 7).pi[0, [0, 1, 6]], [1 / 3] * 3)
    np.testing.assert_allclose(_build("fc", 4).pi, np.full((4, 4), 0.25))
    star = np.eye(4, dtype=int)
    star[0, :] = star[:, 0] = 1
    pi = metropolis_hastings(star)
    np.testing.assert_allclose(pi[1], [0.25, 0.75, 0, 0])
    np.testing.assert_allclose(pi[0], [0.25, 0.25, 0.25, 0.25])
    with pytest.raises(ValueError, match="symmetric"):
        metropolis_hastings(np.triu(np.ones((3, 3))))


def test_spectral_gap_orders_ring_below_fc():
    ring, fc = _build("ring", 8), _build("fc", 8)
    assert fc.spectral_gap() == pytest.approx(1.0)
    # ring with weights 1/3: eigenvalues (1 + 2 cos(2 pi k / n)) / 3
    assert ring.spectral_gap() == pytest.approx(1 - (1 + 2 * np.cos(2 * np.pi / 8)) / 3)
    assert ring.spectral_gap() < _build("torus", 8).spectral_gap() < fc.spectral_gap()
    assert _build("ring", 16).spectral_gap() < ring.spectral_gap()
    assert _build("disconnected", 4).spectral_gap() == pytest.approx(0.0)


def test_random_is_seeded_and_connected():
    a, b, c = _build("random", 20, seed=3), _build("random", 20, seed=3), _build("random", 20, seed=4)
    assert a == b and a != c
    for seed in range(5):  # p = 0 forces the joining step to build a spanning tree
        t = _build("random", 10, seed=seed, p=0.0)
        assert t.is_connected() and int(np.triu(t.connectivity, 1).sum()) == 9
    assert _build("random", 6, p=1.0) .connectivity.sum() == 36


@pytest.mark.parametrize("kind, n, kw, match", [
    ("star", 4, {}, "unknown topology kind 'star'"),
    ("ring", 0, {}, "integer >= 1"),
    ("ring", 2.5, {}, "integer >= 1"),
    ("fc", 4, {"rows": 2}, "unknown option"),
    ("torus", 6, {"rows": 4}, "rows must divide"),
    ("random", 5, {"p": 1.5}, r"p must be in \[0, 1\]"),
    ("bipartite", 4, {"hubs": 4}, "hubs must be in 1..3"),
])
def test_build_rejects_bad_requests(kind, n, kw, match):
    with pytest.raises(UserError, match=match):
        Topology.build(kind, n, **kw)


def test_disconnected_and_asymmetric_warn():
    with pytest.warns(TopologyWarning, match="disconnected"):
        Topology.build("disconnected", 3)
    c = np.ones((2, 2))
    with pytest.warns(TopologyWarning, match="not symmetric.*columns do not sum to 1"):
        t = Topology(c, [[0.5, 0.5], [0.2, 0.8]])
    assert not t.is_symmetric() and t.is_connected()


def test_directed_graph_warns_as_directed():
    c = [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    with pytest.warns(TopologyWarning, match=r"directed \(connectivity is not symmetric\)$"):
        t = Topology(c, np.array(c) / 2)  # a circulant: doubly stochastic, so no drift warning
    assert t.is_connected() and t.spectral_gap() == pytest.approx(1 - 0.5)


def test_record_is_read_only():
    t = _build("ring", 4)
    with pytest.raises(ValueError):
        t.pi[0, 0] = 1.0
    with pytest.raises(AttributeError):
        t.num_agents = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="out of range"):
        t.neighbors(4)


# ---------------------------------------------------------------------- files
def test_reference_files_load_unchanged(tmp_path):
    # our own files in the reference layout: FC (1/N), Ring (1/3), Bipar (weights rounded down to 2 decimals)
    fc = _reference_dict("FC", np.ones((3, 3)), np.full((3, 3), 1 / 3), 1)
    ring = np.eye(4) + np.roll(np.eye(4), 1, 1) + np.roll(np.eye(4), -1, 1)
    a, b, c = 0.33, 1 - 2 * 0.33, 1 - 2 * 0.33
    bip_c = [[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1]]
    bip_pi = [[c, 0, a, a], [0, c, a, a], [a, a, b, 0], [a, a, 0, b]]
    for name, d in [("3_1.json", fc), ("4_2.json", _reference_dict("Ring", ring, ring / 3, 2)),
                    ("4_3.json", _reference_dict("Bipar", bip_c, bip_pi, 3)),
                    ("5_4.json", _reference_dict("Dis", np.eye(5), np.eye(5), 4))]:
        path = _write(tmp_path / name, d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TopologyWarning)
            t = Topology.load(path)
        assert t.graph_type == d["graph_type"] and t.num_agents == d["num_agents"]
        np.testing.assert_array_equal(t.pi, np.array(d["pi"]))  # weights exactly as written
        np.testing.assert_array_equal(t.connectivity, np.array(d["connectivity"]).astype(int))
        assert t.meta == {"experiment id": d["experiment id"]}
        out = tmp_path / ("re_" + name)
        t.save(out)
        assert json.loads(out.read_text()) == d  # the same file content, keys included


def test_reference_generator_two_agent_ring_is_refused(tmp_path):
    # The reference generator's Ring for 2 agents divides a full 2x2 connectivity by 3: rows sum to 2/3.
    d = _reference_dict("Ring", np.ones((2, 2)), np.full((2, 2), 1 / 3), 2)
    path = _write(tmp_path / "2_2.json", d)
    with pytest.raises(UserError) as e:
        Topology.load(path)
    assert str(e.value) == f"{path}: field 'pi': row 0 sums to 0.666667, expected 1 (within 1e-06)"


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_json_and_yaml(tmp_path, kind):
    t = _build(kind, 5, seed=1)
    for suffix in (".json", ".yaml", ".yml"):
        path = tmp_path / f"t{suffix}"
        t.save(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TopologyWarning)
            assert Topology.load(path) == t
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_peers_round_trip_and_validation(tmp_path):
    peers = {0: "127.0.0.1:7000", 1: "127.0.0.1:7001", 2: "node-b:7000"}
    t = _build("ring", 3).with_peers(peers)
    assert t.peers == peers
    path = tmp_path / "p.yaml"
    t.save(path)
    assert Topology.load(path).peers == peers
    d = json.loads(_build("ring", 3).dumps())
    for bad, match in [({"0": "a:1", "1": "b:2"}, r"no address for agent\(s\) \[2\]"),
                       ({"0": "a:1", "1": "b:2", "2": "c"}, "agent 2: expected 'host:port'"),
                       ({"0": "a:1", "1": "b:2", "2": "c:70000"}, "port 1..65535"),
                       ({"0": "a:1", "1": "b:2", "5": "c:3"}, "agent 5 out of range"),
                       ({"x": "a:1"}, "key 'x' is not an agent rank"),
                       (["a:1"], "must map agent rank")]:
        path = _write(tmp_path / "bad.json", {**d, "peers": bad})
        with pytest.raises(UserError, match=f"bad.json: field 'peers'.*{match}"):
            Topology.load(path)


def _ring3():
    return json.loads(_build("ring", 3).dumps())


@pytest.mark.parametrize("mutate, field, match", [
    (lambda d: d.pop("pi"), "pi", "is missing"),
    (lambda d: d.pop("graph_type"), "graph_type", "is missing"),
    (lambda d: d.update(graph_type=3), "graph_type", "non-empty string"),
    (lambda d: d.update(num_agents=4), "connectivity", "is 3x3 but num_agents is 4"),
    (lambda d: d.update(num_agents="3"), "num_agents", "integer >= 1"),
    (lambda d: d["pi"][1].pop(), "pi", "row 1 has 2 entries, expected 3"),
    (lambda d: d.update(pi=[[1, 0, 0]] * 2 + [[0, 0, "x"]]), "pi", r"entry \[2\]\[2\] must be a number"),
    (lambda d: d.update(connectivity="ring"), "connectivity", "list of rows"),
    (lambda d: d["connectivity"][0].__setitem__(1, 0.5), "connectivity", r"entry \[0\]\[1\] is 0.5"),
    (lambda d: d["connectivity"][2].__setitem__(2, 0.0), "connectivity", r"\[2\]\[2\] is 0; .*self-loop"),
    (lambda d: d.update(pi=[[1.5, -0.5, 0], [0, 1, 0], [0, 0, 1]]), "pi", r"entry \[0\]\[1\] is -0.5"),
    (lambda d: d["pi"][1].__setitem__(1, 0.5), "pi", "row 1 sums to 1.16667"),
    (lambda d: d.update(connectivity=np.eye(3).tolist()), "pi",
     r"entry \[0\]\[1\] is 0.333333 but connectivity\[0\]\[1\] is 0"),
])
def test_malformed_files_name_file_and_field(tmp_path, mutate, field, match):
    d = _ring3()
    mutate(d)
    path = _write(tmp_path / "topo.json", d)
    with pytest.raises(UserError, match=f"^{path}: field '{field}'.*{match}"):
        Topology.load(path)


def test_bad_files(tmp_path):
    cases = {
        "missing.json": (None, "no such topology file"),
        "syntax.json": ('{"graph_type": "ring",', "not valid JSON"),
        "syntax.yaml": ("pi: [1, 2\nfoo: :", "not valid YAML"),
        "list.json": ("[1, 2]", "expected a mapping"),
        "nan.json": (json.dumps({**_ring3(), "pi": [[float("nan")] * 3] * 3}), r"'pi': entry \[0\]\[0\] is not finite"),
        "topo.txt": ("{}", "unknown topology file type '.txt'"),
    }
    for name, (text, match) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(UserError, match=f"^{path}: .*{match}"):
            Topology.load(path)


def test_from_spec(tmp_path):
    assert Topology.from_spec("ring", 4).neighbors(0) == [1, 3]
    path = tmp_path / "t.json"
    _build("fc", 3).save(path)
    assert Topology.from_spec(str(path), 3).graph_type == "fc"
    with pytest.raises(UserError, match="field 'num_agents': the file has 3 agents but the run has 4"):
        Topology.from_spec(str(path), 4)
    with pytest.raises(UserError, match="no such topology file"):
        Topology.from_spec(str(tmp_path / "absent.yaml"), 3)


def test_examples_load():
    files = sorted(f for f in EXAMPLES.iterdir() if f.suffix in (".json", ".yaml", ".yml"))
    assert len(files) >= 3
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TopologyWarning)
            assert Topology.load(f).num_agents >= 2


def test_describe_reports_structure():
    text = _build("ring", 5).describe()
    assert "connected: yes" in text and "spectral gap (1 - |lambda_2(pi)|): 0.460655" in text
    assert "    0       2  self 0.3333, 1: 0.3333, 4: 0.3333" in text
    assert "connected: no (3 components)" in _build("disconnected", 3).describe()


# ---------------------------------------------------------------------- command line
def test_cli_make_prints_and_writes(tmp_path, capsys):
    assert cli_main(["topology", "make", "ring", "--agents", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["graph_type"] == "ring" and printed["num_agents"] == 4
    out = tmp_path / "t.yaml"
    assert cli_main(["topology", "make", "random", "-n", "6", "--seed", "2", "--p", "0.2", "-o", str(out)]) == 0
    assert Topology.load(out) == _build("random", 6, seed=2, p=0.2)
    assert cli_main(["topology", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "connected: yes" in shown and "spectral gap" in shown
    assert cli_main(["topology", "make", "torus", "-n", "6", "--format", "yaml"]) == 0
    import yaml

    assert yaml.safe_load(capsys.readouterr().out)["num_agents"] == 6
    assert "connected: yes" in shown and "spectral gap" in shown


def test_cli_show_warns_for_disconnected(tmp_path, capsys):
    path = tmp_path / "d.json"
    _build("disconnected", 3).save(path)
    assert cli_main(["topology", "show", str(path)]) == 0
    captured = capsys.readouterr()
    assert "connected: no" in captured.out
    assert captured.err.strip() == f"dimat: warning: {path}: the graph is disconnected (3 components)"


@pytest.mark.parametrize("argv_tail, expect", [
    (["make", "star", "--agents", "3"], "dimat: error: unknown topology kind 'star'"),
    (["make", "ring", "--agents", "0"], "dimat: error: topology 'ring': number of agents must be"),
    (["show", "{dir}/absent.json"], "dimat: error: {dir}/absent.json: no such topology file"),
    (["show", "{dir}/bad.json"], "dimat: error: {dir}/bad.json: field 'pi': row 0 sums to 0.666667"),
    (["make", "ring", "-n", "3", "-o", "{dir}/nodir/t.json"], "dimat: error: {dir}/nodir/t.json: directory"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv_tail, expect):
    _write(tmp_path / "bad.json", _reference_dict("Ring", np.ones((2, 2)), np.full((2, 2), 1 / 3), 2))
    argv = ["topology"] + [a.format(dir=tmp_path) for a in argv_tail]
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expect.format(dir=tmp_path)), captured.err
    assert captured.out == "" and "Traceback" not in captured.err
    assert not (tmp_path / "nodir").exists()
