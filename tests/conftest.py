import pytest
import torch
from torch import nn

CUDA_MISSING = (
    "needs a CUDA GPU: torch.cuda.is_available() is False here (make gpu-check runs "
    "these on a GPU machine)"
)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_MISSING),
    ]),
]
"""``@pytest.mark.parametrize("device", DEVICES)``: the CPU half always runs; the CUDA
half is marked ``cuda`` and skipped without a GPU."""


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class SmallCNN(nn.Module):
    """stem conv -> two middle convs (BN) -> hidden linear -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


MIDDLE = ("conv1.weight", "conv2.weight", "fc.weight")


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return SmallCNN()


def train_steps(model, optimizer, steps=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 1, 6, 6, generator=generator)
        y = torch.randint(0, 3, (5,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
