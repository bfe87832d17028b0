"""One agent of a multi-process run: set it up from the config and its rank, run its rounds, rejoin after a crash.

This is what ``dimat agent`` runs, in its own process, over the gRPC or the torch.distributed transport. The
agent is built exactly as ``dimat run`` builds agent ``rank`` (:func:`dimat.build.build_agent`: same seed, data
partition and order), and every round is :func:`dimat.loop.run_round` with a list of one agent, so a
multi-process run whose exchanges all arrive in time computes what ``dimat run`` computes.

Files (``OUT`` is the run folder, shared by all local agents; on several hosts each host has its own)::

    OUT/config.yaml              written by the first agent (or the launcher); later agents check theirs equals it
    OUT/metrics/agent-K.jsonl    this agent's metrics records, one line per phase as it ends
    OUT/checkpoints/agent-K.pt   this agent's last complete round

Resume and rejoin (``--resume``)
--------------------------------
The agent restores its last complete round ``c`` from its checkpoint and drops its metrics records of later
rounds. Over gRPC it then asks its neighbours' Status RPC where they are (each call bounded by the transport's
connect timeout) and continues from ``max(c + 1, j_collected + 1)`` over the neighbours ``j`` that answered: the
round they are collecting now, or the next one if they are already training. The rounds it missed are
**skipped**, not replayed: replaying them alone would put it further behind (each round costs its training time)
while its neighbours, which have skipped it meanwhile, move on; it rejoins with its round-``c`` model, which the
next merge pulls back towards its neighbours. When no neighbour answers (all down, or the run is over) it
continues from ``c + 1`` and every collect is bounded by the deadline. Without a checkpoint (``--resume`` after
the checkpoint was lost, or ``--join`` on a new machine) it fetches the state of the live neighbour furthest on
(the FetchState RPC: its latest posted model, round and basis tag) and joins at the round after it. Either way,
right before its first post it asks the neighbours' Status once more and posts the round after the latest one
they have posted, if that is later (:func:`join_round`: the set-up took seconds, and they ran on). While the
rounds run, an agent that finds a neighbour's snapshot of a later round than the one it is about to run (it was
frozen or cut off) skips ahead to that round. Over torch.distributed every agent of the
job restarts together, so they agree on the latest round all of them have completed and continue from there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

from dimat import checkpoint, launcher
from dimat.config import Config, dump, first_difference
from dimat.errors import UserError
from dimat.loop import Agent, pretrain, restore_agent, run_round
from dimat.metrics import MetricsWriter, atomic_write_text
from dimat.build import Setup, build_agent, prepare
from dimat.transport.base import Transport

__all__ = ["run_agent", "claim_run_dir", "rejoin_round", "join_from_neighbour", "join_round", "peers_for"]

_T0 = time.perf_counter()  # about when the agent process started (this module is imported first thing)

def run_agent(
    cfg: Config,
    rank: int,
    transport: str,
    out_dir: str | Path,
    peers_file: Optional[str | Path] = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    join: bool = False,
) -> int:
    """Run agent ``rank`` of ``cfg`` over ``transport`` (``grpc`` or ``torch``) until its last round.

    Parameters
    ----------
    cfg : the resolved config (the same for every agent of the run).
    rank : this agent's index 0..N-1.
    transport : ``grpc`` (peers from ``peers_file`` or the topology file) or ``torch`` (torch.distributed from
        the environment that torchrun or ``dimat launch`` sets).
    out_dir : the run folder.
    peers_file : gRPC: JSON file ``{"peers": {"0": "host:port", ...}}``.
    resume : restore the last checkpoint, then rejoin (see the module docstring); over gRPC, without a
        checkpoint, take a live neighbour's state instead.
    join : ``resume`` on a machine that has no run folder yet (a new machine): the folder is created.
    log : where one progress line per round goes (stdout, i.e. ``OUT/logs/agent-K.log`` under the launcher).

    Returns
    -------
    0 (errors raise: :class:`UserError` for bad input).
    """
    if rank >= cfg["agents"]:
        raise UserError(f"--rank {rank} is out of range: the config has {cfg['agents']} agents (ranks 0.."
                        f"{cfg['agents'] - 1})")
    launcher.check_multiprocess(cfg)
    if transport == "torch":
        _check_world_size(cfg)
    cfg = _with_transport(cfg, transport)
    setup = prepare(cfg)  # every input error surfaces before anything is written
    from dimat.build import coverage_record, merge_coverage, warn_coverage

    coverage = merge_coverage(cfg, setup.dataset)
    warn_coverage(cfg, coverage)
    peers = peers_for(cfg, setup, peers_file) if transport == "grpc" else None
    out = Path(out_dir)
    resume = resume or join
    claim_run_dir(cfg, out, rank, resume, join)
    launcher.write_coverage(out, rank, coverage_record(coverage))
    with _open_transport(cfg, setup, rank, transport, peers) as t:
        agent = build_agent(cfg, setup, rank, t)
        last = _restore(cfg, agent, out, t, transport, log) if resume else None
        first = max(0, (last if last is not None else -2) + 1)
        if resume and transport == "grpc":
            neighbors = setup.topology.neighbors(rank)
            if last is None:  # a new machine, or a lost checkpoint: take a live neighbour's state
                joined = join_from_neighbour(agent, t, neighbors, log)
                if joined is not None:
                    first, last = joined, joined - 1  # no pretraining: the state is a trained model
            first = rejoin_round(t, neighbors, first, log)
        _run_rounds(cfg, agent, out, last, first, resume, log)
        if transport == "torch":
            _aggregate_after_all(cfg, out, rank, log)
    log(f"agent {rank}: done in {time.perf_counter() - _T0:.1f} s")
    return 0


def _check_world_size(cfg: Mapping, env: Mapping[str, str] = os.environ) -> None:
    # Every rank fails at once with this message, instead of the extra ranks failing and the others waiting for
    # them until the process-group timeout.
    world = env.get("WORLD_SIZE")
    if world is not None and world.strip().isdigit() and int(world) != cfg["agents"]:
        raise UserError(f"agents: the config has {cfg['agents']} agents but the torch.distributed job has "
                        f"WORLD_SIZE={world} processes (torchrun --nproc-per-node x --nnodes must equal agents)")


def _with_transport(cfg: Config, transport: str) -> Config:
    c = Config.wrap(cfg.to_dict())
    c["transport"]["name"] = transport
    return c


# ---------------------------------------------------------------------------------------------- run folder


def claim_run_dir(cfg: Config, out: Path, rank: int, resume: bool, join: bool = False) -> None:
    """Check that agent ``rank`` may write into ``out`` and record the config there if nobody has yet.

    Several agents (or the launcher) share ``out``, so ``config.yaml`` is written by whoever comes first
    (atomically; the contents are the same) and compared by the others. Without ``resume`` the agent's own files
    must not exist yet; with it, ``config.yaml`` must exist and describe the same run.

    Raises
    ------
    UserError : ``out`` is a file; it holds a run of another config; this agent already ran there (without
        ``resume``); there is nothing to resume (unless ``join``: a new machine joining a running run).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out must be a folder, but a file of that name exists")
    cfg_file = out / "config.yaml"
    mine = [p for p in (launcher.agent_metrics_path(out, rank), checkpoint.path_for(out / "checkpoints", rank))
            if p.exists()]
    if resume and not join and not cfg_file.exists():
        raise UserError(f"{out}: no run to resume (config.yaml not found)")
    if not resume and mine:
        raise UserError(f"{out}: agent {rank} already ran here ({mine[0]}); pass --resume to continue it or "
                        f"choose another --out")
    if cfg_file.exists():
        _check_same_config(cfg, cfg_file)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg_file, dump(cfg))
    (out / "metrics").mkdir(parents=True, exist_ok=True)


def _check_same_config(cfg: Config, cfg_file: Path) -> None:
    changed = first_difference(cfg, cfg_file)
    if changed:
        k, was, now = changed
        raise UserError(f"{cfg_file}: this run folder holds a run whose {k!r} is {was!r}, but this agent's config "
                        f"says {now!r}; every agent must run the same config")


# ---------------------------------------------------------------------------------------------- transport


def peers_for(cfg: Config, setup: Setup, peers_file: Optional[str | Path]) -> Dict[int, str]:
    """The gRPC address of every rank: from ``peers_file`` if given, else from the topology file's ``peers``."""
    if peers_file is not None:
        return launcher.read_peers(peers_file, n=cfg["agents"])
    if setup.topology.peers:
        return setup.topology.peers
    raise UserError(f"transport grpc needs every agent's address: pass --peers FILE, or give the topology file "
                    f"({cfg['topology']!r}) a 'peers' field")


def _open_transport(cfg: Config, setup: Setup, rank: int, name: str, peers: Optional[Dict[int, str]]) -> Transport:
    from dimat.transport import make_transport

    # serve_state: a neighbour that joins without a checkpoint fetches my latest snapshot (join_from_neighbour).
    kw = {"template": _template(cfg, setup), "serve_state": True} if name == "grpc" else {}
    try:
        return make_transport(name, cfg, rank=rank, topology=setup.graphs, peers=peers, **kw)
    except ValueError as e:
        if launcher.is_addr_in_use(e):
            raise  # `dimat agent` exits with EXIT_PORT_IN_USE, which the launcher retries
        raise UserError(f"transport ({name}): {e}") from None


def _template(cfg: Mapping, setup: Setup) -> Dict[str, torch.Tensor]:
    """A snapshot of the run's architecture (values irrelevant), so that the gRPC server checks every snapshot's
    manifest against it before allocating anything, even those that arrive before this agent's first post."""
    from dimat import models
    from dimat.merge.combine import CombineOptions
    from dimat.node import Node

    ds = setup.dataset
    model = models.build(cfg["model"]["name"], ds.num_classes, width=cfg["model"]["width"],
                         in_channels=ds.in_channels, image_size=ds.image_size)
    m = cfg["merge"]
    return Node.template_snapshot(model, ds.x_train[:2], m["method"], m["basis"], CombineOptions.from_config(m),
                                  m["head"])


# ---------------------------------------------------------------------------------------------- resume / rejoin


def _restore(cfg: Config, agent: Agent, out: Path, t: Transport, transport: str, log: Callable[[str], None]
             ) -> Optional[int]:
    """Restore the checkpoint to continue from; returns its round (None: none, start from scratch)."""
    ckpt_dir = out / "checkpoints"
    last = checkpoint.resume_round(ckpt_dir, [agent.rank])
    if transport == "torch":
        last = _agree_min(t, last)
    if last is not None:
        restore_agent(agent, checkpoint.load(ckpt_dir, agent.rank, last))
        log(f"agent {agent.rank}: restored round {last} from {ckpt_dir}")
    else:
        log(f"agent {agent.rank}: no checkpoint in {ckpt_dir}")
    # Records of rounds after the checkpoint describe a model we no longer have.
    MetricsWriter.truncate_after(launcher.agent_metrics_path(out, agent.rank), last if last is not None else -2)
    return last


def _agree_min(t: Transport, last: Optional[int]) -> Optional[int]:
    """The latest round every agent of a torch.distributed job has completed (the minimum over the job).

    Agents of one job finish a round within one round of each other (their exchanges are synchronous), and each
    keeps its previous checkpoint, so every agent still holds the agreed round.
    """
    value = _all_reduce_min(-2 if last is None else int(last))
    return None if value < -1 else value


def _all_reduce_min(value: int) -> int:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    # nccl reduces only GPU tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def join_from_neighbour(agent: Agent, t: Transport, neighbors: Sequence[int],
                        log: Callable[[str], None] = print) -> Optional[int]:
    """State transfer: load the model (and basis tag) of the live neighbour furthest on; the round to join at.

    Asks every neighbour's Status (each bounded by the transport's connect timeout), then fetches the state of
    the one that posted the latest round (the others in turn if it fails). The state is that neighbour's round-c
    snapshot, so the agent joins at round ``c + 1``, the round its neighbours post next. None (logged) when no
    neighbour gives its state: the agent then starts from scratch.
    """
    fetch = getattr(t, "fetch_state", None)
    if fetch is None:
        return None
    from dimat.merge import payload
    from dimat.node import BASIS_KEY

    posted = {}
    for j in neighbors:
        reply = t.peer_status(j)
        if reply is not None and reply.latest_posted_round >= 0:
            posted[j] = int(reply.latest_posted_round)
    for j in sorted(posted, key=lambda j: (-posted[j], j)):
        got = fetch(j)
        if got is None:
            continue
        round, snap = got
        tag = snap.pop(BASIS_KEY, None)
        agent.model.load_state_dict(payload.split(snap)[0])  # without the payloads (class counts, Fisher, Gram)
        if tag is not None:
            agent.node.basis_tag = int(tag)
        log(f"agent {agent.rank}: took the round-{round} state of neighbour {j} (state transfer); joining at round "
            f"{round + 1}")
        return round + 1
    log(f"agent {agent.rank}: no neighbour gave its state (asked {list(neighbors)}, posted {posted}); starting from "
        f"scratch")
    return None


def rejoin_round(t: Transport, neighbors: Sequence[int], first: int, log: Callable[[str], None] = print) -> int:
    """The round a restarted agent continues from: ``first``, or later if its live neighbours are further on.

    Asks each neighbour's Status (``t.peer_status(j)``, bounded by the transport's connect timeout); a neighbour
    that does not answer is left out. A neighbour that has collected round ``c`` posts ``c + 1`` next, so that is
    the earliest round in which our snapshot still reaches it and its snapshot reaches us.
    """
    status = getattr(t, "peer_status", None)
    if status is None:
        return first
    rounds = {}
    for j in neighbors:
        reply = status(j)
        if reply is None:
            log(f"agent {t.rank}: neighbour {j} did not answer Status (down?)")
        else:
            rounds[j] = int(reply.latest_collected_round) + 1
    start = max([first] + list(rounds.values()))
    if start > first:
        log(f"agent {t.rank}: rejoining at round {start} (neighbours' next rounds {rounds}); skipping rounds "
            f"{first}..{start - 1}")
    return start


def join_round(t: Transport, first: int, log: Callable[[str], None] = print) -> int:
    """The round a resuming or joining agent posts first, decided right before it posts: ``first``, or the round
    after the latest one a live neighbour has posted, if that is later.

    Its set-up (state transfer, Status calls, metrics file) takes seconds, during which its neighbours, which do
    not wait for it (it is down for them), run on; the round it computed before is stale by then. Posting the
    round after theirs, it is in their inbox when they collect that round, so they admit it and wait for it
    (docs/transport.md, "Round protocol"), and it waits for theirs. Each Status call is bounded by the
    transport's connect timeout; a transport without Status (torch.distributed) keeps ``first``."""
    status = getattr(t, "peer_status", None)
    if status is None:
        return first
    posted = {}
    for j in t.neighbors:
        reply = status(j)
        if reply is not None:
            posted[j] = int(reply.latest_posted_round)
    start = max([first] + [p + 1 for p in posted.values()])
    log(f"agent {t.rank}: rejoining at round {start} (decided before the first post; neighbours' latest posted "
        f"rounds {posted})")
    return start


# ---------------------------------------------------------------------------------------------- rounds


def _aggregate_after_all(cfg: Config, out: Path, rank: int, log: Callable[[str], None]) -> None:
    """torch.distributed: once every rank is done, rank 0 writes OUT/metrics.jsonl and OUT/summary.json.

    Only when every agent's metrics file is in this OUT (one node, or a shared file system); over several nodes
    each node keeps its agents' files. (``dimat launch`` aggregates by itself; this is for torchrun.)
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()  # bounded by the process group's timeout
    paths = [launcher.agent_metrics_path(out, k) for k in range(cfg["agents"])]
    if rank != 0 or not all(p.exists() for p in paths):
        return
    launcher.write_summary(out, cfg, wall_s=time.perf_counter() - _T0)
    log(f"agent {rank}: wrote {out / 'metrics.jsonl'} and {out / 'summary.json'} for all {cfg['agents']} agents")



def _run_rounds(cfg: Config, agent: Agent, out: Path, last: Optional[int], first: int, resume: bool,
                log: Callable[[str], None]) -> None:
    ckpt_dir = out / "checkpoints"
    with MetricsWriter(launcher.agent_metrics_path(out, agent.rank)) as writer:
        if last is None and cfg["train"]["pretrain_epochs"] > 0:
            pretrain([agent], cfg, writer, ckpt_dir)
            log(f"agent {agent.rank}: pretrained {cfg['train']['pretrain_epochs']} epochs")
        _start_barrier(cfg, agent, rejoining=resume, log=log)
        if resume:  # capped at the last round: neighbours that have finished leave one round to run alone
            first = max(first, min(join_round(agent.node.transport, first, log), cfg["rounds"] - 1))
        r = first
        while r < cfg["rounds"]:
            r = _catch_up(cfg, agent, r, log)
            res = run_round([agent], r, cfg, writer, ckpt_dir)[0]
            missing = f", missing {res.missing} (deadline)" if res.missing else ""
            log(f"agent {agent.rank}: round {r} ({r + 1} of {cfg['rounds']}): merged with {res.received}{missing}; "
                f"comm {res.comm_s:.2f} s, merge {res.merge_s:.2f} s")
            r += 1


def _start_barrier(cfg: Config, agent: Agent, rejoining: bool, log: Callable[[str], None]) -> None:
    """Before the first round: wait (at most ``transport.startup_s``) until every neighbour is ready too, so that
    agents that start seconds apart (imports, data, pretraining) do not miss each other's first round. An agent
    that rejoins a running run only says it is ready."""
    t = agent.node.transport
    if not hasattr(t, "wait_ready"):
        return
    if rejoining:
        t.mark_ready()
        return
    late = t.wait_ready(cfg["transport"]["startup_s"])
    if late:
        log(f"agent {agent.rank}: neighbours {late} not ready after {cfg['transport']['startup_s']:g} s "
            f"(transport.startup_s); starting without them")


def _catch_up(cfg: Config, agent: Agent, r: int, log: Callable[[str], None]) -> int:
    """The round to run instead of ``r``: a later one when a neighbour has already posted a round two or more
    ahead (this agent was frozen or cut off and its neighbours went on without it). One round behind is caught up
    without skipping: the transport does not wait for a neighbour that is ahead. Skipped rounds are not replayed
    (see the module docstring); in asynchronous rounds only a lag beyond the staleness bound is skipped."""
    hint = getattr(agent.node.transport, "round_hint", None)
    if hint is None:
        return r
    ahead = min(int(hint()), cfg["rounds"] - 1)
    slack = 1 if cfg["transport"]["sync"] else max(1, cfg["transport"]["staleness"])
    if ahead > r + slack:
        log(f"agent {agent.rank}: a neighbour has posted round {ahead}; skipping rounds {r}..{ahead - 1}")
        return ahead
    return r
