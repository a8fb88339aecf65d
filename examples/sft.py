"""Supervised fine-tuning with TRL's SFTTrainer and Half Fine-Tuning: one extra line.

Runs on a CPU in about a minute with a tiny model built from a config and a tokenizer built in
code (nothing downloads). With a real model, replace ``tiny_model``/``tiny_tokenizer`` with
``AutoModelForCausalLM.from_pretrained(...)``/``AutoTokenizer.from_pretrained(...)``.

    python examples/sft.py [--family phi3] [--round 0] [--output-dir /tmp/hft-sft]
"""

from __future__ import annotations

import argparse
import logging

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from hft_plugin import enable_hft
from hft_plugin.testing import tiny_model, tiny_tokenizer

FACTS = [
    ("What colour is the sky?", "The sky is blue."), ("What do cows drink?", "Cows drink water."),
    ("Where do fish live?", "Fish live in water."), ("What is ice?", "Ice is frozen water."),
    ("When do owls hunt?", "Owls hunt at night."), ("What do bees make?", "Bees make honey."),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama", help="tiny model family: llama, qwen2, phi3, mixtral, ...")
    parser.add_argument("--round", type=int, default=0, help="HFT round: each round trains another half")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default="/tmp/hft-sft")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows the HFT summary table
    logging.getLogger("transformers").setLevel(logging.WARNING)

    model = tiny_model(args.family)
    data = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in FACTS * 8])
    config = SFTConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
                       learning_rate=3e-3, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                       max_length=64, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tiny_tokenizer())

    handle = enable_hft(trainer, round=args.round)  # the one line: freeze the half that does not train
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in handle.selection.plan().frozen}
    trainer.train()

    unchanged = all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in frozen.items())
    print(f"\n{len(frozen)} frozen tensors bit-identical after training: {unchanged}")
    print(f"trained {handle.selection.trainable_ratio:.0%} of the layers; selection saved in "
          f"{args.output_dir}/hft_selection.json")
    trainer.save_model()


if __name__ == "__main__":
    main()
