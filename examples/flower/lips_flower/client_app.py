"""ClientApp: local training on this node's digits, with client-side LIPS.

The two lines marked ``# LIPS`` are all that the paper's method adds to the handler;
``show_lips_logs()`` makes LIPS's log lines ("node ..., Flower server round 2 (LIPS
round 1): masked ...") appear beside Flower's.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lips_flower.task import Net, accuracy, lips_config, load_partition
from lips_wrap.integrations.custom import local_train
from lips_wrap.integrations.flower import lips_train, report_metrics, show_lips_logs

torch.set_num_threads(1)
show_lips_logs()
app = ClientApp()


def _data(context: Context):
    cfg = context.run_config
    return load_partition(int(context.node_config["partition-id"]),
                          int(context.node_config["num-partitions"]),
                          float(cfg["alpha"]), int(cfg["seed"]))


def _model(msg: Message) -> torch.nn.Module:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    (x, y), _ = _data(context)
    model = _model(msg)  # the received arrays are loaded before lips_train, which checks it
    optimizer = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]), momentum=0.9)
    generator = torch.Generator().manual_seed(int(cfg["seed"]) + context.node_id % 1000)
    metrics = MetricRecord({"num-examples": len(y)})
    if cfg["lips"] == "client":
        with lips_train(model, optimizer, msg, context, lips_config(cfg)) as lips:  # LIPS
            loss = local_train(model, lips.optimizer, x, y, int(cfg["local-epochs"]),  # LIPS
                               int(cfg["batch-size"]), generator)
        metrics.update(report_metrics(lips.last_report))  # lips-density, -zeroed, -fallback
    else:
        loss = local_train(model, optimizer, x, y, int(cfg["local-epochs"]),
                           int(cfg["batch-size"]), generator)
    metrics["train-loss"] = loss
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, test = _data(context)
    metrics = MetricRecord({"num-examples": len(test[1]), "accuracy": accuracy(_model(msg), test)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
