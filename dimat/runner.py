"""Build agents from a config and drive the round loop; ``run`` is the in-process simulation behind ``dimat run``.

The pieces are public so that the multi-process runner reuses them for one agent:

* :func:`prepare` checks everything that can be wrong with the input (topology, dataset, partition, model,
  method, transport) and loads what every agent needs, before any file is written.
* :func:`build_agent` makes agent ``rank``: its model (seed + rank), data, RNG, optimizer factory and
  :class:`~dimat.node.Node` over a given transport.
* :func:`drive` runs pretraining and the rounds for a list of local agents, with checkpoints, metrics and resume.
* :func:`run` puts them together for N agents over in-process transports and writes the run folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from dimat import checkpoint, models
from dimat.config import Config, dump, first_difference
from dimat.data import Batches, Dataset, load_dataset, partition_dataset
from dimat.errors import UserError
from dimat.loop import Agent, pretrain, restore_agent, run_round
from dimat.metrics import MetricsWriter, atomic_write_text, read_metrics, summarize
from dimat.node import Node
from dimat.topology import Topology
from dimat.train import optimizer_factory
from dimat.transport.base import Transport

__all__ = ["Setup", "prepare", "resolve_device", "build_agent", "drive", "run", "check_run_dir"]

#: files a run folder holds; their presence marks a folder as a run
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


@dataclass
class Setup:
    """What every agent of a run shares: the topology, the dataset and the partition (train, test) indices."""

    topology: Topology
    dataset: Dataset
    parts: List[tuple]


def _topology(cfg: Mapping[str, Any]) -> Topology:
    seed = cfg["topology_seed"] if cfg["topology_seed"] is not None else cfg["seed"]
    with warnings.catch_warnings():
        # Legal but noteworthy graphs (disconnected, asymmetric) are reported once here, not per agent.
        warnings.simplefilter("always")
        return Topology.from_spec(cfg["topology"], cfg["agents"], seed=seed)


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
    import warnings

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
    import sys

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
        topo = _topology(cfg)
        if topo.num_agents != cfg["agents"]:
            raise UserError(f"the topology has {topo.num_agents} agents but key 'agents' is {cfg['agents']}")
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
    return Setup(topo, ds, parts)


def build_agent(cfg: Mapping[str, Any], setup: Setup, rank: int, transport: Optional[Transport]) -> Agent:
    """Agent ``rank`` of the run: model initialised with seed + rank, its data partition and a Node."""
    ds = setup.dataset
    train_idx, test_idx = setup.parts[rank]
    torch.manual_seed(cfg["seed"] + rank)  # different inits per agent (ALGORITHM.md section 2)
    model = _build_model(cfg, ds).to(resolve_device(cfg["device"]))  # data stay on the CPU, moved per batch
    # Merge statistics and BN resets read the first batches of this fixed random order: the rows of a dataset
    # are often sorted by class, and the first rows of a sorted partition would show the merge one class only.
    order = np.random.default_rng([cfg["seed"], rank, 2]).permutation(train_idx)
    local = Batches(ds.x_train, ds.y_train, order, batch_size=cfg["train"]["batch_size"])
    m = cfg["merge"]
    node = Node(model, setup.topology, rank, transport, local, method=m["method"], stat_batches=m["stat_batches"],
                bn_batches=m["bn_batches"], reset_bn=m["reset_bn"], basis=m["basis"])
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


def progress_bar(total: int, initial: int, desc: str, quiet: bool, leave: bool = True):
    """A tqdm bar on stderr, shown only on a terminal and without ``quiet``; ``leave=False`` for inner bars."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="round" if leave else "agent-phase", leave=leave,
                disable=quiet or not sys.stderr.isatty(), file=sys.stderr, dynamic_ncols=True)


def restore_latest(
    agents: Sequence[Agent], ckpt_dir: Path, metrics_path: Path,
    before_restore: Optional[Callable[[int], None]] = None,
) -> Tuple[int, Dict[int, Dict[str, Any]]]:
    """Restore the local agents from the latest round they all completed and drop later metrics records.

    ``before_restore(round)`` runs first when there is a checkpoint (to set up what the restore loads into).
    Returns the last completed step (-2 nothing, -1 pretraining, r >= 0 round r) and the loaded checkpoints by rank.
    """
    done, saved = -2, {}
    last = checkpoint.resume_round(ckpt_dir, [a.rank for a in agents])
    if last is not None:
        if before_restore is not None:
            before_restore(last)
        for a in agents:
            saved[a.rank] = checkpoint.load(ckpt_dir, a.rank, last)
            restore_agent(a, saved[a.rank])
        done = last
    MetricsWriter.truncate_after(metrics_path, done)
    return done, saved


def drive(
    cfg: Mapping[str, Any],
    agents: Sequence[Agent],
    run_dir: Path,
    metrics_path: Path,
    resume: bool = False,
    quiet: bool = False,
    stop_after_round: Optional[int] = None,
) -> bool:
    """Pretrain (unless resumed past it) and run every remaining round for the local ``agents``.

    Parameters
    ----------
    cfg : the resolved config.
    agents : the agents of this process.
    run_dir : checkpoints go to ``run_dir/checkpoints``.
    metrics_path : the JSON-lines file the agents' records are appended to.
    resume : restore the agents from the latest round they all completed and drop later records from
        ``metrics_path``; start from scratch when there is no checkpoint yet.
    quiet : no progress bars.
    stop_after_round : return after this round, as if interrupted (for tests of resume).

    Returns
    -------
    True when all rounds are done, False when stopped early.
    """
    ckpt_dir = run_dir / "checkpoints"
    done = restore_latest(agents, ckpt_dir, metrics_path)[0] if resume else -2  # -2 nothing, -1 pretraining, r
    rounds = cfg["rounds"]
    with MetricsWriter(metrics_path) as writer:
        outer = progress_bar(rounds, max(done + 1, 0), "rounds", quiet)
        inner = progress_bar(len(agents), 0, "agents", quiet, leave=False)  # one step per agent and phase
        try:
            if done < -1 and cfg["train"]["pretrain_epochs"] > 0:
                inner.set_description("pretrain")
                pretrain(agents, cfg, writer, ckpt_dir, progress=inner.update)
            for r in range(max(done + 1, 0), rounds):
                inner.reset(total=len(agents) * (2 if r < rounds - 1 else 1))
                inner.set_description(f"round {r}")
                results = run_round(agents, r, cfg, writer, ckpt_dir, progress=inner.update)
                outer.update(1)
                missing = sum(len(x.missing) for x in results)
                if missing:
                    outer.set_postfix(missing=missing)
                if stop_after_round is not None and stop_after_round <= r < rounds - 1:
                    return False
        finally:
            inner.close()
            outer.close()
    return True


def run(
    cfg: Config,
    out_dir: Optional[str | Path] = None,
    resume: bool = False,
    quiet: bool = False,
    stop_after_round: Optional[int] = None,
) -> Optional[Dict[str, Any]]:
    """Run the in-process simulation of ``cfg`` and write its run folder.

    Parameters
    ----------
    cfg : a resolved config (:func:`dimat.config.load_config`).
    out_dir : run folder (default ``cfg.out``); receives ``config.yaml``, ``metrics.jsonl``, ``summary.json``
        and ``checkpoints/agent-K.pt``.
    resume : continue the run in ``out_dir`` from its last complete round (the config must be the same).
    quiet : no progress bars.
    stop_after_round : stop after this round without a summary, as an interruption would (for tests).

    Returns
    -------
    The summary (also written to ``summary.json``), or None when stopped early.
    """
    t0 = time.perf_counter()
    out = Path(out_dir if out_dir is not None else cfg["out"])
    if cfg["transport"]["name"] != "inproc":
        raise UserError(f"{getattr(cfg, 'source', 'config')}: transport.name: 'dimat run' simulates every agent in "
                        f"one process (inproc); run {cfg['transport']['name']!r} transports with 'dimat launch'")
    setup = prepare(cfg)  # every input error surfaces here, before anything is written
    check_run_dir(cfg, out, resume)
    coverage = merge_coverage(cfg, setup.dataset)
    warn_coverage(cfg, coverage)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(out / "config.yaml", dump(cfg))
    from dimat import gossip
    from dimat.transport.inproc import make_inproc

    transports = make_inproc([setup.topology.neighbors(k) for k in range(cfg["agents"])])
    if gossip.handles(cfg["merge"]["method"]):  # gradient-gossip baselines and centralised: a step-level loop
        agents, driver = gossip.build_agents(cfg, setup, transports), gossip.drive
    else:
        agents, driver = [build_agent(cfg, setup, k, transports[k]) for k in range(cfg["agents"])], drive
    try:
        done = driver(cfg, agents, out, out / "metrics.jsonl", resume=resume, quiet=quiet,
                      stop_after_round=stop_after_round)
    finally:
        for t in transports:
            t.close()
    if not done:
        return None
    summary = summarize(read_metrics([out / "metrics.jsonl"]), cfg["merge"]["method"], len(agents),
                        cfg["rounds"], wall_s=time.perf_counter() - t0)
    if coverage is not None:
        summary["merge_coverage"] = coverage_record(coverage)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
