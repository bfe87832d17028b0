"""Communication graphs: who merges with whom, and with which weights.

A :class:`Topology` holds a 0/1 connectivity matrix ``C`` (with self-loops) and a row-stochastic mixing matrix
``pi``; agent ``i`` merges the models of ``{j : C[i][j] > 0}`` (itself included) with weights ``pi[i][j]``.

Topologies come from builders (:meth:`Topology.build`: ``fc``, ``ring``, ``bipartite``, ``disconnected``,
``torus``, ``exponential``, ``random``; Metropolis-Hastings weights) or from files (:meth:`Topology.load`) in
the DIMAT reference format, as JSON or YAML::

    {"graph_type": "Ring", "num_agents": 3,
     "connectivity": [[1.0, 1.0, 1.0], ...],     # N x N, 0/1, self-loops on the diagonal
     "pi": [[0.333, 0.333, 0.333], ...],         # N x N, row-stochastic, > 0 only on edges
     "peers": {"0": "10.0.0.1:7000", ...}}       # optional: rank -> host:port for the multi-process runner

Other keys (the reference files carry ``"experiment id"``) are kept and written back unchanged.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from dimat.errors import UserError

__all__ = ["Topology", "TopologyWarning", "KINDS", "metropolis_hastings", "ROW_SUM_TOL"]

#: tolerance on each row sum of ``pi`` (the reference files round weights to a few decimals)
ROW_SUM_TOL = 1e-6
#: tolerance for calling ``pi`` symmetric
_SYM_TOL = 1e-9
_RESERVED = ("graph_type", "num_agents", "connectivity", "pi", "peers")


class TopologyWarning(UserWarning):
    """A legal but noteworthy topology: asymmetric weights or a disconnected graph."""


PathLike = Union[str, "os.PathLike[str]"]


class Topology:
    """An immutable communication graph with its mixing matrix.

    Parameters
    ----------
    connectivity : array-like, (N, N)
        0/1 adjacency with ones on the diagonal; ``C[i][j] = 1`` means agent ``i`` uses agent ``j``'s model.
    pi : array-like, (N, N)
        Mixing weights: non-negative, each row sums to 1 (within :data:`ROW_SUM_TOL`), ``pi[i][j] > 0`` only
        where ``C[i][j] = 1``.
    graph_type : str
        A label (``"ring"``, ``"FC"``, ...); free text.
    peers : mapping int -> "host:port", optional
        Network address of every agent, for the multi-process runner.
    meta : mapping, optional
        Extra keys read from a file, written back by :meth:`save`.
    source : str
        What to name in error messages (a file name when loading).

    Raises
    ------
    UserError
        When the matrices are inconsistent; the message names ``source`` and the field.
    """

    def __init__(
        self,
        connectivity: Any,
        pi: Any,
        graph_type: str = "custom",
        peers: Optional[Mapping[Any, str]] = None,
        *,
        meta: Optional[Mapping[str, Any]] = None,
        source: str = "topology",
    ) -> None:
        c = _matrix(connectivity, source, "connectivity")
        p = _matrix(pi, source, "pi")
        _validate(c, p, source)
        c = (c > 0).astype(np.int64)
        c.setflags(write=False)
        p = p.astype(np.float64, copy=True)
        p.setflags(write=False)
        self._c = c
        self._pi = p
        self._graph_type = str(graph_type)
        self._peers = _parse_peers(peers, len(c), source) if peers is not None else None
        self._meta = dict(meta or {})
        self._warn(source)

    # ------------------------------------------------------------------ record
    @property
    def connectivity(self) -> np.ndarray:
        """(N, N) int64 0/1 adjacency, self-loops on the diagonal (read-only)."""
        return self._c

    @property
    def pi(self) -> np.ndarray:
        """(N, N) float64 mixing matrix (read-only)."""
        return self._pi

    @property
    def graph_type(self) -> str:
        return self._graph_type

    @property
    def peers(self) -> Optional[dict[int, str]]:
        """Agent rank -> ``"host:port"``, or None."""
        return dict(self._peers) if self._peers is not None else None

    @property
    def meta(self) -> dict[str, Any]:
        """Extra keys from the file this topology was loaded from."""
        return dict(self._meta)

    @property
    def num_agents(self) -> int:
        return int(self._c.shape[0])

    def with_peers(self, peers: Optional[Mapping[Any, str]]) -> "Topology":
        """A copy with another ``peers`` map."""
        with warnings.catch_warnings():  # this graph was reported on when it was made
            warnings.simplefilter("ignore", TopologyWarning)
            return Topology(self._c, self._pi, self._graph_type, peers, meta=self._meta)

    def __repr__(self) -> str:
        return f"Topology({self._graph_type!r}, num_agents={self.num_agents})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return (
            self._graph_type == other._graph_type
            and np.array_equal(self._c, other._c)
            and np.array_equal(self._pi, other._pi)
            and self._peers == other._peers
        )

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ queries
    def neighbors(self, i: int) -> list[int]:
        """Agents ``j != i`` whose models agent ``i`` uses, ascending."""
        self._check_rank(i)
        return [int(j) for j in np.flatnonzero(self._c[i]) if j != i]

    def weights(self, i: int) -> dict[int, float]:
        """``{j: pi[i][j]}`` over agent ``i`` itself and its neighbours (zero weights included)."""
        self._check_rank(i)
        return {j: float(self._pi[i, j]) for j in sorted([i] + self.neighbors(i))}

    def degree(self, i: int) -> int:
        """Number of neighbours of agent ``i`` (self excluded)."""
        return len(self.neighbors(i))

    def is_symmetric(self) -> bool:
        """True when both ``C`` and ``pi`` equal their transposes."""
        return bool(np.array_equal(self._c, self._c.T) and np.allclose(self._pi, self._pi.T, atol=_SYM_TOL, rtol=0))

    def is_doubly_stochastic(self) -> bool:
        """True when every column of ``pi`` also sums to 1 (the average of all models is preserved)."""
        return bool(np.all(np.abs(self._pi.sum(axis=0) - 1.0) <= ROW_SUM_TOL))

    def components(self) -> list[list[int]]:
        """Connected components of the undirected graph ``C + C^T``, each sorted, ordered by first agent."""
        return _components(self._c)

    def is_connected(self) -> bool:
        """True when the graph (edge directions ignored) has one component."""
        return len(self.components()) == 1

    def spectral_gap(self) -> float:
        """``1 - |lambda_2(pi)|``, with eigenvalues ordered by modulus; 1.0 for a single agent.

        The larger the gap, the faster repeated mixing drives all agents to consensus; 0 means some
        information never spreads (a disconnected graph, or a periodic one such as a 2-colourable graph
        with zero self-weights).
        """
        if self.num_agents == 1:
            return 1.0
        if np.allclose(self._pi, self._pi.T, atol=_SYM_TOL, rtol=0):
            ev = np.linalg.eigvalsh((self._pi + self._pi.T) / 2)
        else:
            ev = np.linalg.eigvals(self._pi)
        mods = np.sort(np.abs(ev))[::-1]
        return float(max(0.0, 1.0 - mods[1]))

    def _check_rank(self, i: int) -> None:
        if not 0 <= int(i) < self.num_agents:
            raise ValueError(f"agent {i} out of range 0..{self.num_agents - 1}")

    def _warn(self, source: str) -> None:
        if not self.is_symmetric():
            what = ("the graph is directed (connectivity is not symmetric)" if not np.array_equal(self._c, self._c.T)
                    else "pi is not symmetric")
            why = ("" if self.is_doubly_stochastic()
                   else "; its columns do not sum to 1, so mixing drifts from the average model")
            warnings.warn(f"{source}: {what}{why}", TopologyWarning, stacklevel=3)
        comps = self.components()
        if len(comps) > 1:
            warnings.warn(f"{source}: the graph is disconnected ({len(comps)} components)",
                          TopologyWarning, stacklevel=3)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, kind: str, num_agents: int, seed: int = 0, **kw: Any) -> "Topology":
        """Build a named topology with Metropolis-Hastings weights.

        Parameters
        ----------
        kind : str
            One of :data:`KINDS`:

            - ``fc``, ``ring``, ``disconnected``;
            - ``bipartite`` (option ``hubs``, default 2, or 1 for two agents): the last ``hubs`` agents form one
              side and every other agent the other side, as in the DIMAT reference's "Bipar";
            - ``torus`` (option ``rows``, default the largest divisor of N not above sqrt(N)): a 2-D grid with
              wrap-around; a prime N gives a ring;
            - ``exponential``: i linked with i +- 2^k; option ``directed=True`` gives the one-way graph
              i -> i + 2^k with uniform weights (doubly stochastic, not symmetric);
            - ``random`` (option ``p``, default ``min(1, 2 ln N / N)``): Erdos-Renyi with ``seed``, its
              components then joined by random edges so that it is connected.
        num_agents : int
            N >= 1.
        seed : int
            Seed for ``random``; the other kinds ignore it.
        """
        kind_l = str(kind).lower()
        if kind_l not in _BUILDERS:
            raise UserError(f"unknown topology kind {kind!r}; choose one of {', '.join(KINDS)} "
                            f"or give a .json/.yaml file")
        if isinstance(num_agents, bool) or not isinstance(num_agents, (int, np.integer)) or num_agents < 1:
            raise UserError(f"topology {kind_l!r}: number of agents must be an integer >= 1, got {num_agents!r}")
        n = int(num_agents)
        unknown = sorted(set(kw) - set(_OPTIONS[kind_l]))
        if unknown:
            allowed = ", ".join(_OPTIONS[kind_l]) or "none"
            raise UserError(f"topology {kind_l!r}: unknown option(s) {', '.join(unknown)} (options: {allowed})")
        result = _BUILDERS[kind_l](n, seed=seed, **kw)
        if isinstance(result, tuple):
            c, p = result
        else:
            c, p = result, metropolis_hastings(result)
        return cls(c, p, kind_l, source=f"topology {kind_l!r}")

    @classmethod
    def from_spec(cls, spec: str, num_agents: int, seed: int = 0) -> "Topology":
        """A kind name (``"ring"``) or a path to a .json/.yaml/.yml file whose size must be ``num_agents``."""
        s = str(spec)
        if s.lower() not in _BUILDERS and (Path(s).suffix.lower() in _SUFFIXES or os.sep in s or Path(s).exists()):
            topo = cls.load(s)
            if topo.num_agents != num_agents:
                raise UserError(f"{s}: field 'num_agents': the file has {topo.num_agents} agents but the run "
                                f"has {num_agents}")
            return topo
        return cls.build(s, num_agents, seed=seed)

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: PathLike) -> "Topology":
        """Read a topology file (.json, .yaml or .yml) in the DIMAT reference format.

        Raises
        ------
        UserError
            Missing or unreadable file, bad syntax, a missing or inconsistent field; the message names the
            file and the field.
        """
        p = Path(path)
        name = str(path)
        fmt = _format_of(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{name}: no such topology file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{name}: cannot read: {e}") from None
        data = _parse(text, fmt, name)
        if not isinstance(data, dict):
            raise UserError(f"{name}: expected a mapping with keys graph_type, num_agents, connectivity, pi; "
                            f"got {type(data).__name__}")
        for key in ("graph_type", "num_agents", "connectivity", "pi"):
            if key not in data:
                raise UserError(f"{name}: field {key!r} is missing")
        gt = data["graph_type"]
        if not isinstance(gt, str) or not gt.strip():
            raise UserError(f"{name}: field 'graph_type' must be a non-empty string, got {gt!r}")
        na = data["num_agents"]
        if isinstance(na, float) and na.is_integer():
            na = int(na)
        if isinstance(na, bool) or not isinstance(na, int) or na < 1:
            raise UserError(f"{name}: field 'num_agents' must be an integer >= 1, got {data['num_agents']!r}")
        c = _matrix(data["connectivity"], name, "connectivity")
        pi = _matrix(data["pi"], name, "pi")
        for field, m in (("connectivity", c), ("pi", pi)):
            if m.shape[0] != na:
                raise UserError(f"{name}: field {field!r} is {m.shape[0]}x{m.shape[1]} but num_agents is {na}")
        meta = {k: v for k, v in data.items() if k not in _RESERVED}
        return cls(c, pi, gt, data.get("peers"), meta=meta, source=name)

    def to_dict(self) -> dict[str, Any]:
        """The reference-format mapping (connectivity as 0.0/1.0 floats, like the reference files)."""
        d: dict[str, Any] = {"graph_type": self._graph_type}
        d.update(self._meta)
        d["num_agents"] = self.num_agents
        d["connectivity"] = self._c.astype(np.float64).tolist()
        d["pi"] = self._pi.tolist()
        if self._peers is not None:
            d["peers"] = {str(k): v for k, v in sorted(self._peers.items())}
        return d

    def dumps(self, fmt: str = "json") -> str:
        """The file text in ``fmt`` (``"json"`` or ``"yaml"``)."""
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=4, default=str) + "\n"
        if fmt == "yaml":
            import yaml

            return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        raise ValueError(f"unknown topology format {fmt!r}; use 'json' or 'yaml'")

    def save(self, path: PathLike) -> None:
        """Write to ``path`` atomically (a temporary file renamed into place); the suffix picks the format."""
        p = Path(path)
        text = self.dumps(_format_of(p))
        _atomic_write(p, text)

    # ------------------------------------------------------------------ report
    def describe(self) -> str:
        """A human-readable summary: size, symmetry, connectivity, spectral gap, then one line per agent."""
        n = self.num_agents
        comps = self.components()
        degs = [self.degree(i) for i in range(n)]
        lines = [
            f"graph_type: {self._graph_type}",
            f"agents: {n}",
            f"edges: {int(sum(degs) // 2) if np.array_equal(self._c, self._c.T) else sum(degs)}"
            f"{'' if np.array_equal(self._c, self._c.T) else ' (directed)'}",
            f"degree: min {min(degs)}, max {max(degs)}, mean {np.mean(degs):.2f}",
            f"connected: {'yes' if len(comps) == 1 else f'no ({len(comps)} components)'}",
            f"symmetric: {'yes' if self.is_symmetric() else 'no'}",
            f"doubly stochastic: {'yes' if self.is_doubly_stochastic() else 'no'}",
            f"spectral gap (1 - |lambda_2(pi)|): {self.spectral_gap():.6f}",
            "agent  degree  neighbours: weight  (self weight first)",
        ]
        for i in range(n):
            w = self.weights(i)
            parts = [f"self {w[i]:.4g}"] + [f"{j}: {w[j]:.4g}" for j in self.neighbors(i)]
            addr = f"  @ {self._peers[i]}" if self._peers else ""
            lines.append(f"{i:>5}  {degs[i]:>6}  " + ", ".join(parts) + addr)
        return "\n".join(lines)


# ---------------------------------------------------------------------- weights and builders
def metropolis_hastings(connectivity: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings weights of a symmetric 0/1 graph: ``pi[i][j] = 1 / (1 + max(d_i, d_j))`` on edges.

    ``d_i`` counts the neighbours of ``i`` (self excluded); the diagonal takes the remainder of each row, so
    ``pi`` is symmetric and doubly stochastic.
    """
    c = (np.asarray(connectivity) > 0).astype(np.float64)
    np.fill_diagonal(c, 0.0)
    if not np.array_equal(c, c.T):
        raise ValueError("Metropolis-Hastings weights need a symmetric graph")
    deg = c.sum(axis=1)
    pi = c / (1.0 + np.maximum(deg[:, None], deg[None, :]))
    np.fill_diagonal(pi, 1.0 - pi.sum(axis=1))
    return pi


def _components(c: np.ndarray) -> list[list[int]]:
    n = len(c)
    adj = (c + c.T) > 0
    seen = np.zeros(n, dtype=bool)
    comps = []
    for start in range(n):
        if seen[start]:
            continue
        stack, comp = [start], []
        seen[start] = True
        while stack:
            v = stack.pop()
            comp.append(v)
            for w in np.flatnonzero(adj[v] & ~seen):
                seen[w] = True
                stack.append(int(w))
        comps.append(sorted(comp))
    return comps


def _adjacency(n: int, edges) -> np.ndarray:
    c = np.eye(n, dtype=np.int64)
    for i, j in edges:
        c[i, j] = c[j, i] = 1
    return c


def _fc(n: int, seed: int = 0) -> np.ndarray:
    return np.ones((n, n), dtype=np.int64)


def _ring(n: int, seed: int = 0) -> np.ndarray:
    return _adjacency(n, [(i, (i + 1) % n) for i in range(n)])


def _disconnected(n: int, seed: int = 0) -> np.ndarray:
    return np.eye(n, dtype=np.int64)


def _bipartite(n: int, seed: int = 0, hubs: Optional[int] = None) -> np.ndarray:
    # The DIMAT reference's "Bipar": the last `hubs` agents on one side, all others on the other side.
    if hubs is None:
        hubs = min(2, n - 1)
    if not 1 <= hubs < n:
        raise UserError(f"topology 'bipartite': hubs must be in 1..{n - 1} for {n} agents, got {hubs}"
                        if n > 1 else "topology 'bipartite' needs at least 2 agents")
    left = range(n - hubs)
    right = range(n - hubs, n)
    return _adjacency(n, [(i, j) for i in left for j in right])


def _torus(n: int, seed: int = 0, rows: Optional[int] = None) -> np.ndarray:
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if not isinstance(rows, int) or rows < 1 or n % rows:
        raise UserError(f"topology 'torus': rows must divide the number of agents {n}, got {rows!r}")
    cols = n // rows
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            edges.append((i, r * cols + (c + 1) % cols))
            edges.append((i, ((r + 1) % rows) * cols + c))
    return _adjacency(n, edges)


def _exponential(n: int, seed: int = 0, directed: bool = False):
    hops = [2 ** k for k in range(max(0, (n - 1).bit_length())) if 2 ** k < n]
    if not directed:
        return _adjacency(n, [(i, (i + h) % n) for i in range(n) for h in hops])
    c = np.eye(n, dtype=np.int64)
    for i in range(n):
        for h in hops:
            c[i, (i + h) % n] = 1
    # a circulant with uniform rows: doubly stochastic, though not symmetric
    return c, c / c.sum(axis=1, keepdims=True)


def _random(n: int, seed: int = 0, p: Optional[float] = None) -> np.ndarray:
    if p is None:
        p = min(1.0, 2.0 * math.log(n) / n) if n > 1 else 1.0
    if not 0.0 <= float(p) <= 1.0:
        raise UserError(f"topology 'random': edge probability p must be in [0, 1], got {p!r}")
    rng = np.random.default_rng(seed)
    iu = np.triu_indices(n, k=1)
    keep = rng.random(len(iu[0])) < p
    c = _adjacency(n, zip(iu[0][keep], iu[1][keep]))
    # join components in a seeded random order until the graph is connected
    comps = _components(c)
    order = rng.permutation(len(comps))
    for a, b in zip(order[:-1], order[1:]):
        i = int(rng.choice(comps[a]))
        j = int(rng.choice(comps[b]))
        c[i, j] = c[j, i] = 1
    return c


_BUILDERS: dict[str, Callable[..., Any]] = {
    "fc": _fc,
    "ring": _ring,
    "bipartite": _bipartite,
    "disconnected": _disconnected,
    "torus": _torus,
    "exponential": _exponential,
    "random": _random,
}
#: keyword options each builder accepts
_OPTIONS: dict[str, tuple[str, ...]] = {
    "fc": (), "ring": (), "bipartite": ("hubs",), "disconnected": (), "torus": ("rows",),
    "exponential": ("directed",), "random": ("p",),
}
#: topology kinds accepted by :meth:`Topology.build`
KINDS = tuple(_BUILDERS)
_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


# ---------------------------------------------------------------------- validation and I/O helpers
def _matrix(value: Any, source: str, field: str) -> np.ndarray:
    """A square float matrix from nested lists or an array; UserError naming ``field`` otherwise."""
    if isinstance(value, np.ndarray):
        rows = value
    else:
        if not isinstance(value, (list, tuple)) or not value:
            raise UserError(f"{source}: field {field!r} must be a non-empty list of rows, got {_short(value)}")
        n = len(value)
        for i, row in enumerate(value):
            if not isinstance(row, (list, tuple)):
                raise UserError(f"{source}: field {field!r}: row {i} must be a list, got {_short(row)}")
            if len(row) != n:
                raise UserError(f"{source}: field {field!r}: row {i} has {len(row)} entries, expected {n} "
                                f"(the matrix must be square)")
            for j, v in enumerate(row):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise UserError(f"{source}: field {field!r}: entry [{i}][{j}] must be a number, got {_short(v)}")
        rows = value
    try:
        m = np.array(rows, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: field {field!r}: not a numeric matrix ({e})") from None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise UserError(f"{source}: field {field!r} must be a non-empty square matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        i, j = np.argwhere(~np.isfinite(m))[0]
        raise UserError(f"{source}: field {field!r}: entry [{i}][{j}] is not finite")
    return m


def _validate(c: np.ndarray, p: np.ndarray, source: str) -> None:
    if c.shape != p.shape:
        raise UserError(f"{source}: field 'pi' is {p.shape[0]}x{p.shape[1]} but 'connectivity' is "
                        f"{c.shape[0]}x{c.shape[1]}")
    bad = np.argwhere((c != 0) & (c != 1))
    if len(bad):
        i, j = bad[0]
        raise UserError(f"{source}: field 'connectivity': entry [{i}][{j}] is {c[i, j]:g}, expected 0 or 1")
    diag0 = np.flatnonzero(np.diag(c) == 0)
    if len(diag0):
        i = diag0[0]
        raise UserError(f"{source}: field 'connectivity': entry [{i}][{i}] is 0; every agent needs a self-loop")
    neg = np.argwhere(p < 0)
    if len(neg):
        i, j = neg[0]
        raise UserError(f"{source}: field 'pi': entry [{i}][{j}] is {p[i, j]:g}, weights must be >= 0")
    sums = p.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOL)
    if len(off):
        i = off[0]
        raise UserError(f"{source}: field 'pi': row {i} sums to {sums[i]:.6g}, expected 1 (within {ROW_SUM_TOL:g})")
    stray = np.argwhere((p > 0) & (c == 0))
    if len(stray):
        i, j = stray[0]
        raise UserError(f"{source}: field 'pi': entry [{i}][{j}] is {p[i, j]:g} but connectivity[{i}][{j}] is 0 "
                        f"(weights are allowed only on edges)")


def _parse_peers(peers: Any, n: int, source: str) -> dict[int, str]:
    if not isinstance(peers, Mapping):
        raise UserError(f"{source}: field 'peers' must map agent rank to 'host:port', got {_short(peers)}")
    out: dict[int, str] = {}
    for k, v in peers.items():
        try:
            rank = int(k)
            if isinstance(k, bool) or (isinstance(k, float) and not k.is_integer()):
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"{source}: field 'peers': key {k!r} is not an agent rank") from None
        if not 0 <= rank < n:
            raise UserError(f"{source}: field 'peers': agent {rank} out of range 0..{n - 1}")
        if rank in out:
            raise UserError(f"{source}: field 'peers': agent {rank} listed twice")
        host, sep, port = str(v).rpartition(":") if isinstance(v, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UserError(f"{source}: field 'peers': agent {rank}: expected 'host:port' with port 1..65535, "
                            f"got {v!r}")
        out[rank] = f"{host}:{int(port)}"
    missing = sorted(set(range(n)) - set(out))
    if missing:
        raise UserError(f"{source}: field 'peers': no address for agent(s) {missing}")
    return out


def _format_of(p: Path) -> str:
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise UserError(f"{p}: unknown topology file type {p.suffix!r}; use .json, .yaml or .yml")
    return fmt


def _parse(text: str, fmt: str, name: str) -> Any:
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1} column {where.column + 1}" if where is not None else ""
        raise UserError(f"{name}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def _atomic_write(path: Path, text: str) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(f"{path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."
