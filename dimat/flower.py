"""Flower integration: FedAvg whose server-side aggregation is a dimat merge (activation matching by default).

Two layers:

* :class:`ModelAggregator` needs only torch and numpy. It turns each client's arrays back into a model, merges the
  models with a :mod:`dimat.merge` operator weighted by the clients' example counts, and returns the merged model.
* Two Flower strategies (need ``flwr``, see :data:`FLOWER_HINT`), each a subclass of Flower's FedAvg that
  replaces only the aggregation of training results, so it goes wherever that FedAvg goes (sampling,
  configuration, evaluation and metrics aggregation stay FedAvg's):

  - :class:`DimatFedAvg` subclasses ``flwr.server.strategy.FedAvg`` (``aggregate_fit``; ``Parameters``/``FitRes``,
    ``start_server``, ``ServerApp(strategy=...)``);
  - :class:`MessageDimatFedAvg` subclasses ``flwr.serverapp.strategy.FedAvg`` (``aggregate_train``; the Message
    API, ``strategy.start(grid, initial_arrays, ...)``).

  They are created on first access, so importing this module never imports flwr.

* :func:`alignment_telemetry` (per-round figures the strategies log with ``telemetry=True``: how many units the
  matching moved, unit correlation before and after) and :func:`align_to_local` (client side: the received
  global model permuted into the client's own unit order before local training). Both need only torch.

A complete Flower App for Flower's deployment runtime (SuperLink, SuperNodes, ``flwr run``) is in
``examples/flower-app/``.

Wire format. ``DimatFedAvg``: clients send ``[v.cpu().numpy() for v in model.state_dict().values()]`` (the usual
Flower PyTorch convention, BatchNorm buffers included) and load what they receive with
``model.load_state_dict(dict(zip(model.state_dict().keys(), map(torch.as_tensor, arrays))))``.
``MessageDimatFedAvg``: clients reply with ``ArrayRecord(model.state_dict())`` (tensors by name) and a
``MetricRecord`` holding ``"num-examples"``. Either way the server needs a model of the same architecture (the
*template*) to know the tensor names, order and dtypes.

Which basis. Activation matching aligns every client to one reference model and the result lives in that model's
permutation basis (every basis computes the same function). The reference is the client with the most examples;
ties go to the first client in ``results`` order, and both strategies sort results by client (node) id first, so a
round does not depend on arrival order.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from dimat import merge
from dimat.merge import combine as combine_mod
from dimat.merge import head as head_mod

# DimatFedAvg and MessageDimatFedAvg are public too, but built on first access (they need flwr).
__all__ = [
    "ModelAggregator",
    "alignment_telemetry",
    "align_to_local",
    "state_to_ndarrays",
    "ndarrays_to_state",
    "FLOWER_HINT",
]

log = logging.getLogger(__name__)

#: Message of the ImportError raised when the flwr-dependent part is used without flwr installed.
FLOWER_HINT = (
    "dimat's Flower strategies need Flower: pip install 'dimat[flower]' (or pip install 'flwr>=1.41,<2'); "
    "see docs/embedding.md"
)

NDArrays = List[np.ndarray]
ModelSource = Union[nn.Module, Callable[[], nn.Module]]


# ------------------------------------------------------------------------------------------------ wire format
def state_to_ndarrays(model: Union[nn.Module, Dict[str, torch.Tensor]]) -> NDArrays:
    """A model (or state_dict) as Flower sends it: one NumPy array per state_dict entry, in state_dict order."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return [t.detach().cpu().numpy() for t in state.values()]


def ndarrays_to_state(
    template: nn.Module, arrays: Union[Sequence[Any], Mapping[str, Any]], who: str = "client"
) -> Dict[str, torch.Tensor]:
    """Rebuild a state_dict from Flower arrays: a list in ``template.state_dict()`` order, or a name -> array mapping.

    Each array is cast to the dtype (and device) of the template's tensor, so a client that sends float64 still
    loads. ValueError (naming ``who`` and the tensor) on a wrong number of arrays, a missing or unknown name, or a
    wrong shape.
    """
    ref = template.state_dict()
    if isinstance(arrays, Mapping):
        missing = [k for k in ref if k not in arrays]
        extra = [k for k in arrays if k not in ref]
        if missing or extra:
            what = f"has no array {missing[0]!r}" if missing else f"sent an unknown array {extra[0]!r}"
            raise ValueError(f"{who} {what}; clients must send model.state_dict() of the server's architecture")
        ordered = [arrays[k] for k in ref]
    else:
        if len(arrays) != len(ref):
            raise ValueError(
                f"{who} sent {len(arrays)} arrays, but the model template has {len(ref)} state_dict entries; "
                "clients must send [v.cpu().numpy() for v in model.state_dict().values()] for the same architecture"
            )
        ordered = list(arrays)
    state: Dict[str, torch.Tensor] = {}
    for (name, t0), a in zip(ref.items(), ordered):
        t = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
        if tuple(t.shape) != tuple(t0.shape):
            raise ValueError(
                f"{who}: array for {name!r} has shape {tuple(t.shape)}, the model template expects {tuple(t0.shape)}"
            )
        state[name] = t.to(dtype=t0.dtype, device=t0.device)
    return state


# ------------------------------------------------------------------------------------------------ aggregation
class ModelAggregator:
    """Merge client models on the server with a :mod:`dimat.merge` operator, weighted by example counts.

    Parameters
    ----------
    model : the architecture clients train: an ``nn.Module`` or a zero-argument factory returning one. Only its
        structure, tensor names and dtypes are used (its weights are never read into a result).
    calibration : batches held by the server (a list or a DataLoader of input tensors or ``(input, target)`` pairs;
        a single tensor counts as one batch). Activation matching computes its statistics on them, and BatchNorm
        statistics of the merged model are recomputed on them. Must be re-iterable: it is used every round.
    method : a :data:`dimat.merge.METHODS` name (``"dimat"``, ``"wm"``, ``"wa"``). None (default): ``"dimat"``
        when ``calibration`` is given, otherwise ``"wa"`` (plain weighted averaging, FedAvg's arithmetic).
    reset_bn : recompute BatchNorm running statistics of the merged model on ``calibration`` (ignored without it).
    stat_batches : number of calibration batches used for statistics and the BatchNorm reset (None: all).
    telemetry : after every merge, also measure how far the clients were from the reference's unit order
        (:func:`alignment_telemetry`, one more statistics pass over the calibration batches) and put it in
        :attr:`last_report`. Needs ``calibration``.
    min_corr : ``"dimat"`` only: a client's unit joins the average only where its correlation with the reference
        unit it was matched to is at least ``min_corr`` (the node's ``merge.min_corr``, docs/merge.md); the
        report's ``kept`` gives each other client's share of units that joined. None (default): every matched
        unit, as published. Clients that start every round from the server's model stay in one unit order and
        keep nearly every unit; the threshold matters when clients diverge (e.g. several local epochs from
        different initialisations). With ``head="label_counts"`` it applies only to a client that shares a class
        with the reference client, as in the node (the report's ``min_corr_off`` lists the others), unless
        ``min_corr_scope="all"``.
    bn_repair : how the BatchNorm statistics of the merged model are repaired on ``calibration`` (with
        ``reset_bn``): ``"local"`` (default) recomputes them on the calibration batches; ``"mix"`` takes the
        clients' aligned running statistics, mixed by weight and corrected for the merge's variance collapse as
        measured on the calibration batches (the node's ``merge.bn_repair``). ``"mix"`` suits a server whose
        calibration batches do not look like the clients' data.
    head : how the output layer (the ``nn.Linear`` that returns the logits) is combined: ``"mean"`` (default) like
        every other layer; ``"label_counts"``: class by class, the row and bias of class c weighted by each
        client's weight times its training samples of class c (the node's ``merge.head``, docs/merge.md), so a
        class comes from the clients that trained on it. The clients' samples per class are the third element of
        each result (see :meth:`merge`); a round where a client's are missing or invalid averages the layer, with a
        warning. Needs ``calibration`` (the layer is found by running the model on a calibration batch) and a model
        whose last Linear returns ``[batch, classes]`` logits unchanged (ValueError otherwise).

    Attributes
    ----------
    last_report : dict describing the latest merge (None before the first): ``method``, ``clients``,
        ``reference`` (index into the results given), ``weights`` (normalised, reference first), ``merge_s``
        (seconds), ``operator_profile`` (the operator's own timings: ``stats_s``/``assign_s`` exist only when it
        matched units), with ``min_corr`` ``kept`` (per other client in the order of ``weights``, the share of its
        units that joined the average), ``head`` (``"label_counts"`` or ``"mean"``: how this merge combined the
        output layer) and, with ``telemetry``, ``alignment``.
    """

    HEADS = ("mean", "label_counts")

    def __init__(
        self,
        model: ModelSource,
        calibration: Optional[Iterable[Any]] = None,
        method: Optional[str] = None,
        reset_bn: bool = True,
        stat_batches: Optional[int] = None,
        telemetry: bool = False,
        *,
        min_corr: Optional[float] = None,
        bn_repair: str = "local",
        head: str = "mean",
        min_corr_scope: str = "shared_classes",
    ) -> None:
        self.template = _template(model)
        self.calibration = _calibration(calibration)
        self.method = method if method is not None else ("dimat" if self.calibration is not None else "wa")
        self._merge = merge.get(self.method)
        if self.method == "dimat" and self.calibration is None:
            raise ValueError("method 'dimat' (activation matching) needs calibration batches held by the server")
        if stat_batches is not None and (not isinstance(stat_batches, int) or stat_batches < 1):
            raise ValueError(f"stat_batches must be a positive int or None, got {stat_batches!r}")
        self.reset_bn = bool(reset_bn)
        self.stat_batches = stat_batches
        if telemetry and self.calibration is None:
            raise ValueError("telemetry (alignment statistics) needs calibration batches held by the server")
        self.telemetry = bool(telemetry)
        if min_corr is not None:
            if self.method != "dimat":
                raise ValueError(f"min_corr acts on activation matching (method 'dimat'), not {self.method!r}")
            merge.operators.check_min_corr(min_corr)
        self.min_corr = None if min_corr is None else float(min_corr)
        merge.operators.check_bn_repair(bn_repair)
        if bn_repair != "local" and self.calibration is None:
            raise ValueError(f"bn_repair {bn_repair!r} measures the merge on calibration batches; none were given")
        self.bn_repair = bn_repair
        self.head = head
        self._output = self._output_layer(head)
        head_mod.check_min_corr_scope(min_corr_scope)
        self.min_corr_scope = min_corr_scope
        self.last_report: Optional[Dict[str, Any]] = None
        # Only operators that match units take a `profile` dict; it records the seconds of each of their stages.
        self._takes_profile = "profile" in inspect.signature(self._merge).parameters

    def _output_layer(self, head: str) -> Optional[head_mod.OutputLayer]:
        """The output layer to combine class by class under ``head="label_counts"`` (None under ``"mean"``)."""
        if head not in self.HEADS:
            raise ValueError(f"head must be one of {', '.join(self.HEADS)}, got {head!r}")
        if head == "mean":
            return None
        if self.calibration is None:
            raise ValueError("head 'label_counts' finds the output layer by running the model on a calibration "
                             "batch; none were given")
        layer, why = head_mod.output_layer(self.template, next(merge.iter_inputs(self.calibration, 1)))
        if layer is None:
            raise ValueError(f"head 'label_counts' needs an output layer to combine class by class: {why}")
        return layer

    def aggregate(self, results: Sequence[Tuple[Any, ...]]) -> NDArrays:
        """Merge ``[(arrays, num_examples), ...]`` (one pair per client) into one model's arrays (state_dict order).

        ``arrays`` is a list in state_dict order or a name -> array mapping (see :func:`ndarrays_to_state`).
        Under ``head="label_counts"`` each result is ``(arrays, num_examples, class_counts)``.
        """
        return state_to_ndarrays(self.merge(results))

    def merge(self, results: Sequence[Tuple[Any, ...]]) -> nn.Module:
        """Like :meth:`aggregate`, but return the merged model (a new module).

        The client with the most examples is the reference every other client is aligned to (ties: the first).
        Under ``head="label_counts"`` a result's third element is the client's training samples per class (a
        sequence of ``classes`` finite non-negative numbers, not all 0); missing or invalid ones make this merge
        average the output layer, with a warning naming the client. ValueError on no results, a negative or
        non-finite count, counts that sum to 0, or arrays that do not fit the template.
        """
        if len(results) == 0:
            raise ValueError("no client results to aggregate")
        counts = [_count(res[1], i) for i, res in enumerate(results)]
        if sum(counts) <= 0:
            raise ValueError("every client reported num_examples=0; nothing to weight the merge by")
        order = _reference_first(counts)
        models = [self._model(results[i][0], f"client {i}") for i in order]
        weights = [counts[i] for i in order]
        profile: Dict[str, float] = {}
        extra: Dict[str, Any] = {"profile": profile} if self._takes_profile else {}
        matched: Dict[int, Dict[str, float]] = {}
        if self.min_corr is not None:
            extra.update(min_corr=self.min_corr, report=matched)
        if self.bn_repair != "local":
            extra["bn_repair"] = self.bn_repair
        class_head = self._class_head([results[i] for i in order], order)
        min_corr_off: List[int] = []
        if self.min_corr is not None and class_head is not None and self.min_corr_scope == "shared_classes":
            # as the node: see head.min_corr_by_classes
            extra["min_corr"], lifted = head_mod.min_corr_by_classes(self.min_corr, class_head.counts)
            min_corr_off = [order[pos] for pos in lifted]
        if class_head is not None:
            params = {n for n, _ in self.template.named_parameters()}
            extra["combine"] = combine_mod.make_hook(combine_mod.CombineOptions(), 0, params, head=class_head)
        t = time.perf_counter()
        merged = self._merge(
            models,
            weights,
            batches=self.calibration,
            reset_bn=self.reset_bn and self.calibration is not None,
            stat_batches=self.stat_batches,
            **extra,
        )
        report: Dict[str, Any] = {
            "method": self.method,
            "clients": len(models),
            "reference": order[0],
            "weights": [w / sum(weights) for w in weights],
            "merge_s": time.perf_counter() - t,
            "operator_profile": dict(profile),
        }
        if self.min_corr is not None:
            report["kept"] = [matched.get(j, {}).get("kept", 1.0) for j in range(1, len(models))]
        if self._output is not None:
            report["head"] = "mean" if class_head is None else "label_counts"
        if min_corr_off:
            report["min_corr_off"] = min_corr_off
        if self.telemetry:
            report["alignment"] = alignment_telemetry(models, self.calibration, self.stat_batches)
        self.last_report = report
        return merged

    def _class_head(self, results: Sequence[Tuple[Any, ...]], clients: Sequence[int]
                    ) -> Optional[combine_mod.ClassHead]:
        """The clients' class counts (``results`` in merge order; ``clients``: their indices, for the warning) as
        a :class:`dimat.merge.combine.ClassHead`, or None: under ``head="mean"``, or (with a warning) when a
        client's are missing or invalid."""
        if self._output is None:
            return None
        counts = []
        for i, res in zip(clients, results):
            c = _class_counts(res[2] if len(res) > 2 else None)
            if c is None or not head_mod.counts_ok(c) or c.numel() != self._output.classes:
                log.warning("head label_counts: client %d sent no valid class counts (%d finite non-negative numbers, "
                            "not all 0); averaging the output layer in this merge", i, self._output.classes)
                return None
            counts.append(c)
        return combine_mod.ClassHead(self._output.axes, counts)

    def _model(self, arrays: Any, who: str) -> nn.Module:
        model = copy.deepcopy(self.template)
        model.load_state_dict(ndarrays_to_state(self.template, arrays, who))
        return model


def _template(model: ModelSource) -> nn.Module:
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise ValueError(f"model must be an nn.Module or a factory returning one, got {type(model).__name__}")
        model = model()
        if not isinstance(model, nn.Module):
            raise ValueError(f"the model factory returned a {type(model).__name__}, not an nn.Module")
    return model


def _calibration(batches: Optional[Iterable[Any]]) -> Optional[Iterable[Any]]:
    if batches is None:
        return None
    if isinstance(batches, torch.Tensor):
        return [batches]
    if not isinstance(batches, Iterable):
        raise ValueError(f"calibration must be an iterable of batches, got {type(batches).__name__}")
    if iter(batches) is batches:
        raise ValueError(
            "calibration is a one-shot iterator; pass something re-iterable (a list of batches or a DataLoader), "
            "it is read every round"
        )
    return batches


def _count(n: Any, i: int) -> float:
    """A client's weight: its example count (any finite non-negative number; Message replies may carry floats)."""
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)) or not (
        math.isfinite(n) and n >= 0
    ):
        raise ValueError(f"client {i} reported num_examples={n!r}; it must be a finite non-negative number")
    return n


def _class_counts(value: Any) -> Optional[torch.Tensor]:
    """A client's samples per class as float64, or None when ``value`` is not a 1-D sequence of numbers."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        c = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        return None
    return c if c.dim() == 1 else None


def _reference_first(counts: Sequence[float]) -> List[int]:
    """Client indices with the reference (most examples, first on ties) first, the others in their order."""
    ref = max(range(len(counts)), key=lambda i: (counts[i], -i))
    return [ref] + [i for i in range(len(counts)) if i != ref]


# ------------------------------------------------------------------------------------------------ telemetry
def alignment_telemetry(
    models: Sequence[nn.Module], batches: Iterable[Any], stat_batches: Optional[int] = None
) -> Dict[str, Any]:
    """How far ``models[1:]`` are from ``models[0]``'s unit order, by activation correlation on ``batches``.

    For every permutable group of the architecture this computes, per other model, the unit correlations with
    ``models[0]`` and their best assignment, with the same functions activation matching uses
    (:func:`dimat.merge.stats.collect_correlations`, :func:`dimat.merge.matching.match`; no parameter
    tie-break). Nothing is modified.

    Returns a dict: ``groups`` (permutable groups), ``units`` (their units, summed), ``moved_fraction`` (share of
    units, over all groups and other models, that the assignment maps to a different index: 0 when the models
    already share the reference's order), ``corr_identity`` and ``corr_matched`` (mean Pearson correlation of
    unit ``i`` of ``models[0]`` with unit ``i`` of the other model, and with the unit it is assigned; both in
    [-1, 1]) and ``per_model`` (the same three figures for each of ``models[1:]``, in order).
    """
    if len(models) < 2:
        return {"groups": 0, "units": 0, "moved_fraction": 0.0, "corr_identity": float("nan"),
                "corr_matched": float("nan"), "per_model": []}
    example = next(merge.iter_inputs(batches, 1))
    spec, graph = merge.spec_for(models[0], example)
    groups = spec.permutable
    corrs: List[Dict[int, torch.Tensor]] = []
    if groups:
        corrs = merge.stats.collect_correlations(
            list(models), spec, graph, merge.iter_inputs(batches, stat_batches), groups
        )
    per_model = []
    for corr in corrs:
        moved = units = 0
        c_id = c_match = 0.0
        for c in corr.values():
            c = torch.nan_to_num(c.double())
            perm = merge.matching.match(c)
            idx = torch.arange(len(perm))
            moved += int((perm != idx).sum())
            units += len(perm)
            c_id += float(c[idx, idx].sum())
            c_match += float(c[idx, perm].sum())
        per_model.append({"moved_fraction": moved / max(units, 1), "corr_identity": c_id / max(units, 1),
                          "corr_matched": c_match / max(units, 1), "units": units})
    total = sum(p["units"] for p in per_model)

    def mean(key: str) -> float:
        return sum(p[key] * p["units"] for p in per_model) / total if total else float("nan")

    return {
        "groups": len(groups),
        "units": per_model[0]["units"] if per_model else 0,
        "moved_fraction": mean("moved_fraction") if total else 0.0,
        "corr_identity": mean("corr_identity"),
        "corr_matched": mean("corr_matched"),
        "per_model": [{k: v for k, v in p.items() if k != "units"} for p in per_model],
    }


# ----------------------------------------------------------------------------------------- client-side helper
def align_to_local(
    received: nn.Module,
    local: nn.Module,
    batches: Iterable[Any],
    keep: float = 0.0,
    stat_batches: Optional[int] = None,
) -> nn.Module:
    """Client side: the received global model re-expressed in the unit order of the client's own ``local`` model.

    Activation matching on the client's ``batches`` finds, for every permutable group, the permutation of the
    received model's units that best matches ``local``'s units; the result is the received model with its units
    permuted (the same function, ``keep=0``), or the weighted average ``keep * local + (1 - keep) * aligned``
    (``0 < keep < 1``: the client keeps part of its own previous model, a DIMAT-style local merge; BatchNorm
    statistics are then recomputed on ``batches``). Neither input is modified; a new module is returned.

    Call it before local training with the model the client trained last round; the server's aligned
    aggregation (:class:`MessageDimatFedAvg` / :class:`DimatFedAvg` with activation matching) then maps every
    client back to one reference basis. With plain weight averaging on the server (FedAvg, ``method="wa"``)
    permuting clients apart breaks the average: use it only with a matching server.
    """
    if not (isinstance(keep, (int, float)) and not isinstance(keep, bool) and 0.0 <= keep < 1.0):
        raise ValueError(f"keep (weight of the client's own model) must be a number in [0, 1), got {keep!r}")
    return merge.activation_match(
        [local, received], [keep, 1.0 - keep], batches, reset_bn=keep > 0, stat_batches=stat_batches
    )


# --------------------------------------------------------------------------------------- flwr-dependent part
_CLASSES: Dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # PEP 562: build the flwr subclasses on first access so that `import dimat.flower` works without flwr.
    builders = {"DimatFedAvg": _build_dimat_fedavg, "MessageDimatFedAvg": _build_message_dimat_fedavg}
    if name in builders:
        if name not in _CLASSES:
            _CLASSES[name] = builders[name]()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _flwr_import_error(e: ImportError) -> ImportError:
    return ImportError(f"{FLOWER_HINT} ({e})")


class _Merging:
    """The constructor both Flower strategies share: FedAvg's keywords plus a :class:`ModelAggregator`'s."""

    def __init__(
        self,
        *,
        model: ModelSource,
        calibration: Optional[Iterable[Any]] = None,
        method: Optional[str] = None,
        reset_bn: bool = True,
        stat_batches: Optional[int] = None,
        telemetry: bool = False,
        min_corr: Optional[float] = None,
        bn_repair: str = "local",
        head: str = "mean",
        class_counts_key: str = "class-counts",
        min_corr_scope: str = "shared_classes",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # the FedAvg that follows in the strategy's MRO
        self.aggregator = ModelAggregator(model, calibration, method, reset_bn, stat_batches, telemetry,
                                          min_corr=min_corr, bn_repair=bn_repair, head=head,
                                          min_corr_scope=min_corr_scope)
        #: the key of the clients' metrics that holds their training samples per class (``head="label_counts"``)
        self.class_counts_key = class_counts_key
        #: one dict per aggregated round: ``{"round": r, "client_ids": [...], **aggregator.last_report}``
        self.merge_log: List[Dict[str, Any]] = []

    def _record(self, server_round: int, client_ids: Sequence[Any]) -> None:
        report = {"round": int(server_round), "client_ids": [str(c) for c in client_ids],
                  **(self.aggregator.last_report or {})}
        self.merge_log.append(report)
        a = report.get("alignment")
        if a:
            log.info("round %s: %s merge of %d clients, %.0f%% of %d units moved, unit correlation %.3f -> %.3f",
                     server_round, report["method"], report["clients"], 100 * a["moved_fraction"], a["units"],
                     a["corr_identity"], a["corr_matched"])


def _build_dimat_fedavg() -> type:
    try:
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.server.strategy import FedAvg
    except ImportError as e:
        raise _flwr_import_error(e) from e

    class DimatFedAvg(_Merging, FedAvg):
        """Flower FedAvg (``flwr.server.strategy``) whose aggregation merges client models with dimat.

        Everything but ``aggregate_fit`` is FedAvg's, so it replaces FedAvg wherever FedAvg is used.

        Parameters
        ----------
        model : the clients' architecture (``nn.Module`` or zero-argument factory); see :class:`ModelAggregator`.
        calibration : batches held by the server for activation statistics and the BatchNorm reset. Without it the
            strategy falls back to weighted averaging (FedAvg's arithmetic).
        method, reset_bn, stat_batches, telemetry, min_corr, bn_repair, head, min_corr_scope : as in
            :class:`ModelAggregator`; each round's report is appended to ``merge_log``.
        class_counts_key : under ``head="label_counts"``, the ``FitRes.metrics`` key of each client's training
            samples per class, a list of numbers (default ``"class-counts"``).
        **kwargs : every FedAvg keyword (``min_fit_clients``, ``initial_parameters``, ``evaluate_fn``, ...).
        """

        def __repr__(self) -> str:
            return f"DimatFedAvg(method={self.aggregator.method!r}, accept_failures={self.accept_failures})"

        def aggregate_fit(self, server_round, results, failures):
            """Merge the clients' models, weighted by ``FitRes.num_examples``; metrics as in FedAvg."""
            if not results:
                return None, {}
            if not self.accept_failures and failures:
                return None, {}
            # Sort by client id so that the reference client (and so the result) does not depend on arrival order.
            results = sorted(results, key=lambda r: str(getattr(r[0], "cid", "")))
            pairs = [(parameters_to_ndarrays(res.parameters), res.num_examples,
                      (res.metrics or {}).get(self.class_counts_key)) for _, res in results]
            arrays = self.aggregator.aggregate(pairs)
            self._record(server_round, [getattr(proxy, "cid", "") for proxy, _ in results])
            log.info("round %s: merged %d client models with %r", server_round, len(pairs), self.aggregator.method)
            metrics: Dict[str, Any] = {}
            if self.fit_metrics_aggregation_fn:
                metrics = self.fit_metrics_aggregation_fn([(res.num_examples, res.metrics) for _, res in results])
            return ndarrays_to_parameters(arrays), metrics

    DimatFedAvg.__module__ = __name__
    return DimatFedAvg


def _build_message_dimat_fedavg() -> type:
    try:
        from flwr.common import ArrayRecord
        from flwr.serverapp.strategy import FedAvg
        from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
    except ImportError as e:
        raise _flwr_import_error(e) from e

    class MessageDimatFedAvg(_Merging, FedAvg):
        """Flower FedAvg of the Message API (``flwr.serverapp.strategy``) whose aggregation merges with dimat.

        Everything but ``aggregate_train`` is FedAvg's. Each reply carries one ``ArrayRecord`` of the client's
        ``state_dict`` (tensors by name) and one ``MetricRecord`` with the weight under ``weighted_by_key``
        (default ``"num-examples"``), as FedAvg expects.

        Parameters
        ----------
        model : the clients' architecture (``nn.Module`` or zero-argument factory); see :class:`ModelAggregator`.
        calibration : batches held by the server for activation statistics and the BatchNorm reset. Without it the
            strategy falls back to weighted averaging (FedAvg's arithmetic).
        method, reset_bn, stat_batches, telemetry, min_corr, bn_repair, head, min_corr_scope : as in
            :class:`ModelAggregator`; each round's report is appended to ``merge_log``.
        class_counts_key : under ``head="label_counts"``, the ``MetricRecord`` key of each reply's training
            samples per class, a list of floats (default ``"class-counts"``).
        **kwargs : every FedAvg keyword (``fraction_train``, ``min_train_nodes``, ``weighted_by_key``, ...).
        """

        def aggregate_train(self, server_round, replies):
            """Merge the replies' models, weighted by their ``weighted_by_key`` metric; metrics as in FedAvg."""
            replies = list(replies)
            valid = sorted((m for m in replies if not m.has_error()), key=lambda m: m.metadata.src_node_id)
            log.info("round %s: %d results and %d failures", server_round, len(valid), len(replies) - len(valid))
            if not valid:
                return None, None
            contents = [m.content for m in valid]
            validate_message_reply_consistency(
                replies=contents, weighted_by_key=self.weighted_by_key, check_arrayrecord=True
            )
            metrics = [next(iter(c.metric_records.values())) for c in contents]
            pairs = [
                (
                    next(iter(c.array_records.values())).to_torch_state_dict(),
                    m[self.weighted_by_key],
                    m[self.class_counts_key] if self.class_counts_key in m else None,
                )
                for c, m in zip(contents, metrics)
            ]
            merged = self.aggregator.merge(pairs)
            self._record(server_round, [m.metadata.src_node_id for m in valid])
            return ArrayRecord(merged.state_dict()), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    MessageDimatFedAvg.__module__ = __name__
    return MessageDimatFedAvg
