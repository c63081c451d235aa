"""job.py: run FedAvg + LIPS on the digits in NVFlare's simulator, then read back what
the server saved.

    python job.py                 # client-side LIPS (the paper's method), FedAvgRecipe
    python job.py --side server   # server-side LIPS: LIPSFedAvg, clients unchanged

The simulator's server listens on all network interfaces of this machine for the run.
It exits normally even when a client failed, so this script checks the global model
file and the round metrics and exits with status 1 if a round is missing.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from digits_task import Net

from lips_wrap import LIPSConfig, density_at

HERE = Path(__file__).resolve().parent


def client_side(args):
    """The stock FedAvgRecipe; LIPS lives in client.py."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe import SimEnv

    recipe = FedAvgRecipe(
        name="lips_digits", model=Net(), min_clients=args.sites, num_rounds=args.rounds,
        train_script=str(HERE / "client.py"),
        train_args=f"--num-sites {args.sites} --period {args.period}",
    )
    recipe.add_server_config({"server": {"task_request_interval": 0.2}})
    recipe.run(SimEnv(num_clients=args.sites, workspace_root=args.workspace,
                      log_config="WARNING"))
    return Path(args.workspace) / "lips_digits" / "server" / "simulate_job"


def server_side(args):
    """FedAvg's controller swapped for LIPSFedAvg; client.py trains plain FedAvg."""
    from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
    from nvflare.job_config.script_runner import ScriptRunner

    from lips_wrap.integrations.nvflare import LIPSFedAvg

    job = BaseFedJob(name="lips_digits_server", initial_model=Net(), min_clients=args.sites)
    job.set_app_packages(["lips_wrap"])  # installed at every site: not copied into the job
    job.to_server(LIPSFedAvg(
        num_clients=args.sites, num_rounds=args.rounds,
        persistor_id=job.comp_ids["persistor_id"], lips_model=Net(),
        lips_config=LIPSConfig(total_rounds=args.rounds, period=args.period),
    ))
    job.to_server({"server": {"task_request_interval": 0.2}})
    job.to_clients(ScriptRunner(script=str(HERE / "client.py"),
                                script_args=f"--num-sites {args.sites} --lips off"))
    job.simulator_run(args.workspace, n_clients=args.sites, log_config="WARNING")
    return Path(args.workspace) / "server" / "simulate_job"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("client", "server"), default="client")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--period", type=int, default=5)
    parser.add_argument("--workspace", default="/tmp/nvflare/lips_digits")
    args = parser.parse_args()
    torch.manual_seed(0)
    job_dir = client_side(args) if args.side == "client" else server_side(args)

    metrics_file = job_dir / "metrics" / "round_metrics.jsonl"
    rounds = ([json.loads(line) for line in metrics_file.read_text().splitlines()]
              if metrics_file.is_file() else [])
    schedule = LIPSConfig(total_rounds=args.rounds, period=args.period)
    print("round  mask density  accuracy of the received model  after local training")
    for entry in rounds:
        values = {m["name"]: m["value"] for m in entry["aggregated_metrics"]}
        density = density_at(entry["round"], schedule) or 0.0
        print(f"{entry['round']:5d}  {density:12.3f}  {values['accuracy']:30.3f}  "
              f"{values['local_accuracy']:20.3f}")
    model_file = job_dir / "app_server" / "FL_global_model.pt"
    if len(rounds) != args.rounds or not model_file.is_file():
        sys.exit(f"the run stopped after {len(rounds)} of {args.rounds} rounds: see the "
                 f"sites' error_log.txt under {args.workspace}")
    print(f"global model: {model_file}")


if __name__ == "__main__":
    main()
