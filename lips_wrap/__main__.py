"""Command line: ``python -m lips_wrap inspect SPEC`` prints the plan LIPS would use.

SPEC names a model: ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``),
``hf:MODEL_TYPE`` (a small Hugging Face model built from its config, or ``hf:FOLDER``
for a local checkpoint), or ``module.path:factory`` (a callable returning an
``nn.Module``, called without arguments). ``timm:`` and ``hf:`` take comma-separated
``key=value`` options: ``timm:vit_tiny_patch16_224,img_size=64``, ``hf:gpt2,n_layer=4``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Dict, List, Optional

from torch import nn

from .builders import build_hf, build_timm
from .layers import find_layers

ModelBuilder = Callable[[str], nn.Module]


def _from_python(target: str) -> nn.Module:
    module_name, sep, attr = target.partition(":")
    if not sep or not attr:
        raise ValueError(f"model spec {target!r} must look like 'package.module:factory'")
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lips_wrap")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="show which tensors LIPS masks, and why")
    inspect.add_argument(
        "model", help="timm:NAME[,key=value...], hf:MODEL_TYPE[,key=value...] or module:factory"
    )
    inspect.add_argument("--include", action="append", default=[], help="glob to include")
    inspect.add_argument("--exclude", action="append", default=[], help="glob to exclude")
    args = parser.parse_args(argv)
    try:
        model = build_model(args.model)
        plan = find_layers(model, args.include, args.exclude, allow_empty=True)
    except (ValueError, TypeError, ImportError, AttributeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(plan.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
