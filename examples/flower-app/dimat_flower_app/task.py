"""What the ServerApp and the ClientApp share: data, the split between server and clients, the model."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, List, Mapping, Tuple

import numpy as np
import torch
from torch import nn

from dimat.data import Dataset, load_dataset, partition
from dimat.models import build

STRATEGIES = ("both", "dimat", "fedavg")
CLIENT_INITS = ("shared", "own")
CLIENT_ALIGNS = ("none", "align")


@dataclass(frozen=True)
class Settings:
    """The run config of pyproject.toml's [tool.flwr.app.config], checked (one-line errors name the key)."""

    num_server_rounds: int
    min_nodes: int
    strategy: str
    merge: str
    head: str
    dataset: str
    partition: str
    calibration_fraction: float
    client_init: str
    client_align: str
    client_keep: float
    model: str
    width: float
    local_epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    out_dir: str

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> "Settings":
        def get(key: str, kind: type) -> Any:
            if key not in cfg:
                raise ValueError(f"run config: missing key {key!r} (see the app's pyproject.toml)")
            v = cfg[key]
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, kind) or isinstance(v, bool):
                raise ValueError(f"run config: {key!r} must be a {kind.__name__}, got {v!r}")
            return v

        def choice(key: str, options: Tuple[str, ...]) -> str:
            v = get(key, str)
            if v not in options:
                raise ValueError(f"run config: {key!r} must be one of {', '.join(options)}; got {v!r}")
            return v

        s = cls(
            num_server_rounds=get("num-server-rounds", int),
            min_nodes=get("min-nodes", int),
            strategy=choice("strategy", STRATEGIES),
            merge=choice("merge", ("dimat", "wm", "wa")),
            head=choice("head", ("mean", "label_counts")),
            dataset=get("dataset", str),
            partition=get("partition", str),
            calibration_fraction=get("calibration-fraction", float),
            client_init=choice("client-init", CLIENT_INITS),
            client_align=choice("client-align", CLIENT_ALIGNS),
            client_keep=get("client-keep", float),
            model=get("model", str),
            width=get("width", float),
            local_epochs=get("local-epochs", int),
            learning_rate=get("learning-rate", float),
            batch_size=get("batch-size", int),
            seed=get("seed", int),
            out_dir=get("out-dir", str),
        )
        for key, value, ok in [
            ("num-server-rounds", s.num_server_rounds, s.num_server_rounds >= 1),
            ("min-nodes", s.min_nodes, s.min_nodes >= 1),
            ("calibration-fraction", s.calibration_fraction, 0 < s.calibration_fraction < 1),
            ("client-keep", s.client_keep, 0 <= s.client_keep < 1),
            ("local-epochs", s.local_epochs, s.local_epochs >= 1),
            ("batch-size", s.batch_size, s.batch_size >= 1),
            ("learning-rate", s.learning_rate, s.learning_rate > 0),
        ]:
            if not ok:
                raise ValueError(f"run config: {key!r} is out of range: {value!r}")
        return s


@lru_cache(maxsize=2)
def dataset(spec: str) -> Dataset:
    return load_dataset(spec)


def split(s: Settings) -> Tuple[np.ndarray, np.ndarray]:
    """(server's calibration indices, the clients' pool of indices) into the training set; fixed by the seed."""
    n = len(dataset(s.dataset).y_train)
    order = np.random.default_rng(s.seed).permutation(n)
    k = max(1, int(round(n * s.calibration_fraction)))
    return np.sort(order[:k]), np.sort(order[k:])


def client_indices(s: Settings, partition_id: int, num_partitions: int) -> np.ndarray:
    """Training-set indices of one client: its share of the clients' pool (same split on every SuperNode)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node config: partition-id={partition_id} is not in 0..{num_partitions - 1}")
    _, pool = split(s)
    labels = dataset(s.dataset).y_train[pool].numpy()
    return pool[partition(labels, num_partitions, s.partition, s.seed)[partition_id]]


def new_model(s: Settings, seed: int) -> nn.Module:
    """A freshly initialised zoo model (dimat.models) for the dataset, initialised under ``seed``."""
    ds = dataset(s.dataset)
    torch.manual_seed(seed)
    return build(s.model, ds.num_classes, width=s.width, in_channels=ds.in_channels, image_size=ds.image_size)


def calibration_batches(s: Settings, batch_size: int = 256) -> List[torch.Tensor]:
    """The server's calibration inputs, in batches (activation statistics and the BatchNorm reset)."""
    held, _ = split(s)
    x = dataset(s.dataset).x_train[held]
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
