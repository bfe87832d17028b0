"""ServerApp: FedAvg whose aggregation aligns client models by activation matching (dimat), against FedAvg.

With ``strategy = "both"`` (the default) it runs DimatFedAvg and then Flower's own FedAvg on the same SuperNodes,
from the same initial model, and logs the test accuracy of the global model after every round for both. The
server holds a calibration set (a share of the training set no client has) for activation statistics and the
BatchNorm reset. With ``out-dir`` set it writes ``results.json`` there: accuracies and, for DimatFedAvg, each
round's alignment telemetry (share of units the matching moved, unit correlation before and after matching).
"""

from __future__ import annotations

import json
import logging
import time
from logging import INFO
from pathlib import Path
from typing import Any, Dict

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from dimat.flower import MessageDimatFedAvg
from dimat.train import evaluate

from dimat_flower_app.task import Settings, calibration_batches, dataset, new_model

app = ServerApp()

# dimat.flower logs each round's alignment telemetry; send it where Flower's own log goes (`flwr run --stream`).
_dimat_log = logging.getLogger("dimat.flower")
_dimat_log.handlers[:] = logging.getLogger("flwr").handlers
_dimat_log.setLevel(logging.INFO)
_dimat_log.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    s = Settings.from_run_config(context.run_config)
    names = ["dimat", "fedavg"] if s.strategy == "both" else [s.strategy]
    results: Dict[str, Any] = {"settings": {k: getattr(s, k) for k in s.__dataclass_fields__}, "runs": {}}
    for name in names:
        results["runs"][name] = run_strategy(name, s, grid)
        log(INFO, "%s: test accuracy after each round (0 = initial model): %s", label(name, s),
            " ".join(f"{a:.3f}" for a in results["runs"][name]["accuracy"]))
    summary = ["test accuracy of the global model after each round (round 0 = initial model)"]
    for name, run in results["runs"].items():
        summary.append(f"  {label(name, s):>20}: " + " ".join(f"{a:.3f}" for a in run["accuracy"])
                       + f"   ({run['seconds']:.0f} s)")
    log(INFO, "\n".join(summary))
    if s.out_dir:
        out = Path(s.out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1, default=float))
        tmp.replace(out / "results.json")  # whole file or nothing
        log(INFO, "results written to %s", out / "results.json")


def label(name: str, s: Settings) -> str:
    return "FedAvg" if name == "fedavg" else f"DimatFedAvg({s.merge})"


def run_strategy(name: str, s: Settings, grid: Grid) -> Dict[str, Any]:
    """Train for ``s.num_server_rounds`` rounds with one strategy; the test accuracy after each round."""
    ds = dataset(s.dataset)
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=s.min_nodes,
                  min_available_nodes=s.min_nodes)
    if name == "fedavg":
        strategy = FedAvg(**common)
    else:
        strategy = MessageDimatFedAvg(model=lambda: new_model(s, s.seed), calibration=calibration_batches(s),
                                      method=s.merge, head=s.head, telemetry=True, **common)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = new_model(s, s.seed)
        model.load_state_dict(arrays.to_torch_state_dict())
        acc, loss = evaluate(model, ds.x_test, ds.y_test)
        return MetricRecord({"accuracy": acc, "loss": loss})

    t = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(new_model(s, s.seed).state_dict()),
        num_rounds=s.num_server_rounds,
        # "strategy" lets clients keep separate state per strategy when one run trains with both.
        train_config=ConfigRecord({"strategy": name}),
        evaluate_fn=central_evaluate,
    )
    seconds = time.perf_counter() - t
    rounds = sorted(result.evaluate_metrics_serverapp)
    return {
        "accuracy": [float(result.evaluate_metrics_serverapp[r]["accuracy"]) for r in rounds],
        "rounds": rounds,
        "seconds": seconds,
        "merge_log": getattr(strategy, "merge_log", []),
        "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
    }
