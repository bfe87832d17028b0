"""The in-process runner: run folder contents, reproducibility, resume, and the per-agent loop pieces."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dimat import checkpoint, merge
from dimat.config import resolve
from dimat.errors import UserError
from dimat.metrics import read_metrics
from dimat.build import build_agent, prepare
from dimat.loop import run_round
from dimat.runner import run
from dimat.transport.inproc import make_inproc

TIMINGS = ("train_s", "merge_s", "comm_s")
RECORD_KEYS = {"round", "agent", "phase", "test_acc", "test_loss", "local_test_acc", "train_loss", "train_s",
               "merge_s", "comm_s", "comm_bytes"}


def tiny(**over):
    data = {"agents": 3, "rounds": 3, "threads": 1, "data": {"dataset": "synthetic:train=300,test=90,features=16"},
            "model": {"width": 0.25}, "merge": {"method": "wa", "stat_batches": 2, "bn_batches": 2},
            "train": {"epochs": 1, "batch_size": 50, "lr": 0.01}}
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[section] = value
    return resolve(data)


def no_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def test_run_writes_the_run_folder(tmp_path):
    cfg = tiny(train__pretrain_epochs=1)
    summary = run(cfg, tmp_path / "r", quiet=True)
    out = tmp_path / "r"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary) == {"method", "agents", "rounds", "final_mean_acc", "final_min_acc", "final_max_acc",
                            "per_agent_acc", "wall_s"}
    assert summary["method"] == "wa" and summary["agents"] == 3 and summary["rounds"] == 3
    assert summary["final_min_acc"] <= summary["final_mean_acc"] <= summary["final_max_acc"]
    recs = read_metrics([out / "metrics.jsonl"])
    # pretrain, then merge + train for rounds 0 and 1, merge only in the last round
    phases = [(r["round"], r["phase"]) for r in recs if r["agent"] == 0]
    assert phases == [(-1, "pretrain"), (0, "merge"), (0, "train"), (1, "merge"), (1, "train"), (2, "merge")]
    assert all(RECORD_KEYS <= set(r) for r in recs)
    merges = [r for r in recs if r["phase"] == "merge"]
    assert all(r["comm_bytes"] > 0 and len(r["received"]) == 2 for r in merges)
    assert all(r["train_loss"] is not None and r["train_s"] > 0 for r in recs if r["phase"] == "train")
    last = [r["test_acc"] for r in recs if r["round"] == 2]
    assert summary["per_agent_acc"] == last
    for k in range(3):
        assert torch.load(out / "checkpoints" / f"agent-{k}.pt", weights_only=True)["round"] == 2
    assert "rounds: 3" in (out / "config.yaml").read_text()


def test_training_improves_accuracy(tmp_path):
    summary = run(tiny(train__epochs=5), tmp_path / "r", quiet=True)
    first = [r["test_acc"] for r in read_metrics([tmp_path / "r/metrics.jsonl"]) if r["round"] == 0]
    assert summary["final_mean_acc"] > 0.5  # 10 classes: chance is 0.1
    assert summary["final_mean_acc"] > sum(first) / len(first) + 0.2


@pytest.mark.parametrize("method", ["wa", "dimat"])
def test_identical_runs_give_identical_results(tmp_path, method):
    cfg = tiny(train__optimizer="msgd", train__keep_optimizer_state=True, merge__method=method)
    a = run(cfg, tmp_path / "a", quiet=True)
    b = run(cfg, tmp_path / "b", quiet=True)
    a.pop("wall_s"), b.pop("wall_s")  # the only field allowed to differ
    assert a == b
    ra, rb = (read_metrics([tmp_path / d / "metrics.jsonl"]) for d in "ab")
    assert no_timings(ra) == no_timings(rb)


def test_agents_differ_by_seed(tmp_path):
    cfg = tiny(merge__method="none")  # no transport needed
    setup = prepare(cfg)
    a0, a1 = (build_agent(cfg, setup, k, None) for k in (0, 1))
    assert not torch.equal(next(a0.model.parameters()), next(a1.model.parameters()))
    cfg5 = tiny(merge__method="none", seed=5)
    other = build_agent(cfg5, prepare(cfg5), 0, None)
    assert not torch.equal(next(a0.model.parameters()), next(other.model.parameters()))


@pytest.mark.parametrize("init, tags", [("different", [0, 1, 2]), ("same", [0, 0, 0])])
def test_one_init_is_one_basis(init, tags):
    # model.init same: every agent starts from the same weights, so under basis shared they start with one tag
    # (and their merges never align); different inits keep their own ranks as tags.
    cfg = tiny(merge__method="dimat", merge__basis="shared", model__init=init)
    setup = prepare(cfg)
    ts = make_inproc([list(setup.graphs.neighbors(k)) for k in range(3)])
    agents = [build_agent(cfg, setup, k, ts[k]) for k in range(3)]
    assert [a.node.basis_tag for a in agents] == tags
    first = [next(a.model.parameters()) for a in agents]
    assert torch.equal(first[0], first[1]) == (init == "same")


def test_a_kept_optimizer_is_replaced_when_a_merge_changes_the_basis():
    # Ring of 3 under basis shared: in round 0 agents 1 and 2 take tag 0 (their models are loaded in agent 0's
    # unit order), so their kept Adam moments would be in the wrong order; agent 0's basis does not change.
    cfg = tiny(merge__method="dimat", merge__basis="shared", train__keep_optimizer_state=True)
    setup = prepare(cfg)
    ts = make_inproc([list(setup.graphs.neighbors(k)) for k in range(3)])
    agents = [build_agent(cfg, setup, k, ts[k]) for k in range(3)]
    kept = []
    for a in agents:
        a.optimizer = a.make_optimizer(a.model)
        kept.append(a.optimizer)
    run_round(agents, 0, cfg, None)
    assert [a.node.basis_tag for a in agents] == [0, 0, 0]
    assert [a.optimizer is k for a, k in zip(agents, kept)] == [True, False, False]
    assert all(a.optimizer is not None for a in agents)  # the round's training built and kept a fresh one


@pytest.mark.parametrize("keep", [False, True])
def test_resume_equals_uninterrupted(tmp_path, keep):
    cfg = tiny(rounds=4, train__pretrain_epochs=1, train__keep_optimizer_state=keep, train__optimizer="adam")
    full = run(cfg, tmp_path / "full", quiet=True)

    out = tmp_path / "cut"
    assert run(cfg, out, quiet=True, stop_after_round=1) is None
    assert not (out / "summary.json").exists()
    # Simulate an interruption inside round 2: a record of round 2 was written, and agent 0's checkpoint was
    # already replaced by a (bogus) round-2 one while the others still hold round 1.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 2, "agent": 0, "phase": "merge", "test_acc": 0.0}) + "\n")
        f.write('{"round": 2, "agent": 1, "pha')  # torn line
    bogus = torch.load(out / "checkpoints/agent-0.pt", weights_only=True)
    bogus["round"] = 2
    checkpoint.save(out / "checkpoints", 0, bogus)
    assert checkpoint.resume_round(out / "checkpoints", range(3)) == 1

    resumed = run(cfg, out, resume=True, quiet=True)
    full.pop("wall_s"), resumed.pop("wall_s")
    assert resumed == full
    got, want = (read_metrics([d / "metrics.jsonl"]) for d in (out, tmp_path / "full"))
    assert no_timings(got) == no_timings(want)


def test_resume_with_shared_basis_restores_the_tags(tmp_path):
    # Ring of 4, 2 agents per tag after round 0: a resume that forgot the tags would align other models in round 1.
    cfg = tiny(agents=4, rounds=3, merge__method="dimat", merge__basis="shared", merge__bn_batches=None)
    full = run(cfg, tmp_path / "full", quiet=True)
    assert run(cfg, tmp_path / "cut", quiet=True, stop_after_round=0) is None
    resumed = run(cfg, tmp_path / "cut", resume=True, quiet=True)
    full.pop("wall_s"), resumed.pop("wall_s")
    assert resumed == full
    tags = [torch.load(tmp_path / "cut" / "checkpoints" / f"agent-{k}.pt", weights_only=True)["basis_tag"]
            for k in range(4)]
    assert tags == [0, 0, 0, 0]


def test_resume_from_nothing_starts_over(tmp_path):
    cfg = tiny(rounds=2)
    out = tmp_path / "r"
    run(cfg, out, quiet=True, stop_after_round=0)
    for p in (out / "checkpoints").iterdir():
        p.unlink()
    resumed = run(cfg, out, resume=True, quiet=True)
    again = run(cfg, tmp_path / "again", quiet=True)
    resumed.pop("wall_s"), again.pop("wall_s")
    assert resumed == again


def test_resume_of_a_finished_run_rewrites_the_same_summary(tmp_path):
    cfg = tiny(rounds=2)
    first = run(cfg, tmp_path / "r", quiet=True)
    second = run(cfg, tmp_path / "r", resume=True, quiet=True)
    first.pop("wall_s"), second.pop("wall_s")
    assert first == second


def test_resume_with_another_config_is_refused(tmp_path):
    cfg = tiny(rounds=2)
    run(cfg, tmp_path / "r", quiet=True, stop_after_round=0)
    with pytest.raises(UserError, match=r"config.yaml: --resume needs the same config .* key 'train.lr'"):
        run(tiny(rounds=2, train__lr=0.5), tmp_path / "r", resume=True, quiet=True)
    moved = tiny(rounds=2, out="elsewhere")  # `out` may differ
    assert run(moved, tmp_path / "r", resume=True, quiet=True) is not None


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(UserError, match="no run to resume"):
        run(tiny(), tmp_path / "none", resume=True, quiet=True)
    assert not (tmp_path / "none").exists()


def test_existing_run_is_not_overwritten(tmp_path):
    run(tiny(rounds=1), tmp_path / "r", quiet=True)
    before = (tmp_path / "r/metrics.jsonl").read_text()
    with pytest.raises(UserError, match="already holds a run"):
        run(tiny(rounds=1), tmp_path / "r", quiet=True)
    assert (tmp_path / "r/metrics.jsonl").read_text() == before


def test_method_none_trains_locally_without_traffic(tmp_path):
    run(tiny(merge__method="none", rounds=2), tmp_path / "r", quiet=True)
    recs = read_metrics([tmp_path / "r/metrics.jsonl"])
    assert all(r["comm_bytes"] == 0 for r in recs)
    assert all(r["received"] == [] for r in recs if r["phase"] == "merge")


@pytest.mark.parametrize("method", sorted(m for m in merge.METHODS if m != "wa"))
def test_every_registered_method_runs_on_a_bn_model(tmp_path, method):
    cfg = tiny(rounds=2, merge__method=method, model={"name": "cnn", "width": 0.25},
               data={"dataset": "digits", "partition": "iid"})
    summary = run(cfg, tmp_path / "r", quiet=True)
    assert summary["method"] == method and len(summary["per_agent_acc"]) == 3
    # finite (a NaN would be written as null), well above chance (10 digit classes; one epoch reaches about
    # 0.25) and above the merged random inits of round 0
    assert all(a is not None and 0.15 < a <= 1.0 for a in summary["per_agent_acc"]), summary["per_agent_acc"]
    recs = read_metrics([tmp_path / "r/metrics.jsonl"])
    first = [r["test_acc"] for r in recs if r["phase"] == "merge" and r["round"] == 0]
    assert max(first) < min(summary["per_agent_acc"])
    assert all(r["test_loss"] is not None and r["test_loss"] < 5 for r in recs)
    merges = [r for r in recs if r["phase"] == "merge"]
    assert len(merges) == 6 and all(len(r["received"]) == 2 and r["comm_bytes"] > 0 for r in merges)


def test_a_transport_other_than_inproc_is_refused(tmp_path):
    with pytest.raises(UserError, match="transport.name"):
        run(tiny(transport={"name": "grpc"}), tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()


def test_flip_on_non_images_is_refused(tmp_path):
    with pytest.raises(UserError, match="data.flip"):
        run(tiny(data={"dataset": "digits", "flip": True}), tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()


def test_stats_both_runs_on_digits_and_records_the_second_message(tmp_path):
    """merge.stats both in simulation: finite accuracies, the statistics messages' bytes in every merge record
    (and inside comm_bytes), no edge falling back."""
    base = dict(rounds=2, data={"dataset": "digits", "partition": "dirichlet:0.3"},
                model={"name": "mlp", "width": 0.25})
    own = tiny(merge={"method": "dimat", "stat_batches": 2, "basis": "own"}, **base)
    both = tiny(merge={"method": "dimat", "stat_batches": 2, "stats": "both", "basis": "own"}, **base)
    run(own, tmp_path / "own", quiet=True)
    summary = run(both, tmp_path / "both", quiet=True)
    assert all(a is not None and 0.0 < a <= 1.0 for a in summary["per_agent_acc"]), summary["per_agent_acc"]
    merges = [r for r in read_metrics([tmp_path / "both/metrics.jsonl"]) if r["phase"] == "merge"]
    plain = {(r["round"], r["agent"]): r for r in read_metrics([tmp_path / "own/metrics.jsonl"])
             if r["phase"] == "merge"}
    assert len(merges) == 6
    for r in merges:
        assert r["stats_fallback"] == [] and r["stats_both"] == r["received"] and len(r["received"]) == 2
        # the zoo MLP's two hidden layers (C = 256, 128 at width 1; 64, 32 here): one message per edge each way
        size = sum(4 * (c * c + 4 * c) + 8 for c in (64, 32))
        assert r["stats_bytes"] == 4 * size
        assert r["comm_bytes"] == plain[(r["round"], r["agent"])]["comm_bytes"] + r["stats_bytes"]
        assert all(v is not None for v in (r["test_acc"], r["test_loss"]))
    assert all("stats_bytes" not in r for r in plain.values())


def test_stats_both_with_the_default_shared_basis(tmp_path):
    """merge.stats both with basis shared (the default) in simulation: in round 0 (tags = ranks) agent 0 holds
    the reference and uses both neighbours' statistics, every other agent uses its pair with its reference; once
    every agent of a merge carries one basis, nothing is exchanged."""
    both = tiny(rounds=3, data={"dataset": "digits", "partition": "dirichlet:0.3"}, model={"name": "mlp", "width": 0.25},
                merge={"method": "dimat", "stat_batches": 2, "stats": "both"})
    summary = run(both, tmp_path / "both", quiet=True)
    assert all(a is not None and 0.0 < a <= 1.0 for a in summary["per_agent_acc"]), summary["per_agent_acc"]
    merges = {(r["round"], r["agent"]): r for r in read_metrics([tmp_path / "both/metrics.jsonl"])
              if r["phase"] == "merge"}
    assert merges[(0, 0)]["stats_both"] == [1, 2] and merges[(0, 0)]["stats_unused"] == []
    assert merges[(0, 1)]["stats_both"] == [0] and merges[(0, 1)]["stats_unused"] == [2]
    assert merges[(0, 2)]["stats_both"] == [0] and merges[(0, 2)]["stats_unused"] == [1]
    for r in merges.values():
        assert r["stats_fallback"] == []
        assert r["test_acc"] is not None and math.isfinite(r["test_acc"])
    # tag 0 reaches all three agents of the ring in round 0, so rounds 1 and 2 send no statistics at all
    assert all(merges[(k, a)]["stats_bytes"] == 0 and merges[(k, a)]["stats_both"] == [] for k in (1, 2)
               for a in range(3))


def test_dimat_runs_combine_the_output_layer_by_class_counts(tmp_path):
    """merge.head auto: dimat's merges record head label_counts (the counts of each agent's partition, given by
    the runner), wa's record nothing; head mean gives another model on a label-skewed split (in round 1, once
    the three agents share a basis and min_corr leaves no unit out)."""
    base = dict(rounds=2, data={"dataset": "digits", "partition": "classes"}, model={"name": "mlp", "width": 0.25})
    run(tiny(merge={"method": "dimat", "stat_batches": 2}, **base), tmp_path / "auto", quiet=True)
    run(tiny(merge={"method": "dimat", "stat_batches": 2, "head": "mean"}, **base), tmp_path / "mean", quiet=True)
    run(tiny(merge={"method": "wa", "stat_batches": 2}, **base), tmp_path / "wa", quiet=True)
    recs = {k: [r for r in read_metrics([tmp_path / k / "metrics.jsonl"]) if r["phase"] == "merge"]
            for k in ("auto", "mean", "wa")}
    assert [r["head"] for r in recs["auto"]] == ["label_counts"] * 6
    assert all("head" not in r for r in recs["mean"] + recs["wa"])
    ck = [torch.load(tmp_path / k / "checkpoints/agent-0.pt", weights_only=False)["model"] for k in ("auto", "mean")]
    last = [n for n in ck[0] if n.endswith("weight")][-1]
    assert not torch.allclose(ck[0][last], ck[1][last])
