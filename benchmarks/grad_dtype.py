"""Which dtype should the stored gradient ``g`` have? Rank agreement with float32.

LIPS keeps the last-step gradient of every eligible tensor in ``grad_dtype`` and keeps
the entries with the largest ``|g * W|``. This trains two models in float32 and, at
several points, takes the last step's float32 gradients: for each candidate dtype it
stores them as LIPS would (``g.to(dtype)``) and counts

- ``flushed``: share of the non-zero gradients that the dtype turns into 0;
- ``subnormal``: share that become subnormal (float16 below 6.1e-5: few mantissa bits);
- ``differ``: entries kept at density 0.5 by the float32 gradient but not by the
  stored one (the masks are computed with the library's own score and selection),
  as a share of the kept entries, over all eligible tensors; ``worst`` is the largest
  count in one tensor.

Models: a BatchNorm ResNet-8 (widths 16/32/64) trained with SGD (lr 0.1, momentum
0.9) on generated 32x32 shapes, and a small BERT built from its config (2 layers,
hidden 256: 65,536-entry attention matrices) fine-tuned with AdamW (lr 5e-5) on a
learnable token task. Gradients shrink as a model converges (a fine-tuned model's
can be far smaller than these), so the last checkpoint of each model is also scored
with its gradients scaled by 0.1 and 0.01 (``scale``): the float32 ranking, and
bfloat16's, do not depend on the scale; float16's does. Nothing is downloaded.

Run: ``OMP_NUM_THREADS=1 python benchmarks/grad_dtype.py`` (``--quick``: fewer steps).
Last line: ``bfloat16/float16 differ ratio: X`` on the BERT's last checkpoint at scale
0.01 (below 1: bfloat16 ranks closer to float32).
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from models import ResNet8
from timing import single_thread, table
from torch import nn

from lips_wrap import find_layers
from lips_wrap.data import make_shapes
from lips_wrap.masking import keep_count, keep_mask, sensitivity_score

DTYPES = (torch.float16, torch.bfloat16)
DENSITY = 0.5
SCALES = (1.0, 0.1, 0.01)
"""Scales of the last checkpoint's gradients (smaller gradients, same ranking)."""
Snapshot = Dict[str, Tuple[torch.Tensor, torch.Tensor]]
"""Eligible name -> (weight, float32 last-step gradient)."""


def compare(snapshot: Snapshot, dtype: torch.dtype) -> Dict[str, float]:
    """Flushed, subnormal and top-k differences of ``dtype`` against float32."""
    nonzero = flushed = subnormal = kept = differ = worst = 0
    tiny = torch.finfo(dtype).tiny
    for weight, grad in snapshot.values():
        stored = grad.to(dtype)
        is_nonzero = grad != 0
        nonzero += int(is_nonzero.sum())
        flushed += int((is_nonzero & (stored == 0)).sum())
        subnormal += int(((stored != 0) & (stored.abs() < tiny)).sum())
        k = keep_count(weight.numel(), DENSITY)
        exact = keep_mask(sensitivity_score(weight, grad), k)
        rounded = keep_mask(sensitivity_score(weight, stored), k)
        count = int((exact & ~rounded).sum())
        kept, differ, worst = kept + k, differ + count, max(worst, count)
    return {"flushed": flushed / nonzero, "subnormal": subnormal / nonzero,
            "differ": differ / kept, "worst": worst}


def snapshot(model: nn.Module, names: Sequence[str]) -> Snapshot:
    return {name: (model.get_parameter(name).detach().clone(),
                   model.get_parameter(name).grad.detach().clone()) for name in names}


def train(model: nn.Module, optimizer: torch.optim.Optimizer,
          batches: Callable[[], Iterator[Tuple[dict, torch.Tensor]]],
          checkpoints: Sequence[int]) -> Iterator[Tuple[int, Snapshot]]:
    """Train in float32; at each checkpoint step yield the last step's snapshot."""
    names = find_layers(model).eligible_names
    step = 0
    while step < checkpoints[-1]:
        for inputs, targets in batches():
            optimizer.zero_grad()
            logits = model(**inputs)
            logits = getattr(logits, "logits", logits)
            nn.functional.cross_entropy(logits, targets).backward()
            optimizer.step()
            step += 1
            if step in checkpoints:
                yield step, snapshot(model, names)
            if step == checkpoints[-1]:
                return


def cnn(steps: Sequence[int]) -> Iterator[Tuple[int, Snapshot]]:
    torch.manual_seed(0)
    model = ResNet8(3, 10)
    images, labels = make_shapes(400, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def batches():
        order = torch.randperm(len(labels))
        for start in range(0, len(order), 50):
            index = order[start:start + 50]
            yield {"x": images[index]}, labels[index]

    return train(model, optimizer, batches, steps)


def bert(steps: Sequence[int]) -> Iterator[Tuple[int, Snapshot]]:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=500, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 500, (256, 32), generator=generator)
    labels = ids[:, 1] % 3  # learnable from one token: the loss (and |g|) falls
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)

    def batches():
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 16):
            index = order[start:start + 16]
            yield {"input_ids": ids[index]}, labels[index]

    return train(model, optimizer, batches, steps)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    args = parser.parse_args(argv)
    single_thread()
    runs = {
        "ResNet-8 (SGD)": (cnn, (1, 4) if args.quick else (1, 50, 200)),
        "BERT 2x256 (AdamW)": (bert, (1, 4) if args.quick else (1, 100, 400)),
    }
    rows, last = [], {}
    for label, (run, steps) in runs.items():
        for step, snap in run(steps):
            for scale in SCALES if step == steps[-1] else (1.0,):
                scaled = {name: (w, g * scale) for name, (w, g) in snap.items()}
                magnitudes = torch.cat([g.abs().flatten() for _, g in scaled.values()])
                for dtype in DTYPES:
                    found = compare(scaled, dtype)
                    last[dtype] = found
                    rows.append([label, str(step), f"{scale:g}",
                                 f"{float(magnitudes.median()):.1e}",
                                 str(dtype).split(".")[1], f"{found['flushed']:.2%}",
                                 f"{found['subnormal']:.2%}", f"{found['differ']:.3%}",
                                 str(found["worst"])])
    print(table(["model", "step", "scale", "median |g|", "dtype", "flushed", "subnormal",
                 "differ", "worst"], rows))
    ratio = last[torch.bfloat16]["differ"] / max(last[torch.float16]["differ"], 1e-12)
    print(f"bfloat16/float16 differ ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
