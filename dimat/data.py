"""Datasets, partitions across agents, and batch iteration.

:func:`load_dataset` turns a spec into a :class:`Dataset` of standardised tensors:

``digits``
    scikit-learn's bundled 8x8 digits (1 x 8 x 8, values 0..16), a fixed stratified 80/20 split. The default.
``synthetic`` or ``synthetic:classes=K,features=F,train=N,test=M,spread=S``
    Gaussian clusters in R^F drawn with the run's seed: unit-norm class centres, isotropic noise whose norm is
    about S (defaults 10 classes, 32 features, 2000/500 samples, S = 1.5: ~95 % for a linear model).
``npz:PATH``
    arrays ``x_train, y_train, x_test, y_test``: uint8 images (N, H, W, C) or (N, H, W), or flat features
    (N, F); other arrays (e.g. ``classes``) are ignored.
``imagefolder:PATH``
    ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` when both folders exist, otherwise ``PATH/<class>/*``
    with a fixed stratified 80/20 split. Images are read with Pillow and must all have one square size.
``cifar:PATH``
    the CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``; fine labels) python
    pickles in PATH (or in ``PATH/cifar-10-batches-py`` / ``PATH/cifar-100-python``). Pickles can run code when
    read: only point this at files you trust.

Every dataset is standardised per channel with the training set's mean and standard deviation.

:func:`partition` splits sample indices among agents from the labels alone (``iid``, ``classes``,
``dirichlet:ALPHA``); :class:`Batches` iterates over (a subset of) a dataset reproducibly.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from dimat.errors import UserError

__all__ = [
    "Dataset",
    "Batches",
    "load_dataset",
    "partition",
    "partition_dataset",
    "DATASETS",
    "PARTITIONS",
]

#: dataset spec prefixes accepted by :func:`load_dataset`
DATASETS = ("digits", "synthetic", "npz:PATH", "imagefolder:PATH", "cifar:PATH")
#: partition specs accepted by :func:`partition`
PARTITIONS = ("iid", "classes", "dirichlet:ALPHA")

#: seed of the fixed train/test splits (digits, single-folder imagefolder): one test set for every run
SPLIT_SEED = 0
TEST_FRACTION = 0.2
_STD_FLOOR = 1e-6
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


@dataclass
class Dataset:
    """A train/test pair of standardised tensors.

    Attributes
    ----------
    x_train, x_test : torch.Tensor
        float32 (N, C, H, W), standardised per channel with the training statistics; flat features are
        stored as (N, F, 1, 1).
    y_train, y_test : torch.Tensor
        int64 (N,) class labels in ``0 .. num_classes - 1``.
    num_classes, in_channels, image_size : int
        ``image_size`` is H (= W); 1 for flat features.
    is_image : bool
        Whether a random horizontal flip is a valid augmentation (False for digits and flat features).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    is_image: bool

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"classes={self.num_classes}, shape={self.in_channels}x{self.image_size}x{self.image_size})")


# ---------------------------------------------------------------------- loading
def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """Load the dataset named by ``spec`` (see the module docstring).

    Parameters
    ----------
    spec : str
        ``digits``, ``synthetic[:k=v,...]``, ``npz:PATH``, ``imagefolder:PATH`` or ``cifar:PATH``.
    seed : int
        Seed of the ``synthetic`` draw; the other datasets do not depend on it.

    Raises
    ------
    UserError
        Unknown spec, missing path, missing or inconsistent arrays; the message names the file and field.
    """
    s = str(spec).strip()
    kind, sep, arg = s.partition(":")
    kind = kind.lower()
    if kind == "digits" and not sep:
        return _digits()
    if kind == "synthetic":
        return _synthetic(arg, seed)
    if kind in _PATH_LOADERS:
        if not arg:
            raise UserError(f"dataset {s!r}: give a path, e.g. '{kind}:/data/mine'")
        path = Path(arg).expanduser()
        if not path.exists():
            raise UserError(f"dataset {s!r}: {path}: no such file or directory")
        return _PATH_LOADERS[kind](path)
    raise UserError(f"unknown dataset {s!r}; choose one of {', '.join(DATASETS)}")


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    y = d.target.astype(np.int64)
    tr, te = _stratified_split(y, TEST_FRACTION, SPLIT_SEED)
    # a flipped digit is another glyph (or none), so no flip augmentation
    return _finish("digits", x[tr], y[tr], x[te], y[te], is_image=False)


def _synthetic(arg: str, seed: int) -> Dataset:
    opts = {"classes": 10, "features": 32, "train": 2000, "test": 500, "spread": 1.5}
    for item in filter(None, (a.strip() for a in arg.split(","))):
        key, eq, val = item.partition("=")
        if key not in opts or not eq:
            raise UserError(f"dataset 'synthetic:{arg}': unknown option {item!r}; options are "
                            f"{', '.join(f'{k}=' for k in opts)}")
        try:
            opts[key] = type(opts[key])(val)
        except ValueError:
            raise UserError(f"dataset 'synthetic:{arg}': option {key!r} must be a number, got {val!r}") from None
    k, f, ntr, nte = int(opts["classes"]), int(opts["features"]), int(opts["train"]), int(opts["test"])
    if k < 2 or f < 1 or ntr < k or nte < 1 or opts["spread"] <= 0:
        raise UserError(f"dataset 'synthetic:{arg}': need classes >= 2, features >= 1, train >= classes, "
                        f"test >= 1, spread > 0")
    rng = np.random.default_rng(seed)
    # unit-norm class centres, isotropic noise of expected norm ~`spread`: at the defaults the clusters
    # overlap enough that a linear model reaches about 95 % test accuracy, not 100 %
    centres = rng.normal(size=(k, f))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % k
        rng.shuffle(y)
        x = centres[y] + rng.normal(scale=opts["spread"] / math.sqrt(f), size=(n, f))
        return x.astype(np.float32)[:, :, None, None], y.astype(np.int64)

    xtr, ytr = draw(ntr)
    xte, yte = draw(nte)
    return _finish("synthetic", xtr, ytr, xte, yte, is_image=False)


def _npz(path: Path) -> Dataset:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: expected an .npz archive with x_train, y_train, x_test, y_test")
    with z:
        names = set(z.files)
        for key in ("x_train", "y_train", "x_test", "y_test"):
            if key not in names:
                raise UserError(f"{path}: missing array {key!r} (found: {', '.join(sorted(names)) or 'none'})")
        try:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except ValueError as e:  # object arrays need pickle, which we refuse
            raise UserError(f"{path}: cannot read arrays ({e})") from None
    xtr, xte = (_npz_images(arrays[k], path, k) for k in ("x_train", "x_test"))
    ytr, yte = (_labels(arrays[k], path, k) for k in ("y_train", "y_test"))
    is_image = xtr.shape[2] > 1
    return _finish(f"npz:{path}", xtr, ytr, xte, yte, is_image=is_image, source=str(path))


def _npz_images(a: np.ndarray, path: Path, key: str) -> np.ndarray:
    """(N, H, W, C) / (N, H, W) images or (N, F) features -> float32 (N, C, H, W)."""
    if a.dtype.kind not in "uif":
        raise UserError(f"{path}: array {key!r} must be numeric, got dtype {a.dtype}")
    if a.ndim == 2:
        return a.astype(np.float32)[:, :, None, None]
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise UserError(f"{path}: array {key!r} has shape {a.shape}; expected (N, H, W, C), (N, H, W) or (N, F)")
    if a.shape[1] != a.shape[2]:
        raise UserError(f"{path}: array {key!r} holds {a.shape[1]}x{a.shape[2]} images; only square images "
                        f"are supported")
    x = a.astype(np.float32)
    if a.dtype == np.uint8:
        x /= 255.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _imagefolder(path: Path) -> Dataset:
    if not path.is_dir():
        raise UserError(f"{path}: imagefolder needs a directory")
    if (path / "train").is_dir() and (path / "test").is_dir():
        classes = _class_dirs(path / "train")
        xtr, ytr = _read_images(path / "train", classes)
        test_classes = _class_dirs(path / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise UserError(f"{path / 'test'}: class folder(s) {unknown} have no counterpart in {path / 'train'}")
        xte, yte = _read_images(path / "test", classes, only=test_classes)
    else:
        classes = _class_dirs(path)
        x, y = _read_images(path, classes)
        tr, te = _stratified_split(y, TEST_FRACTION, SPLIT_SEED)
        xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    if xtr.shape[1:] != xte.shape[1:]:
        raise UserError(f"{path}: train images are {_shape(xtr)} but test images are {_shape(xte)}")
    return _finish(f"imagefolder:{path}", xtr, ytr, xte, yte, is_image=True, source=str(path),
                   num_classes=len(classes))


def _class_dirs(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    return classes


def _read_images(root: Path, classes: Sequence[str], only: Optional[Sequence[str]] = None):
    """Images under ``root/<class>/`` -> float32 (N, C, H, W) in [0, 1] and labels (the index in ``classes``).

    C is 1 when every image is grayscale, else 3 (grayscale images are repeated, alpha is dropped).
    """
    from PIL import Image, UnidentifiedImageError

    arrays, ys = [], []
    first: Optional[tuple[Path, tuple[int, int]]] = None
    for label, name in enumerate(classes):
        if only is not None and name not in only:
            continue
        files = sorted(p for p in (root / name).iterdir()
                       if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise UserError(f"{root / name}: no image files ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        for f in files:
            try:
                with Image.open(f) as im:
                    gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
                    arr = np.asarray(im.convert("L" if gray else "RGB"))
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise UserError(f"{f}: cannot read image ({e})") from None
            if first is None:
                first = (f, arr.shape[:2])
            if arr.shape[:2] != first[1]:
                raise UserError(f"{f}: image is {arr.shape[1]}x{arr.shape[0]} but {first[0]} is "
                                f"{first[1][1]}x{first[1][0]}; all images must have one size")
            arrays.append(arr)
            ys.append(label)
    assert first is not None  # _class_dirs found folders and each holds files
    if first[1][0] != first[1][1]:
        raise UserError(f"{first[0]}: image is {first[1][1]}x{first[1][0]}; only square images are supported")
    channels = 3 if any(a.ndim == 3 for a in arrays) else 1
    x = np.stack([a[..., None].repeat(channels, axis=-1) if a.ndim == 2 else a for a in arrays])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0, np.array(ys, np.int64)


def _cifar(path: Path) -> Dataset:
    if not path.is_dir():
        raise UserError(f"{path}: cifar needs the directory holding the python pickles")
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if not (path / "test_batch").exists() and not (path / "test").exists() and (path / sub).is_dir():
            path = path / sub
    if (path / "test_batch").exists():
        train_files = [path / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, meta, names_key = [path / "test_batch"], "labels", path / "batches.meta", "label_names"
    elif (path / "test").exists():
        train_files, test_files = [path / "train"], [path / "test"]
        label_key, meta, names_key = "fine_labels", path / "meta", "fine_label_names"
    else:
        raise UserError(f"{path}: no CIFAR pickles (expected data_batch_1..5 and test_batch, or train and test)")
    missing = [f.name for f in train_files if not f.exists()]
    if missing:
        raise UserError(f"{path}: missing CIFAR file(s) {', '.join(missing)}")
    xtr, ytr = _cifar_arrays(train_files, label_key)
    xte, yte = _cifar_arrays(test_files, label_key)
    num_classes = None
    if meta.exists():
        names = _unpickle(meta).get(names_key)
        num_classes = len(names) if names is not None else None
    return _finish(f"cifar:{path}", xtr, ytr, xte, yte, is_image=True, source=str(path), num_classes=num_classes)


def _unpickle(f: Path) -> dict[str, Any]:
    try:
        with open(f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
    except Exception as e:  # any unpickling failure is a bad file
        raise UserError(f"{f}: not a CIFAR python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{f}: not a CIFAR python pickle (a {type(d).__name__}, expected a dict)")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def _cifar_arrays(files: Sequence[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        d = _unpickle(f)
        for key in ("data", label_key):
            if key not in d:
                raise UserError(f"{f}: missing field {key!r} (found: {', '.join(sorted(d))})")
        data = np.asarray(d["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(f"{f}: field 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
        labels = _labels(np.asarray(d[label_key]), f, label_key)
        if len(labels) != len(data):
            raise UserError(f"{f}: field {label_key!r} has {len(labels)} entries but 'data' has {len(data)} rows")
        xs.append(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


_PATH_LOADERS = {"npz": _npz, "imagefolder": _imagefolder, "cifar": _cifar}


# ---------------------------------------------------------------------- shared helpers
def _labels(a: np.ndarray, path: Any, key: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or a.dtype.kind not in "uif":
        raise UserError(f"{path}: array {key!r} must be a 1-D array of integer labels, got {a.dtype} {a.shape}")
    if a.dtype.kind == "f" and not np.all(np.mod(a, 1) == 0):
        raise UserError(f"{path}: array {key!r} holds non-integer labels")
    if len(a) and a.min() < 0:
        raise UserError(f"{path}: array {key!r} holds negative labels")
    return a.astype(np.int64)


def _shape(x: np.ndarray) -> str:
    return "x".join(str(s) for s in x.shape[1:])


def _finish(name: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, *, is_image: bool,
            source: Optional[str] = None, num_classes: Optional[int] = None) -> Dataset:
    """Check consistency, standardise per channel with training statistics, wrap as tensors."""
    src = source or name
    if len(xtr) != len(ytr):
        raise UserError(f"{src}: x_train has {len(xtr)} samples but y_train has {len(ytr)}")
    if len(xte) != len(yte):
        raise UserError(f"{src}: x_test has {len(xte)} samples but y_test has {len(yte)}")
    if len(xtr) == 0:
        raise UserError(f"{src}: x_train is empty")
    if xtr.shape[1:] != xte.shape[1:]:
        raise UserError(f"{src}: x_train samples are {_shape(xtr)} but x_test samples are {_shape(xte)}")
    if not np.all(np.isfinite(xtr)) or not np.all(np.isfinite(xte)):
        raise UserError(f"{src}: the inputs hold NaN or infinite values")
    k = int(max(ytr.max(), yte.max() if len(yte) else 0)) + 1
    if num_classes is not None:
        if k > num_classes:
            raise UserError(f"{src}: label {k - 1} is out of range for {num_classes} classes")
        k = num_classes
    mean = xtr.mean(axis=(0, 2, 3), dtype=np.float64)
    std = np.maximum(xtr.std(axis=(0, 2, 3), dtype=np.float64), _STD_FLOOR)
    shift = mean.astype(np.float32)[None, :, None, None]
    scale = std.astype(np.float32)[None, :, None, None]
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray((xtr - shift) / scale, dtype=np.float32)),
        y_train=torch.from_numpy(ytr.astype(np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray((xte - shift) / scale, dtype=np.float32)),
        y_test=torch.from_numpy(yte.astype(np.int64)),
        num_classes=k,
        in_channels=int(xtr.shape[1]),
        image_size=int(xtr.shape[2]),
        is_image=bool(is_image),
    )


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded ``round(n_c * test_fraction)`` samples go to test (at least one when n_c >= 2)."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_te = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_te = min(max(n_te, 1), len(idx) - 1)
        te.append(idx[:n_te])
        tr.append(idx[n_te:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(te))


# ---------------------------------------------------------------------- partitions
def partition(labels: np.ndarray, num_agents: int, spec: str, seed: int) -> list[np.ndarray]:
    """Split sample indices among agents, from the labels alone.

    Parameters
    ----------
    labels : array of int, (N,)
    num_agents : int
    spec : str
        ``iid`` (class-stratified equal shares), ``classes`` (the k-th class present goes to agent k mod N;
        needs at least as many classes as agents) or ``dirichlet:ALPHA`` (per class, shares ~ Dir(ALPHA);
        an agent left empty takes one sample from the largest agent).
    seed : int

    Returns
    -------
    list of int64 arrays, one per agent, sorted, disjoint, covering every index.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if isinstance(num_agents, bool) or not isinstance(num_agents, (int, np.integer)) or num_agents < 1:
        raise UserError(f"number of agents must be an integer >= 1, got {num_agents!r}")
    n = int(num_agents)
    if len(y) < n:
        raise UserError(f"partition {spec!r}: {len(y)} samples cannot be shared among {n} agents")
    s = str(spec).strip()
    kind, sep, arg = s.partition(":")
    kind = kind.lower()
    rng = np.random.default_rng(seed)
    if kind == "iid" and not sep:
        parts = _iid(y, n, rng)
    elif kind == "classes" and not sep:
        parts = _by_class(y, n)
    elif kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise UserError(f"partition {s!r}: ALPHA must be a number > 0, e.g. 'dirichlet:0.5'") from None
        if not alpha > 0 or not math.isfinite(alpha):
            raise UserError(f"partition {s!r}: ALPHA must be a finite number > 0, got {arg!r}")
        parts = _dirichlet(y, n, alpha, rng)
    else:
        raise UserError(f"unknown partition {s!r}; choose one of {', '.join(PARTITIONS)}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _iid(y: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    start = 0  # rotate who receives each class's leftover samples, so agents' totals stay within one of each other
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        chunks = np.array_split(idx, n)  # the first len(idx) % n chunks are one longer
        for k, chunk in enumerate(chunks):
            parts[(start + k) % n].append(chunk)
        start = (start + len(idx) % n) % n
    return [np.concatenate(p) for p in parts]


def _by_class(y: np.ndarray, n: int) -> list[np.ndarray]:
    classes = np.unique(y)
    if len(classes) < n:
        raise UserError(f"partition 'classes' needs at least as many classes as agents: {len(classes)} classes, "
                        f"{n} agents (use 'dirichlet:ALPHA' instead)")
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for k, c in enumerate(classes):
        parts[k % n].append(np.flatnonzero(y == c))
    return [np.concatenate(p) for p in parts]


def _dirichlet(y: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    owner = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        shares = rng.dirichlet(np.full(n, alpha))
        counts = _largest_remainder(shares, len(idx))
        owner[idx] = np.repeat(np.arange(n), counts)
    sizes = np.bincount(owner, minlength=n)
    # an agent with no data cannot train: give it one sample taken from the largest agent
    for a in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        pick = int(rng.choice(np.flatnonzero(owner == donor)))
        owner[pick] = a
        sizes[donor] -= 1
        sizes[a] += 1
    return [np.flatnonzero(owner == a) for a in range(n)]


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` and proportional to ``shares`` (Hamilton's method)."""
    raw = np.asarray(shares, dtype=np.float64) * total / max(float(np.sum(shares)), 1e-300)
    counts = np.floor(raw).astype(np.int64)
    rest = total - int(counts.sum())
    if rest > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:rest]] += 1
    return counts


def partition_dataset(ds: Dataset, num_agents: int, spec: str, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Partition the training set with :func:`partition`, and the test set to match.

    Each class's test samples are divided among agents in the proportions that agents hold that class's
    training samples, so an agent's local test set has (up to rounding) its training class mix. Test samples
    of a class no agent trains on are left out. An agent may get no test sample when the test set is small.

    Returns
    -------
    list of (train_idx, test_idx) per agent.
    """
    ytr = ds.y_train.numpy()
    yte = ds.y_test.numpy()
    train = partition(ytr, num_agents, spec, seed)
    n = len(train)
    k = int(max(ytr.max(), yte.max() if len(yte) else 0)) + 1
    held = np.stack([np.bincount(ytr[t], minlength=k) for t in train])  # (agents, classes)
    rng = np.random.default_rng([seed, 1])  # a stream apart from the training partition's
    test: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in np.unique(yte):
        if held[:, c].sum() == 0:
            continue
        idx = rng.permutation(np.flatnonzero(yte == c))
        counts = _largest_remainder(held[:, c], len(idx))
        for a, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            test[a].append(chunk)
    return [(t, np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64)) for t, p in zip(train, test)]


# ---------------------------------------------------------------------- batches
class Batches:
    """A re-iterable source of ``(x, y)`` batches over (a subset of) tensors.

    Each pass draws a fresh order (and fresh flips) from one seeded ``torch.Generator`` whose state advances,
    so a run that iterates the same way is reproduced exactly.

    Parameters
    ----------
    x, y : torch.Tensor
        Inputs (N, ...) and labels (N,).
    indices : array of int, optional
        The samples to use (default: all).
    batch_size : int
        Samples per batch (the last batch may be smaller unless ``drop_last``).
    shuffle : bool
        Draw a new order every pass.
    flip : bool
        Mirror each sample horizontally (last axis) with probability 1/2.
    seed : int
    drop_last : bool
        Skip a final partial batch.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, indices: Optional[Any] = None, batch_size: int = 100,
                 shuffle: bool = False, flip: bool = False, seed: int = 0, drop_last: bool = False) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        if indices is None:
            idx = torch.arange(len(y))
        else:
            idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
            if idx.ndim != 1:
                raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
            if len(idx) and (idx.min() < 0 or idx.max() >= len(y)):
                raise ValueError(f"indices out of range 0..{len(y) - 1}")
        self.indices = idx
        self.batch_size = int(batch_size)
        self.shuffle, self.flip, self.drop_last = bool(shuffle), bool(flip), bool(drop_last)
        self._gen = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices
        if self.shuffle:
            idx = idx[torch.randperm(len(idx), generator=self._gen)]
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            xb, yb = self.x[sel], self.y[sel]
            if self.flip:
                mask = torch.rand(len(sel), generator=self._gen) < 0.5
                xb[mask] = xb[mask].flip(-1)  # xb is a copy made by the indexing above
            yield xb, yb
