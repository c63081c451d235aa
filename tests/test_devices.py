"""LIPS on every device (issue 21): each test runs on the CPU here and on CUDA where a
GPU exists (the ``cuda`` half is marked ``cuda``: ``pytest -m cuda``, ``make gpu-check``).

Masks are exact on CUDA parameters of every dtype and layout and pick the entries a CPU
computes; wrapped training is bitwise bare training with fused/foreach optimizers,
autocast and GradScaler; gradients kept in pinned host memory are the ones a
synchronous copy keeps; states move between devices; the server side masks CUDA state
dicts as it masks CPU ones.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICES, MIDDLE, SmallCNN
from torch import nn

from lips_wrap import LIPS, LIPSConfig, find_layers, mask_global_state
from lips_wrap.masking import keep_count, keep_mask, sensitivity_score

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _deterministic():
    """cuDNN may pick non-deterministic kernels; bitwise comparisons need the same
    kernels and orders on both sides."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def make_model(device: str, dtype: torch.dtype = torch.float32,
               channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN().to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def make_optimizer(kind: str, params, impl: str = "forloop") -> torch.optim.Optimizer:
    options = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    if kind == "SGD":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, **options)
    # eps 1e-3: the default 1e-8 is zero in float16, and pure-fp16 Adam overflows
    return getattr(torch.optim, kind)(params, lr=1e-2, eps=1e-3, **options)


def train(model, optimizer, device, steps=2, dtype=torch.float32, channels_last=False,
          autocast=None, scaler=None, delay=False, seed=1):
    """``steps`` optimizer steps on random batches drawn on the CPU (the same on every
    device). ``autocast``: a dtype to autocast to; ``delay``: keep the GPU busy before
    each step so the host runs ahead of it."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 1, 6, 6, generator=generator).to(device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 3, (5,), generator=generator).to(device)
        if delay and torch.device(device).type == "cuda":
            torch.cuda._sleep(20_000_000)
        optimizer.zero_grad()
        with torch.autocast(torch.device(device).type, dtype=autocast,
                            enabled=autocast is not None):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def kept_grads(lips: LIPS):
    return {name: lips.optimizer.captured_grad(lips.model.get_parameter(name))
            for name in lips.plan.eligible_names}


# -- masks: exact counts, CPU's choice, zero state, exempt tensors untouched -------------

@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("device", DEVICES)
def test_masks_are_exact_and_match_the_cpu(device, dtype, channels_last, optimizer):
    model = make_model(device, dtype, channels_last)
    inner = make_optimizer(optimizer, model.parameters())
    lips = LIPS(model, inner, LIPSConfig(total_rounds=10, start_density=0.3))
    train(model, lips.optimizer, device, dtype=dtype, channels_last=channels_last)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    params = {name: model.get_parameter(name) for name in lips.plan.eligible_names}
    states = {name: [s.clone() for s in lips.optimizer.state_tensors(p)]
              for name, p in params.items()}
    # the entries a CPU keeps, from the same weights and kept gradients
    expected = {}
    for name, grad in kept_grads(lips).items():
        assert grad.device.type == torch.device(device).type, name
        score = sensitivity_score(before[name].cpu(), grad.cpu())
        expected[name] = keep_mask(score, keep_count(score.numel(), 0.3)).to(device)

    report = lips.on_global_model(1)

    assert set(params) == set(MIDDLE) and report.tensors_masked == len(MIDDLE)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == before[name].dtype and tensor.device == before[name].device
        if name not in params:
            assert torch.equal(tensor, before[name]), f"exempt {name} changed"
            continue
        keep = expected[name]
        assert int(keep.sum()) == int(0.3 * tensor.numel()), name
        assert torch.equal(tensor[keep], before[name][keep]), f"{name}: kept entries changed"
        assert not bool(tensor[~keep].any()), f"{name}: dropped entries are not zero"
        if channels_last and tensor.dim() == 4:
            assert tensor.is_contiguous(memory_format=torch.channels_last), name
        current = lips.optimizer.state_tensors(params[name])
        assert len(current) == len(states[name]) >= 1, name
        for state, old in zip(current, states[name]):
            assert not bool(state[~keep].any()), f"{name}: state not zero where dropped"
            assert torch.equal(state[keep], old[keep]), f"{name}: state changed where kept"


# -- wrapped training is bare training, bit for bit --------------------------------------

PRECISIONS = {
    "fp32": (None, False),
    "fp32-gradscaler": (None, True),
    "bf16-autocast": (torch.bfloat16, False),
    "fp16-autocast-gradscaler": (torch.float16, True),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("device", DEVICES)
def test_wrapped_training_is_bitwise_bare_training(device, optimizer, impl, precision):
    autocast, use_scaler = PRECISIONS[precision]
    model, twin = make_model(device), make_model(device)
    lips = LIPS(model, make_optimizer(optimizer, model.parameters(), impl),
                LIPSConfig(total_rounds=10))
    bare = make_optimizer(optimizer, twin.parameters(), impl)

    def scaler():
        if not use_scaler:
            return None
        return torch.amp.GradScaler(torch.device(device).type, init_scale=4096.0,
                                    growth_interval=1)

    train(model, lips.optimizer, device, steps=3, autocast=autocast, scaler=scaler())
    train(twin, bare, device, steps=3, autocast=autocast, scaler=scaler())
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
    for name, kept in kept_grads(lips).items():  # the unscaled gradient, in grad_dtype
        grad = twin.get_parameter(name).grad
        assert kept.dtype == lips.config.grad_dtype and kept.device == grad.device, name
        assert torch.allclose(kept.float(), grad.to(kept.dtype).float(), rtol=1e-2,
                              atol=1e-6), name


# -- gradients kept in (pinned) host memory -----------------------------------------------

@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "fused-gradscaler"])
@pytest.mark.parametrize("device", DEVICES)
def test_host_capture_keeps_what_a_synchronous_copy_keeps(device, scaled):
    """``grad_device="cpu"`` with the model on a GPU copies asynchronously into pinned
    buffers. Read right after a step, after steps that ran back to back, and after the
    gradients were overwritten, they hold what a copy beside the weights holds."""
    impl = "fused" if scaled else "forloop"
    sides = []
    for grad_device in ("cpu", None):
        model = make_model(device)
        lips = LIPS(model, make_optimizer("SGD", model.parameters(), impl),
                    LIPSConfig(total_rounds=10, grad_device=grad_device))
        scaler = (torch.amp.GradScaler(torch.device(device).type, init_scale=4096.0)
                  if scaled else None)
        # nothing reads between steps; the host runs ahead of the GPU
        train(model, lips.optimizer, device, steps=3, scaler=scaler, delay=True)
        right_after = {n: g.clone() for n, g in kept_grads(lips).items()}
        train(model, lips.optimizer, device, steps=2, scaler=scaler, delay=True, seed=2)
        model.zero_grad(set_to_none=False)  # gradients overwritten before any read
        nn.functional.cross_entropy(
            model(torch.randn(5, 1, 6, 6, device=device)), torch.zeros(5, dtype=torch.long,
                                                                       device=device)
        ).backward()
        sides.append((lips, right_after, kept_grads(lips)))
    (host, host_first, host_last), (_, beside_first, beside_last) = sides
    for name in MIDDLE:
        kept = host_last[name]
        assert kept.device == torch.device("cpu"), name
        assert kept.is_pinned() == (torch.device(device).type == "cuda"), name
        assert torch.equal(host_first[name], beside_first[name].cpu()), name
        assert torch.equal(kept, beside_last[name].cpu()), name
        assert not torch.equal(host_first[name], kept), name  # the later steps were kept
    # and a state taken now holds the same gradients
    state = host.state_dict()
    for name in MIDDLE:
        assert torch.equal(state["grads"][name], beside_last[name].cpu()), name



@pytest.mark.parametrize("device", DEVICES)
def test_score_of_a_cpu_weight_waits_for_its_gradient(device):
    """A non-blocking copy to the CPU returns before the data is there: the score of a
    CPU weight must not read a device gradient before its copy has finished."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 512, generator=generator)
    grad = torch.randn(512, 512, generator=generator).half()
    expected = (weight * grad.float()).abs()
    on_device = grad.to(device)
    if device == "cuda":
        torch.cuda._sleep(200_000_000)  # the copy queues behind a busy GPU
    assert torch.equal(sensitivity_score(weight, on_device), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_cpu_model_with_gradients_kept_on_the_device_masks_like_the_cpu(device):
    model = make_model("cpu")
    lips = LIPS(model, make_optimizer("SGD", model.parameters()),
                LIPSConfig(total_rounds=10, start_density=0.3, grad_device=device))
    train(model, lips.optimizer, "cpu")
    expected = {}
    for name, grad in kept_grads(lips).items():
        assert grad.device.type == device, name
        score = sensitivity_score(model.get_parameter(name).detach(), grad.cpu())
        expected[name] = keep_mask(score, keep_count(score.numel(), 0.3))
    lips.on_global_model(1)
    for name in MIDDLE:
        assert torch.equal(model.get_parameter(name) != 0, expected[name]), name

# -- state dicts between devices ---------------------------------------------------------

@pytest.mark.parametrize("grad_device", [None, "cpu"])
@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_moves_between_devices(device, grad_device):
    config = LIPSConfig(total_rounds=10, start_density=0.4, grad_device=grad_device)
    model = make_model(device)
    lips = LIPS(model, make_optimizer("SGD", model.parameters()), config)
    train(model, lips.optimizer, device)
    buffer = io.BytesIO()
    torch.save(lips.state_dict(), buffer)  # a checkpoint, read back on a CPU machine
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu")

    cpu_model = make_model("cpu")
    cpu_model.load_state_dict(model.state_dict())
    on_cpu = LIPS(cpu_model, make_optimizer("SGD", cpu_model.parameters()),
                  LIPSConfig(total_rounds=10, start_density=0.4))
    on_cpu.load_state_dict(state)
    back_model = make_model(device)
    back_model.load_state_dict(model.state_dict())
    back = LIPS(back_model, make_optimizer("SGD", back_model.parameters()), config)
    back.load_state_dict(on_cpu.state_dict())  # CPU tensors into a LIPS on the device

    original, cpu_grads, back_grads = kept_grads(lips), kept_grads(on_cpu), kept_grads(back)
    for name in MIDDLE:
        assert cpu_grads[name].device == torch.device("cpu"), name
        assert back_grads[name].device == original[name].device, name
        assert torch.equal(cpu_grads[name], original[name].cpu()), name
        assert torch.equal(back_grads[name], original[name]), name
    for each in (lips, on_cpu, back):
        assert each.on_global_model(1).tensors_masked == len(MIDDLE)
    for name in MIDDLE:
        weight = cpu_model.get_parameter(name)
        assert int(weight.count_nonzero()) == int(0.4 * weight.numel()), name
        assert torch.equal(model.get_parameter(name).cpu(), weight), name
        assert torch.equal(back_model.get_parameter(name).cpu(), weight), name


# -- the server side on device state dicts -----------------------------------------------

@pytest.mark.parametrize("previous_on", ["device", "cpu"])
@pytest.mark.parametrize("score", ["sensitivity", "magnitude", "random"])
@pytest.mark.parametrize("device", DEVICES)
def test_server_masks_device_state_dicts(device, score, previous_on):
    model = make_model("cpu")
    plan = find_layers(model)
    generator = torch.Generator().manual_seed(3)
    cpu_state = {k: v.clone() for k, v in model.state_dict().items()}
    cpu_previous = {k: v - 0.01 * torch.randn(v.shape, generator=generator)
                    if v.is_floating_point() else v for k, v in cpu_state.items()}
    state = {k: v.to(device) for k, v in cpu_state.items()}
    previous = {k: v.to(device if previous_on == "device" else "cpu")
                for k, v in cpu_previous.items()}
    untouched = {k: v.clone() for k, v in state.items()}
    config = LIPSConfig(total_rounds=10, start_density=0.3, score=score)

    masked, report = mask_global_state(state, previous, plan, 1, config)
    on_cpu, _ = mask_global_state(cpu_state, cpu_previous, plan, 1, config)

    assert report.tensors_masked == len(plan.eligible_names) == len(MIDDLE)
    assert report.fallback == ()
    for name, tensor in masked.items():
        assert torch.equal(state[name], untouched[name]), f"input {name} was modified"
        if name not in plan.eligible_names:
            assert tensor is state[name], name
            continue
        assert tensor.device == state[name].device and tensor.dtype == state[name].dtype
        kept = tensor != 0
        assert int(kept.sum()) == int(0.3 * tensor.numel()), name
        assert torch.equal(tensor[kept], state[name][kept]), name
        if score != "random":  # random draws come from the device's own generator
            assert torch.equal(tensor.cpu(), on_cpu[name]), f"{name}: not the CPU's mask"



# -- scripts/gpu_check.sh (make gpu-check) ------------------------------------------------

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"
STEPS = {  # step -> what its output must hold
    "torch": r"torch \S+ CUDA",
    "pytest-cuda": r"\d+ skipped",
    "mask_speed": r"mask/fedavg ratio: \d+\.\d+\n?$",
    "step_overhead": r"step overhead ratio: \d+\.\d+\n?$",
    "memory": r"memory ratio: \d+\.\d+\n?$",
    "slice-paper-cifar100-resnet8": r"slice paper-cifar100-resnet8: .+ / FedAvg time per round",
    "slice-paper-cifar10-vgg11": r"slice paper-cifar10-vgg11: .+ / FedAvg time per round",
}


def _gpu_check(tmp_path, *args, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=3600,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env})


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "out"
    done = _gpu_check(tmp_path, CUDA_VISIBLE_DEVICES="", OUT=str(out))
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) == 1 and "no GPU" in lines[0], lines
    assert not out.exists()  # nothing written
    wrong = _gpu_check(tmp_path, "--gpu")
    assert wrong.returncode == 2 and "unknown argument '--gpu'" in wrong.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """The whole script on the CPU at tiny sizes: the GPU run can fail only on what is
    truly CUDA-specific."""
    out = tmp_path / "out"
    done = _gpu_check(tmp_path, "--dry-run", GPU_CHECK_OUT=str(out), CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stdout[-3000:]
    summary = done.stdout.split("== summary (cpu, ")[1].splitlines()[1:]
    assert [line.split()[0] for line in summary] == list(STEPS)
    assert all(line.split()[1:3] == ["exit", "0"] for line in summary), summary
    log = (out / "gpu-check.log").read_text()
    for name, pattern in STEPS.items():
        text = (out / f"{name}.txt").read_text()
        assert re.search(pattern, text), f"{name}: {text[-1000:]}"
        assert text.strip().splitlines()[-1] in log, name  # the log holds every step
    for setup in ("paper-cifar100-resnet8", "paper-cifar10-vgg11"):
        stored = json.loads((out / "paper-slice" / f"{setup}-slice.json").read_text())
        arms = stored["seconds_per_round"]
        assert len(arms) == 2 and "FedAvg" in arms, setup
