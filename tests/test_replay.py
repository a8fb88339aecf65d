"""Replay: the share and order as pure functions (world sizes 1 and 2), self samples, TRL's SFT and the
plain Trainer with replay, replay/loss against an independent computation, resume bit for bit,
rounds (earlier tasks' data), zero-code settings, and every bad input before training."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from ._workers.common import TEXTS, collate, dpo_dataset, lm_dataset, sft_dataset, snapshot, train_args
from hft_plugin import (IntegrationError, ReplayError, ReplayUnsupportedError, disable_replay, enable_hft,
                        enable_replay)
from hft_plugin import replay as core
from hft_plugin.bootstrap import env
from hft_plugin.testing import tiny_model, tiny_tokenizer


# -- the order: pure functions ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size,ratio", [(4, 0.1), (4, 0.25), (1, 0.1), (8, 0.5), (3, 0.3), (16, 0.0)])
def test_share_is_exact_over_every_run_of_batches(batch_size, ratio):
    counts = [core.replay_count(t, batch_size, ratio) for t in range(200)]
    for start in range(0, 150, 7):
        for length in (1, 5, 50):
            window = sum(counts[start:start + length])
            assert abs(window - length * batch_size * ratio) < 1 + 1e-9  # within one example of the share


def test_epoch_layout_uses_every_example_once_and_fills_batches():
    layout = core.EpochLayout.build(n_main=10, batch_size=4, ratio=0.25)
    assert layout.main_counts == (3, 3, 3, 1) and layout.replay_counts == (1, 1, 1, 1) and len(layout) == 14
    stream = core.epoch_stream(list(range(10))[::-1], pool_size=3, layout=layout, seed=0, epoch=0)
    assert [i for i in stream if i < 10] == list(range(10))[::-1]  # the trainer's order, untouched
    assert all(len(b) == 4 for b in core.rank_batches(stream, 4, 0, 1)[:-1])
    replayed = [i - 10 for i in stream if i >= 10]
    assert sorted(replayed[:3]) == [0, 1, 2]  # every pool example once per cycle


def test_replay_order_is_a_function_of_seed_and_slot_only():
    assert core.replay_indices(0, 30, 7, seed=3) == core.replay_indices(0, 30, 7, seed=3)
    assert core.replay_indices(0, 30, 7, seed=3) != core.replay_indices(0, 30, 7, seed=4)
    whole = core.replay_indices(0, 40, 7, seed=1)
    assert core.replay_indices(13, 20, 7, seed=1) == whole[13:33]
    layout = core.EpochLayout.build(20, 4, 0.25)
    e1 = core.epoch_stream(list(range(20)), 7, layout, seed=1, epoch=1)
    assert [i - 20 for i in e1 if i >= 20] == whole[layout.replay_slots:2 * layout.replay_slots]  # epochs continue


def test_global_rng_untouched():
    state = torch.random.get_rng_state()
    core.replay_indices(0, 100, 9, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("world_size", [1, 2])
def test_ranks_train_their_own_batches_and_no_duplicates(world_size):
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    # 42 examples, 3 + 1 replay a batch: 14 full batches, an even count (accelerate evens out a short last
    # round by repeating the first examples, with or without replay)
    layout = core.EpochLayout.build(n_main=42, batch_size=4, ratio=0.25)
    stream = core.epoch_stream(list(range(42)), pool_size=50, layout=layout, seed=0, epoch=0)
    per_rank = [core.rank_batches(stream, 4, r, world_size) for r in range(world_size)]
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == sorted(stream) and len(set(seen)) == len(seen)  # all of it, nothing twice
    for batches in per_rank:  # each rank its own share
        replay = sum(i >= 42 for b in batches for i in b)
        assert abs(replay / sum(map(len, batches)) - 0.25) < 0.05

    # the same through accelerate's own dealing of batches to ranks, over the real sampler
    def rank_sampler():  # each process builds its own, as each rank's trainer does
        return core.MixingSampler(list(range(42)), 42, 50, 4, 0.25, seed=0)

    dealt = [list(BatchSamplerShard(BatchSampler(rank_sampler(), 4, False), num_processes=world_size,
                                    process_index=r)) for r in range(world_size)]
    assert dealt == per_rank


# -- self samples ----------------------------------------------------------------------------------------
def test_self_samples_are_reproducible_and_leave_the_global_rng_alone():
    from hft_plugin.sampling import sample_texts

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    state = torch.random.get_rng_state()
    first = sample_texts(model, tokenizer, 5, max_new_tokens=10, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert first == sample_texts(model, tokenizer, 5, max_new_tokens=10, seed=1)
    assert first != sample_texts(model, tokenizer, 5, max_new_tokens=10, seed=2)
    assert len(first) == 5 and model.training is True


# -- trainers --------------------------------------------------------------------------------------------
def sft_trainer(output_dir, model=None, n=16, **overrides):
    from trl import SFTConfig, SFTTrainer

    values = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                  lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                  max_length=32, disable_tqdm=True, seed=0)
    values.update(overrides)
    return SFTTrainer(model=model if model is not None else tiny_model("llama"), args=SFTConfig(**values),
                      train_dataset=sft_dataset(n), processing_class=tiny_tokenizer())


def earlier_file(tmp_path, n=6):
    path = tmp_path / "task0.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"old{i}: ", "completion": TEXTS[i % 8][::-1]}) + "\n"
                            for i in range(n)))
    return path


def test_sft_mixes_the_share_and_logs_replay_loss(tmp_path, caplog):
    trainer = sft_trainer(tmp_path / "out", max_steps=4, learning_rate=0.0)
    replay = enable_replay(trainer, earlier_file(tmp_path), ratio=0.25)
    # prepared by SFT's own pipeline: tokenized prompt+completion, completion-only labels, EOS appended
    row = replay.pool[0]
    prompt_len = len(tiny_tokenizer()(f"old{0}: ")["input_ids"])
    assert row["labels"][:prompt_len] == [-100] * prompt_len and row["input_ids"][-1] == tiny_tokenizer().eos_token_id
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        trainer.train()
    assert "Replay: 25.0% of each training batch from" in caplog.text
    assert replay.used == [[i] for i in core.replay_indices(0, 4, 6, seed=0)]  # one replay row per batch of 4
    logged = [h["replay/loss"] for h in trainer.state.log_history if "replay/loss" in h]
    assert len(logged) == 4
    # independent: the model did not move (lr 0), so each step's replay loss is the NLL of its replay example
    model = trainer.model.eval()
    with torch.no_grad():
        for value, used in zip(logged, replay.used):
            ex = replay.pool[used[0]]
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
            assert value == pytest.approx(model(input_ids=ids, labels=labels).loss.item(), abs=1e-3)


def test_plain_trainer_with_text_replay_and_hft(tmp_path, caplog):
    from transformers import Trainer

    tokenizer = tiny_tokenizer()
    trainer = Trainer(model=tiny_model("llama"), args=train_args(tmp_path / "out", max_steps=3),
                      train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer), processing_class=tokenizer)
    enable_hft(trainer)
    text = tmp_path / "earlier.txt"
    text.write_text("old text one.\nold text two.\n\nold text three.\n")
    replay = enable_replay(trainer, str(text), ratio=0.5)
    assert set(replay.pool.column_names) >= {"input_ids", "labels", "attention_mask"} and len(replay.pool) == 3
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        trainer.train()
    assert "trains with Half Fine-Tuning" in caplog.text and "Replay: 50.0% of each training batch" in caplog.text
    assert [len(u) for u in replay.used] == [2, 2, 2]
    assert all("replay/loss" in h and math.isfinite(h["replay/loss"]) for h in trainer.state.log_history[:3])


@pytest.mark.parametrize("hft", [False, True])
def test_resume_trains_the_same_examples_and_weights_as_an_uninterrupted_run(tmp_path, hft):
    """6 steps straight against 3 + resume 3; an epoch is 4 batches (10 examples, 3 + 1 replay per
    batch), so the resumed run skips into epoch 0 and then crosses into epoch 1."""
    options = dict(n=10, max_steps=6, save_strategy="steps", save_steps=3)
    straight = sft_trainer(tmp_path / "a", **options)
    hft and enable_hft(straight)
    replay_a = enable_replay(straight, earlier_file(tmp_path), ratio=0.25)
    straight.train()

    first = sft_trainer(tmp_path / "b", **{**options, "max_steps": 3})
    hft and enable_hft(first)
    replay_b1 = enable_replay(first, earlier_file(tmp_path), ratio=0.25)
    first.train()
    second = sft_trainer(tmp_path / "b", **options)
    hft and enable_hft(second)
    replay_b2 = enable_replay(second, earlier_file(tmp_path), ratio=0.25)
    second.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))

    assert len(replay_a.used) == 6 and replay_b1.used + replay_b2.used == replay_a.used
    a, b = snapshot(straight.model), snapshot(second.model)
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])][:3]
    record = json.loads((tmp_path / "b" / "checkpoint-3" / core.RECORD_NAME).read_text())
    assert record["ratio"] == 0.25


def test_self_replay_is_drawn_once_and_reused(tmp_path, monkeypatch):
    trainer = sft_trainer(tmp_path / "out", max_steps=2)
    replay = enable_replay(trainer, "self", ratio=0.25, samples=6, sample_length=12)
    stored = json.loads((tmp_path / "out" / core.SELF_NAME).read_text())
    assert len(stored["texts"]) == 6 and stored["seed"] == 0
    assert "completion" not in replay.pool.column_names  # plain language modelling: every token a label
    assert all(lab == ids for ids, lab in zip(replay.pool["input_ids"], replay.pool["labels"]))
    trainer.train()
    assert any(replay.used)

    import hft_plugin.sampling

    def refuse(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(hft_plugin.sampling, "sample_texts", refuse)
    again = enable_replay(sft_trainer(tmp_path / "out"), "self", ratio=0.25, samples=6, sample_length=12)
    assert again.pool["input_ids"] == replay.pool["input_ids"]


def test_rounds_replay_the_earlier_tasks_recorded_once(tmp_path):
    from transformers import AutoModelForCausalLM

    task0 = earlier_file(tmp_path)
    first = sft_trainer(tmp_path / "r0", max_steps=2)
    enable_hft(first, round=0)
    off = enable_replay(first, "earlier", task_data=str(task0))  # first task: nothing earlier to replay
    assert off.ratio == 0
    first.train()
    first.save_model()
    assert json.loads((tmp_path / "r0" / core.RECORD_NAME).read_text())["tasks"] == [str(task0)]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r0")
    task1 = tmp_path / "task1.jsonl"
    task1.write_text(json.dumps({"prompt": "new: ", "completion": "a new task."}) + "\n")
    second = sft_trainer(tmp_path / "r1", model=model, max_steps=2)
    enable_hft(second, round="next")
    replay = enable_replay(second, "earlier", ratio=0.25, task_data=str(task1))
    assert len(replay.pool) == 6 and "task0.jsonl" in replay.source
    second.train()
    assert any(replay.used)
    assert json.loads((tmp_path / "r1" / core.RECORD_NAME).read_text())["tasks"] == [str(task0), str(task1)]


def test_disable_replay_restores_the_trainers_own_loader(tmp_path):
    trainer = sft_trainer(tmp_path / "out")
    enable_replay(trainer, earlier_file(tmp_path))
    assert disable_replay(trainer) and not disable_replay(trainer)
    assert "get_train_dataloader" not in trainer.__dict__
    assert type(trainer.get_train_dataloader().dataset).__name__ != "MixedDataset"


# -- bad input, before training --------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_bad_ratio(tmp_path, ratio):
    trainer = sft_trainer(tmp_path / "out")
    with pytest.raises(ReplayError, match=r"ratio=.*\[0, 1\)|not a number"):
        enable_replay(trainer, earlier_file(tmp_path), ratio=ratio)
    assert "get_train_dataloader" not in trainer.__dict__


def test_empty_unreadable_and_unknown_sources(tmp_path):
    from datasets import Dataset

    trainer = sft_trainer(tmp_path / "out")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    cases = [(str(tmp_path / "missing.jsonl"), "no such file"), (str(tmp_path / "empty.jsonl"), "is empty"),
             (str(tmp_path / "bad.json"), "not valid JSON"), (str(tmp_path / "obj.json"), "must hold a list"),
             (Dataset.from_list([]), "is empty"), (42, "not usable")]
    for source, message in cases:
        with pytest.raises(ReplayError, match=message):
            enable_replay(trainer, source)


def test_preference_data_given_to_an_sft_trainer(tmp_path):
    with pytest.raises(ReplayError, match="preference dataset.*rename_column"):
        enable_replay(sft_trainer(tmp_path / "out"), dpo_dataset(4))


def test_self_without_a_tokenizer(tmp_path):
    from transformers import Trainer

    trainer = Trainer(model=tiny_model("llama"), args=train_args(tmp_path / "out"),
                      train_dataset=lm_dataset(tiny_tokenizer()), data_collator=collate(tiny_tokenizer()))
    with pytest.raises(ReplayError, match="'self' needs a tokenizer.*processing_class"):
        enable_replay(trainer, "self")


def test_trainers_that_build_their_own_batches_and_non_trainers(tmp_path):
    from transformers import Trainer

    class Online(Trainer):
        def get_train_dataloader(self):
            return super().get_train_dataloader()

    tokenizer = tiny_tokenizer()
    trainer = Online(model=tiny_model("llama"), args=train_args(tmp_path / "out"),
                     train_dataset=lm_dataset(tokenizer), data_collator=collate(tokenizer))
    with pytest.raises(ReplayUnsupportedError, match="Online builds its training batches itself"):
        enable_replay(trainer, "self")
    with pytest.raises(IntegrationError, match="needs a transformers.Trainer"):
        enable_replay(object(), "self")


# -- zero code -------------------------------------------------------------------------------------------
def test_replay_variables():
    assert env.replay_settings({}) is None
    assert env.replay_settings({"HFT_REPLAY": "SELF"}) == {"source": "self", "ratio": 0.1, "task_data": None}
    assert env.replay_settings({"HFT_REPLAY": "a.jsonl", "HFT_REPLAY_RATIO": "0", "HFT_REPLAY_TASK": "t.jsonl"}) == {
        "source": "a.jsonl", "ratio": 0.0, "task_data": "t.jsonl"}
    for environ, message in [({"HFT_REPLAY": "self", "HFT_REPLAY_RATIO": "1"}, "HFT_REPLAY_RATIO='1' is outside"),
                             ({"HFT_REPLAY": "self", "HFT_REPLAY_RATIO": "ten"}, "HFT_REPLAY_RATIO='ten' is not a"),
                             ({"HFT_REPLAY_RATIO": "0.1"}, "HFT_REPLAY is not")]:
        with pytest.raises(ReplayError.__mro__[1], match=message):  # ConfigError
            env.replay_settings(environ)
    assert {"HFT_REPLAY", "HFT_REPLAY_RATIO", "HFT_REPLAY_TASK"} <= set(env.ALL_VARIABLES)


def test_zero_code_replay_reaches_a_trainer(tmp_path, monkeypatch, caplog):
    from hft_plugin.adapters.transformers import TransformersAdapter
    from hft_plugin.adapters.trainer_replay import replay_of

    monkeypatch.setenv("HFT_REPLAY", str(earlier_file(tmp_path)))
    monkeypatch.setenv("HFT_REPLAY_RATIO", "0.25")
    adapter = TransformersAdapter(config={"ratio": 0.5})
    adapter.instrument()
    try:
        trainer = sft_trainer(tmp_path / "out", max_steps=2)
        with caplog.at_level(logging.WARNING, logger="hft_plugin"):
            trainer.train()
    finally:
        adapter.uninstrument()
    replay = replay_of(trainer)
    assert replay is not None and replay.ratio == 0.25 and len(replay.used) == 2
    assert "trains with Half Fine-Tuning" in caplog.text and "Replay: 25.0%" in caplog.text


def test_the_continual_replay_example_runs(tmp_path, monkeypatch, capsys):
    import os
    import runpy
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setattr(sys, "argv", ["continual_replay.py", "--steps", "2", "--output-dir", str(tmp_path)])
    runpy.run_path(os.path.join(root, "examples", "continual_replay.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "round 0 (counting): replayed 0" in out and "round 2 (reversal): replayed 112 earlier examples at 25%" in out
    assert json.loads((tmp_path / "round2-reversal" / core.RECORD_NAME).read_text())["tasks"][0].endswith("counting.jsonl")


def test_dpo_trainer_replays_earlier_preference_pairs(tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tiny_model("llama").save_pretrained(tmp_path / "base")
    config = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                       use_cpu=True, save_strategy="no", logging_steps=1, max_length=48, disable_tqdm=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tmp_path / "base"), args=config,
                         train_dataset=dpo_dataset(), processing_class=tiny_tokenizer())
    earlier = dpo_dataset(6).map(lambda row: {"prompt": "old " + row["prompt"]})
    replay = enable_replay(trainer, earlier, ratio=0.25)
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(replay.pool.column_names)  # DPO's own preparation
    assert "replay/loss not measured" in replay.summary()
    loader = trainer.get_train_dataloader()
    assert loader.dataset.n_main == 16 and len(loader) == 6  # 3 + 1 replay a batch: 16 pairs in 6 batches
    trainer.train()
    with pytest.raises(ReplayError, match="preference pairs"):
        enable_replay(trainer, sft_dataset(4))
