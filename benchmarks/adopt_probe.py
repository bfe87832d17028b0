"""How well does a neighbour's network serve an agent's own data? A linear probe on its features (docs/merge.md,
"Keeping one's own basis").

Under ``merge.basis: shared`` an agent adopts the reference neighbour's network in round 0, and relearns its own
data from there. This measures, before that first merge, how good a starting point each neighbour's network is:
a ridge-regression probe (one-hot targets, standardised features, penalty 0.01 per sample) is fitted on the input
of the model's last ``nn.Linear`` for half of a shuffled sample of the agent's training data, and its accuracy is
read on the other half. The same is done with the agent's own network; the ratio neighbour / own says how much
of the agent's data the neighbour's features separate. Both halves come from the agent's training data, as
anything an agent could decide on at run time must.

The run folder must hold the models of the pretraining: run the config with ``--set rounds=1``, so that
``checkpoints/agent-K.prev.pt`` is the state after pretraining (round -1).

Usage, from the repository root (the run's config must resolve from there)::

    dimat run CONFIG --set rounds=1 --out runs/X
    python benchmarks/adopt_probe.py [--samples 1000] runs/X [runs/Y ...]
"""

from __future__ import annotations

import argparse
from typing import List

import numpy as np
import torch
from torch import nn

from dimat import build
from dimat.config import load_config


def last_linear(model: nn.Module) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise SystemExit(f"{type(model).__name__} has no nn.Linear layer to probe the input of")
    return layers[-1]


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The input of the model's last Linear layer for every row of ``x`` (float64, flattened)."""
    model.eval()
    got: List[torch.Tensor] = []
    hook = last_linear(model).register_forward_pre_hook(lambda _m, inp: got.append(inp[0].flatten(1)))
    try:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    finally:
        hook.remove()
    return torch.cat(got).double()


def probe_accuracy(f_fit: torch.Tensor, y_fit: torch.Tensor, f_eval: torch.Tensor, y_eval: torch.Tensor,
                   penalty: float = 1e-2) -> float:
    """Accuracy on (f_eval, y_eval) of a ridge probe fitted on (f_fit, y_fit); classes are those of y_fit."""
    mu, sd = f_fit.mean(0), f_fit.std(0).clamp_min(1e-6)
    a = torch.cat([(f_fit - mu) / sd, torch.ones(len(f_fit), 1, dtype=torch.float64)], 1)
    b = torch.cat([(f_eval - mu) / sd, torch.ones(len(f_eval), 1, dtype=torch.float64)], 1)
    classes = torch.unique(y_fit)
    target = (y_fit[:, None] == classes[None]).double()
    w = torch.linalg.solve(a.T @ a + penalty * len(a) * torch.eye(a.shape[1], dtype=torch.float64), a.T @ target)
    return float((classes[(b @ w).argmax(1)] == y_eval).double().mean())


def main(run: str, samples: int) -> None:
    cfg = load_config(f"{run}/config.yaml", ["merge.method=none", "merge.min_corr=null"])
    torch.set_num_threads(cfg["threads"] or torch.get_num_threads())
    setup = build.prepare(cfg)
    agents = [build.build_agent(cfg, setup, k, None) for k in range(cfg["agents"])]
    for a in agents:
        ck = torch.load(f"{run}/checkpoints/agent-{a.rank}.prev.pt", weights_only=False)
        if ck.get("round") != -1:
            raise SystemExit(f"{run}: agent-{a.rank}.prev.pt is round {ck.get('round')}, not the pretraining "
                             f"(-1): run the config with --set rounds=1")
        a.model.load_state_dict(ck["model"])
    graph = setup.graphs.at(0) if hasattr(setup.graphs, "at") else setup.graphs
    own_acc, nb_acc, ratios = [], [], []
    for a in agents:
        x, y = a.train
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(a.rank))
        n = min(samples, len(x)) // 2
        x, y = x[order[:2 * n]], y[order[:2 * n]]
        accs = {}
        for j in [a.rank] + [j for j in graph.neighbors(a.rank) if j != a.rank]:
            f = features(agents[j].model, x)
            accs[j] = probe_accuracy(f[:n], y[:n], f[n:], y[n:])
        own = accs.pop(a.rank)
        own_acc.append(own)
        nb_acc += list(accs.values())
        ratios += [v / own for v in accs.values()]
        print(f"  agent {a.rank} ({2 * n} samples): own {own:.3f}; neighbours "
              + ", ".join(f"{j}: {v:.3f}" for j, v in accs.items()))
    print(f"{run}: probe accuracy own {np.mean(own_acc):.3f}, neighbours {np.mean(nb_acc):.3f}; ratio "
          f"neighbour / own {np.mean(ratios):.2f} (per neighbour {min(ratios):.2f} - {max(ratios):.2f})",
          flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders of `dimat run ... --set rounds=1`")
    p.add_argument("--samples", type=int, default=1000, help="training samples per agent (half fit, half score)")
    args = p.parse_args()
    for r in args.runs:
        main(r, args.samples)
