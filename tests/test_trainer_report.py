"""What a user sees of HFT in a trainer: the summary block at train start (visible with logging left
unconfigured, main process only, overall share first), the model card TRL writes, and the message
when the trainer was given a ``peft_config``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from hft_plugin import IntegrationError, UnsupportedModelError, enable_hft, select_half
from hft_plugin.testing import tiny_model, tiny_tokenizer

from ._workers.common import sft_dataset
from .helpers import plain_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- Selection.summary ------------------------------------------------------------------------------------
def test_summary_puts_the_overall_share_first_and_says_what_the_layers_share_is():
    selection = select_half(tiny_model("phi3"), 0)
    lines = selection.summary().splitlines()
    assert lines[0].startswith("HFT selection: strategy=category ratio=0.5 round=0")
    assert lines[1] == "trainable params: 86,336 || all params: 160,320 || trainable%: 53.8523"  # PEFT's form
    assert lines[2] == ("50.00% of the transformer layers' parameters train (the HFT ratio counts only the layers); "
                        "the 12,352 parameters outside them (embeddings, lm_head, final norm) all train, so 53.85% "
                        "of all parameters do.")
    rows = [line.split()[0] for line in lines[4:]]
    assert rows[:2] == ["all", "layers"] and rows[-1] == "outside"
    frozen = select_half(tiny_model("phi3"), 0, train_embeddings=False).summary().splitlines()
    assert frozen[1].endswith("trainable%: 46.1477") and "are frozen, so 46.15%" in frozen[2]


def test_summary_shows_the_counts_it_is_given():
    selection = select_half(tiny_model("llama"), 0)
    counts = dict(selection.stats(), trainable_params=1, overall_ratio=1 / selection.stats()["total_params"],
                  frozen_by_user=["lm_head.weight"])
    text = selection.summary(counts)
    assert "trainable params: 1 ||" in text and "1 tensor this round would train was frozen before HFT and stays frozen (e.g. lm_head.weight)" in text


# -- the block at train start -----------------------------------------------------------------------------
TRAIN_SCRIPT = """
import sys
from transformers import Trainer, TrainingArguments
from hft_plugin import enable_hft
from hft_plugin.testing import tiny_model, tiny_tokenizer
from tests._workers.common import collate, lm_dataset
tokenizer = tiny_tokenizer()
args = TrainingArguments(sys.argv[1], max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                         save_strategy="no", logging_steps=1, disable_tqdm=True)
trainer = Trainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset(tokenizer),
                  data_collator=collate(tokenizer))
enable_hft(trainer)
trainer.train()
"""


def test_the_summary_block_is_visible_with_logging_unconfigured(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFT_")}
    env.update(PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("trainable params: ") == 1, done.stderr[-3000:]
    block = done.stderr[done.stderr.index("hft_plugin: Trainer trains with Half Fine-Tuning"):]
    lines = block.splitlines()
    assert lines[1].startswith("HFT selection: strategy=category ratio=0.5 round=0")
    assert lines[2].startswith("trainable params: ") and "the HFT ratio counts only the layers" in lines[3]
    assert "'hft/overall_ratio'" in done.stdout + done.stderr  # the metrics keep flowing


def test_the_summary_block_is_written_by_the_main_process_only(tmp_path, caplog, monkeypatch):
    trainer = plain_trainer(tmp_path, max_steps=1)
    enable_hft(trainer)
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: False)  # as on rank 1
    with caplog.at_level(logging.INFO, logger="hft_plugin"):
        trainer.train()
    assert "trainable params" not in caplog.text


def test_the_summary_block_counts_what_actually_trains(tmp_path, caplog):
    trainer = plain_trainer(tmp_path, max_steps=1)
    trainer.model.model.embed_tokens.requires_grad_(False)  # frozen by hand: HFT leaves it frozen
    handle = enable_hft(trainer)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        trainer.train()
    trains = sum(p.numel() for p in handle.parameters())  # separate projections: the optimizer's elements
    assert f"trainable params: {trains:,} ||" in caplog.text
    assert trains < handle.selection.stats()["trainable_params"]
    assert "1 tensor this round would train was frozen before HFT and stays frozen" in caplog.text


# -- the model card ---------------------------------------------------------------------------------------
def sft_trainer(tmp_path, model=None, save_strategy="no", **config):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, save_strategy=save_strategy, save_steps=1, max_length=32, disable_tqdm=True)
    return SFTTrainer(model=model if model is not None else tiny_model("llama"), args=args,
                      train_dataset=sft_dataset(), processing_class=tiny_tokenizer(), **config)


def test_the_model_card_says_the_model_was_half_fine_tuned(tmp_path):
    trainer = sft_trainer(tmp_path, save_strategy="steps")
    handle = enable_hft(trainer, round=1, strategy="layer")
    trainer.train()  # TRL writes the card with each checkpoint
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.count("## Half Fine-Tuning") == 1
    trainer.create_model_card(model_name="tiny")  # and on request (push_to_hub goes through here)
    card = (tmp_path / "out" / "README.md").read_text()
    stats = handle.selection.stats()
    assert "## Half Fine-Tuning" in card
    assert "round 1" in card and "strategy `layer`" in card and "ratio 0.5" in card
    assert f"{stats['overall_ratio']:.2%} of all parameters" in card and "hft_selection.json" in card
    assert "- hft" in card.split("---")[1]  # a tag in the card's metadata
    # a trainer without HFT writes TRL's card untouched
    other = sft_trainer(tmp_path / "other")
    other.create_model_card(model_name="tiny")
    assert "Half Fine-Tuning" not in (tmp_path / "other" / "out" / "README.md").read_text()


def test_the_model_card_names_no_base_model_none(tmp_path):
    """TRL's card said "a fine-tuned version of [None](https://huggingface.co/None)" for a model
    object and for a model loaded from a local folder."""
    from transformers import AutoModelForCausalLM

    built = sft_trainer(tmp_path / "built")  # from a config: no base to name, the sentence is left out
    enable_hft(built)
    built.create_model_card(model_name="tiny")
    card = (tmp_path / "built" / "out" / "README.md").read_text()
    assert "[None]" not in card and "huggingface.co/None" not in card and "fine-tuned version of" not in card
    folder = tmp_path / "my-tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    loaded = sft_trainer(tmp_path / "loaded", model=AutoModelForCausalLM.from_pretrained(folder))
    enable_hft(loaded)
    loaded.create_model_card(model_name="tiny", dataset_name="toy")
    card = (tmp_path / "loaded" / "out" / "README.md").read_text()
    assert "This model is a fine-tuned version of the local model `my-tiny-llama` on the [toy](" in card
    assert "[None]" not in card and str(tmp_path) not in card  # the folder's name only, not its path


# -- PEFT through peft_config -----------------------------------------------------------------------------
def _lora():
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    return peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def test_peft_config_on_the_trainer_says_hft_and_lora_are_alternatives(tmp_path):
    trainer = sft_trainer(tmp_path, peft_config=_lora())
    assert type(trainer.model).__name__.startswith("Peft")  # the real PeftModel TRL built
    flags = {n: p.requires_grad for n, p in trainer.model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match="HFT and LoRA are alternatives: drop peft_config"):
        enable_hft(trainer)
    assert flags == {n: p.requires_grad for n, p in trainer.model.named_parameters()}


def test_peft_config_under_hft_enable_says_the_same(tmp_path):
    from hft_plugin.adapters.transformers import TransformersAdapter

    adapter = TransformersAdapter()
    adapter.instrument()
    try:
        trainer = sft_trainer(tmp_path, peft_config=_lora())
        with pytest.raises(IntegrationError, match="HFT and LoRA are alternatives: drop peft_config") as error:
            trainer.train()
        assert "unset HFT_ENABLE" in str(error.value)
    finally:
        adapter.uninstrument()
