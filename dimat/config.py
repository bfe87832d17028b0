"""Run configuration: one nested schema of defaults, loaded from YAML, overridden by ``--set key.sub=value``.

:data:`DEFAULTS` is the whole schema: every valid key with its default value. A key's type is the type of its
default (an ``int`` default also accepts nothing but ints, a ``float`` default accepts ints and floats); keys whose
default is ``None`` or that accept several types are listed in :data:`TYPES`. Adding a key to :data:`DEFAULTS`
(and, only for such keys, to :data:`TYPES`) is the only step needed to make it a valid config key.

A config that holds only ``agents`` and ``rounds`` runs: everything else has a default. An unknown key is a
:class:`~dimat.errors.UserError` that names the file and suggests the nearest valid key.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import yaml

from dimat.errors import UserError

__all__ = ["DEFAULTS", "TYPES", "Config", "load_config", "resolve", "flatten", "diff", "first_difference", "OPTIMIZERS", "TRANSPORTS"]

OPTIMIZERS = ("sgd", "msgd", "adam")
TRANSPORTS = ("inproc", "grpc", "torch")
#: Transports that carry a second message per round (merge.stats both).
MESSAGE_TRANSPORTS = ("inproc", "grpc", "torch")

#: The schema: every valid key and its default. Comments give units and meaning (see docs/config.md).
DEFAULTS: Dict[str, Any] = {
    "seed": 0,  # agent k uses seed + k for its init and data order
    "agents": 5,  # number of agents N; must equal the topology's size
    "rounds": 10,  # merge rounds R
    "topology": "ring",  # a kind (ring, fc, ...), a file, a schedule (one-peer-exponential, random-matching) or a list
    "topology_seed": None,  # seed for random topologies (None: use `seed`)
    "data": {
        "dataset": "digits",  # digits | synthetic[:opts] | npz:PATH | imagefolder:PATH | cifar:PATH
        "partition": "iid",  # iid | classes | dirichlet:ALPHA
        "flip": False,  # random horizontal flips of training images (augmentation)
    },
    "model": {
        "name": "mlp",  # a zoo model: mlp, cnn, vgg16, resnet20, resnet50
        "width": 1.0,  # multiplier on every hidden width
        "init": "different",  # different (agent k initialised with seed + k) | same (every agent with seed)
    },
    "train": {
        "optimizer": "adam",  # sgd | msgd (momentum 0.9) | adam
        "lr": 1e-3,
        "weight_decay": 0.0,
        "epochs": 2,  # local epochs E per round
        "batch_size": 100,
        "pretrain_epochs": 0,  # local epochs before the first merge
        "keep_optimizer_state": False,  # False: a fresh optimizer every round (the reference)
    },
    "merge": {
        "method": "dimat",  # dimat | wa | wm | none | cdsgd | cdmsgd | dpsgd | sgp | centralised
        "stat_batches": 10,  # batches of local data for activation statistics and the BN reset (None: all)
        "bn_batches": None,  # a separate number of batches for the BN reset, done outside the operator (no REPAIR)
        "reset_bn": True,  # recompute BatchNorm statistics of the merged model on local data
        "bn_repair": "local",  # how reset_bn sets them: local (recomputed on local batches) | mix (see dimat.Node)
        "restore_norms": False,  # give units a BatchNorm normalises their mean norm back after combining
        "bn_refresh": False,  # re-estimate the model's BatchNorm statistics on local batches before each post
        "basis": "shared",  # shared (carry basis tags; see dimat.Node) | own (DIMAT as published: align to own model)
        "identity_prior": 0.0,  # dimat: lambda added to the correlation's diagonal before each assignment
        "keep_margin": None,  # dimat: keep a group's order unless matching gains more correlation than this
        "min_corr": "auto",  # dimat: average a matched unit only where its correlation reaches this (auto: 0.7 with
        # combine mean, else null; null: average every matched unit, as published)
        "min_corr_scope": "shared_classes",  # dimat with class counts (head label_counts): min_corr only for
        # participants that share a class with the merge's reference (shared_classes) | for every participant (all)
        "adopt_min_acc": None,  # basis shared: adopt a neighbour's basis only if its model reaches this accuracy
        # on local batches (auto: chance, 1/classes; null: always adopt)
        "head": "auto",  # the output layer: mean | label_counts (class c from the agents with samples of c, by
        # their counts; the counts travel with the snapshots) | auto (label_counts for dimat with combine mean)
        "stats": "own",  # dimat: align on own data's statistics (own) or on both sides' of each edge (both)
        "combine": "mean",  # after alignment: mean | ties | dare | consensus | fisher | regmean
        "combine_scale": 1.0,  # lambda on the combined task vector (ties, dare, consensus)
        "ties_density": 0.2,  # share of each task vector's entries ties keeps (per tensor)
        "dare_drop": 0.5,  # dare's drop probability
        "dare_then": "mean",  # mean | ties: how dare combines the sparsified task vectors
        "consensus_lambda": 0.4,  # TALL-mask threshold
        "consensus_k": 2,  # participants whose masks must keep an entry
        "fisher_floor": 1e-8,  # added to every Fisher entry before weighting
        "fisher_samples": 256,  # most local samples the Fisher is estimated on (one backward pass each)
        "regmean_alpha": 0.9,  # factor on the Gram matrices' off-diagonal entries
        "regmean_max_inputs": None,  # regmean: layers with larger Gram matrices (rows) take the mean (None: none)
    },
    "gossip": {  # the gradient-gossip baselines (merge.method cdsgd, cdmsgd, dpsgd, sgp); see dimat/gossip.py
        "comm_every": 1,  # local steps between two exchanges
        "momentum": 0.9,  # CDMSGD's Nesterov momentum
        "lr": None,  # learning rate of the gossip steps (None: train.lr)
    },
    "eval": {
        "batch_size": 1000,
        "consensus": False,  # dimat run: also evaluate all agents aligned and merged into one, every round
    },
    "transport": {
        "name": "inproc",  # inproc (dimat run) | grpc | torch (dimat launch / dimat agent)
        "deadline_s": 60.0,  # seconds an agent waits for its neighbours' snapshots per round
        "compress": None,  # None | fp16 | bf16: float tensors on the wire (grpc, torch); see docs/transport.md
        "secret_file": None,  # file holding the shared secret (grpc; else $DIMAT_SECRET; never the secret itself)
        "credentials_file": None,  # per-agent keys binding identity to rank (grpc; "{rank}" is replaced)
        "tls_cert": None,  # PEM certificate, key and CA for TLS between agents (grpc)
        "tls_key": None,
        "tls_ca": None,
        "tls_client_auth": False,  # mutual TLS: agents also show certificates signed by tls_ca
        "timeout_s": None,  # torch.distributed process-group timeout (None: deadline_s)
        "startup_s": 120.0,  # grpc: seconds an agent waits at start for its neighbours to be ready (barrier)
        "sync": True,  # false: asynchronous rounds (grpc): merge each neighbour's freshest snapshot, never wait
        "staleness": 1,  # asynchronous rounds: merge snapshots at most this many rounds old
    },
    "device": "cpu",  # where the agents' models live: cpu | cuda | cuda:N | auto (cuda when available)
    "threads": None,  # torch intra-op threads of the process (None: torch's default); results depend on it
    "out": None,  # run folder (None: runs/<config file stem>); `--out` overrides
}

#: Accepted types of keys whose default is None or that accept more than the default's type.
TYPES: Dict[str, Tuple[type, ...]] = {
    "topology": (str, list),
    "topology_seed": (int, type(None)),
    "model.width": (int, float),
    "merge.stat_batches": (int, type(None)),
    "merge.bn_batches": (int, type(None)),
    "merge.keep_margin": (int, float, type(None)),
    "merge.min_corr": (int, float, str, type(None)),
    "merge.min_corr_scope": (str,),
    "merge.adopt_min_acc": (int, float, str, type(None)),
    "merge.regmean_max_inputs": (int, type(None)),
    "gossip.lr": (int, float, type(None)),
    "transport.compress": (str, type(None)),
    "transport.secret_file": (str, type(None)),
    "transport.credentials_file": (str, type(None)),
    "transport.tls_cert": (str, type(None)),
    "transport.tls_key": (str, type(None)),
    "transport.tls_ca": (str, type(None)),
    "transport.timeout_s": (int, float, type(None)),
    "threads": (int, type(None)),
    "out": (str, type(None)),
}


class Config(dict):
    """A resolved config: a nested dict that also allows attribute access (``cfg.train.lr``).

    ``source`` names where it came from (the YAML file), for error messages about its values.
    """

    source: str = "config"

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> Dict[str, Any]:
        """A plain nested ``dict`` copy (for YAML/JSON output)."""
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}

    @classmethod
    def wrap(cls, d: Mapping[str, Any]) -> "Config":
        return cls({k: cls.wrap(v) if isinstance(v, Mapping) else v for k, v in d.items()})


# ----------------------------------------------------------------------------------------------- flat keys
def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (leaves only)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key not in TYPES:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _sections() -> set:
    return {k for k, v in _walk(DEFAULTS) if isinstance(v, Mapping)}


def _walk(d: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for k, v in d.items():
        yield prefix + k, v
        if isinstance(v, Mapping):
            yield from _walk(v, prefix + k + ".")


def _suggest(key: str) -> str:
    valid = [k for k, _ in _walk(DEFAULTS)]
    # Compare both the full dotted key and its last part, so 'metod' finds 'merge.method'.
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not near:
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
        near = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    return f" (did you mean {near[0]!r}?)" if near else ""


def _unknown(where: str, key: str) -> UserError:
    return UserError(f"{where}: unknown key {key!r}{_suggest(key)}")


# --------------------------------------------------------------------------------------------------- checks
def _accepted(key: str) -> Tuple[type, ...]:
    if key in TYPES:
        return TYPES[key]
    default = _default(key)
    if default is None:
        return (str, int, float, bool, type(None))
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, float):
        return (int, float)
    return (type(default),)


def _default(key: str) -> Any:
    node: Any = DEFAULTS
    for part in key.split("."):
        node = node[part]
    return node


def _type_name(types: Sequence[type]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             list: "a list"}
    shown = [t for t in types if not (t is int and float in types)]  # "a number" covers the integers
    return " or ".join(names.get(t, t.__name__) for t in shown)


def _check_type(where: str, key: str, value: Any) -> Any:
    types = _accepted(key)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise UserError(f"{where}: key {key!r} must be {_type_name(types)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: key {key!r} must be finite, got {value!r}")
    if isinstance(_default(key), float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # so that "lr: 1" and "lr: 1.0" resolve to the same config
    return value


def _merge_into(base: Dict[str, Any], data: Mapping[str, Any], where: str, prefix: str = "") -> None:
    sections = _sections()
    for k, v in data.items():
        if not isinstance(k, str):
            raise UserError(f"{where}: key {k!r} is not a string")
        key = prefix + k
        if key in sections:
            if not isinstance(v, Mapping):
                raise UserError(f"{where}: key {key!r} is a section; give a mapping of its keys, got {v!r}")
            _merge_into(base[k], v, where, key + ".")
            continue
        if k not in base:
            raise _unknown(where, key)
        base[k] = _check_type(where, key, v)


def _set(base: Dict[str, Any], assignment: str) -> None:
    where = f"--set {assignment}"
    key, eq, text = assignment.partition("=")
    key = key.strip()
    if not eq or not key:
        raise UserError(f"{where}: expected KEY=VALUE, e.g. --set train.lr=0.01")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"{where}: value is not valid YAML ({_first_line(e)})") from None
    node = base
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise _unknown("--set", key)
        node = node[part]
    if parts[-1] not in node:
        raise _unknown("--set", key)
    if isinstance(node[parts[-1]], dict):
        raise UserError(f"{where}: {key!r} is a section; set one of its keys, e.g. {key}.{next(iter(node[parts[-1]]))}")
    node[parts[-1]] = _check_type("--set", key, value)


def _first_line(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    if mark is not None:  # PyYAML's own text repeats the source as "<unicode string>"; say where, then what
        what = "; ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return " ".join(str(e).split())


def _check_values(where: str, c: Dict[str, Any]) -> None:
    """Range and choice checks that need no other module (datasets, models and topologies are checked at run)."""

    def bad(key: str, msg: str) -> UserError:
        return UserError(f"{where}: key {key!r} {msg}")

    f = flatten(c)
    for key in ("agents", "rounds", "train.batch_size", "eval.batch_size"):
        if f[key] < 1:
            raise bad(key, f"must be >= 1, got {f[key]}")
    for key in ("train.epochs", "train.pretrain_epochs", "train.weight_decay"):
        if f[key] < 0:
            raise bad(key, f"must be >= 0, got {f[key]}")
    for key in ("merge.stat_batches", "merge.bn_batches"):
        if f[key] is not None and f[key] < 1:
            raise bad(key, f"must be >= 1 or null (all batches), got {f[key]}")
    if f["gossip.comm_every"] < 1:
        raise bad("gossip.comm_every", f"must be >= 1 local step, got {f['gossip.comm_every']}")
    if not 0 < f["gossip.momentum"] < 1:
        raise bad("gossip.momentum", f"must be in (0, 1), got {f['gossip.momentum']}")
    if f["gossip.lr"] is not None and not f["gossip.lr"] > 0:
        raise bad("gossip.lr", f"must be > 0 or null (train.lr), got {f['gossip.lr']}")
    if f["threads"] is not None and f["threads"] < 1:
        raise bad("threads", f"must be >= 1 or null (torch's default), got {f['threads']}")
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", str(f["device"])):
        raise bad("device", f"must be cpu, cuda, cuda:N or auto, got {f['device']!r}")
    if not f["train.lr"] > 0:
        raise bad("train.lr", f"must be > 0, got {f['train.lr']}")
    if not f["model.width"] > 0:
        raise bad("model.width", f"must be > 0, got {f['model.width']}")
    if not f["transport.deadline_s"] > 0:
        raise bad("transport.deadline_s", f"must be > 0 seconds, got {f['transport.deadline_s']}")
    if not f["transport.startup_s"] > 0:
        raise bad("transport.startup_s", f"must be > 0 seconds, got {f['transport.startup_s']}")
    if not isinstance(f["transport.staleness"], int) or f["transport.staleness"] < 0:
        raise bad("transport.staleness", f"must be an integer >= 0 rounds, got {f['transport.staleness']!r}")
    if f["train.optimizer"] not in OPTIMIZERS:
        raise bad("train.optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {f['train.optimizer']!r}")
    if f["transport.compress"] not in (None, "fp16", "bf16"):
        raise bad("transport.compress", f"must be fp16, bf16 or null, got {f['transport.compress']!r}")
    if f["transport.name"] not in TRANSPORTS:
        raise bad("transport.name", f"must be one of {', '.join(TRANSPORTS)}, got {f['transport.name']!r}")
    methods = known_methods()
    if f["merge.basis"] not in ("own", "shared"):
        raise bad("merge.basis", f"must be own or shared, got {f['merge.basis']!r}")
    if f["merge.method"] not in methods:
        raise bad("merge.method", f"must be one of {', '.join(methods)}, got {f['merge.method']!r}")
    if not f["topology"]:
        raise bad("topology", "must be a topology kind, a file path or a non-empty list of them, got "
                              f"{f['topology']!r}")
    if isinstance(f["topology"], list):
        for k, entry in enumerate(f["topology"]):
            if not isinstance(entry, str) or not entry:
                raise bad("topology", f"entry {k} must be a topology kind or file, got {entry!r}")
    if f["eval.consensus"] and (f["transport.name"] != "inproc" or f["merge.method"] not in ("dimat", "wa", "wm", "none")):
        raise bad("eval.consensus", "needs every model in one process: only dimat run (transport inproc) with "
                  "merge.method dimat, wa, wm or none evaluates the consensus model")
    if f["model.init"] not in ("different", "same"):
        raise bad("model.init", f"must be different or same, got {f['model.init']!r}")
    _check_merge(f, bad)


def _check_merge(f: Dict[str, Any], bad) -> None:
    """The alignment guards, the combine rule and its settings, and the combinations that cannot work."""
    from dimat.merge.combine import CombineOptions

    from dimat.merge.repair import BN_REPAIRS
    from dimat.node import Node

    if f["merge.bn_repair"] not in BN_REPAIRS:
        raise bad("merge.bn_repair", f"must be one of {', '.join(BN_REPAIRS)}, got {f['merge.bn_repair']!r}")
    if f["merge.bn_repair"] == "mix" and not f["merge.bn_refresh"]:
        raise bad("merge.bn_repair", "mix mixes the BatchNorm statistics the snapshots carry: set merge.bn_refresh "
                  "true so that they describe the current weights, not a stale training average")
    if f["merge.bn_repair"] != "local" and not f["merge.reset_bn"]:
        raise bad("merge.bn_repair", f"is {f['merge.bn_repair']!r}, but merge.reset_bn is false: no BatchNorm "
                  "statistics are repaired at all")
    if f["merge.restore_norms"]:
        if f["merge.method"] not in ("dimat", "wa", "wm"):
            raise bad("merge.restore_norms", f"rescales merged weights: merge.method dimat, wa or wm only, got "
                      f"{f['merge.method']!r}")
        if not f["merge.reset_bn"]:
            raise bad("merge.restore_norms", "rescales weights that a BatchNorm normalises, whose statistics must "
                      "then be recomputed: set merge.reset_bn true")
    if f["merge.identity_prior"] < 0:
        raise bad("merge.identity_prior", f"must be >= 0, got {f['merge.identity_prior']}")
    if isinstance(f["merge.min_corr"], str) and f["merge.min_corr"] != "auto":
        raise bad("merge.min_corr", f"must be a number, null or auto, got {f['merge.min_corr']!r}")
    if f["merge.min_corr_scope"] not in Node.MIN_CORR_SCOPES:
        raise bad("merge.min_corr_scope", f"must be one of {', '.join(Node.MIN_CORR_SCOPES)}, got "
                                          f"{f['merge.min_corr_scope']!r}")
    adopt = f["merge.adopt_min_acc"]
    if isinstance(adopt, str) and adopt != "auto":
        raise bad("merge.adopt_min_acc", f"must be an accuracy in [0, 1], null or auto, got {adopt!r}")
    if not isinstance(adopt, (str, type(None))):
        if not 0.0 <= adopt <= 1.0:
            raise bad("merge.adopt_min_acc", f"must be an accuracy in [0, 1], got {adopt!r}")
        if f["merge.basis"] != "shared" or f["merge.method"] not in Node.ALIGNING:
            raise bad("merge.adopt_min_acc", f"decides whether a neighbour's basis is adopted: merge.basis shared "
                      f"with merge.method {' or '.join(Node.ALIGNING)} only, got basis {f['merge.basis']!r} and method "
                      f"{f['merge.method']!r}")
    if f["merge.head"] not in Node.HEADS:
        raise bad("merge.head", f"must be one of {', '.join(Node.HEADS)}, got {f['merge.head']!r}")
    if f["merge.head"] == "label_counts" and (f["merge.method"] not in ("dimat", "wa", "wm")
                                              or f["merge.combine"] != "mean"):
        raise bad("merge.head", f"label_counts combines the output layer class by class within the mean: "
                                f"merge.method dimat, wa or wm with merge.combine mean only, got method "
                                f"{f['merge.method']!r} and combine {f['merge.combine']!r}")
    if f["merge.method"] != "dimat":
        for key, off in (("merge.identity_prior", (0.0,)), ("merge.keep_margin", (None,)),
                         ("merge.min_corr", ("auto", None))):
            if f[key] not in off:
                raise bad(key, f"acts on activation matching (merge.method dimat), but merge.method is "
                               f"{f['merge.method']!r}")
    if f["merge.min_corr"] not in (None, "auto") and f["merge.combine"] != "mean":
        raise bad("merge.min_corr", f"leaves poorly matched units out of the mean: merge.combine mean only, got "
                  f"{f['merge.combine']!r}")
    try:
        CombineOptions.from_config({k[len("merge."):]: v for k, v in f.items() if k.startswith("merge.")})
    except ValueError as e:  # "combine option NAME must ..., got X": name the config key
        name, _, rest = str(e)[len("combine option "):].partition(" ")
        raise bad("merge.combine" if name == "rule" else f"merge.{name}", rest) from None
    if f["merge.stats"] not in ("own", "both"):
        raise bad("merge.stats", f"must be own or both, got {f['merge.stats']!r}")
    if f["merge.stats"] == "both":
        if f["merge.method"] != "dimat":
            raise bad("merge.stats", f"both pools activation statistics for matching (merge.method dimat), but "
                                     f"merge.method is {f['merge.method']!r}")
        if f["transport.name"] not in MESSAGE_TRANSPORTS:
            raise bad("merge.stats", f"both needs a second message per round, which transport "
                                     f"{f['transport.name']!r} cannot carry (use one of "
                                     f"{', '.join(MESSAGE_TRANSPORTS)})")
        if not f["transport.sync"]:
            raise bad("merge.stats", "both needs synchronous rounds (transport.sync true): both sides' statistics "
                                     "are of the same round's models")


def known_methods() -> List[str]:
    """Methods a config may name: the merge registry, ``none`` (local training only) and the gossip baselines."""
    from dimat import baselines, merge

    return sorted(set(merge.METHODS) | {"none"} | set(baselines.STEP_METHODS))


# ------------------------------------------------------------------------------------------------ loading
def resolve(data: Optional[Mapping[str, Any]] = None, overrides: Iterable[str] = (), where: str = "config",
            stem: str = "run") -> Config:
    """Defaults, updated by ``data`` (a nested mapping, e.g. parsed YAML) and then by ``KEY=VALUE`` overrides.

    Parameters
    ----------
    data : nested mapping of config keys (unknown keys are an error).
    overrides : ``"a.b=value"`` strings; the value is parsed as YAML.
    where : name used in error messages (usually the file name).
    stem : name of the default run folder ``runs/<stem>`` when ``out`` is null.
    """
    c = copy.deepcopy(DEFAULTS)
    if data:
        _merge_into(c, data, where)
    for a in overrides:
        _set(c, a)
    _check_values(where, c)
    if c["out"] is None:
        c["out"] = str(Path("runs") / stem)
    cfg = Config.wrap(c)
    cfg.source = where
    return cfg


def load_config(path: Optional[str | Path], overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config file, apply ``--set`` overrides, check and resolve it.

    Parameters
    ----------
    path : YAML file (a mapping of config keys); None for defaults only.
    overrides : ``"key.sub=value"`` strings, values parsed with ``yaml.safe_load``.

    Raises
    ------
    UserError : the file is missing or malformed, a key is unknown, or a value has a wrong type or range.
    """
    if path is None:
        return resolve(None, overrides)
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UserError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read config file ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{p}: malformed YAML: {_first_line(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(f"{p}: a config must be a mapping of keys (e.g. 'agents: 5'), got {type(data).__name__}")
    return resolve(data, overrides, where=str(p), stem=p.stem)


def diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Sequence[str] = ("out",)) -> List[str]:
    """Flat keys whose values differ between two configs (keys in ``ignore`` skipped)."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k) != fb.get(k))


def first_difference(cfg: Mapping[str, Any], cfg_file: Path) -> Optional[Tuple[str, Any, Any]]:
    """Compare ``cfg`` with the run config stored in ``cfg_file`` (``out`` aside).

    Returns ``(key, stored value, value in cfg)`` for the first key that differs, or None when they agree;
    UserError when the stored file is not a readable run config.
    """
    try:
        old = yaml.safe_load(Path(cfg_file).read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{cfg_file}: malformed YAML: {' '.join(str(e).split())}") from None
    if not isinstance(old, Mapping):
        raise UserError(f"{cfg_file}: not a run config (expected a mapping)")
    new = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    # A key added to the schema after the run was written compares as its default.
    old = {**flatten(DEFAULTS), **flatten(old)}
    changed = diff(old, flatten(new))
    if not changed:
        return None
    k = changed[0]
    return k, flatten(old).get(k), flatten(new).get(k)


def dump(cfg: Mapping[str, Any]) -> str:
    """The config as YAML text, in schema order."""
    plain = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    return yaml.safe_dump(plain, sort_keys=False)
