"""Training-step time with ``lips.optimizer`` divided by the bare optimizer's.

A step is forward + backward + ``optimizer.step()`` on a timm CNN (resnet18) and a
timm ViT (vit_tiny, 64x64 images), with SGD (momentum) and AdamW, on rounds that do
not mask (the only per-step work LIPS adds is one fused copy of the eligible
gradients into float16 buffers). Bare and wrapped steps alternate, so drift on a
shared machine hits both alike; each figure is a median. The "copy share" column is
the capture alone (``_capture_grads``) as a share of the bare step.

Run: ``nice -n 10 python benchmarks/step_overhead.py`` (``--quick`` for a smoke run,
``--device cuda`` for a GPU: batch 128 instead of 16, times from CUDA events).
One thread on both sides. Last line: ``step overhead ratio: X`` (geometric mean).
"""

from __future__ import annotations

import argparse
import copy
import math
from typing import Callable, Tuple

import timm
import torch
from timing import (
    add_device_argument,
    describe,
    median_seconds,
    paired_medians,
    single_thread,
    table,
)
from torch import nn
from tqdm import tqdm

from lips_wrap import LIPS, LIPSConfig

MODELS = {
    "resnet18 (CNN)": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
    "vit_tiny (ViT)": lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64),
}
OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-4),
}


def stepper(model: nn.Module, optimizer: torch.optim.Optimizer, batch: int,
            device: torch.device) -> Callable:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 64, 64, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def compare(build: Callable, make_opt: Callable, batch: int, repeats: int,
            device: torch.device) -> Tuple[float, float, float]:
    bare_model = build().to(device)
    lips_model = copy.deepcopy(bare_model)
    bare = stepper(bare_model, make_opt(bare_model.parameters()), batch, device)
    lips = LIPS(lips_model, make_opt(lips_model.parameters()), LIPSConfig(total_rounds=100))
    wrapped = stepper(lips_model, lips.optimizer, batch, device)
    bare(), wrapped()  # warm-up, creates optimizer state and gradient buffers
    bare_median, lips_median = paired_medians(bare, wrapped, repeats, device=device)
    capture = median_seconds(lips.optimizer._capture_grads, repeats, device=device)
    return bare_median, lips_median, capture / bare_median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, few steps")
    add_device_argument(parser)
    args = parser.parse_args()
    single_thread()
    batch, repeats = (2, 3) if args.quick else (16, 40)
    if args.device.type == "cuda" and not args.quick:
        batch = 128
    cases = [(m, o) for m in MODELS for o in OPTIMIZERS]
    if args.quick:
        cases = cases[:1]
    rows, ratios = [], []
    for model_name, opt_name in tqdm(cases, desc="models", leave=False):
        torch.manual_seed(0)
        bare, wrapped, share = compare(MODELS[model_name], OPTIMIZERS[opt_name], batch, repeats,
                                       args.device)
        ratios.append(wrapped / bare)
        rows.append([model_name, opt_name, f"{bare * 1e3:.1f}", f"{wrapped * 1e3:.1f}",
                     f"{wrapped / bare:.3f}", f"{share:.4f}"])
    print(f"{describe(args.device)}; batch {batch} of 64x64 images; medians of {repeats} "
          "alternating steps")
    print(table(["model", "optimizer", "bare ms", "lips ms", "ratio", "copy share"], rows))
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"step overhead ratio: {geomean:.3f}")


if __name__ == "__main__":
    main()
