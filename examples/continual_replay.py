"""Continual learning with HFT and the paper's Replay: task after task, each round a new half, and a
share of every batch from the earlier tasks' data.

Each task's data is a JSON-lines file of prompt/completion examples, named once (``task_data``) in
the round that trains on it; the next round, loaded from that round's folder (``round="next"``),
replays every file recorded so far (``"earlier"``). After each round the script prints the loss on
every task seen so far. A tiny model, nothing downloads; about a minute on a CPU.

    python examples/continual_replay.py [--ratio 0.25] [--steps 20] [--output-dir /tmp/hft-replay]
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from hft_plugin import enable_hft, enable_replay
from hft_plugin.testing import tiny_model, tiny_tokenizer

TASKS = {
    "counting": [(f"{i} {i + 1} ", f"{i + 2} {i + 3}.") for i in range(0, 60, 3)],
    "spelling": [(" ".join(w) + " = ", f"{w}.") for w in ("cat", "dog", "sun", "map", "pen", "cup", "box", "hat")],
    "reversal": [(f"{w} -> ", f"{w[::-1]}.") for w in ("abc", "hello", "train", "model", "paper", "round", "half")],
}


def write_task(folder: str, name: str) -> str:
    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for prompt, completion in TASKS[name] * 4:
            handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


@torch.no_grad()
def loss_on(model, tokenizer, name: str) -> float:
    """Mean loss on the completions of task ``name`` (prompt tokens not counted)."""
    model.eval()
    losses = []
    for prompt, completion in TASKS[name]:
        p = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + completion)["input_ids"]
        labels = [-100] * len(p) + ids[len(p):]
        losses.append(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item())
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.25, help="replay share of each batch (0: no replay)")
    parser.add_argument("--steps", type=int, default=20, help="steps per task")
    parser.add_argument("--output-dir", default="/tmp/hft-replay")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.makedirs(args.output_dir, exist_ok=True)

    tokenizer = tiny_tokenizer()
    tiny_model("llama").save_pretrained(os.path.join(args.output_dir, "base"))
    folder = os.path.join(args.output_dir, "base")  # each round starts from the folder the last one saved
    for number, name in enumerate(TASKS):
        data = write_task(args.output_dir, name)
        out = os.path.join(args.output_dir, f"round{number}-{name}")
        config = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=3e-3,
                           save_strategy="no", report_to=[], use_cpu=True, logging_steps=args.steps,
                           max_length=48, disable_tqdm=True)
        from datasets import load_dataset

        train = load_dataset("json", data_files=data, split="train")
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=config, train_dataset=train,
                             processing_class=tokenizer)
        enable_hft(trainer, round="next")  # round 0 from the base folder, then 1, 2, ...
        replay = enable_replay(trainer, "earlier", ratio=args.ratio, task_data=data)  # earlier tasks; record this
        trainer.train()
        trainer.save_model()  # weights, hft_selection.json and hft_replay.json
        folder = out
        seen = list(TASKS)[: number + 1]
        losses = ", ".join(f"{t}={loss_on(trainer.model, tokenizer, t):.3f}" for t in seen)
        print(f"round {number} ({name}): replayed {len(replay.pool)} earlier examples at {replay.ratio:.0%}; "
              f"loss on tasks so far: {losses}")


if __name__ == "__main__":
    main()
