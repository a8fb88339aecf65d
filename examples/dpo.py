"""Preference tuning with TRL's DPOTrainer and Half Fine-Tuning.

Only the policy (``trainer.model``) is half fine-tuned; the reference model TRL loads next to it
is never trained (its values and flags stay as loaded; it shares the policy's frozen half instead
of holding a second copy of it). Runs on a CPU in about a minute with a tiny model (nothing downloads).

    python examples/dpo.py [--family phi3] [--round 0] [--output-dir /tmp/hft-dpo]
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from hft_plugin import enable_hft
from hft_plugin.testing import tiny_model, tiny_tokenizer

PAIRS = [
    ("Greet me.", "Hello, nice to meet you!", "Go away."),
    ("Say thanks.", "Thank you very much!", "Whatever."),
    ("Offer help.", "How can I help you today?", "Not my problem."),
    ("Say goodbye.", "Goodbye, take care!", "Finally."),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama")
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--output-dir", default="/tmp/hft-dpo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)

    # A saved model, loaded by path as usual: TRL loads the reference model from the same path.
    base = os.path.join(args.output_dir, "base-model")
    tiny_model(args.family).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    data = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS * 8])
    config = DPOConfig(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
                       learning_rate=1e-3, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                       max_length=64, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tiny_tokenizer())
    reference = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}

    handle = enable_hft(trainer, round=args.round)
    trainer.train()

    ref_same = all(torch.equal(p, reference[n]) for n, p in trainer.ref_model.named_parameters())
    ref_flags = all(p.requires_grad for p in trainer.ref_model.parameters())
    print(f"\npolicy trained {handle.selection.stats()['overall_ratio']:.0%} of its parameters; "
          f"reference model unchanged: {ref_same}, its requires_grad flags as TRL set them: {ref_flags}")


if __name__ == "__main__":
    main()
