"""Merge two models trained on DISJOINT halves of the classes, with each operator, and print test accuracies.

A diagnostic for non-IID runs: how much of two experts survives one merge, and whether activation statistics
from one agent's own data (its half of the classes) do worse than statistics from the union.

    python examples/disjoint_merge.py --data npz:../shared/data/tin20-dev.npz [--epochs 4] [--width 0.5]
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from dimat import merge, models
from dimat.data import Batches, load_dataset


def train(ds, idx, seed, args):
    torch.manual_seed(seed)
    m = models.build(args.model, ds.num_classes, width=args.width, in_channels=ds.in_channels,
                     image_size=ds.image_size)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    batches = Batches(ds.x_train, ds.y_train, idx, batch_size=100, shuffle=True, flip=ds.is_image, seed=seed)
    m.train()
    for _ in range(args.epochs):
        for xb, yb in batches:
            opt.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            opt.step()
    return m


@torch.no_grad()
def accuracy(ds, m):
    m.eval()
    return (m(ds.x_test).argmax(1) == ds.y_test).float().mean().item()


def stat_batches(ds, idx, rng, n=1000, size=100):
    pick = rng.permutation(idx)[:n]
    return [(ds.x_train[i], ds.y_train[i]) for i in np.array_split(pick, max(1, len(pick) // size))]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--model", default="cnn")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    ds = load_dataset(args.data)
    y = ds.y_train.numpy()
    half = ds.num_classes // 2
    idx_a, idx_b = np.where(y < half)[0], np.where(y >= half)[0]
    a, b = train(ds, idx_a, 0, args), train(ds, idx_b, 1, args)
    print(f"endpoints (full test set): A {accuracy(ds, a):.3f}  B {accuracy(ds, b):.3f}")
    rng = np.random.default_rng(0)
    for name, idx in [("A's own data", idx_a), ("union of both", np.arange(len(y)))]:
        batches = stat_batches(ds, idx, rng)
        row = {
            "average+BN reset": merge.average([a, b], [0.5, 0.5], batches=batches, reset_bn=True),
            "weight_match": merge.weight_match([a, b], [0.5, 0.5], batches=batches),
            "activation_match": merge.activation_match([a, b], [0.5, 0.5], batches=batches),
        }
        print(f"statistics on {name}: " + "  ".join(f"{k} {accuracy(ds, m):.3f}" for k, m in row.items()))


if __name__ == "__main__":
    main()
