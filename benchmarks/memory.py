"""Bytes LIPS keeps per client, as a share of the bytes of the parameters it masks.

LIPS keeps one gradient per eligible parameter (in ``grad_dtype``) and a few
integers; both are measured from the objects themselves after a training step: the
captured buffers' ``nbytes`` and the size of ``torch.save(lips.state_dict())``.

Run: ``python benchmarks/memory.py`` (``--quick`` for a smoke run, ``--device cuda``
for a model on a GPU: the gradients are then kept on the GPU, or with
``LIPSConfig(grad_device="cpu")`` in pinned host memory, both shown).
Last line: ``memory ratio: X`` (float16 gradients, the largest share over the float32
models; with 16-bit weights a 16-bit gradient is as large as the weight, share 1).
"""

from __future__ import annotations

import argparse
import io

import timm
import torch
from timing import add_device_argument, describe, single_thread, table
from torch import nn
from tqdm import tqdm

from lips_wrap import LIPS, LIPSConfig

MODELS = {
    "resnet18": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
    "vit_tiny": lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64),
    "resnet18 bf16 weights": lambda: timm.create_model(
        "resnet18", pretrained=False, num_classes=10).to(torch.bfloat16),
}


def measure(build, grad_dtype: torch.dtype, device: torch.device, grad_device=None):
    torch.manual_seed(0)
    model = build().to(device)
    dtype = next(model.parameters()).dtype
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.01),
                LIPSConfig(total_rounds=10, grad_dtype=grad_dtype, grad_device=grad_device))
    images = torch.randn(2, 3, 64, 64, dtype=dtype).to(device)
    labels = torch.tensor([0, 1], device=device)
    nn.functional.cross_entropy(model(images).float(), labels).backward()
    lips.optimizer.step()
    masked = [model.get_parameter(name) for name in lips.plan.eligible_names]
    masked_bytes = sum(p.nelement() * p.element_size() for p in masked)
    kept = sum(lips.optimizer.captured_grad(p).nbytes for p in masked)
    buffer = io.BytesIO()
    torch.save(lips.state_dict(), buffer)
    return masked_bytes, kept, buffer.getbuffer().nbytes, dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, float16 only")
    add_device_argument(parser)
    args = parser.parse_args()
    single_thread()
    models = list(MODELS)[:1] if args.quick else list(MODELS)
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16, torch.float32]
    # on a GPU, the gradients beside the weights and in pinned host memory
    places = [None, "cpu"] if args.device.type == "cuda" else [None]
    rows, fp16_ratios = [], []
    for name in tqdm(models, desc="models", leave=False):
        for dtype in dtypes:
            for place in places:
                masked, kept, saved, weights = measure(MODELS[name], dtype, args.device, place)
                if dtype == torch.float16 and weights == torch.float32:
                    fp16_ratios.append(kept / masked)
                rows.append([name, str(dtype).replace("torch.", ""),
                             place or str(args.device), f"{masked / 2**20:.1f}",
                             f"{kept / 2**20:.1f}", f"{kept / masked:.3f}",
                             f"{saved / masked:.3f}"])
    print(describe(args.device))
    print(table(["model", "grad_dtype", "kept on", "masked MiB", "kept MiB", "kept/masked",
                 "state_dict/masked"], rows))
    print(f"memory ratio: {max(fp16_ratios):.3f}")


if __name__ == "__main__":
    main()
