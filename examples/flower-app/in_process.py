"""Run this Flower App's ServerApp and ClientApps in one process: no SuperLink, no SuperNodes, no Ray.

A small :class:`InProcessGrid` stands in for Flower's runtime: it hands every message the strategy sends straight
to the ClientApp, with one ``Context`` per simulated node (kept across rounds, as a SuperNode keeps it), and
returns the replies. The ServerApp's ``main`` and the ClientApp's ``train`` are the same functions `flwr run`
executes, and every random draw is seeded from the run config, so the accuracies equal those of the deployment
(``local_deployment.py``) for the same run config. It is much faster on a small machine (no process per message,
no polling), which makes it the tool for sweeps, and for the default test suite (Flower's own simulation runtime
needs Ray).

    python examples/flower-app/in_process.py                                    # same defaults as flwr run
    python examples/flower-app/in_process.py --run-config "client-init='own'" --nodes 3
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence
from uuid import uuid4

APP = Path(__file__).resolve().parent

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are ClientApp calls in this process (one Context per node id)."""

    def __init__(self, client: Callable[[Message, Context], Message], node_contexts: Dict[int, Context]) -> None:
        self.client = client
        self.contexts = node_contexts
        self._run = None
        self._replies: Dict[str, Message] = {}

    def set_run(self, run) -> None:  # Grid API; the run object is not used here
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: Optional[float] = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            dst = msg.metadata.dst_node_id
            if dst not in self.contexts:
                raise ValueError(f"message for unknown node {dst}; nodes: {sorted(self.contexts)}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's in-memory grid assigns it
            self._replies[msg.metadata.message_id] = self.client(msg, self.contexts[dst])
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def app_run_config(overrides: Optional[str] = None) -> Dict:
    """The app's run config from pyproject.toml, with `flwr run --run-config`-style overrides applied."""
    from flwr.common.config import parse_config_args

    try:
        import tomllib
    except ImportError:  # Python 3.10; flwr depends on tomli
        import tomli as tomllib
    cfg = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    extra = parse_config_args([overrides]) if overrides else {}
    unknown = sorted(set(extra) - set(cfg))
    if unknown:
        raise ValueError(f"--run-config: unknown key {unknown[0]!r} (keys: {', '.join(cfg)})")
    return {**cfg, **extra}


@contextlib.contextmanager
def _task_identity(run_id: int):
    """flwr >= 1.42 stamps new messages with the identity of the running task (the runtime sets it otherwise)."""
    try:
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older flwr: Message() does not read it
        yield
        return
    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def run(run_config: Dict, nodes: int = 3) -> None:
    """The ServerApp's main on an InProcessGrid of ``nodes`` ClientApps (partition k of ``nodes`` each)."""
    if str(APP) not in sys.path:
        sys.path.insert(0, str(APP))
    from dimat_flower_app import client_app, server_app

    contexts = {100 + k: Context(run_id=1, node_id=100 + k, node_config={"partition-id": k, "num-partitions": nodes},
                               state=RecordDict(), run_config=dict(run_config)) for k in range(nodes)}
    grid = InProcessGrid(client_app.app, contexts)
    with _task_identity(run_id=1):
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                      run_config=dict(run_config)))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-config", default=None, help="overrides, as for flwr run, e.g. \"client-init='own'\"")
    p.add_argument("--nodes", type=int, default=3, help="simulated SuperNodes (partitions)")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error("--nodes must be >= 1")
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.INFO)
    t = time.perf_counter()
    run(app_run_config(args.run_config), args.nodes)
    print(f"in-process run took {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
