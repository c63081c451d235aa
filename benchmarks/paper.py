"""The paper's own setups: CIFAR-10 with VGG11-bn and CIFAR-100 with ResNet-8.

Data: the standard python-version CIFAR folders (``cifar-10-batches-py/`` with
``data_batch_1`` .. ``data_batch_5`` and ``test_batch``; ``cifar-100-python/`` with
``train`` and ``test``: pickled dicts of uint8 images and labels), read directly, so a
miniature folder in the same format works too (torchvision's classes would also check the
official checksums). Nothing is downloaded: point ``--data-dir`` at the folder holding them.

Split, as the authors' code samples it: every client draws class proportions from
Dirichlet(alpha) over all classes and gets exactly ``samples_per_client`` training images
(``round(n * p_c)`` of each class but the last, which takes the remainder), drawn from
that class's images; clients draw independently, so two clients may share an image.
Its personalized test set is drawn the same way from the test images, with the same
proportions and ``test_per_client`` images.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CLASSES = {"cifar10": 10, "cifar100": 100}
# per-channel mean and std of the CIFAR training images, on [0, 1] pixel values
MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}

PROTOCOL = {"clients": 100, "samples_per_client": 100, "test_per_client": 400,
            "alpha": 0.1, "rounds": 300, "epochs": 5, "batch_size": 100, "lr": 0.1,
            "momentum": 0.9, "period": 5, "finetune_epochs": 5}
"""The paper's protocol: all clients every round, SGD with fresh state each round, no
weight decay, no augmentation; a final ``finetune_epochs`` of local training per client."""

SETUPS = {
    "paper-cifar10-vgg11": {"task": "cifar10", "model": "vgg11-reference", "classes": 10,
                            "density": 0.5},
    "paper-cifar100-resnet8": {"task": "cifar100", "model": "resnet8-reference",
                               "classes": 100, "density": 0.3},
}
"""Dataset, model and the paper's start density for each setup."""

SMOKE = {"clients": 2, "samples_per_client": 20, "test_per_client": 20, "rounds": 2,
         "epochs": 1, "batch_size": 10, "finetune_epochs": 1, "seeds": 1,
         "ablation_seeds": 1}
"""``--smoke``: end to end in seconds on a miniature folder."""


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def _images(batch: dict) -> np.ndarray:
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)


def load_cifar(data_dir: Path, task: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray,
                                                   np.ndarray]:
    """(train images, train labels, test images, test labels) of CIFAR-10 or -100, images
    as uint8 arrays N x 3 x 32 x 32 and labels as int64, from the python-version folder
    inside ``data_dir``."""
    if task not in FOLDERS:
        raise ValueError(f"unknown dataset {task!r}; accepted: {', '.join(FOLDERS)}")
    folder = Path(data_dir) / FOLDERS[task]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no {FOLDERS[task]}/ in {data_dir}: expected the python version of {task} "
            f"extracted there ({folder})")
    if task == "cifar10":
        names, key = [f"data_batch_{i}" for i in range(1, 6)], b"labels"
        train = [_unpickle(folder / name) for name in names]
        test = _unpickle(folder / "test_batch")
        x_train = np.concatenate([_images(b) for b in train])
        y_train = np.concatenate([np.asarray(b[key]) for b in train])
    else:
        key = b"fine_labels"
        batch = _unpickle(folder / "train")
        x_train, y_train = _images(batch), np.asarray(batch[key])
        test = _unpickle(folder / "test")
    return (x_train, y_train.astype(np.int64), _images(test),
            np.asarray(test[key]).astype(np.int64))


def normalise(images: np.ndarray, task: str) -> torch.Tensor:
    """uint8 images to float32, scaled to [0, 1] and standardised per channel."""
    x = torch.from_numpy(images).float().div_(255.0)
    mean = torch.tensor(MEAN[task]).view(1, 3, 1, 1)
    std = torch.tensor(STD[task]).view(1, 3, 1, 1)
    return (x - mean) / std


def synthetic(task: str, train_n: int, test_n: int, seed: int = 0):
    """Random images shaped like ``task``'s, labels cycling through every class (for
    timing runs without the data)."""
    rng = np.random.default_rng(seed)
    classes = CLASSES[task]
    return (rng.integers(0, 256, (train_n, 3, 32, 32), dtype=np.uint8),
            np.arange(train_n, dtype=np.int64) % classes,
            rng.integers(0, 256, (test_n, 3, 32, 32), dtype=np.uint8),
            np.arange(test_n, dtype=np.int64) % classes)


def class_proportions(clients: int, classes: int, alpha: float,
                      rng: np.random.Generator) -> np.ndarray:
    """clients x classes label proportions, each row drawn from Dirichlet(alpha)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return rng.dirichlet(np.full(classes, alpha), clients)


def class_counts(proportions: Sequence[float], total: int) -> np.ndarray:
    """How many of ``total`` images of each class a client gets: ``round(total * p)`` for
    every class but the last, capped by what is left, the last takes the remainder."""
    counts, left = [], total
    for index, share in enumerate(proportions):
        take = left if index == len(proportions) - 1 else min(int(total * share + 0.5), left)
        counts.append(max(take, 0))
        left -= counts[-1]
    return np.asarray(counts, dtype=np.int64)


def sample_clients(labels: np.ndarray, proportions: np.ndarray, per_client: int,
                   rng: np.random.Generator) -> List[np.ndarray]:
    """Each client's indices: ``class_counts`` images of each class, drawn without
    replacement from that class (with replacement if it has too few)."""
    by_class = [np.flatnonzero(labels == c) for c in range(proportions.shape[1])]
    clients = []
    for row in proportions:
        picked = [rng.choice(by_class[c], n, replace=n > by_class[c].size)
                  for c, n in enumerate(class_counts(row, per_client)) if n > 0]
        clients.append(np.concatenate(picked).astype(np.int64))
    return clients


def paper_split(y_train: np.ndarray, y_test: np.ndarray, setup: dict, seed: int):
    """Training and personalized test indices of every client (module docstring)."""
    rng = np.random.default_rng(seed)
    proportions = class_proportions(setup["clients"], setup["classes"], setup["alpha"], rng)
    train = sample_clients(y_train, proportions, setup["samples_per_client"], rng)
    tests = sample_clients(y_test, proportions, setup["test_per_client"], rng)
    return train, tests


def load_paper_task(setup: dict, seed: int):
    """Inputs, labels and per-client indices, as ``reproduce.load_task`` returns them:
    training images first, then the test images (test indices offset accordingly)."""
    if setup.get("synthetic"):
        per_train = setup["clients"] * setup["samples_per_client"]
        classes = setup["classes"]
        arrays = synthetic(setup["task"], max(per_train, classes),
                           max(per_train // 5, classes), seed)
    else:
        if not setup.get("data_dir"):
            raise ValueError(f"setup {setup['name']} needs --data-dir (the folder holding "
                             f"{FOLDERS[setup['task']]}/)")
        arrays = load_cifar(Path(setup["data_dir"]), setup["task"])
    x_train, y_train, x_test, y_test = arrays
    train, tests = paper_split(y_train, y_test, setup, seed)
    x = torch.cat([normalise(x_train, setup["task"]), normalise(x_test, setup["task"])])
    y = torch.from_numpy(np.concatenate([y_train, y_test]))
    offset = len(y_train)
    return x, y, train, [t + offset for t in tests]


def write_miniature(root: Path, task: str, per_class_train: int = 3,
                    per_class_test: int = 2, seed: int = 0) -> Path:
    """A tiny CIFAR folder in the real pickled format under ``root`` (for tests and
    ``--smoke``); returns ``root``."""
    rng = np.random.default_rng(seed)
    classes = CLASSES[task]
    folder = Path(root) / FOLDERS[task]
    folder.mkdir(parents=True, exist_ok=True)

    def batch(per_class: int, key: bytes) -> dict:
        labels = np.repeat(np.arange(classes), per_class)
        data = rng.integers(0, 256, (labels.size, 3 * 32 * 32), dtype=np.uint8)
        return {b"data": data, key: labels.tolist()}

    def dump(name: str, content: dict) -> None:
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle)

    if task == "cifar10":
        for i in range(1, 6):
            dump(f"data_batch_{i}", batch(per_class_train, b"labels"))
        dump("test_batch", batch(per_class_test, b"labels"))
    else:
        dump("train", batch(per_class_train, b"fine_labels"))
        dump("test", batch(per_class_test, b"fine_labels"))
    return Path(root)
