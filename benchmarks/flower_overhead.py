"""Round wall time of client-side LIPS in Flower's simulation: 20 supernodes, digits CNN.

    nice python benchmarks/flower_overhead.py            # ~3 min on 2 busy CPU cores
    nice python benchmarks/flower_overhead.py --rounds 40 --supernodes 20

Both arms run in ONE simulation, interleaved so that machine load hits them alike:
odd server rounds train plainly, even rounds train inside ``lips_train`` (state restore,
gradient capture, mask on mask rounds, state save). With ``period=5`` every fifth LIPS
round masks (server rounds 2, 12, 22, ...), the method's own share. A round's time runs
from ``configure_train`` to the end of ``aggregate_train`` (evaluation is off). The
last line is ``flower round ratio: X``, the median LIPS round over the median plain one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "flower"))

os.environ.update(
    FLWR_TELEMETRY_ENABLED="0",
    FLWR_DISABLE_UPDATE_CHECK="1",
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    RAY_USAGE_STATS_ENABLED="0",
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray on the loopback only
)

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from lips_flower.task import Net, load_partition  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lips_wrap import LIPSConfig  # noqa: E402
from lips_wrap.integrations.custom import local_train  # noqa: E402
from lips_wrap.integrations.flower import lips_train  # noqa: E402

client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    config = msg.content["config"]
    (x, y), _ = load_partition(int(context.node_config["partition-id"]),
                               int(context.node_config["num-partitions"]), 0.1, 0)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(int(config["server-round"]))
    epochs = int(config["local-epochs"])
    if config["lips"]:
        lips_config = LIPSConfig(total_rounds=int(config["num-rounds"]))
        with lips_train(model, optimizer, msg, context, lips_config) as lips:
            local_train(model, lips.optimizer, x, y, epochs, 16, generator)
    else:
        local_train(model, optimizer, x, y, epochs, 16, generator)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(content=content, reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg that alternates the arms and times each round's training phase."""

    def __init__(self, num_rounds: int, epochs: int, progress: tqdm) -> None:
        super().__init__(fraction_evaluate=0.0)
        self.num_rounds, self.epochs, self.progress = num_rounds, epochs, progress
        self.times = {"plain": [], "LIPS": []}
        self._start = 0.0

    def configure_train(self, server_round, arrays, config, grid):
        self._start = time.perf_counter()
        config = ConfigRecord({"lips": server_round % 2 == 0, "num-rounds": self.num_rounds,
                               "local-epochs": self.epochs})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        result = super().aggregate_train(server_round, replies)
        arm = "LIPS" if server_round % 2 == 0 else "plain"
        self.times[arm].append(time.perf_counter() - self._start)
        self.progress.update(1)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="server rounds, both arms")
    parser.add_argument("--supernodes", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use")
    args = parser.parse_args()
    from flwr.simulation import run_simulation

    with tempfile.TemporaryDirectory(prefix="lips-flower-bench-") as tmp, \
            tqdm(total=args.rounds, desc="server rounds", unit="round") as progress:
        os.environ["RAY_TMPDIR"] = tmp
        strategy = TimedFedAvg(args.rounds, args.epochs, progress)
        server = ServerApp()

        @server.main()
        def run(grid: Grid, context: Context) -> None:
            strategy.start(grid, ArrayRecord(Net().state_dict()), num_rounds=args.rounds)

        run_simulation(server, client, num_supernodes=args.supernodes, backend_config={
            "client_resources": {"num_cpus": 1},
            "init_args": {"num_cpus": args.cpus, "_temp_dir": tmp, "logging_level": "ERROR"},
        })
    # The first round of each arm pays for worker start-up and imports: leave it out.
    times = {arm: values[1:] for arm, values in strategy.times.items()}
    print(f"\n{args.supernodes} supernodes, {args.rounds} server rounds, "
          f"{args.epochs} local epochs, digits CNN")
    print(f"{'arm':<6} {'rounds':>6} {'median s':>9} {'mean s':>8} {'min s':>7} {'max s':>7}")
    for arm, values in times.items():
        print(f"{arm:<6} {len(values):>6} {statistics.median(values):>9.3f} "
              f"{statistics.mean(values):>8.3f} {min(values):>7.3f} {max(values):>7.3f}")
    ratio = statistics.median(times["LIPS"]) / statistics.median(times["plain"])
    print(f"flower round ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
