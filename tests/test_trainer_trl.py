"""enable_hft on TRL's GRPO, Reward and KTO trainers (SFT and DPO are in test_trainer.py): the
policy trains its half, the reference model is left alone, the optimizer owns the trainable half."""

from __future__ import annotations

import pytest
import torch

from ._workers.common import TEXTS, check_training, snapshot
from hft_plugin import enable_hft
from hft_plugin.testing import tiny_config, tiny_model, tiny_tokenizer

COMMON = dict(per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant", report_to=[],
              use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)


@pytest.mark.slow
def test_grpo_trainer(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def longer_is_better(completions, **_):
        return [float(len(c)) for c in completions]

    model = tiny_model("llama")
    config = GRPOConfig(output_dir=str(tmp_path), max_steps=2, num_generations=4, max_completion_length=8, **COMMON)
    trainer = GRPOTrainer(model=model, args=config, reward_funcs=longer_is_better, processing_class=tiny_tokenizer(),
                          train_dataset=Dataset.from_list([{"prompt": f"q{i}: "} for i in range(8)]))
    handle = enable_hft(trainer)
    before = snapshot(model)
    trainer.train()
    check_training(handle.selection, before, snapshot(model), trainer, handle)


def test_reward_trainer_on_a_classifier(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_config(tiny_config("llama", num_labels=1))
    data = Dataset.from_list([{"chosen": TEXTS[i % 8], "rejected": TEXTS[(i + 3) % 8][::-1]} for i in range(16)])
    config = RewardConfig(output_dir=str(tmp_path), max_steps=3, max_length=32, **COMMON)
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tiny_tokenizer())
    handle = enable_hft(trainer)
    before = snapshot(model)
    trainer.train()
    counts = check_training(handle.selection, before, snapshot(model), trainer, handle)
    assert counts["optimizer_numel"] == handle.selection.stats()["trainable_params"]  # the score head trains


def test_kto_trainer_leaves_the_reference_model_alone(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    tiny_model("phi3").save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    data = Dataset.from_list([{"prompt": f"q{i}: ", "completion": TEXTS[i % 8], "label": i % 2 == 0} for i in range(16)])
    config = KTOConfig(output_dir=str(tmp_path / "out"), max_steps=3, max_length=48, **COMMON)
    trainer = KTOTrainer(model=model, args=config, train_dataset=data, processing_class=tiny_tokenizer())
    ref = trainer.ref_model
    ref_before = snapshot(ref)
    ref_flags = {n: p.requires_grad for n, p in ref.named_parameters()}
    handle = enable_hft(trainer)
    before = snapshot(model)
    trainer.train()
    check_training(handle.selection, before, snapshot(model), trainer, handle)
    assert all(torch.equal(ref_before[n], p) for n, p in ref.named_parameters())
    assert {n: p.requires_grad for n, p in ref.named_parameters()} == ref_flags
