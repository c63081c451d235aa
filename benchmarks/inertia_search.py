"""Which many-clients setups show layer-wise inertia under FedAvg? A short search.

    OMP_NUM_THREADS=1 python benchmarks/inertia_search.py --workers 2 --resume

Runs FedAvg alone (seed 0, 30 rounds) on variants of the ``shapes-resnet8-many`` setup
of ``reproduce.py`` (number of clients, model widths, image resolution) and prints, per
variant, the inertia ratio of ``benchmarks/inertia.py`` (the number ``lips-wrap
diagnose`` prints), the first/middle/last mean relative updates, the personalized
accuracies and the CPU seconds. Results go to ``benchmarks/results/inertia_search.json``
(one entry per variant; ``--resume`` keeps the entries already there).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce import COMMON, FULL, RESULTS, run_one  # noqa: E402

OUT = RESULTS / "inertia_search.json"
BASE = "shapes-resnet8-many"
# what each variant changes in the base setup
VARIANTS: List[dict] = [
    {"clients": 20, "widths": [8, 16, 32], "resolution": 8},
    {"clients": 40, "widths": [8, 16, 32], "resolution": 8},
    {"clients": 20, "widths": [16, 32, 64], "resolution": 8},
    {"clients": 20, "widths": [32, 64, 128], "resolution": 8},
    {"clients": 20, "widths": [16, 32, 64], "resolution": 16},
]


def variant_name(variant: dict) -> str:
    """``c20_w8-16-32_r16_t30``: clients, widths, resolution, rounds."""
    return (f"c{variant['clients']}_w{'-'.join(map(str, variant['widths']))}"
            f"_r{variant['resolution']}_t{variant['rounds']}")


def variant_setup(variant: dict, base: Optional[dict] = None) -> dict:
    """The full setup of one variant: the base setup with the variant's changes."""
    base = base if base is not None else {"name": "inertia-search", **COMMON, **FULL[BASE]}
    return {**base, **variant}


def _one(job: tuple) -> tuple:
    setup, name = job
    torch.set_num_threads(1)
    run = run_one(setup, "FedAvg", 0)
    keep = {k: run[k] for k in ("before_last", "after_last", "cpu_seconds", "inertia",
                                "inertia_layers", "relative_update")}
    return name, {"config": setup, **keep}


def search(variants: List[dict], out: Path, rounds: int = 30, workers: int = 1,
           resume: bool = False, base: Optional[dict] = None) -> Dict[str, dict]:
    """FedAvg on every variant for ``rounds`` rounds; returns (and writes to ``out``)
    the results by variant name."""
    done = json.loads(out.read_text()) if resume and out.exists() else {}
    jobs = []
    for variant in variants:
        setup = variant_setup({**variant, "rounds": rounds}, base)
        name = variant_name(setup)
        if name not in done:
            jobs.append((setup, name))
    out.parent.mkdir(parents=True, exist_ok=True)

    def keep(name: str, result: dict) -> None:
        done[name] = result
        out.write_text(json.dumps(done, indent=1))
        print(line(name, result), flush=True)

    if workers <= 1:
        for job in jobs:
            keep(*_one(job))
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for name, result in pool.imap_unordered(_one, jobs):
                keep(name, result)
    return done


def line(name: str, result: dict) -> str:
    g = result["inertia"]
    return (f"{name}: ratio {g['ratio']:.3f} (first {g['first']:.4f}, middle "
            f"{g['middle']:.4f}, last {g['last']:.4f}), after {result['after_last']:.3f}, "
            f"before {result['before_last']:.3f}, {result['cpu_seconds']:.0f} cpu s")


def markdown(results: Dict[str, dict]) -> str:
    """The search as a Markdown table (accuracies in %), in the order of ``results``."""
    rows = ["| clients | widths | image | rounds | FedAvg inertia ratio | first | middle "
            "| last | after agg. | before agg. | CPU s |", "|---|---|---|---|---|---|---|---|"
            "---|---|---|"]
    for result in results.values():
        c, g = result["config"], result["inertia"]
        rows.append(f"| {c['clients']} | {'/'.join(map(str, c['widths']))} | "
                    f"{c['resolution']}x{c['resolution']} | {c['rounds']} | "
                    f"**{g['ratio']:.2f}** | {g['first']:.3f} | {g['middle']:.3f} | "
                    f"{g['last']:.3f} | {100 * result['after_last']:.1f} | "
                    f"{100 * result['before_last']:.1f} | {result['cpu_seconds']:.0f} |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--resume", action="store_true",
                        help=f"keep the variants already in {OUT.name}")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true",
                        help="only print the Markdown table of the results in --out")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return 0
    results = search(VARIANTS, args.out, args.rounds, args.workers, args.resume)
    for name, result in results.items():
        print(line(name, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
