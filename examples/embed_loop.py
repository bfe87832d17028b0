"""Decentralized merge-and-train inside a plain PyTorch training loop: three agents, one ``dimat.Node`` each.

All three agents live in this process and talk over the in-process transport; with one agent per process the only
change is the transport (see docs/embedding.md). The training loop is ordinary PyTorch that dimat never sees.

    python examples/embed_loop.py [--rounds 5] [--epochs 2] [--method dimat|wm|wa]
"""

import argparse

import torch
import torch.nn.functional as F

import dimat
from dimat.data import Batches, load_dataset, partition_dataset
from dimat.models import build
from dimat.topology import Topology
from dimat.transport.inproc import make_inproc


def main(argv=None):
    p = argparse.ArgumentParser(description="three agents on digits, merged with dimat every round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2, help="local epochs between merges")
    p.add_argument("--method", default="dimat", help="merge operator: dimat, wm or wa")
    args = p.parse_args(argv)

    ds = load_dataset("digits")
    topology = Topology.from_spec("ring", 3)
    transports = make_inproc([topology.neighbors(k) for k in range(3)])
    nodes, data = [], []
    for k, (train_idx, _) in enumerate(partition_dataset(ds, 3, "dirichlet:1.0", seed=0)):
        torch.manual_seed(k)  # every agent its own initialisation
        model = build("cnn", ds.num_classes, width=0.5, in_channels=ds.in_channels, image_size=ds.image_size)
        x, y = ds.x_train[train_idx], ds.y_train[train_idx]
        local = Batches(x, y, batch_size=100, shuffle=True, seed=k)  # merge statistics use only local data
        nodes.append(dimat.Node(model, topology, k, transports[k], local, method=args.method))
        data.append((x, y))

    for r in range(args.rounds):
        for node, (x, y) in zip(nodes, data):  # your training loop: dimat does not touch it
            opt = torch.optim.Adam(node.model.parameters(), lr=1e-3)
            node.model.train()
            for _ in range(args.epochs):
                for idx in torch.randperm(len(x)).split(32):
                    opt.zero_grad()
                    F.cross_entropy(node.model(x[idx]), y[idx]).backward()
                    opt.step()
        for node in nodes:  # in one process: everyone posts round r before anyone merges
            node.post(r)
        for node in nodes:  # exchange with the neighbours and merge into node.model, in place
            node.merge_round(r)
        with torch.no_grad():
            accs = [(n.model.eval()(ds.x_test).argmax(1) == ds.y_test).float().mean().item() for n in nodes]
        print(f"round {r}: test accuracy after merge " + " ".join(f"{a:.3f}" for a in accs))
    return accs


if __name__ == "__main__":
    main()
