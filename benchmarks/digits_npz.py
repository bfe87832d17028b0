"""Write scikit-learn's digits as an npz file in the tin20 layout, for ``dimat bench merge --data``.

    python -m benchmarks.digits_npz /tmp/digits.npz

Arrays: x_train (1400, 8, 8, 1) and x_test (397, 8, 8, 1) as uint8 (pixel values 0..16 scaled to 0..255),
y_train, y_test; the split is a fixed random permutation (numpy seed 0).
"""

from __future__ import annotations

import sys

import numpy as np


def write(path: str) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * 255 / 16).round().astype(np.uint8)[..., None]
    idx = np.random.default_rng(0).permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    np.savez(path, x_train=x[tr], y_train=d.target[tr], x_test=x[te], y_test=d.target[te])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.digits_npz OUT.npz")
    write(sys.argv[1])
