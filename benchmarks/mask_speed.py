"""Mask time of a whole model, as a multiple of a FedAvg of two models of its size.

Models are sets of tensors shaped like GPT-2 small's transformer blocks (85M entries)
and ResNet-50's convolutions (23M), every tensor eligible. The mask is the whole
client path, ``LIPS.on_global_model`` on a mask round with the sensitivity score
(finite checks, scores, selection, weights and optimizer state masked). FedAvg is
the usual sample-weighted sum of two state dicts, ``w_a * A + w_b * B`` per tensor
(``torch.mul`` then ``add_``), timed in alternation with the mask. ``torch.topk``,
``torch.kthvalue`` and a full ``torch.sort`` of the same scores are the alternatives
LIPS does not use.

Run: ``nice -n 10 python benchmarks/mask_speed.py`` (``--quick`` for a smoke run,
``--device cuda`` for a GPU: tensors, gradients and optimizer state on the GPU, times
from CUDA events). One thread on both sides. Last line: ``mask/fedavg ratio: X`` (d=0.5,
GPT-2 shapes).
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Sequence, Tuple

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
from lips_wrap.masking import sensitivity_score
from lips_wrap.selection import apply_selection_, select_top_k

Shapes = List[Tuple[int, ...]]


def gpt2_shapes(blocks: int) -> Shapes:
    """The four weight matrices of each GPT-2 small block (Conv1D layout)."""
    return [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * blocks


def resnet50_shapes(stages: int) -> Shapes:
    """Convolution weights of ResNet-50's bottleneck stages (torchvision layout)."""
    shapes: Shapes = []
    width, inplanes = 64, 64
    for stage, blocks in enumerate((3, 4, 6, 3)[:stages]):
        planes = width * 2**stage
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes, planes, 3, 3),
                       (planes * 4, planes, 1, 1)]
            if block == 0:
                shapes.append((planes * 4, inplanes, 1, 1))
            inplanes = planes * 4
    return shapes


class TensorSet(nn.Module):
    """A model made of free tensors of the given shapes (drawn on the CPU, so every
    device gets the same values)."""

    def __init__(self, shapes: Shapes, seed: int, device: torch.device) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.tensors = nn.ParameterList(
            nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device))
            for shape in shapes
        )


def fedavg_two(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
               out: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Weighted average of two models into preallocated ``out`` (as a server accumulates
    into its global buffers): timing fresh outputs measures page faults, not FedAvg."""
    for x, y, o in zip(a, b, out):
        torch.mul(x, 0.6, out=o).add_(y, alpha=0.4)
    return out


def client(shapes: Shapes, density: float, device: torch.device
           ) -> Tuple[LIPS, List[torch.Tensor], Dict]:
    model = TensorSet(shapes, seed=0, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = LIPSConfig(total_rounds=10, start_density=density, include=("*",))
    lips = LIPS(model, optimizer, config)
    generator = torch.Generator().manual_seed(1)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator).to(device)
    lips.optimizer.step()  # keeps the gradients (fp16) and creates momentum buffers
    originals = [p.detach().clone() for p in model.parameters()]
    return lips, originals, lips.state_dict()


def restore(lips: LIPS, originals: List[torch.Tensor], state: Dict) -> None:
    with torch.no_grad():
        for param, original in zip(lips.model.parameters(), originals):
            param.copy_(original)
    lips.load_state_dict(state)


def measure(name: str, shapes: Shapes, densities: Sequence[float], repeats: int,
            baselines: bool, device: torch.device
            ) -> Tuple[List[List[str]], Dict[float, float]]:
    others = list(TensorSet(shapes, seed=2, device=device).parameters())
    rows, ratios = [], {}
    for density in tqdm(densities, desc=name, leave=False):
        fed, mask, extra = one_density(shapes, density, others, repeats,
                                       baselines and density == 0.5, device)
        ratios[density] = mask / fed
        cells = [f"{x / fed:.1f}" for x in extra] + [""] * (3 - len(extra))
        rows.append([name, f"{density:.1f}", f"{fed * 1e3:.0f}", f"{mask * 1e3:.0f}",
                     f"{mask / fed:.2f}", *cells])
    return rows, ratios


def one_density(shapes: Shapes, density: float, others: List[torch.Tensor], repeats: int,
                baselines: bool, device: torch.device) -> Tuple[float, float, List[float]]:
    lips, originals, state = client(shapes, density, device)
    params = list(lips.model.parameters())
    with torch.no_grad():
        out = [torch.empty_like(p) for p in params]
        fed, mask = paired_medians(lambda: fedavg_two(params, others, out),
                                   lambda: lips.on_global_model(1), repeats,
                                   setup_second=lambda: restore(lips, originals, state),
                                   device=device)
        extra = alternatives(lips, originals, state, repeats, device) if baselines else []
    return fed, mask, extra


def alternatives(lips: LIPS, originals, state, repeats: int, device: torch.device
                 ) -> List[float]:
    restore(lips, originals, state)
    scores = [sensitivity_score(p.detach(), lips.optimizer.captured_grad(p)).view(-1)
              for p in lips.model.parameters()]
    ks = [s.numel() // 2 for s in scores]
    runs = [
        lambda: [torch.topk(s, k, sorted=False) for s, k in zip(scores, ks)],
        lambda: [torch.kthvalue(s, s.numel() - k + 1) for s, k in zip(scores, ks)],
        lambda: [torch.sort(s, descending=True, stable=True) for s in scores],
    ]
    return [median_seconds(run, max(1, repeats // 2), device=device) for run in runs]


def phases(shapes: Shapes, repeats: int, device: torch.device) -> str:
    """Where the mask time goes (GPT-2 shapes, d=0.5), each as a multiple of FedAvg."""
    lips, originals, state = client(shapes, 0.5, device)
    params = list(lips.model.parameters())
    grads = [lips.optimizer.captured_grad(p) for p in params]
    other = list(TensorSet(shapes, seed=2, device=device).parameters())
    with torch.no_grad():
        out = [torch.empty_like(p) for p in params]
        fed = median_seconds(lambda: fedavg_two(params, other, out), repeats, device=device)
        scores = [sensitivity_score(p, g) for p, g in zip(params, grads)]
        chosen = [select_top_k(s, s.numel() // 2) for s in scores]
        score_t = median_seconds(
            lambda: [sensitivity_score(p, g) for p, g in zip(params, grads)], repeats,
            device=device)
        check_t = median_seconds(
            lambda: [(p.sum(), g.sum(dtype=torch.float32)) for p, g in zip(params, grads)],
            repeats, device=device)
        select_t = median_seconds(
            lambda: [select_top_k(s, s.numel() // 2) for s in scores], repeats,
            device=device)
        apply_t = median_seconds(
            lambda: [apply_selection_([p, *lips.optimizer.state_tensors(p)], s, c)
                     for p, s, c in zip(params, scores, chosen)],
            repeats, setup=lambda: restore(lips, originals, state), device=device)
    parts = {"finite checks": check_t, "score": score_t, "selection": select_t,
             "mask weight+momentum": apply_t}
    return "phases (x FedAvg): " + ", ".join(f"{k} {v / fed:.2f}" for k, v in parts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat")
    add_device_argument(parser)
    args = parser.parse_args()
    device = args.device
    single_thread()
    quick = args.quick
    repeats = 1 if quick else 5
    gpt2 = gpt2_shapes(1 if quick else 12)
    resnet = resnet50_shapes(1 if quick else 4)
    densities = (0.5,) if quick else (0.3, 0.5, 0.9)
    rows, gpt2_ratios = measure("GPT-2 small blocks", gpt2, densities, repeats, not quick,
                                device)
    more, _ = measure("ResNet-50 convs", resnet, densities, repeats, not quick, device)
    header = ["tensors", "d", "FedAvg ms", "mask ms", "mask/FedAvg",
              "topk/FedAvg", "kthvalue/FedAvg", "sort/FedAvg"]
    print(f"{describe(device)}; {sum(map(_numel, gpt2)) / 1e6:.1f}M GPT-2 entries, "
          f"{sum(map(_numel, resnet)) / 1e6:.1f}M ResNet-50 entries; medians of {repeats}")
    print(table(header, rows + more))
    if not quick:
        print(phases(gpt2, repeats, device))
    print(f"mask/fedavg ratio: {gpt2_ratios[0.5]:.2f}")


def _numel(shape: Tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


if __name__ == "__main__":
    main()
