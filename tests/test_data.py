"""Tests for dimat.data: datasets, partitions, batches."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dimat.data import Batches, Dataset, load_dataset, partition, partition_dataset
from dimat.errors import UserError

TIN20 = Path(os.environ.get("DIMAT_TIN20", Path(__file__).resolve().parents[2] / "shared/data/tin20-dev.npz"))


def _assert_standardised(ds: Dataset):
    per_channel = ds.x_train.transpose(0, 1).reshape(ds.in_channels, -1)
    np.testing.assert_allclose(per_channel.mean(1).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(per_channel.std(1, unbiased=False).numpy(), 1.0, atol=1e-3)


def _assert_well_formed(ds: Dataset, n_train, n_test, classes, channels, size):
    assert ds.x_train.shape == (n_train, channels, size, size) and ds.x_train.dtype == torch.float32
    assert ds.x_test.shape == (n_test, channels, size, size) and ds.x_test.dtype == torch.float32
    assert ds.y_train.shape == (n_train,) and ds.y_train.dtype == torch.int64
    assert ds.y_test.shape == (n_test,) and ds.y_test.dtype == torch.int64
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (classes, channels, size)


# ---------------------------------------------------------------------- built-in datasets
def test_digits():
    ds = load_dataset("digits")
    _assert_well_formed(ds, 1438, 359, 10, 1, 8)
    assert not ds.is_image  # a mirrored digit is not the same digit
    _assert_standardised(ds)
    # a stratified split: every class is in the test set about 20 % of the time
    counts_tr = np.bincount(ds.y_train.numpy())
    counts_te = np.bincount(ds.y_test.numpy())
    np.testing.assert_allclose(counts_te / (counts_tr + counts_te), 0.2, atol=0.01)
    again = load_dataset("digits", seed=7)  # the split is fixed, whatever the run's seed
    assert torch.equal(ds.x_test, again.x_test) and torch.equal(ds.y_train, again.y_train)


def test_synthetic_is_seeded_and_configurable():
    a, b, c = load_dataset("synthetic", seed=1), load_dataset("synthetic", seed=1), load_dataset("synthetic", seed=2)
    _assert_well_formed(a, 2000, 500, 10, 32, 1)
    assert not a.is_image
    _assert_standardised(a)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    small = load_dataset("synthetic:classes=3,features=5,train=60,test=30,spread=0.5")
    _assert_well_formed(small, 60, 30, 3, 5, 1)
    # learnable: nearest class mean (of the training set) classifies most test points
    means = torch.stack([small.x_train[small.y_train == k].mean(0).flatten() for k in range(3)])
    pred = torch.cdist(small.x_test.flatten(1), means).argmin(1)
    assert (pred == small.y_test).float().mean() > 0.9


@pytest.mark.parametrize("spec, match", [
    ("mnist", "unknown dataset 'mnist'"),
    ("digits:foo", "unknown dataset 'digits:foo'"),
    ("synthetic:colors=3", "unknown option 'colors=3'"),
    ("synthetic:classes=x", "option 'classes' must be a number"),
    ("synthetic:classes=1", "need classes >= 2"),
    ("npz:", "give a path"),
])
def test_bad_dataset_specs(spec, match):
    with pytest.raises(UserError, match=match):
        load_dataset(spec)


@pytest.mark.parametrize("kind", ["npz", "imagefolder", "cifar"])
def test_missing_paths(tmp_path, kind):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"{missing}: no such file or directory"):
        load_dataset(f"{kind}:{missing}")


# ---------------------------------------------------------------------- npz
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_uint8_color_images(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 6, 6, 3), dtype=np.uint8)
    x[..., 2] = 7  # a constant channel must not divide by zero
    path = _npz(tmp_path / "d.npz", x_train=x[:30], y_train=np.arange(30) % 4, x_test=x[30:],
                y_test=np.arange(10) % 4, classes=np.array(["a", "b", "c", "d"]))
    ds = load_dataset(f"npz:{path}")
    _assert_well_formed(ds, 30, 10, 4, 3, 6)
    assert ds.is_image
    # NHWC -> NCHW, then (v - mean_c) / std_c with train statistics of channel c
    raw = x[:30, :, :, 0].astype(np.float64) / 255
    expect = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), expect, atol=1e-4)
    assert torch.all(ds.x_train[:, 2] == 0)


def test_npz_grayscale_and_flat_features(tmp_path):
    rng = np.random.default_rng(1)
    gray = _npz(tmp_path / "g.npz", x_train=rng.integers(0, 256, (20, 5, 5), dtype=np.uint8), y_train=np.arange(20) % 2,
                x_test=rng.integers(0, 256, (6, 5, 5), dtype=np.uint8), y_test=np.arange(6) % 2)
    _assert_well_formed(load_dataset(f"npz:{gray}"), 20, 6, 2, 1, 5)
    flat = _npz(tmp_path / "f.npz", x_train=rng.normal(size=(20, 7)), y_train=np.arange(20) % 5,
                x_test=rng.normal(size=(8, 7)), y_test=np.arange(8) % 5)
    ds = load_dataset(f"npz:{flat}")
    _assert_well_formed(ds, 20, 8, 5, 7, 1)
    assert not ds.is_image
    _assert_standardised(ds)


def test_npz_bad_contents(tmp_path):
    good = dict(x_train=np.zeros((4, 3)), y_train=np.arange(4), x_test=np.zeros((2, 3)), y_test=np.arange(2))
    cases = [
        ({k: v for k, v in good.items() if k != "y_test"}, "missing array 'y_test' (found: x_test, x_train, y_train)"),
        ({**good, "x_train": np.zeros((4, 5, 6, 3), np.uint8)}, "array 'x_train' holds 5x6 images; only square"),
        ({**good, "x_test": np.zeros((2, 4))}, "x_train samples are 3x1x1 but x_test samples are 4x1x1"),
        ({**good, "y_train": np.arange(3)}, "x_train has 4 samples but y_train has 3"),
        ({**good, "y_train": np.array([0, 1, -1, 2])}, "array 'y_train' holds negative labels"),
        ({**good, "y_train": np.array([0, 1.5, 1, 2])}, "array 'y_train' holds non-integer labels"),
        ({**good, "x_train": np.array(["a"] * 12).reshape(4, 3)}, "array 'x_train' must be numeric"),
        ({**good, "x_train": np.zeros((4, 2, 2, 2, 2))}, "array 'x_train' has shape"),
        ({**good, "x_train": np.full((4, 3), np.nan)}, "NaN or infinite"),
    ]
    for i, (arrays, match) in enumerate(cases):
        path = _npz(tmp_path / f"bad{i}.npz", **arrays)
        with pytest.raises(UserError, match=f"^{re.escape(str(path))}: .*{re.escape(match)}"):
            load_dataset(f"npz:{path}")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UserError, match=f"^{junk}: not a readable .npz file"):
        load_dataset(f"npz:{junk}")


@pytest.mark.skipif(not TIN20.exists(), reason="tin20-dev.npz not available")
def test_tin20():
    ds = load_dataset(f"npz:{TIN20}")
    _assert_well_formed(ds, 10000, 1000, 20, 3, 32)
    assert ds.is_image


# ---------------------------------------------------------------------- imagefolder
def _png(path: Path, size=(4, 4), mode="RGB", value=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value if mode == "L" else (value, 255 - value, value // 2)).save(path)


def test_imagefolder_train_test_layout(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for c, name in enumerate(["cat", "dog"]):
            for i in range(n):
                _png(tmp_path / split / name / f"{i}.png", value=40 * c + 10 * i)
    ds = load_dataset(f"imagefolder:{tmp_path}")
    _assert_well_formed(ds, 6, 2, 2, 3, 4)
    assert ds.is_image and ds.y_train.tolist() == [0, 0, 0, 1, 1, 1] and ds.y_test.tolist() == [0, 1]


def test_imagefolder_single_folder_split_and_grayscale(tmp_path):
    for c in range(3):
        for i in range(10):
            _png(tmp_path / f"class{c}" / f"{i}.png", size=(5, 5), mode="L", value=20 * c + i)
    (tmp_path / "class0" / "notes.txt").write_text("ignored")
    ds = load_dataset(f"imagefolder:{tmp_path}")
    _assert_well_formed(ds, 24, 6, 3, 1, 5)
    assert np.bincount(ds.y_test.numpy()).tolist() == [2, 2, 2]  # fixed stratified 80/20


def test_imagefolder_mixed_gray_and_color_gives_rgb(tmp_path):
    _png(tmp_path / "a" / "0.png", mode="L", value=200)
    _png(tmp_path / "a" / "1.png", mode="L", value=100)
    _png(tmp_path / "b" / "0.png", value=30)
    _png(tmp_path / "b" / "1.png", value=90)
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.in_channels == 3 and ds.num_classes == 2 and len(ds.y_train) + len(ds.y_test) == 4


def test_imagefolder_bad_contents(tmp_path):
    _png(tmp_path / "a" / "0.png")
    _png(tmp_path / "a" / "1.png", size=(5, 5))
    with pytest.raises(UserError, match=r"1.png: image is 5x5 but .*0.png is 4x4; all images must have one size"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "a" / "1.png").unlink()
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path / 'b'}: no image files"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "b" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"x.png: cannot read image"):
        load_dataset(f"imagefolder:{tmp_path}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no class folders"):
        load_dataset(f"imagefolder:{empty}")
    wide = tmp_path / "wide"
    _png(wide / "a" / "0.png", size=(6, 4))
    with pytest.raises(UserError, match="only square images"):
        load_dataset(f"imagefolder:{wide}")


# ---------------------------------------------------------------------- cifar
def _pickle(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_batch(n, classes, label_key, offset=0):
    rng = np.random.default_rng(offset)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [(i + offset) % classes for i in range(n)]}


def test_cifar10_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"  # found inside the given folder too
    for i in range(1, 6):
        _pickle(root / f"data_batch_{i}", _cifar_batch(4, 10, b"labels", offset=i))
    _pickle(root / "test_batch", _cifar_batch(5, 10, b"labels"))
    _pickle(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    ds = load_dataset(f"cifar:{tmp_path}")
    _assert_well_formed(ds, 20, 5, 10, 3, 32)
    assert ds.is_image
    raw = _cifar_batch(4, 10, b"labels", offset=1)[b"data"].reshape(4, 3, 32, 32)
    # the first image's red channel, standardised: ordering of the 3072 bytes is (channel, row, column)
    red = ds.x_train[0, 0].numpy()
    assert np.corrcoef(red.ravel(), raw[0, 0].ravel())[0, 1] > 0.999


def test_cifar100_pickles(tmp_path):
    _pickle(tmp_path / "train", _cifar_batch(12, 100, "fine_labels"))  # str keys are accepted too
    _pickle(tmp_path / "test", _cifar_batch(6, 100, "fine_labels"))
    ds = load_dataset(f"cifar:{tmp_path}")
    _assert_well_formed(ds, 12, 6, 12, 3, 32)  # without a meta file: classes = largest label + 1


def test_cifar_bad_contents(tmp_path):
    with pytest.raises(UserError, match="no CIFAR pickles"):
        load_dataset(f"cifar:{tmp_path}")
    _pickle(tmp_path / "test_batch", _cifar_batch(5, 10, b"labels"))
    _pickle(tmp_path / "data_batch_1", _cifar_batch(5, 10, b"labels"))
    with pytest.raises(UserError, match="missing CIFAR file.s. data_batch_2, data_batch_3"):
        load_dataset(f"cifar:{tmp_path}")
    for i in range(2, 6):
        _pickle(tmp_path / f"data_batch_{i}", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(UserError, match=r"data_batch_2: missing field 'labels'"):
        load_dataset(f"cifar:{tmp_path}")
    (tmp_path / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"data_batch_2: not a CIFAR python pickle"):
        load_dataset(f"cifar:{tmp_path}")


# ---------------------------------------------------------------------- partitions
LABELS = np.repeat(np.arange(10), [50, 40, 30, 30, 30, 30, 30, 30, 30, 21])  # unequal, 321 samples


def _check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and complete
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_iid_partition_is_class_stratified():
    parts = partition(LABELS, 4, "iid", seed=0)
    _check_cover(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    per_class = np.stack([np.bincount(LABELS[p], minlength=10) for p in parts])
    assert np.all(per_class.max(0) - per_class.min(0) <= 1)  # every agent holds every class equally
    assert partition(LABELS, 4, "iid", seed=0)[2].tolist() == parts[2].tolist()
    assert partition(LABELS, 4, "iid", seed=1)[2].tolist() != parts[2].tolist()


def test_classes_partition():
    parts = partition(LABELS, 3, "classes", seed=0)
    _check_cover(parts, len(LABELS))
    for a, p in enumerate(parts):
        assert sorted(set(LABELS[p].tolist())) == [c for c in range(10) if c % 3 == a]
    # the k-th class present goes to agent k mod N, also when labels have gaps
    gappy = np.array([2, 2, 5, 9, 9, 9])
    assert [p.tolist() for p in partition(gappy, 2, "classes", 0)] == [[0, 1, 3, 4, 5], [2]]
    with pytest.raises(UserError, match="needs at least as many classes as agents: 10 classes, 11 agents"):
        partition(LABELS, 11, "classes", seed=0)


def test_dirichlet_partition():
    parts = partition(LABELS, 5, "dirichlet:0.5", seed=3)
    _check_cover(parts, len(LABELS))
    assert [p.tolist() for p in partition(LABELS, 5, "dirichlet:0.5", seed=3)] == [p.tolist() for p in parts]
    assert [p.tolist() for p in partition(LABELS, 5, "dirichlet:0.5", seed=4)] != [p.tolist() for p in parts]
    # small alpha: skewed class mixes; large alpha: close to iid
    skew = np.stack([np.bincount(LABELS[p], minlength=10) for p in partition(LABELS, 5, "dirichlet:0.05", 0)])
    flat = np.stack([np.bincount(LABELS[p], minlength=10) for p in partition(LABELS, 5, "dirichlet:1000", 0)])
    assert (skew == 0).mean() > 0.5 and (flat == 0).sum() == 0
    # many agents, tiny alpha: nobody is left without data
    for seed in range(5):
        tiny = partition(LABELS, 40, "dirichlet:0.01", seed)
        _check_cover(tiny, len(LABELS))
        assert min(len(p) for p in tiny) >= 1


@pytest.mark.parametrize("spec, n, match", [
    ("dirichlet:abc", 3, "ALPHA must be a number"),
    ("dirichlet:-1", 3, "ALPHA must be a finite number > 0"),
    ("dirichlet:nan", 3, "ALPHA must be a finite number > 0"),
    ("shards", 3, "unknown partition 'shards'"),
    ("iid", 0, "integer >= 1"),
    ("iid", 400, "321 samples cannot be shared among 400 agents"),
])
def test_bad_partitions(spec, n, match):
    with pytest.raises(UserError, match=match):
        partition(LABELS, n, spec, seed=0)


@pytest.mark.parametrize("spec", ["iid", "classes", "dirichlet:0.3"])
def test_partition_dataset_test_split_follows_train_mix(spec):
    ds = load_dataset("synthetic:classes=6,features=4,train=600,test=300")
    splits = partition_dataset(ds, 3, spec, seed=0)
    ytr, yte = ds.y_train.numpy(), ds.y_test.numpy()
    _check_cover([tr for tr, _ in splits], len(ytr))
    _check_cover([te for _, te in splits], len(yte))  # every class is trained on by someone here
    for tr, te in splits:
        train_mix = np.bincount(ytr[tr], minlength=6) / len(tr)
        test_mix = np.bincount(yte[te], minlength=6) / max(len(te), 1)
        np.testing.assert_allclose(test_mix, train_mix, atol=0.03)
        assert set(yte[te]) <= set(ytr[tr])


# ---------------------------------------------------------------------- batches
def _toy(n=10):
    x = torch.arange(n * 2 * 3, dtype=torch.float32).reshape(n, 1, 2, 3)
    return x, torch.arange(n)


def test_batches_cover_and_sizes():
    x, y = _toy()
    b = Batches(x, y, indices=np.array([1, 3, 5, 7, 9]), batch_size=2)
    assert len(b) == 3 and [yb.tolist() for _, yb in b] == [[1, 3], [5, 7], [9]]
    assert len(Batches(x, y, batch_size=4, drop_last=True)) == 2
    assert sum(len(yb) for _, yb in Batches(x, y, batch_size=4, drop_last=True)) == 8
    assert list(Batches(x, y, indices=np.array([], dtype=int))) == []


def test_batches_shuffle_is_seeded_and_fresh_each_epoch():
    x, y = _toy(50)

    def epochs(b, k=3):
        return [torch.cat([yb for _, yb in b]).tolist() for _ in range(k)]

    e1 = epochs(Batches(x, y, batch_size=8, shuffle=True, seed=5))
    e2 = epochs(Batches(x, y, batch_size=8, shuffle=True, seed=5))
    assert e1 == e2  # reproducible
    assert e1[0] != e1[1] and sorted(e1[0]) == list(range(50))  # a new order each pass, same samples
    assert epochs(Batches(x, y, batch_size=8, shuffle=True, seed=6))[0] != e1[0]


def test_batches_flip_mirrors_rows_and_keeps_data():
    x, y = _toy(200)
    flipped = 0
    for xb, yb in Batches(x, y, batch_size=64, flip=True, seed=0):
        for xi, yi in zip(xb, yb):
            orig = x[yi]
            assert torch.equal(xi, orig) or torch.equal(xi, orig.flip(-1))
            flipped += int(not torch.equal(xi, orig))
    assert 60 < flipped < 140
    assert torch.equal(x, _toy(200)[0])  # the source tensor is untouched


def test_batches_reject_bad_arguments():
    x, y = _toy()
    with pytest.raises(ValueError, match="out of range"):
        Batches(x, y, indices=[0, 10])
    with pytest.raises(ValueError, match="batch_size"):
        Batches(x, y, batch_size=0)
    with pytest.raises(ValueError, match="x has 10 samples but y has 9"):
        Batches(x, y[:9])
