"""Federated training of a few Flower clients on partitions of scikit-learn's digits, merged by dimat.

Everything runs in one process: Flower's own ``Server`` drives the rounds (sampling, fit, aggregation,
evaluation) and talks to the clients through a tiny in-process ``ClientProxy`` instead of gRPC, so no SuperLink,
no Ray and no network are needed. The server holds a small calibration set (training samples no client has) for
activation matching and the BatchNorm reset. ``--strategy both`` runs FedAvg on exactly the same clients for
comparison.

    pip install -e '.[flower]'                          # from the repository root
    python examples/flower/run.py                       # 4 clients, 5 rounds, DIMAT vs FedAvg
    python examples/flower/run.py --own-init            # round 1 starts every client from its own random init

With ``--own-init`` the clients do not share their first starting point (the DIMAT setting), which is where
aligning before averaging matters most; otherwise every round starts from the common global model.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from flwr.client import Client, NumPyClient
from flwr.common import DisconnectRes, ndarrays_to_parameters
from flwr.server import Server, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from dimat.data import Dataset, load_dataset, partition
from dimat.flower import DimatFedAvg, ndarrays_to_state, state_to_ndarrays
from dimat.models import build
from dimat.train import evaluate, train_epochs


class DigitsClient(NumPyClient):
    """One Flower client: a model and a private partition of the digits training set."""

    def __init__(self, cid: int, ds: Dataset, indices: np.ndarray, args: argparse.Namespace):
        self.x, self.y = ds.x_train[indices], ds.y_train[indices]
        self.args = args
        torch.manual_seed(args.seed + 1000 * (cid + 1))  # each client its own initialisation
        self.model = new_model(ds, args)
        self.gen = torch.Generator().manual_seed(args.seed + cid)

    def get_parameters(self, config) -> List[np.ndarray]:
        return state_to_ndarrays(self.model)

    def fit(self, parameters, config):
        if not (self.args.own_init and config.get("server_round") == 1):
            self.model.load_state_dict(ndarrays_to_state(self.model, parameters))
        opt = torch.optim.Adam(self.model.parameters(), lr=self.args.lr)
        loss = train_epochs(self.model, opt, self.x, self.y, self.args.epochs, self.args.batch_size, self.gen)
        return state_to_ndarrays(self.model), len(self.y), {"train_loss": loss}


class InProcessProxy(ClientProxy):
    """Hands Flower's instructions straight to a client object in this process (no gRPC)."""

    def __init__(self, cid: str, client: Client):
        super().__init__(cid)
        self.client = client

    def get_properties(self, ins, timeout, group_id):
        return self.client.get_properties(ins)

    def get_parameters(self, ins, timeout, group_id):
        return self.client.get_parameters(ins)

    def fit(self, ins, timeout, group_id):
        return self.client.fit(ins)

    def evaluate(self, ins, timeout, group_id):
        return self.client.evaluate(ins)

    def reconnect(self, ins, timeout, group_id):
        return DisconnectRes(reason="in-process client")


def new_model(ds: Dataset, args: argparse.Namespace) -> torch.nn.Module:
    return build(args.model, ds.num_classes, width=args.width, in_channels=ds.in_channels, image_size=ds.image_size)


def make_strategy(name: str, ds: Dataset, calibration, args: argparse.Namespace):
    """The strategy under test, with a central evaluation on the digits test set after every round."""

    def evaluate_fn(server_round: int, arrays, config):
        model = new_model(ds, args)
        model.load_state_dict(ndarrays_to_state(model, arrays))
        acc, loss = evaluate(model, ds.x_test, ds.y_test)
        return loss, {"accuracy": acc}

    torch.manual_seed(args.seed)
    common = dict(
        min_fit_clients=args.clients,
        min_available_clients=args.clients,
        fraction_evaluate=0.0,  # central evaluation only
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {"server_round": r},
        initial_parameters=ndarrays_to_parameters(state_to_ndarrays(new_model(ds, args))),
    )
    if name == "fedavg":
        return FedAvg(**common)
    return DimatFedAvg(model=lambda: new_model(ds, args), calibration=calibration, method=args.merge,
                       reset_bn=not args.no_reset_bn, **common)


def run(name: str, args: argparse.Namespace) -> List[float]:
    """Train ``args.clients`` fresh clients for ``args.rounds`` rounds with strategy ``name``; test accuracies."""
    ds = load_dataset("digits")
    # The server keeps every tenth training sample as its calibration set; clients share the rest.
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(ds.y_train))
    held, rest = np.sort(order[: len(order) // 10]), np.sort(order[len(order) // 10 :])
    calibration = [ds.x_train[held]]
    parts = partition(ds.y_train[rest].numpy(), args.clients, args.partition, args.seed)

    manager = SimpleClientManager()
    for cid, part in enumerate(parts):
        manager.register(InProcessProxy(str(cid), DigitsClient(cid, ds, rest[part], args).to_client()))
    server = Server(client_manager=manager, strategy=make_strategy(name, ds, calibration, args))
    history, _ = server.fit(num_rounds=args.rounds, timeout=None)
    return [acc for _, acc in history.metrics_centralized["accuracy"]]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", choices=["dimat", "fedavg", "both"], default="both")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    p.add_argument("--partition", default="dirichlet:0.5", help="iid, classes or dirichlet:ALPHA")
    p.add_argument("--model", default="cnn")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--own-init", action="store_true", help="round 1 starts from each client's own init")
    p.add_argument("--merge", default=None, help="DimatFedAvg's merge operator: dimat (default), wm or wa")
    p.add_argument("--no-reset-bn", action="store_true", help="keep the averaged BatchNorm statistics")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[float]]:
    args = parse_args(argv)
    names = ["dimat", "fedavg"] if args.strategy == "both" else [args.strategy]
    history = {name: run(name, args) for name in names}
    print(f"test accuracy after each round (round 0 = initial model), {args.clients} clients, {args.partition}")
    for name, accs in history.items():
        label = "FedAvg" if name == "fedavg" else f"DimatFedAvg({args.merge or 'dimat'})"
        print(f"  {label:>18}: " + " ".join(f"{a:.3f}" for a in accs))
    return history


if __name__ == "__main__":
    main(sys.argv[1:])
