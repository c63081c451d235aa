"""ServerApp: FedAvg, optionally wrapped in server-side LIPS (run config ``lips="server"``)."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from lips_flower.task import Net, lips_config
from lips_wrap.integrations.flower import LIPSStrategy, show_lips_logs

show_lips_logs()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=float(cfg["fraction-evaluate"]))
    if cfg["lips"] == "server":
        strategy = LIPSStrategy(strategy, Net(), lips_config(cfg))
    elif cfg["lips"] not in ("client", "off"):
        raise ValueError(f"run config lips={cfg['lips']!r}; accepted: client, server, off")
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
    )
    for server_round, metrics in sorted(result.evaluate_metrics_clientapp.items()):
        print(f"server round {server_round:>3}: personalized accuracy {metrics['accuracy']:.3f}")
    if isinstance(strategy, LIPSStrategy):
        for server_round, report in sorted(strategy.reports.items()):
            if report.masked:
                print(f"Flower server round {server_round:>3} (LIPS round {report.round}): "
                      f"sent the nodes a masked model, density {report.density:.3f}, "
                      f"{report.elements_zeroed:,} entries dropped")
