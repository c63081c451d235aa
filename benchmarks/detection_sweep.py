"""Run layer detection over every architecture timm or transformers can build.

    python benchmarks/detection_sweep.py timm                 # every timm architecture
    python benchmarks/detection_sweep.py hf                   # every transformers model type
    python benchmarks/detection_sweep.py timm --filter 'vit_*'

Models are built on the meta device (no memory, no weights, nothing downloaded); Hugging
Face ones small, as ``python -m lips_wrap inspect hf:TYPE`` builds them. Prints one line
per model: detector, eligible tensors, share of parameters masked, and FALLBACK where a
generic rule decided; then a summary. Lines starting with ``!`` deserve a look.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import warnings
from collections import Counter
from typing import Callable, Iterator, Tuple

import torch
from tqdm import tqdm

from lips_wrap import find_layers
from lips_wrap.builders import build_hf, build_timm


def timm_specs() -> Iterator[str]:
    import timm

    seen = set()
    for name in timm.list_models():
        arch = name.split(".")[0]
        if arch not in seen:
            seen.add(arch)
            yield arch


def hf_specs() -> Iterator[str]:
    import transformers

    transformers.logging.set_verbosity_error()
    yield from sorted(transformers.CONFIG_MAPPING.keys())


SOURCES: dict = {"timm": (timm_specs, build_timm), "hf": (hf_specs, build_hf)}


def sweep_one(build: Callable[[str], torch.nn.Module], spec: str) -> Tuple[str, str]:
    """(outcome, line) for one model; outcome is ok, fallback, empty, build-error, error."""
    try:
        with torch.device("meta"):
            model = build(spec)
    except Exception as error:  # noqa: BLE001 - a sweep reports every failure and goes on
        return "build-error", f"  {spec:42s} cannot build: {type(error).__name__}: {error}"[:160]
    try:
        plan = find_layers(model, allow_empty=True)
    except Exception as error:  # noqa: BLE001
        return "error", f"! {spec:42s} detection failed: {type(error).__name__}: {error}"
    share = plan.masked_numel / max(plan.total_numel, 1)
    fallback = any("generic rule" in d.reason for d in plan.decisions)
    outcome = "empty" if not plan.eligible else "fallback" if fallback else "ok"
    flag = " " if outcome == "ok" else "!"
    line = (
        f"{flag} {spec:42s} {type(model).__name__:36s} {len(plan.eligible):5d}/"
        f"{len(plan.decisions):<5d} {share:6.1%}  {plan.detector}"
        + ("  FALLBACK" if fallback else "")
    )
    return outcome, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=sorted(SOURCES))
    parser.add_argument("--filter", default="*", help="glob on model names")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    specs, build = SOURCES[args.source]
    names = [name for name in specs() if fnmatch.fnmatchcase(name, args.filter)]
    counts: Counter = Counter()
    for name in tqdm(names, desc=args.source, leave=False):
        outcome, line = sweep_one(build, name)
        counts[outcome] += 1
        tqdm.write(line)
    print(f"{len(names)} {args.source} models: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
