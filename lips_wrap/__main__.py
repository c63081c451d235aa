"""Command line ``lips-wrap`` (also ``python -m lips_wrap``).

``lips-wrap inspect SPEC`` prints the plan LIPS would use on a model; ``lips-wrap
diagnose PATH...`` measures layer inertia in an existing run from its saved global
checkpoints.

SPEC names a model: ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``),
``hf:MODEL_TYPE`` (a small Hugging Face model built from its config, or ``hf:FOLDER``
for a local checkpoint), or ``module.path:factory`` (a callable returning an
``nn.Module``, called without arguments). ``timm:`` and ``hf:`` take comma-separated
``key=value`` options: ``timm:vit_tiny_patch16_224,img_size=64``, ``hf:gpt2,n_layer=4``.

Exit codes: 0 success, 1 a failed check (``inspect``: no tensor eligible; ``diagnose``:
the middle layers stall), 2 a usage error (bad option, model spec or input files).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional

from torch import nn

from . import __version__
from .builders import build_hf, build_timm
from .diagnose import CheckpointError, diagnose
from .diagnostics import INERTIA_THRESHOLD
from .layers import LayerPlan, find_layers

ModelBuilder = Callable[[str], nn.Module]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
"""Exit codes: success, a failed check, a usage error."""

PROGRESS_MIN_CHECKPOINTS = 10
"""Fewest checkpoints for which ``diagnose`` shows a progress bar by default."""

SPEC_HELP = "timm:NAME[,key=value...], hf:MODEL_TYPE[,key=value...] or module:factory"


def _from_python(target: str) -> nn.Module:
    module_name, sep, attr = target.partition(":")
    if not sep or not attr:
        raise ValueError(
            f"model spec {target!r} must look like 'package.module:factory', "
            "'timm:NAME' or 'hf:MODEL_TYPE'"
        )
    factory = getattr(importlib.import_module(module_name), attr)
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{target} returned {type(model).__name__}, not an nn.Module")
    return model


BUILDERS: Dict[str, ModelBuilder] = {"timm": build_timm, "hf": build_hf}
"""Spec prefixes (``prefix:name``) and the function that builds such a model."""


def build_model(spec: str) -> nn.Module:
    """Build the model a spec names (see the module docstring)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in BUILDERS:
        return BUILDERS[prefix](rest)
    return _from_python(spec)


def plan_to_dict(plan: LayerPlan) -> Dict[str, Any]:
    """A layer plan in plain JSON types (what ``inspect --json`` prints)."""
    return {
        "detector": plan.detector,
        "eligible": len(plan.eligible),
        "tensors_total": len(plan.decisions),
        "masked_numel": plan.masked_numel,
        "total_numel": plan.total_numel,
        "tensors": [
            {"name": d.name, "aliases": list(d.aliases), "shape": list(d.shape),
             "eligible": d.eligible, "reason": d.reason, "slices": d.slices}
            for d in plan.decisions
        ],
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lips-wrap",
        description="LIPS for federated learning: inspect a model's layers, diagnose "
                    "inertia in a run's checkpoints.",
        epilog="exit codes: 0 ok, 1 a failed check, 2 a usage error",
    )
    parser.add_argument("--version", action="version", version=f"lips-wrap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="show which tensors LIPS masks, and why",
        description="Print the plan LIPS would use: every tensor, masked or exempt, and "
                    "why. Exit 1 when no tensor is eligible.")
    inspect.add_argument("model", help=SPEC_HELP)
    inspect.add_argument("--include", action="append", default=[], metavar="GLOB",
                         help="make matching parameter names eligible (repeatable)")
    inspect.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                         help="make matching parameter names exempt (repeatable)")
    inspect.add_argument("--json", action="store_true", help="print the plan as JSON")

    diag = commands.add_parser(
        "diagnose", help="measure layer inertia from a run's saved global checkpoints",
        description="Read one global checkpoint per round (torch.save state dicts, "
                    ".safetensors or .npz; ordered by the last number in the file name), "
                    "print each layer's relative update and whether the middle layers "
                    "stall against the first and last layers. Exit 1 when they do.")
    diag.add_argument("paths", nargs="+", metavar="PATH",
                      help="checkpoint files, folders holding them, or glob patterns")
    diag.add_argument("--model", metavar="SPEC",
                      help="the run's model (" + SPEC_HELP + "): the layers LIPS masks "
                           "are the middle layers; default: every weight matrix")
    diag.add_argument("--include", action="append", default=[], metavar="GLOB",
                      help="with --model: make matching names middle layers (repeatable)")
    diag.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                      help="with --model: take matching names out of the middle (repeatable)")
    diag.add_argument("--warmup", type=int, default=None, metavar="N",
                      help="updates skipped before averaging (default: the first 20%%)")
    diag.add_argument("--windows", type=int, default=None, metavar="N",
                      help="also report the ratio over N consecutive spans of rounds "
                           "(default 5)")
    diag.add_argument("--threshold", type=float, default=INERTIA_THRESHOLD, metavar="X",
                      help=f"ratio below which the middle layers stall "
                           f"(default {INERTIA_THRESHOLD})")
    diag.add_argument("--out", metavar="DIR",
                      help="write inertia.png, inertia.csv and inertia.json there")
    diag.add_argument("--json", action="store_true",
                      help="print the results as JSON instead of the table")
    bar = diag.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always show a progress bar (needs lips-wrap[progress])")
    bar.add_argument("--no-progress", dest="progress", action="store_false",
                     help=f"never show one (default: shown on a terminal from "
                          f"{PROGRESS_MIN_CHECKPOINTS} checkpoints, if tqdm is installed)")
    return parser


def _run_inspect(args: argparse.Namespace) -> int:
    try:
        model = build_model(args.model)
        plan = find_layers(model, args.include, args.exclude, allow_empty=True)
    except (ValueError, TypeError, ImportError, AttributeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(plan_to_dict(plan), indent=1) if args.json else plan.table())
    if not plan.eligible:
        print(f"check failed: no tensor of {type(model).__name__} is eligible for LIPS; "
              "name some with --include", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _progress_bar(requested: Optional[bool], count: int
                  ) -> Optional[Callable[[Iterable[Any]], Iterable[Any]]]:
    if requested is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        if requested:
            raise ImportError(
                "--progress needs tqdm: pip install 'lips-wrap[progress]'") from None
        return None
    if requested is None and (count < PROGRESS_MIN_CHECKPOINTS or not sys.stderr.isatty()):
        return None
    return lambda items: tqdm(items, desc="checkpoints", unit="ckpt", file=sys.stderr)


def _run_diagnose(args: argparse.Namespace) -> int:
    from .diagnose import find_checkpoints

    try:
        model = plan = None
        if args.model:
            model = build_model(args.model)
            plan = find_layers(model, args.include, args.exclude)
        elif args.include or args.exclude:
            raise ValueError("--include and --exclude need --model (they select its layers)")
        progress = _progress_bar(args.progress, len(find_checkpoints(args.paths)))
        result = diagnose(args.paths, model, plan, warmup=args.warmup,
                          threshold=args.threshold, progress=progress,
                          windows=args.windows)
    except (CheckpointError, ValueError, TypeError, ImportError, AttributeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.out:
        try:
            import matplotlib  # noqa: F401

            plot = True
        except ImportError:
            plot = False
            print("warning: inertia.png not written: the heatmap needs matplotlib: "
                  "pip install 'lips-wrap[plot]'", file=sys.stderr)
        written = result.write(args.out, plot=plot)
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.report())
    return EXIT_CHECK_FAILED if result.stalled else EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help, --version (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if args.command == "inspect":
        return _run_inspect(args)
    return _run_diagnose(args)


if __name__ == "__main__":
    sys.exit(main())
