"""LIPSCallback with transformers.Trainer: tiny BERT- and GPT-2-style models trained
federatedly for several rounds, one Trainer.train() per client and round."""

from __future__ import annotations

import copy
import os
from typing import Callable, Dict, List, Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lips_wrap import LIPS, LIPSConfig, density_at  # noqa: E402
from lips_wrap.integrations.custom import fedavg  # noqa: E402
from lips_wrap.integrations.hf import LIPSCallback  # noqa: E402
from lips_wrap.masking import keep_count  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, LENGTH = 48, 12


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=LENGTH, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                                     n_positions=LENGTH)
    return transformers.GPT2LMHeadModel(config)


def dataset(kind: str, size: int, seed: int) -> List[Dict[str, torch.Tensor]]:
    """Random token sequences; classification labels or next-token targets."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, LENGTH), generator=generator)
    rows = []
    for row in ids:
        item = {"input_ids": row, "attention_mask": torch.ones_like(row)}
        item["labels"] = row.clone() if kind == "lm" else row[0] % 3
        rows.append(item)
    return rows


class Probe(transformers.TrainerCallback):
    """Runs after LIPSCallback: records the weights training starts from, and counts
    optimizer steps."""

    def __init__(self) -> None:
        self.starts: List[Dict[str, torch.Tensor]] = []
        self.steps: List[int] = []
        self.optimizer_states: List[int] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.starts.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self.optimizer_states.append(len(optimizer.state))
        self.steps.append(0)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.steps[-1] += 1


def training_args(tmp_path, **extra) -> "transformers.TrainingArguments":
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    options.update(extra)
    return transformers.TrainingArguments(**options)


def federate(
    model: torch.nn.Module,
    kind: str,
    config: LIPSConfig,
    tmp_path,
    clients: int = 2,
    args: Optional[dict] = None,
    on_round: Optional[Callable[[int, LIPSCallback], None]] = None,
) -> tuple:
    """A FedAvg(+LIPS) simulation through Trainer: one model, Trainer and callback.

    Returns (lips, callback, probe, loaded): ``loaded[i]`` holds the global weights
    loaded before the i-th train() call, ``probe.starts[i]`` what training began from.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    lips = LIPS(model, torch.optim.AdamW(trainable, lr=1e-2), config)
    callback, probe = LIPSCallback(lips), Probe()
    data = [dataset(kind, 10, seed=cid) for cid in range(clients)]
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path, **(args or {})), train_dataset=data[0],
        optimizers=(lips.optimizer, None), callbacks=[callback, probe])
    global_state = copy.deepcopy(model.state_dict())
    loaded = []
    for rnd in range(config.total_rounds):
        uploads = []
        for cid in range(clients):
            model.load_state_dict(global_state)
            loaded.append({n: p.detach().clone() for n, p in model.named_parameters()})
            callback.start_round(rnd, client=cid)
            trainer.train_dataset = data[cid]
            trainer.train()
            uploads.append(copy.deepcopy(model.state_dict()))
        global_state = fedavg(uploads, [1.0] * clients)
        if on_round is not None:
            on_round(rnd, callback)
    return lips, callback, probe, loaded


def assert_masks(lips: LIPS, callback: LIPSCallback, probe: Probe, loaded: list,
                 config: LIPSConfig, clients: int = 2) -> int:
    """Mask rounds: each eligible tensor keeps exactly int(d * numel) of the loaded
    entries, the rest are zero; other tensors and non-mask rounds are untouched.
    Returns the number of mask rounds seen."""
    eligible = set(lips.plan.eligible_names)
    masked_rounds = 0
    for call, (start, before, report) in enumerate(zip(probe.starts, loaded, callback.reports)):
        rnd = call // clients
        density = density_at(rnd, config)
        assert report.round == rnd and report.density == density
        for name, weight in start.items():
            if density is None or name not in eligible:
                assert torch.equal(weight, before[name]), (rnd, name)
                continue
            assert before[name].count_nonzero() == weight.numel(), name  # precondition
            kept = int(density * weight.numel())
            assert int(weight.count_nonzero()) == kept, (rnd, name)
            nonzero = weight != 0
            assert torch.equal(weight[nonzero], before[name][nonzero])
        masked_rounds += density is not None and call % clients == 0
    return masked_rounds


CONFIG = LIPSConfig(total_rounds=4, period=2, start_density=0.5)  # masks rounds 1 and 3


def test_bert_trainer_masks_exact_counts(tmp_path):
    lips, callback, probe, loaded = federate(tiny_bert(), "cls", CONFIG, tmp_path)
    assert lips.plan.eligible_names and all(".encoder.layer." in n
                                            for n in lips.plan.eligible_names)
    assert assert_masks(lips, callback, probe, loaded, CONFIG) == 2
    assert [r.masked for r in callback.reports] == [False] * 2 + [True] * 2 + [False] * 2 \
        + [True] * 2
    assert not any(r.fallback for r in callback.reports)  # gradients kept per client
    grads = [callback.client_state(cid)["grads"] for cid in (0, 1)]
    name = lips.plan.eligible_names[0]
    assert not torch.equal(grads[0][name], grads[1][name])  # each client its own state


def test_trainer_path_keeps_the_largest_gradient_times_weight(tmp_path):
    """Round 1's mask keeps, per tensor and client, the int(d * numel) entries with the
    largest |g * W|: g the client's own last-step gradient of round 0 (as stored, in
    grad_dtype), W the global weights loaded before round 1."""
    stored = {}

    def keep_round_0_grads(rnd, callback):
        if rnd == 0:
            stored.update({cid: dict(callback.client_state(cid)["grads"]) for cid in (0, 1)})

    lips, callback, probe, loaded = federate(tiny_bert(), "cls", CONFIG, tmp_path,
                                             on_round=keep_round_0_grads)
    density = density_at(1, CONFIG)
    for cid in (0, 1):
        start, before = probe.starts[2 + cid], loaded[2 + cid]
        for name in lips.plan.eligible_names:
            score = (stored[cid][name].float() * before[name]).abs()
            kept = start[name] != 0
            assert int(kept.sum()) == keep_count(kept.numel(), density), (cid, name)
            assert score[kept].min() >= score[~kept].max(), (cid, name)


def test_gpt2_trainer_masks_exact_counts(tmp_path):
    lips, callback, probe, loaded = federate(tiny_gpt2(), "lm", CONFIG, tmp_path)
    names = lips.plan.eligible_names
    assert {n.split(".")[-2] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert "lm_head.weight" not in names and "transformer.wte.weight" not in names
    assert assert_masks(lips, callback, probe, loaded, CONFIG) == 2


def test_gradient_accumulation(tmp_path):
    lips, callback, probe, loaded = federate(
        tiny_bert(), "cls", CONFIG, tmp_path, args={"gradient_accumulation_steps": 2})
    assert probe.steps == [2] * 8  # 10 samples, batch 4: 3 batches, 2 optimizer steps
    assert assert_masks(lips, callback, probe, loaded, CONFIG) == 2
    assert not any(r.fallback for r in callback.reports)


def test_lora_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if not p.requires_grad}
    lips, callback, probe, loaded = federate(model, "cls", CONFIG, tmp_path)
    names = lips.plan.eligible_names
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert assert_masks(lips, callback, probe, loaded, CONFIG) == 2
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name  # base weights never masked


def test_errors(tmp_path):
    model = tiny_bert()
    lips = LIPS(model, torch.optim.SGD(model.parameters(), lr=0.1), CONFIG)
    callback = LIPSCallback(lips)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path),
                                   train_dataset=dataset("cls", 4, 0),
                                   optimizers=(lips.optimizer, None), callbacks=[callback])
    with pytest.raises(RuntimeError, match="start_round"):
        trainer.train()
    other = tiny_bert()
    lips_other = LIPS(other, torch.optim.SGD(other.parameters(), lr=0.1), CONFIG)
    wrong_callback = LIPSCallback(lips_other)
    wrong = transformers.Trainer(model=other, args=training_args(tmp_path),
                                 train_dataset=dataset("cls", 4, 0), callbacks=[wrong_callback])
    wrong_callback.start_round(0)
    with pytest.raises(ValueError, match="optimizers=\\(lips.optimizer, None\\)"):
        wrong.train()
    callback.start_round(0)
    callback.start_round(0)  # a retry of the same round is allowed
    with pytest.raises(RuntimeError, match="has not been trained: call trainer.train"):
        callback.start_round(1)
    with pytest.raises(TypeError, match="lips_wrap.LIPS"):
        LIPSCallback(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="client must be a hashable id"):
        LIPSCallback(lips).start_round(0, client=["a"])
    with pytest.raises(ValueError, match=r"round 4 is outside \[0, 4\)"):
        LIPSCallback(lips).start_round(4)


def one_client_round(tmp_path, callbacks, clients=(None,), rounds=(0,), lips=None):
    """A tiny BERT, its LIPS and a Trainer with ``callbacks(lips)``; trains the given
    (round, client) pairs in order. Returns (lips, callback, trainer)."""
    if lips is None:
        model = tiny_bert()
        lips = LIPS(model, torch.optim.AdamW(model.parameters(), lr=1e-2), CONFIG)
    callback = LIPSCallback(lips)
    trainer = transformers.Trainer(
        model=lips.model, args=training_args(tmp_path), train_dataset=dataset("cls", 4, 0),
        optimizers=(lips.optimizer, None), callbacks=callbacks(callback))
    for rnd in rounds:
        for client in clients:
            callback.start_round(rnd, client=client)
            trainer.train()
    return lips, callback, trainer


def test_a_second_client_without_client_id_names_start_round_with_client(tmp_path):
    lips, callback, _ = one_client_round(tmp_path, lambda c: [c])
    before = {n: p.detach().clone() for n, p in lips.model.named_parameters()}
    # a second client of round 0, declared without client=: refused at once, with the fix
    with pytest.raises(ValueError, match=r"client None has already trained round 0.*"
                                         r"start_round\(rnd, client=cid\)"):
        callback.start_round(0)
    assert all(torch.equal(p, before[n]) for n, p in lips.model.named_parameters())
    callback.start_round(0, client=1)  # named: accepted


def test_rounds_out_of_order_are_refused_at_start_round(tmp_path):
    lips, callback, _ = one_client_round(tmp_path, lambda c: [c], clients=(0,), rounds=(1,))
    with pytest.raises(ValueError, match=r"start_round\(0, client=0\): client 0 has already "
                                         r"trained round 1.*rnd > 1"):
        callback.start_round(0, client=0)
    with pytest.raises(ValueError, match="already trained round 1"):
        callback.start_round(1, client=0)


def test_callback_missing_from_the_trainer_is_named(tmp_path):
    """start_round, then train() without the callback in callbacks=: the next
    start_round says the callback is not registered (the round trained without LIPS)."""
    lips, callback, _ = one_client_round(tmp_path, lambda c: [], rounds=())
    trainer = transformers.Trainer(
        model=lips.model, args=training_args(tmp_path), train_dataset=dataset("cls", 4, 0),
        optimizers=(lips.optimizer, None))
    callback.start_round(0)
    trainer.train()
    assert callback.reports == []  # LIPS never ran
    with pytest.raises(RuntimeError, match=r"not registered with the Trainer.*took 1 step\(s\)"
                                           r".*callbacks=\[callback\]"):
        callback.start_round(1)


def test_a_skipped_round_is_accepted_and_its_mask_reported(tmp_path):
    config = LIPSConfig(total_rounds=4, period=1)  # masks rounds 1, 2, 3
    model = tiny_bert()
    lips = LIPS(model, torch.optim.AdamW(model.parameters(), lr=1e-2), config)
    _, callback, _ = one_client_round(tmp_path, lambda c: [c], rounds=(0, 2), lips=lips)
    assert [r.skipped for r in callback.reports] == [(), (1,)]
    assert callback.reports[1].masked and "skipped the mask of round(s) 1" in str(
        callback.reports[1])


def test_fresh_optimizer_state_and_state_dict(tmp_path):
    lips, callback, probe, _ = federate(tiny_bert(), "cls",
                                        LIPSConfig(total_rounds=2, period=1), tmp_path)
    assert probe.optimizer_states == [0, 0, 0, 0]  # cleared before every round
    assert len(lips.optimizer.state) > 0  # AdamW moments of the last client
    saved = callback.state_dict()
    assert set(saved["clients"]) == {0, 1}
    assert all(s["last_round"] == 1 for s in saved["clients"].values())
    restored = LIPSCallback(lips)
    restored.load_state_dict(saved)
    assert restored.client_state(1) is saved["clients"][1]
    assert restored.client_state("new")["last_round"] is None
    with pytest.raises(ValueError, match="a dict with a .clients. dict"):
        restored.load_state_dict({"grads": {}})


def test_fine_tuning_mode_returns_dropped_entries_to_the_reference(tmp_path):
    model = tiny_bert()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = LIPSConfig(total_rounds=4, period=2, reference="initial")
    lips, callback, probe, loaded = federate(model, "cls", config, tmp_path)
    assert "reference" in callback.client_state(0)
    for call, (start, before) in enumerate(zip(probe.starts, loaded)):
        density = density_at(call // 2, config)
        for name in lips.plan.eligible_names:
            if density is None:
                assert torch.equal(start[name], before[name])
                continue
            ref = initial[name]  # kept exactly, in the parameter's dtype
            assert bool((before[name] != ref).all()), name  # precondition
            changed = start[name] != before[name]
            assert int(changed.sum()) == start[name].numel() - int(density * ref.numel())
            assert torch.equal(start[name][changed], ref[changed])
            assert int(start[name].count_nonzero()) == start[name].numel()  # nothing zeroed


def test_compiled_model_keeps_its_plan(tmp_path):
    plain = tiny_bert()
    names = LIPS(plain, torch.optim.SGD(plain.parameters(), lr=0.1), CONFIG).plan.eligible_names
    compiled = torch.compile(tiny_bert(), backend="eager")
    # Trainer reads a compiled model's forward signature as (*args, **kwargs): keep columns
    lips, callback, probe, loaded = federate(compiled, "cls", CONFIG, tmp_path,
                                             args={"remove_unused_columns": False})
    assert list(lips.plan.eligible_names) == ["_orig_mod." + n for n in names]
    assert assert_masks(lips, callback, probe, loaded, CONFIG) == 2
