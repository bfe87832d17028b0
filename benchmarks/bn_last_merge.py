"""Redo the last round's merges of a finished `dimat run` with different BatchNorm repairs (docs/merge.md,
"BatchNorm repair").

The run folder's ``checkpoints/agent-K.prev.pt`` hold every agent's model before the last round's merge (the
snapshots that merge used) and its basis tag; under ``merge.basis: shared``, participants that all carry one tag
are averaged without alignment, as the run did. Each agent merges them again with the run's operator, weights and
local batches, and the merged model's accuracy on the full test set is printed, per variant, as the mean over
agents and per agent:

* ``local``: the BatchNorm statistics recomputed on the local batches (``merge.bn_repair: local``, the default);
* ``refresh``: every snapshot's statistics first re-estimated on its owner's batches (``merge.bn_refresh``),
  then ``local``;
* ``mix``: ``refresh``, then ``merge.bn_repair: mix``;
* ``global``: ``refresh``, the merge with ``local``, then the statistics recomputed on 20 batches drawn from
  every agent's training data: a reference no agent can compute (it needs everyone's data).

Usage, from the repository root (the run's config must resolve from there)::

    python benchmarks/bn_last_merge.py runs/X [local,refresh,mix,global]
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dimat import build, merge
from dimat.data import Batches
from dimat.node import Node
from dimat.config import load_config
from dimat.train import evaluate


def main(run: str, variants: list[str]) -> None:
    # agents without a transport; the merge settings are read from the run's config as it ran
    cfg = load_config(f"{run}/config.yaml", ["merge.method=none", "merge.min_corr=null"])
    ran = load_config(f"{run}/config.yaml")["merge"]
    method = json.load(open(f"{run}/summary.json"))["method"]
    torch.set_num_threads(cfg["threads"] or torch.get_num_threads())
    setup = build.prepare(cfg)
    agents = [build.build_agent(cfg, setup, k, None) for k in range(cfg["agents"])]
    tags = {}
    for a in agents:
        ck = torch.load(f"{run}/checkpoints/agent-{a.rank}.prev.pt", weights_only=False)
        a.model.load_state_dict(ck["model"])
        tags[a.rank] = ck.get("basis_tag")
    m = cfg["merge"]
    n_bn = m["bn_batches"] or m["stat_batches"]
    fresh = []
    for a in agents:
        f = copy.deepcopy(a.model)
        merge.repair.refresh_bn_stats(f, lambda b=a.node.batches: merge.iter_inputs(b, n_bn))
        fresh.append(f)
    g = setup.graphs.at(0) if hasattr(setup.graphs, "at") else setup.graphs
    ds = setup.dataset
    order = np.random.default_rng(0).permutation(np.concatenate([p[0] for p in setup.parts]))
    everyone = Batches(ds.x_train, ds.y_train, order, batch_size=cfg["train"]["batch_size"])
    fn = merge.get(method)
    res: dict[str, list[float]] = {v: [] for v in variants}
    for a in agents:
        ranks = [a.rank] + [j for j in g.neighbors(a.rank) if j != a.rank]
        w = [float(g.pi[a.rank][j]) for j in ranks]
        for v in variants:
            models = [agents[j].model for j in ranks] if v == "local" else [fresh[j] for j in ranks]
            kw = dict(batches=a.node.batches, reset_bn=m["reset_bn"], stat_batches=m["stat_batches"])
            if method == "dimat":  # min_corr as the run's Node resolved it
                kw["min_corr"] = Node.resolve_min_corr(ran["min_corr"], method, ran["combine"])
            if m["bn_batches"] is not None:  # the node's own reset on bn_batches, no REPAIR (as in the run)
                kw.update(bn_batches=m["bn_batches"], repair=False)
            if ran["basis"] == "shared" and method in Node.ALIGNING and None not in tags.values() \
                    and len({tags[j] for j in ranks}) == 1:
                kw["same_basis"] = list(range(1, len(ranks)))  # one basis: the run averaged them unaligned
            merged = fn(models, w, bn_repair="mix" if v == "mix" else "local", **kw)
            if v == "global":
                merge.reset_bn_stats(merged, everyone, 20)
            res[v].append(evaluate(merged, *a.test, batch_size=cfg["eval"]["batch_size"])[0])
    for v in variants:
        print(f"{run}\t{v}\t{np.mean(res[v]):.3f}\t" + " ".join(f"{x:.3f}" for x in res[v]))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    if not (Path(sys.argv[1]) / "config.yaml").exists():
        sys.exit(f"bn_last_merge.py: {sys.argv[1]}: not a finished run folder (no config.yaml)")
    main(sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "local,refresh,mix,global").split(","))
