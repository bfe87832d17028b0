"""ClientApp: trains a dimat zoo model on this SuperNode's partition of the data and sends it back.

Each SuperNode is started with ``--node-config "partition-id=K num-partitions=N"``; every node computes the same
split (from the run config's seed) and takes share K. Optionally (``client-align = "align"``) the received global
model is first permuted into the unit order of the model this client trained in its previous round
(:func:`dimat.flower.align_to_local`, activation matching on the client's own data).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dimat.flower import align_to_local
from dimat.train import train_epochs

from dimat_flower_app.task import Settings, client_indices, dataset, new_model

app = ClientApp()

#: batches of the client's own data that client-side alignment computes activation statistics on
ALIGN_BATCHES, ALIGN_BATCH_SIZE = 4, 128


def node_partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    for key in ("partition-id", "num-partitions"):
        if key not in cfg:
            raise ValueError(f"node config: missing {key!r}; start the SuperNode with "
                             "--node-config 'partition-id=K num-partitions=N'")
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    s = Settings.from_run_config(context.run_config)
    pid, n = node_partition(context)
    config = msg.content["config"]
    server_round, name = int(config["server-round"]), str(config.get("strategy", "fedavg"))
    ds = dataset(s.dataset)
    idx = client_indices(s, pid, n)
    x, y = ds.x_train[idx], ds.y_train[idx]

    if s.client_init == "own" and server_round == 1:
        model = new_model(s, s.seed + 1000 * (pid + 1))  # this client's own initialisation; the global is unused
    else:
        model = new_model(s, s.seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        key = f"{name}.previous-local"
        if s.client_align == "align" and key in context.state:
            previous = new_model(s, s.seed)
            previous.load_state_dict(context.state[key].to_torch_state_dict())
            batches = [x[i:i + ALIGN_BATCH_SIZE] for i in range(0, min(len(x), ALIGN_BATCHES * ALIGN_BATCH_SIZE),
                                                                  ALIGN_BATCH_SIZE)]
            model = align_to_local(model, previous, batches, keep=s.client_keep)

    seed = int(np.random.SeedSequence([s.seed, pid, server_round]).generate_state(1)[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=s.learning_rate)
    loss = train_epochs(model, optimizer, x, y, s.local_epochs, s.batch_size, torch.Generator().manual_seed(seed))

    state = ArrayRecord(model.state_dict())
    if s.client_align == "align":
        context.state[f"{name}.previous-local"] = state
    # Samples per class: DimatFedAvg with head = "label_counts" combines the output layer class by class with them.
    counts = np.bincount(np.asarray(y), minlength=ds.num_classes).astype(float).tolist()
    content = RecordDict({"arrays": state, "metrics": MetricRecord({"train-loss": loss, "num-examples": len(y),
                                                                    "class-counts": counts})})
    return Message(content=content, reply_to=msg)
