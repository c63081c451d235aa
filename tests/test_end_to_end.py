"""A short federated run: 4 clients, 8 rounds, FedAvg + LIPS with one shared LIPS object."""

import copy

import numpy as np
import torch
from conftest import MIDDLE, SmallCNN

from lips_wrap import LIPS, LIPSConfig, density_at
from lips_wrap.integrations.custom import dirichlet_split, fedavg, local_train
from lips_wrap.masking import keep_count


def test_federated_run_masks_exactly_on_mask_rounds():
    torch.manual_seed(0)
    x = torch.randn(120, 1, 6, 6)
    y = torch.randint(0, 3, (120,))
    clients = dirichlet_split(y, 4, alpha=0.5, seed=0, min_samples=10)
    model = SmallCNN()
    config = LIPSConfig(total_rounds=8, period=3, start_density=0.4)
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), config)
    states = [lips.state_dict() for _ in clients]
    global_state = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    seen = []
    for rnd in range(config.total_rounds):
        uploads = []
        for cid, idx in enumerate(clients):
            model.load_state_dict(global_state)
            lips.optimizer.state.clear()
            lips.load_state_dict(states[cid])
            report = lips.on_global_model(rnd)
            density = density_at(rnd, config)
            for name, tensor in model.state_dict().items():
                if name in MIDDLE and density is not None:
                    # at most k entries survive (a kept entry may be 0 already: dead units;
                    # exact counts on dense weights are in test_lips.py)
                    kept = tensor != 0
                    assert int(kept.sum()) <= keep_count(tensor.numel(), density)
                    assert torch.equal(tensor[kept], global_state[name][kept])
                else:
                    assert torch.equal(tensor, global_state[name])
            assert report.fallback == ()  # every client trained before the first mask
            seen.append((rnd, report.masked))
            idx_t = torch.as_tensor(idx)
            local_train(model, lips.optimizer, x[idx_t], y[idx_t], 1, 16, generator)
            states[cid] = lips.state_dict()
            uploads.append(copy.deepcopy(model.state_dict()))
        global_state = fedavg(uploads, [len(i) for i in clients])
    masked_rounds = sorted({r for r, m in seen if m})
    assert masked_rounds == [1, 4, 7]
    assert np.isfinite([v.float().sum().item() for v in global_state.values()]).all()
