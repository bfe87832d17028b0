"""Time-varying topologies: which graph (neighbours and mixing weights) each round uses.

A :class:`Schedule` maps a round ``r`` (0-based) to a :class:`~dimat.topology.Topology`. Kinds:

* a static topology (a kind such as ``ring``, or a file): the same graph every round;
* ``one-peer-exponential``: in round ``r`` agent ``i`` merges with agent ``(i + 2^(r mod tau)) mod N`` only,
  weights 1/2 and 1/2, where ``tau = ceil(log2 N)``. Each agent sends one snapshot and receives one per round,
  and when N is a power of two the product of ``tau`` consecutive rounds' mixing matrices is exact averaging
  (every entry 1/N);
* ``random-matching``: in round ``r`` the agents are paired by a random perfect matching drawn from the seed and
  ``r`` alone (so every process of a multi-process run draws the same pairs without talking); each pair averages
  with weights 1/2 and 1/2, and with an odd N one agent sits the round out;
* a list of topologies (kinds or files), round ``r`` using entry ``r mod len(list)``.

Transports learn the per-round peers from :meth:`Schedule.round_peers`; everything that must be set up once
(gRPC addresses, thread pools, who may send to whom at all) uses the union over all rounds,
:meth:`Schedule.potential_neighbors` and :meth:`Schedule.union`.
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from dimat.errors import UserError
from dimat.topology import KINDS, Topology, TopologyWarning, metropolis_hastings

__all__ = ["Schedule", "SCHEDULE_KINDS", "RoundPeers", "product_spectral_gap"]

#: Time-varying kinds :meth:`Schedule.from_spec` accepts besides the static kinds of :data:`dimat.topology.KINDS`.
SCHEDULE_KINDS = ("one-peer-exponential", "random-matching")

#: round -> (ranks this agent collects from, ranks it sends to) in that round
RoundPeers = Callable[[int], Tuple[List[int], List[int]]]

Spec = Union[str, Sequence[str]]


def _quiet(c: np.ndarray, pi: np.ndarray, name: str) -> Topology:
    # A matching is disconnected and the one-peer graph is directed in every single round; that is the point of a
    # schedule, so the per-round graphs are not reported as warnings (the union and the product are).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TopologyWarning)
        return Topology(c, pi, name)


class Schedule:
    """A topology per round.

    Parameters
    ----------
    name : what :meth:`describe` and error messages call it.
    num_agents : N.
    graph_at : round -> Topology of that round (called with r >= 0; results are cached).
    period : rounds after which the graphs repeat; None when they never do (``random-matching``).
    peers : rank -> ``"host:port"`` shared by all rounds (from topology files), or None.

    Use the constructors (:meth:`static`, :meth:`cycle`, :meth:`one_peer_exponential`, :meth:`random_matching`,
    :meth:`from_spec`) rather than this one.
    """

    def __init__(self, name: str, num_agents: int, graph_at: Callable[[int], Topology], period: Optional[int],
                 peers: Optional[dict] = None) -> None:
        self.name = str(name)
        self.num_agents = int(num_agents)
        self.period = period
        self._graph_at = functools.lru_cache(maxsize=256)(graph_at)
        self.peers = peers
        self._union: Optional[Topology] = None

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def static(cls, topology: Topology) -> "Schedule":
        """The same graph every round."""
        return cls(topology.graph_type, topology.num_agents, lambda r: topology, 1, topology.peers)

    @classmethod
    def cycle(cls, topologies: Sequence[Topology], name: str = "cycle") -> "Schedule":
        """Round r uses ``topologies[r % len(topologies)]``; all must have the same number of agents."""
        topos = list(topologies)
        if not topos:
            raise UserError(f"{name}: a topology list needs at least one entry")
        n = topos[0].num_agents
        for k, t in enumerate(topos):
            if t.num_agents != n:
                raise UserError(f"{name}: entry {k} has {t.num_agents} agents but entry 0 has {n}")
        peers = [t.peers for t in topos if t.peers]
        if any(p != peers[0] for p in peers):
            raise UserError(f"{name}: the topology files give different 'peers' addresses; give them in one "
                            f"file, or in none and pass a peers file")
        return cls(name, n, lambda r: topos[r % len(topos)], len(topos), peers[0] if peers else None)

    @classmethod
    def one_peer_exponential(cls, num_agents: int) -> "Schedule":
        """Round r: agent i merges with ``(i + 2^(r mod tau)) mod N``, ``tau = ceil(log2 N)``; weights 1/2, 1/2.

        Directed (agent i receives from i + 2^k and sends to i - 2^k), doubly stochastic; for N a power of two
        the product of any ``tau`` consecutive rounds averages exactly.
        """
        n = _check_n("one-peer-exponential", num_agents)
        tau = max(1, math.ceil(math.log2(n))) if n > 1 else 1

        def at(r: int) -> Topology:
            c = np.eye(n, dtype=np.int64)
            if n > 1:
                hop = 2 ** (r % tau)
                c[np.arange(n), (np.arange(n) + hop) % n] = 1
            return _quiet(c, c / c.sum(axis=1, keepdims=True), f"one-peer-exponential (round {r})")

        return cls("one-peer-exponential", n, at, tau)

    @classmethod
    def random_matching(cls, num_agents: int, seed: int = 0) -> "Schedule":
        """Round r: a random perfect matching drawn from ``(seed, r)``; each pair averages (weights 1/2, 1/2).

        With an odd N the unpaired agent keeps its model that round. No period.
        """
        n = _check_n("random-matching", num_agents)
        seed = int(seed)

        def at(r: int) -> Topology:
            perm = np.random.default_rng([seed, int(r)]).permutation(n)
            c = np.eye(n, dtype=np.int64)
            for a, b in zip(perm[0::2], perm[1::2]):
                c[a, b] = c[b, a] = 1
            return _quiet(c, metropolis_hastings(c), f"random-matching (round {r})")

        return cls(f"random-matching (seed {seed})", n, at, None)

    @classmethod
    def from_spec(cls, spec: Spec, num_agents: int, seed: int = 0) -> "Schedule":
        """A schedule from a config's ``topology`` value.

        ``spec`` is a static kind or topology file (:meth:`Topology.from_spec`), a kind of :data:`SCHEDULE_KINDS`,
        or a non-empty list of static kinds / files cycled by round (entry k of the list is built with seed
        ``seed + k``, so that ``[random, random]`` is two different graphs).

        Raises
        ------
        UserError : unknown kind, a bad file, or a size other than ``num_agents``; the message names the entry.
        """
        if isinstance(spec, str):
            kind = spec.lower()
            if kind == "one-peer-exponential":
                return cls.one_peer_exponential(num_agents)
            if kind == "random-matching":
                return cls.random_matching(num_agents, seed)
            try:
                return cls.static(_static(spec, num_agents, seed))
            except UserError as e:
                if str(e).startswith("unknown topology kind"):  # name the time-varying kinds too
                    raise UserError(f"unknown topology kind {spec!r}; choose one of {', '.join(KINDS)}, a schedule "
                                    f"({', '.join(SCHEDULE_KINDS)}), a .json/.yaml file or a list of them") from None
                raise
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise UserError("a topology list needs at least one entry (a kind or a file per round)")
            topos = []
            for k, entry in enumerate(spec):
                if not isinstance(entry, str) or not entry:
                    raise UserError(f"entry {k} of the topology list must be a topology kind or file, got {entry!r}")
                if entry.lower() in SCHEDULE_KINDS:
                    raise UserError(f"entry {k} of the topology list: {entry!r} is a schedule itself; a list "
                                    f"holds static topologies (kinds or files), one per round")
                try:
                    topos.append(_static(entry, num_agents, seed + k))
                except UserError as e:
                    raise UserError(f"entry {k} of the topology list: {e}") from None
            name = "cycle of " + ", ".join(Path(s).name for s in spec)
            return cls.cycle(topos, name) if len(topos) > 1 else cls.static(topos[0])
        raise UserError(f"a topology must be a kind, a file or a list of them, got {spec!r}")

    # --------------------------------------------------------------------------------------------- queries
    @property
    def is_static(self) -> bool:
        """True when every round uses the same graph."""
        return self.period == 1

    def at(self, r: int) -> Topology:
        """The graph of round ``r`` (r >= 0)."""
        r = int(r)
        if r < 0:
            raise ValueError(f"round {r} is negative")
        return self._graph_at(r if self.period is None else r % self.period)

    def neighbors(self, i: int, r: int) -> List[int]:
        """Agents whose models agent ``i`` merges in round ``r``."""
        return self.at(r).neighbors(i)

    def out_neighbors(self, i: int, r: int) -> List[int]:
        """Agents that merge agent ``i``'s model in round ``r`` (where ``i`` sends its snapshot)."""
        c = self.at(r).connectivity
        return [int(k) for k in np.flatnonzero(c[:, i]) if k != i]

    def round_peers(self, rank: int) -> RoundPeers:
        """``round -> (neighbours, out-neighbours)`` of agent ``rank``: what a transport asks each round."""
        def peers(r: int) -> Tuple[List[int], List[int]]:
            return self.neighbors(rank, r), self.out_neighbors(rank, r)
        return peers

    def union_connectivity(self) -> np.ndarray:
        """0/1 matrix of every edge any round may use (random-matching: every pair)."""
        n = self.num_agents
        if self.period is None:
            return np.ones((n, n), dtype=np.int64)
        c = np.zeros((n, n), dtype=np.int64)
        for r in range(self.period):
            c |= self.at(r).connectivity
        return c

    def potential_neighbors(self, i: int) -> List[int]:
        """Agents that agent ``i`` merges in some round."""
        return [int(j) for j in np.flatnonzero(self.union_connectivity()[i]) if j != i]

    def potential_out_neighbors(self, i: int) -> List[int]:
        """Agents that merge agent ``i``'s model in some round."""
        return [int(k) for k in np.flatnonzero(self.union_connectivity()[:, i]) if k != i]

    def union(self) -> Topology:
        """Every edge any round may use, as one graph (Metropolis-Hastings weights on its undirected version).

        Its weights are not used for merging; it says who may ever talk to whom (addresses, connections).
        A static schedule's union is its topology. A union that leaves agents apart is reported with a
        :class:`~dimat.topology.TopologyWarning` (once).
        """
        if self.is_static:
            return self.at(0)
        if self._union is None:  # built once, so that a disconnected union is reported once
            c = self.union_connectivity()
            c = ((c + c.T) > 0).astype(np.int64)
            self._union = Topology(c, metropolis_hastings(c), f"union of {self.name}", self.peers,
                                   source=f"topology schedule {self.name!r}: the union of all rounds")
        return self._union

    def mixing_product(self, rounds: int, start: int = 0) -> np.ndarray:
        """``pi_{start+rounds-1} @ ... @ pi_{start}``: what ``rounds`` rounds of mixing do to the agents' models
        (row i: the weight of every agent's round-``start`` model in agent i's model afterwards)."""
        p = np.eye(self.num_agents)
        for r in range(start, start + int(rounds)):
            p = self.at(r).pi @ p
        return p

    def window(self) -> int:
        """Rounds :meth:`describe` mixes over by default: the period, or ``ceil(log2 N)`` (at least 1) without one."""
        if self.period is not None:
            return self.period
        return max(1, math.ceil(math.log2(self.num_agents))) if self.num_agents > 1 else 1

    def describe(self, rounds: Optional[int] = None, show_rounds: Optional[int] = None) -> str:
        """Per-round graphs and the mixing of ``rounds`` consecutive rounds (default :meth:`window`).

        Reports the spectral gap ``1 - |lambda_2|`` of the product of the window's mixing matrices and the
        per-round rate ``1 - |lambda_2|^(1/T)`` it amounts to (comparable with a static graph's gap), and lists
        the neighbours of every agent in the first ``show_rounds`` rounds (default: the window, at most 8).
        """
        n = self.num_agents
        t = int(rounds) if rounds is not None else self.window()
        if t < 1:
            raise UserError(f"--rounds must be >= 1, got {t}")
        prod = self.mixing_product(t)
        gap = product_spectral_gap(prod)
        per_round = 1.0 - (1.0 - gap) ** (1.0 / t)
        sent = [sum(len(self.out_neighbors(i, r)) for i in range(n)) / n for r in range(t)]
        union = self.union()
        lines = [
            f"schedule: {self.name}",
            f"agents: {n}",
            f"period: {self.period if self.period is not None else 'none (a new graph every round)'}",
            f"union of all rounds: {'connected' if union.is_connected() else 'DISCONNECTED'}"
            f" ({len(union.components())} component{'s' if len(union.components()) > 1 else ''})",
            f"snapshots sent per agent and round: mean {np.mean(sent):.3g} over rounds 0..{t - 1}",
            f"mixing over rounds 0..{t - 1} (product of {t} mixing matrices):",
            f"  spectral gap of the product (1 - |lambda_2|): {gap:.6f}",
            f"  per-round rate (1 - |lambda_2|^(1/{t})): {per_round:.6f}",
            f"  largest deviation from exact averaging, max |P - 1/N|: {np.abs(prod - 1.0 / n).max():.3g}",
        ]
        shown = min(t, 8) if show_rounds is None else int(show_rounds)
        for r in range(shown):
            g = self.at(r)
            lines.append(f"round {r}: spectral gap {g.spectral_gap():.6f}")
            for i in range(n):
                w = g.weights(i)
                parts = [f"self {w[i]:.4g}"] + [f"{j}: {w[j]:.4g}" for j in g.neighbors(i)]
                lines.append(f"  {i:>5}  " + ", ".join(parts))
        if shown < t:
            lines.append(f"(rounds {shown}..{t - 1} not listed; pass --show-rounds)")
        return "\n".join(lines)


def product_spectral_gap(p: np.ndarray) -> float:
    """``1 - |lambda_2(P)|`` of a (row-stochastic) matrix, eigenvalues ordered by modulus; 1.0 for N = 1."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 1:
        return 1.0
    mods = np.sort(np.abs(np.linalg.eigvals(p)))[::-1]
    return float(min(1.0, max(0.0, 1.0 - mods[1])))


def _check_n(kind: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"topology {kind!r}: number of agents must be an integer >= 1, got {n!r}")
    return int(n)


def _static(spec: str, n: int, seed: int) -> Topology:
    topo = Topology.from_spec(spec, n, seed=seed)
    if topo.num_agents != n:
        raise UserError(f"the topology has {topo.num_agents} agents but key 'agents' is {n}")
    return topo
