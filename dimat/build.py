"""Build what a run needs from its config: check the inputs, load the shared pieces, make one agent.

Every runner uses these (``dimat run``, ``dimat launch``, ``dimat agent``, torchrun), so that agent ``rank`` is
the same agent whichever way it is started:

* :func:`prepare` checks everything that can be wrong with the input (topology, dataset, partition, model,
  method, transport) and loads what every agent needs, before any file is written.
* :func:`build_agent` makes agent ``rank``: its model (seed + rank), data, RNG, optimizer factory and
  :class:`~dimat.node.Node` over a given transport.
* :func:`check_run_dir` says whether a run folder may hold this run.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np
import torch

from dimat import models
from dimat.baselines import STEP_METHODS
from dimat.config import Config, first_difference
from dimat.data import Batches, Dataset, load_dataset, partition_dataset
from dimat.errors import UserError
from dimat.loop import Agent
from dimat.merge.combine import CombineOptions
from dimat.node import Node
from dimat.schedule import Schedule
from dimat.topology import Topology
from dimat.train import optimizer_factory
from dimat.transport.base import Transport

__all__ = ["Setup", "RUN_FILES", "prepare", "resolve_device", "build_agent", "check_run_dir", "merge_coverage",
           "coverage_record", "warn_coverage", "ALIGNING_METHODS"]

#: files a run folder holds; their presence marks a folder as a run
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


@dataclass
class Setup:
    """What every agent of a run shares: the topology, the dataset and the partition (train, test) indices.

    ``schedule`` is set for a time-varying topology (``topology`` is then the union of its rounds: every edge
    some round uses, for addresses and connections); None for a static one.
    """

    topology: Topology
    dataset: Dataset
    parts: List[tuple]
    schedule: Optional[Schedule] = None

    @property
    def graphs(self) -> Any:
        """What a Node and a transport follow: the schedule if there is one, else the static topology."""
        return self.schedule if self.schedule is not None else self.topology


def _topology(cfg: Mapping[str, Any]) -> Schedule:
    seed = cfg["topology_seed"] if cfg["topology_seed"] is not None else cfg["seed"]
    with warnings.catch_warnings():
        # Legal but noteworthy graphs (disconnected, asymmetric) are reported once here, not per agent.
        warnings.simplefilter("always")
        sched = Schedule.from_spec(cfg["topology"], cfg["agents"], seed=seed)
        sched.union()  # a schedule whose rounds together never join all agents is worth a warning
        return sched


def resolve_device(spec: str) -> torch.device:
    """The torch device a config's ``device`` names: ``cpu``, ``cuda`` (this process's ``LOCAL_RANK`` GPU under
    torchrun, else GPU 0), ``cuda:N`` or ``auto`` (cuda when available, else cpu).

    Raises
    ------
    UserError : a GPU is named but torch sees none, or fewer than N + 1.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{spec!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                        f"use cpu or auto")
    index = int(spec.split(":")[1]) if ":" in spec else int(os.environ.get("LOCAL_RANK", 0))
    if index >= torch.cuda.device_count():
        raise UserError(f"{spec!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)


def _check_model(cfg: Mapping[str, Any], ds: Dataset) -> None:
    m = _build_model(cfg, ds)
    try:
        with torch.no_grad():
            m.eval()(ds.x_train[:2])
    except RuntimeError as e:
        raise UserError(f"model {cfg['model']['name']!r} cannot run on dataset "
                        f"{cfg['data']['dataset']!r} ({' '.join(str(e).split())[:200]})") from None


#: merge methods that align units (their coverage is reported); the others average or do not merge at all
ALIGNING_METHODS = ("dimat", "wm")


def merge_coverage(cfg: Mapping[str, Any], ds: Dataset):
    """How much of the run's model the merge can align (:class:`dimat.merge.structure.Coverage`), or None when
    the merge method aligns nothing. Derives (and caches) the model's permutation groups on two training inputs."""
    if cfg["merge"]["method"] not in ALIGNING_METHODS:
        return None
    from dimat.merge import spec_for

    torch.manual_seed(cfg["seed"])
    model = _build_model(cfg, ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported below, once, as one line
        spec, _ = spec_for(model, ds.x_train[:2])
    return spec.coverage()


def coverage_record(cov) -> Optional[Dict[str, Any]]:
    """The coverage as summary.json records it: fraction of hidden-unit parameters in permuted groups, and every
    group the merge averages without aligning, with the reason."""
    if cov is None:
        return None
    return {"fraction": round(cov.fraction, 6), "not_permuted": [{"group": n, "reason": r} for n, r in cov.frozen]}


def warn_coverage(cfg: Mapping[str, Any], cov, stream=None) -> None:
    """One warning line on stderr when the merge cannot align every hidden unit of the model."""
    if cov is None or cov.fraction >= 1.0:
        return
    print(f"dimat: warning: merge.method {cfg['merge']['method']!r} can align only {100 * cov.fraction:.1f}% of "
          f"model {cfg['model']['name']!r}'s hidden-unit parameters; the rest is averaged without alignment: "
          + "; ".join(f"{n}: {r}" for n, r in cov.frozen), file=stream or sys.stderr)


def _build_model(cfg: Mapping[str, Any], ds: Dataset) -> torch.nn.Module:
    return models.build(cfg["model"]["name"], ds.num_classes, width=cfg["model"]["width"],
                        in_channels=ds.in_channels, image_size=ds.image_size)


@contextmanager
def _field(cfg: Mapping[str, Any], key: str) -> Iterator[None]:
    """Prefix a UserError raised while using config key ``key`` with the config file and the key."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{getattr(cfg, 'source', 'config')}: {key}: {e}") from None


def prepare(cfg: Mapping[str, Any]) -> Setup:
    """Check the inputs a config names and load the shared pieces of a run; writes nothing.

    Raises
    ------
    UserError : unknown or malformed topology, dataset, partition or model; a topology whose size differs from
        ``agents``; a flip augmentation on data that are not images.

    Notes
    -----
    Sets torch's thread count to ``threads`` when the config gives one (a process-wide setting). One thread is
    often much faster for small models on a busy machine, and the count changes floating-point sums, so it is
    part of what makes two runs identical.
    """
    if cfg["threads"] is not None:
        torch.set_num_threads(cfg["threads"])
    with _field(cfg, "topology"):
        sched = _topology(cfg)
        if sched.num_agents != cfg["agents"]:
            raise UserError(f"the topology has {sched.num_agents} agents but key 'agents' is {cfg['agents']}")
        if not sched.is_static and cfg["merge"]["method"] in STEP_METHODS:
            raise UserError(f"{sched.name} changes the graph every round, but merge.method "
                            f"{cfg['merge']['method']!r} (a gradient-gossip baseline) needs a static topology")
        topo = sched.union()
    with _field(cfg, "data.dataset"):
        ds = load_dataset(cfg["data"]["dataset"], seed=cfg["seed"])
    with _field(cfg, "data.flip"):
        if cfg["data"]["flip"] and not ds.is_image:
            raise UserError(f"dataset {cfg['data']['dataset']!r} is not a set of natural images (a mirrored "
                            f"sample is another class or none); set data.flip to false")
    with _field(cfg, "data.partition"):
        parts = partition_dataset(ds, cfg["agents"], cfg["data"]["partition"], seed=cfg["seed"])
    with _field(cfg, "model.name"):
        _check_model(cfg, ds)
    with _field(cfg, "device"):
        resolve_device(cfg["device"])
    return Setup(topo, ds, parts, None if sched.is_static else sched)


def _label_counts(ds: Any, train_idx: np.ndarray) -> Optional[np.ndarray]:
    """The agent's training samples per class (for ``merge.head: label_counts``); None for an empty partition."""
    y = np.asarray(ds.y_train)[np.asarray(train_idx, dtype=np.int64)]
    return np.bincount(y, minlength=ds.num_classes).astype(np.float64) if len(y) else None


def build_agent(cfg: Mapping[str, Any], setup: Setup, rank: int, transport: Optional[Transport]) -> Agent:
    """Agent ``rank`` of the run: model initialised with seed + rank, its data partition and a Node."""
    ds = setup.dataset
    train_idx, test_idx = setup.parts[rank]
    # model.init: different inits per agent (seed + rank), or one init shared by every agent (seed)
    same_init = cfg["model"].get("init", "different") == "same"
    torch.manual_seed(cfg["seed"] + (0 if same_init else rank))
    model = _build_model(cfg, ds).to(resolve_device(cfg["device"]))  # data stay on the CPU, moved per batch
    # Merge statistics and BN resets read the first batches of this fixed random order: the rows of a dataset
    # are often sorted by class, and the first rows of a sorted partition would show the merge one class only.
    order = np.random.default_rng([cfg["seed"], rank, 2]).permutation(train_idx)
    local = Batches(ds.x_train, ds.y_train, order, batch_size=cfg["train"]["batch_size"])
    m = cfg["merge"]
    node = Node(model, setup.graphs, rank, transport, local, method=m["method"], stat_batches=m["stat_batches"],
                bn_batches=m["bn_batches"], reset_bn=m["reset_bn"], basis=m["basis"],
                combine=CombineOptions.from_config(m), combine_seed=cfg["seed"],
                identity_prior=m["identity_prior"], keep_margin=m["keep_margin"], min_corr=m["min_corr"],
                adopt_min_acc=m["adopt_min_acc"], min_corr_scope=m["min_corr_scope"], bn_repair=m["bn_repair"],
                bn_refresh=m["bn_refresh"], stats=m["stats"], restore_norms=m["restore_norms"],
                head=m["head"], label_counts=_label_counts(ds, train_idx),
                basis_tag=0 if same_init else None)  # one init: one unit order from the start
    t = cfg["train"]
    train_idx_t, test_idx_t = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return Agent(
        rank=rank,
        node=node,
        train=(ds.x_train[train_idx_t], ds.y_train[train_idx_t]),
        test=(ds.x_test, ds.y_test),
        local_test=(ds.x_test[test_idx_t], ds.y_test[test_idx_t]),
        make_optimizer=optimizer_factory(t["optimizer"], t["lr"], t["weight_decay"]),
        generator=torch.Generator().manual_seed(cfg["seed"] + rank),
    )


# ---------------------------------------------------------------------------------------------- run folder
def check_run_dir(cfg: Config, out: Path, resume: bool) -> None:
    """UserError unless ``out`` may hold this run: new (or empty) without ``--resume``; same config with it."""
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out must be a folder, but a file of that name exists")
    if not resume:
        if existing:
            raise UserError(f"{out}: already holds a run ({', '.join(existing)}); pass --resume to continue it "
                            f"or choose another --out")
        return
    cfg_file = out / "config.yaml"
    if not cfg_file.exists():
        raise UserError(f"{out}: no run to resume (config.yaml not found)")
    changed = first_difference(cfg, cfg_file)
    if changed:
        k, was, now = changed
        raise UserError(f"{cfg_file}: --resume needs the same config as the interrupted run, but key {k!r} was "
                        f"{was!r} and is now {now!r}")
