"""Pieces shared by the trainer tests and the scripts torchrun launches from them: tiny data sets,
trainers, and the checks (frozen bit-identical, trained moved, optimizer owns the trainable half)."""

from __future__ import annotations

import contextlib
import os

import torch

from hft_plugin.testing import assert_frozen_and_trained

TEXTS = [
    "the cat sat on the mat.", "a dog ran in the park!", "birds sing at dawn.", "rain falls on the roof.",
    "the sun is hot today.", "fish swim in the sea.", "we read books at night.", "snow is cold and white.",
]


def lm_dataset(tokenizer, n: int = 16):
    from datasets import Dataset

    rows = []
    for i in range(n):
        ids = tokenizer(TEXTS[i % len(TEXTS)])["input_ids"][:24]
        rows.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids)})
    return Dataset.from_list(rows)


def sft_dataset(n: int = 16):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"q{i}: ", "completion": TEXTS[i % len(TEXTS)]} for i in range(n)])


def dpo_dataset(n: int = 16):
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": f"q{i}: ", "chosen": TEXTS[i % len(TEXTS)], "rejected": TEXTS[(i + 3) % len(TEXTS)][::-1]}
        for i in range(n)
    ])


def collate(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def train_args(output_dir, **overrides):
    """TrainingArguments that make every step move every trainable tensor: a high learning rate,
    no warm-up, weight decay on (so frozen tensors would move if the optimizer held them)."""
    from transformers import TrainingArguments

    values = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                  lr_scheduler_type="constant", weight_decay=0.1, logging_steps=1, save_strategy="no",
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArguments(**values)


@contextlib.contextmanager
def full_parameters(model):
    """All of ``model``'s parameters in full, under ZeRO-3 too (gathered for reading)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def snapshot(model) -> dict[str, torch.Tensor]:
    with full_parameters(model):
        return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def optimizer_params(trainer) -> list[torch.nn.Parameter]:
    """The model parameters the trainer's optimizer owns, whatever built it (ZeRO included)."""
    engine_optimizer = getattr(trainer.model_wrapped, "optimizer", None)
    for attr in ("bit16_groups", "fp16_groups"):
        groups = getattr(engine_optimizer, attr, None)
        if groups:
            return [p for group in groups for p in group]
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_params(trainer) -> int:
    """How many tensors the (plain torch) optimizer holds state for."""
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return len(optimizer.state)


def check_training(selection, before, after, trainer, handle) -> dict:
    """Frozen elements bit-identical, trainable ones moved, and the optimizer owns exactly the
    trainable tensors. Returns what was checked; raises AssertionError on the first failure."""
    counts = assert_frozen_and_trained(selection, before, after)
    owned = {id(p) for p in optimizer_params(trainer)}
    expected = {id(p) for p in handle.parameters()}
    assert owned == expected, f"optimizer owns {len(owned)} tensors, the trainable half is {len(expected)}"
    counts["optimizer_tensors"] = len(owned)
    counts["trainable_tensors"] = len(expected)
    counts["optimizer_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in optimizer_params(trainer))
    return counts


def rank() -> int:
    return int(os.environ.get("RANK", "0"))
