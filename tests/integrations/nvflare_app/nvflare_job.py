"""Build and run one NVFlare simulation for test_nvflare.py (run as a script, in a
network namespace with only loopback: see the test)."""

import argparse
from pathlib import Path

import torch
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
from nvflare.job_config.script_runner import ScriptRunner
from nvflare_net import Net

from lips_wrap import LIPSConfig
from lips_wrap.integrations.nvflare import LIPSFedAvg

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--trace", required=True)
    parser.add_argument("--side", choices=("client", "server"), required=True)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--period", type=int, default=2)
    parser.add_argument("--skip-load-round", type=int, default=-1)
    args = parser.parse_args()

    torch.manual_seed(0)
    job = BaseFedJob(name="lips", initial_model=Net(), min_clients=args.clients)
    job.set_app_packages(["lips_wrap"])  # installed at every site: not copied into the job
    common = dict(num_clients=args.clients, num_rounds=args.rounds,
                  persistor_id=job.comp_ids["persistor_id"])
    if args.side == "server":
        controller = LIPSFedAvg(lips_model=Net(), lips_config=LIPSConfig(
            total_rounds=args.rounds, period=args.period), **common)
    else:
        controller = FedAvg(**common)
    job.to_server(controller)
    lips = "none" if args.side == "server" else "client"
    job.to_clients(ScriptRunner(
        script=str(HERE / "nvflare_client.py"),
        script_args=f"--trace {args.trace} --lips {lips} --period {args.period} "
                    f"--skip-load-round {args.skip_load_round}",
    ))
    job.to_server({"server": {"task_request_interval": 0.2}})  # rounds every 0.2 s, not 2 s
    job.simulator_run(args.workspace, n_clients=args.clients, threads=args.threads)


if __name__ == "__main__":
    main()
