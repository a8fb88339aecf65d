"""Continual learning with Half Fine-Tuning: three tasks in a row, a new half each round.

Each task is a round (0, 1, 2): HFT trains half of the layers and freezes the other half, so what
the frozen half knows survives the round. After each task the script reports the loss on every
task seen so far. Runs on a CPU in about a minute with a tiny model (nothing downloads).

    python examples/continual.py [--family qwen2] [--output-dir /tmp/hft-continual]
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hft_plugin import enable_hft
from hft_plugin.testing import tiny_model, tiny_tokenizer

TASKS = {
    "counting": [f"{i} {i + 1} {i + 2} {i + 3}." for i in range(0, 60, 3)],
    "spelling": [" ".join(w) + f" = {w}." for w in ("cat", "dog", "sun", "map", "pen", "cup", "box", "hat")],
    "reversal": [f"{w} -> {w[::-1]}." for w in ("abc", "hello", "train", "model", "paper", "round", "half")],
}


def dataset(tokenizer, texts):
    return Dataset.from_list([{"input_ids": tokenizer(t)["input_ids"]} for t in texts * 4])


@torch.no_grad()
def loss_on(model, tokenizer, texts) -> float:
    model.eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**batch, labels=labels).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama")
    parser.add_argument("--steps", type=int, default=25, help="steps per task")
    parser.add_argument("--output-dir", default="/tmp/hft-continual")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    tokenizer = tiny_tokenizer()
    model = tiny_model(args.family)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    halves = []
    for round, (task, texts) in enumerate(TASKS.items()):
        out = os.path.join(args.output_dir, f"round{round}-{task}")
        training = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
                                     learning_rate=3e-3, save_strategy="no", report_to=[], use_cpu=True,
                                     logging_steps=args.steps, disable_tqdm=True)
        trainer = Trainer(model=model, args=training, train_dataset=dataset(tokenizer, texts), data_collator=collator)
        handle = enable_hft(trainer, round=round)  # round r draws a new half
        trainer.train()
        trainer.save_model()  # weights plus hft_selection.json
        halves.append(handle.selection.trainable_units)
        seen = list(TASKS)[: round + 1]
        losses = ", ".join(f"{t}={loss_on(model, tokenizer, TASKS[t]):.3f}" for t in seen)
        manifest = json.load(open(os.path.join(out, "hft_selection.json")))
        print(f"round {round} ({task}): trained {len(handle.selection.trainable_units)} of "
              f"{sum(len(layer) for layer in handle.selection.layout.layers)} units "
              f"(manifest round={manifest['config']['round']}); loss on tasks so far: {losses}")
    overlap = len(halves[0] & halves[1]) / len(halves[0])
    print(f"\nround 0 and round 1 share {overlap:.0%} of their trainable units; every round trained another half.")


if __name__ == "__main__":
    main()
