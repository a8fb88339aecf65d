"""enable_hft on the HF Trainer and TRL's trainers, in one process: what trains, what the optimizer
owns, what a run leaves behind, and the errors."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from torch import nn

from .helpers import flags, plain_trainer
from ._workers.common import (check_training, collate, dpo_dataset, lm_dataset, optimizer_params,
                             optimizer_state_params, sft_dataset, snapshot, train_args)
from hft_plugin import (ConfigError, IntegrationError, SelectionMismatchError, UnsupportedModelError,
                        disable_hft, enable_hft)
from hft_plugin.selection import MANIFEST_NAME
from hft_plugin.testing import tiny_model, tiny_tokenizer

FAMILIES = ["llama", "phi3"]  # separate projections; fused qkv_proj / gate_up_proj (masks)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_trainer_trains_exactly_the_chosen_half(tmp_path, family):
    trainer = plain_trainer(tmp_path, family)
    handle = enable_hft(trainer, round=0)
    before = snapshot(trainer.model)
    trainer.train()
    counts = check_training(handle.selection, before, snapshot(trainer.model), trainer, handle)
    assert counts["frozen"] > 0 and counts["trained"] > 0
    assert counts["partial"] == (6 if family == "phi3" else 0)
    assert optimizer_state_params(trainer) == counts["trainable_tensors"]  # no state for frozen tensors
    if family == "llama":  # separate projections: the optimizer's elements are exactly the trainable ones
        assert counts["optimizer_numel"] == handle.selection.stats()["trainable_params"]
    # the manifest in the output dir, and the stats in the logged metrics
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["fingerprint"] == handle.selection.fingerprint and manifest["config"]["round"] == 0
    first = trainer.state.log_history[0]
    assert first["hft/trainable_ratio"] == pytest.approx(0.5) and first["hft/round"] == 0
    assert "hft/attention_ratio" in first and "hft/trainable_ratio" not in trainer.state.log_history[1]


def test_the_stats_reach_every_reporter_once(tmp_path):
    # a reporter added after enable_hft (W&B, TensorBoard: callbacks) sees the stats in the first logs
    from transformers import TrainerCallback

    seen = []

    class Reporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = plain_trainer(tmp_path, max_steps=2, logging_steps=1)
    handle = enable_hft(trainer, round=1)
    trainer.add_callback(Reporter())
    trainer.train()
    assert seen[0]["hft/round"] == 1
    assert seen[0]["hft/trainable_ratio"] == pytest.approx(handle.selection.trainable_ratio)
    assert "loss" in seen[0] and not any("hft/round" in logs for logs in seen[1:])


def test_summary_is_logged_at_train_start(tmp_path, caplog):
    trainer = plain_trainer(tmp_path, max_steps=1)
    enable_hft(trainer)
    with caplog.at_level(logging.INFO, logger="hft_plugin"):
        trainer.train()
    text = caplog.text
    assert "HFT selection: strategy=category" in text and "attention" in text and "all parameters" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_trainer(tmp_path, family):
    from trl import SFTConfig, SFTTrainer

    model = tiny_model(family)
    config = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                       lr_scheduler_type="constant", weight_decay=0.1, report_to=[], use_cpu=True,
                       save_strategy="no", logging_steps=1, max_length=32, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=sft_dataset(), processing_class=tiny_tokenizer())
    handle = enable_hft(trainer)
    before = snapshot(model)
    trainer.train()
    counts = check_training(handle.selection, before, snapshot(model), trainer, handle)
    assert counts["frozen"] > 0 and optimizer_state_params(trainer) == counts["trainable_tensors"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_trainer_leaves_the_reference_model_alone(tmp_path, family):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    # Saved and loaded by path, as users do: TRL then loads the reference model fresh from that path.
    tiny_model(family).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    config = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                       learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.1, report_to=[],
                       use_cpu=True, save_strategy="no", logging_steps=1, max_length=48, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dpo_dataset(), processing_class=tiny_tokenizer())
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    ref_before, ref_flags = snapshot(ref), flags(ref)
    handle = enable_hft(trainer)
    assert flags(ref) == ref_flags and all(ref_flags.values())  # identified by identity, not by flags
    before = snapshot(model)
    trainer.train()
    check_training(handle.selection, before, snapshot(model), trainer, handle)
    after = snapshot(ref)
    assert all(torch.equal(ref_before[n], after[n]) for n in ref_before)
    assert flags(ref) == ref_flags


def test_enable_after_the_optimizer_exists_rebuilds_it_with_a_warning(tmp_path, caplog):
    trainer = plain_trainer(tmp_path)
    trainer.create_optimizer()
    old = trainer.optimizer
    assert len(optimizer_params(trainer)) == len(list(trainer.model.parameters()))
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        handle = enable_hft(trainer)
    assert "did not fit HFT round 0" in caplog.text and "builds a new optimizer and scheduler" in caplog.text
    assert trainer.optimizer is None and trainer.lr_scheduler is None
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.optimizer is not old
    check_training(handle.selection, before, snapshot(trainer.model), trainer, handle)


@pytest.mark.parametrize("family", FAMILIES)
def test_user_optimizer_over_the_whole_model_is_refused(tmp_path, family):
    """An optimizer given to the Trainer over model.parameters() owns the frozen half (and, for
    fused tensors, lacks their trainable regions): refused, naming what is extra, with the model
    as it was."""
    from transformers import Trainer, get_constant_schedule

    from hft_plugin import OptimizerMismatchError

    model = tiny_model(family)
    state = flags(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokenizer = tiny_tokenizer()
    trainer = Trainer(model=model, args=train_args(tmp_path), train_dataset=lm_dataset(tokenizer),
                      data_collator=collate(tokenizer), optimizers=(optimizer, get_constant_schedule(optimizer)))
    with pytest.raises(OptimizerMismatchError, match="do not train in this round") as caught:
        enable_hft(trainer)
    assert "optimizers=(...)" in str(caught.value)
    assert flags(model) == state and [n for n, _ in model.named_parameters()] == list(state)
    assert disable_hft(trainer) is False


def test_second_call_warns_and_changes_nothing(tmp_path, caplog):
    trainer = plain_trainer(tmp_path)
    handle = enable_hft(trainer, round=0)
    state = flags(trainer.model)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        again = enable_hft(trainer, round=1)
    assert again is handle and flags(trainer.model) == state
    assert "already enabled" in caplog.text and "ignored" in caplog.text


def test_disable_restores_everything(tmp_path):
    trainer = plain_trainer(tmp_path, "phi3")
    original = flags(trainer.model)
    methods = set(vars(trainer))
    callbacks = list(trainer.callback_handler.callbacks)
    enable_hft(trainer)
    assert flags(trainer.model) != original and len(trainer.callback_handler.callbacks) == len(callbacks) + 1
    assert disable_hft(trainer) is True
    assert flags(trainer.model) == original and set(vars(trainer)) == methods
    assert trainer.callback_handler.callbacks == callbacks
    assert disable_hft(trainer) is False
    trainer.args.max_steps = 1
    trainer.train()  # a full fine-tune again: the optimizer owns every tensor
    assert len(optimizer_params(trainer)) == len(original)


# -- the optimizer of a round owns exactly that round's trainable elements --------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_same_trainer_next_round_trains_the_new_half(tmp_path, family):
    """enable_hft(round 0), train, disable_hft, enable_hft(round 1), train: round 1 gets an optimizer
    (and scheduler) of its own, so every tensor of round 1's half moves and its frozen half stays."""
    trainer = plain_trainer(tmp_path, family)
    enable_hft(trainer, round=0)
    trainer.train()
    first = optimizer_params(trainer)
    disable_hft(trainer)
    handle = enable_hft(trainer, round=1)
    before = snapshot(trainer.model)
    trainer.train()
    counts = check_training(handle.selection, before, snapshot(trainer.model), trainer, handle)
    assert optimizer_state_params(trainer) == counts["trainable_tensors"]  # no state from round 0
    assert {id(p) for p in optimizer_params(trainer)} != {id(p) for p in first}


@pytest.mark.parametrize("family", FAMILIES)
def test_after_disable_the_whole_model_trains(tmp_path, family):
    trainer = plain_trainer(tmp_path, family)
    enable_hft(trainer, round=0)
    trainer.train()
    disable_hft(trainer)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    still = [n for n in before if torch.equal(before[n], after[n])]
    assert not still, f"{len(still)} of {len(before)} tensors never moved, e.g. {still[0]}"
    assert {id(p) for p in optimizer_params(trainer)} == {id(p) for p in trainer.model.parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_an_optimizer_built_before_the_switch_is_refused(tmp_path, family):
    """A new Trainer given an optimizer built over round 0's handle.parameters(), HFT at round 1: the
    optimizer lacks round 1's trainable tensors (and owns frozen ones); refused, naming them, before
    any weight changes."""
    from transformers import Trainer, get_constant_schedule

    from hft_plugin import HFTError, apply_selection, select_half

    model = tiny_model(family)
    round0 = apply_selection(model, select_half(model, round=0))
    optimizer = torch.optim.AdamW(round0.parameters(), lr=1e-2, weight_decay=0.1)
    tokenizer = tiny_tokenizer()
    trainer = Trainer(model=model, args=train_args(tmp_path), train_dataset=lm_dataset(tokenizer),
                      data_collator=collate(tokenizer), optimizers=(optimizer, get_constant_schedule(optimizer)))
    weights = snapshot(model)
    with pytest.raises(HFTError, match=r"handle\.parameters\(\)") as caught:
        enable_hft(trainer, round=1)
        trainer.train()
    assert "missing" in str(caught.value) or "lacks" in str(caught.value)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_an_optimizer_built_from_the_same_half_is_used(tmp_path, family):
    """The user's optimizer over handle.parameters() of the same round fits: enable_hft keeps it."""
    from transformers import Trainer, get_constant_schedule

    from hft_plugin import apply_selection, select_half

    model = tiny_model(family)
    handle = apply_selection(model, select_half(model, round=1))
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    tokenizer = tiny_tokenizer()
    trainer = Trainer(model=model, args=train_args(tmp_path), train_dataset=lm_dataset(tokenizer),
                      data_collator=collate(tokenizer), optimizers=(optimizer, get_constant_schedule(optimizer)))
    handle = enable_hft(trainer, round=1)
    before = snapshot(model)
    trainer.train()
    check_training(handle.selection, before, snapshot(model), trainer, handle)
    assert optimizer_params(trainer)[0] is optimizer.param_groups[0]["params"][0]


def test_gpt2_regions_under_the_default_fused_adamw(tmp_path):
    """GPT-2's c_attn regions are column blocks (strided views): the Trainer's default fused AdamW
    runs their groups unfused; a region of a bias lands in the no-decay group by its name."""
    trainer = plain_trainer(tmp_path, "gpt2")
    assert trainer.args.optim == "adamw_torch_fused"
    handle = enable_hft(trainer)
    before = snapshot(trainer.model)
    trainer.train()
    check_training(handle.selection, before, snapshot(trainer.model), trainer, handle)
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    names = {id(p): n for n, p in handle.named_parameters()}
    for group in optimizer.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        if any(".c_attn.weight_hft" in n for n in group_names):
            assert group["fused"] is False
        if any(".c_attn.bias_hft" in n for n in group_names):
            assert group["weight_decay"] == 0.0


# -- bad input: typed errors, raised before anything changes ------------------------------------------
def test_not_a_trainer():
    model = tiny_model("llama")
    before = flags(model)
    with pytest.raises(IntegrationError, match="transformers.Trainer"):
        enable_hft(model)
    assert flags(model) == before


def test_unknown_option_suggests_the_closest(tmp_path):
    trainer = plain_trainer(tmp_path)
    before = flags(trainer.model)
    with pytest.raises(ConfigError, match="Did you mean 'ratio'"):
        enable_hft(trainer, ration=0.5)
    with pytest.raises(ConfigError, match="ratio"):
        enable_hft(trainer, ratio=1.5)
    assert flags(trainer.model) == before and disable_hft(trainer) is False


def test_peft_wrapped_policy_is_refused(tmp_path):
    # peft is not a dependency; a wrapper with PEFT's marks stands in for PeftModelForCausalLM.
    class PeftModelForCausalLM(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_model = base
            self.peft_config = {"default": object()}

    trainer = plain_trainer(tmp_path)
    trainer.model = trainer.model_wrapped = PeftModelForCausalLM(trainer.model)
    before = flags(trainer.model)
    with pytest.raises(UnsupportedModelError, match="PEFT"):
        enable_hft(trainer)
    assert flags(trainer.model) == before


# -- rounds, checkpoints and resume ---------------------------------------------------------------------
def test_checkpoints_carry_the_manifest_and_resume_checks_it(tmp_path):
    trainer = plain_trainer(tmp_path, "phi3", max_steps=4, save_strategy="steps", save_steps=2)
    handle = enable_hft(trainer, round=1, seed=3)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    for folder in (checkpoint, tmp_path / "out" / "checkpoint-4"):
        saved = json.loads((folder / MANIFEST_NAME).read_text())
        assert saved["config"] == {**handle.selection.config.to_dict()}
        assert saved["fingerprint"] == handle.selection.fingerprint

    # Same options: resumes, with the same half, and finishes the run.
    resumed = plain_trainer(tmp_path, "phi3", max_steps=4, save_strategy="no")
    again = enable_hft(resumed, round=1, seed=3)
    assert again.selection.trainable_units == handle.selection.trainable_units
    before = snapshot(resumed.model)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    check_training(again.selection, before, snapshot(resumed.model), resumed, again)

    # Another round: refused before the checkpoint's weights are loaded.
    other = plain_trainer(tmp_path, "phi3", max_steps=4)
    enable_hft(other, round=2, seed=3)
    weights, state = snapshot(other.model), flags(other.model)
    with pytest.raises(SelectionMismatchError, match="round 1, but this run is round 2"):
        other.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(weights[n], p) for n, p in other.model.named_parameters()) and flags(other.model) == state

    # Another seed: refused too, naming the option.
    seeded = plain_trainer(tmp_path, "phi3", max_steps=4)
    enable_hft(seeded, round=1, seed=4)
    with pytest.raises(SelectionMismatchError, match="seed=3 there, 4 here"):
        seeded.train(resume_from_checkpoint=True)  # the last checkpoint in output_dir


def test_resume_refuses_another_model_and_a_checkpoint_without_manifest(tmp_path):
    trainer = plain_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    enable_hft(trainer)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    wider = plain_trainer(tmp_path, model=tiny_model("llama", intermediate_size=96), max_steps=2)
    enable_hft(wider)
    with pytest.raises(SelectionMismatchError, match="another model"):
        wider.train(resume_from_checkpoint=str(checkpoint))
    os.remove(checkpoint / MANIFEST_NAME)
    plain = plain_trainer(tmp_path, max_steps=2)
    enable_hft(plain)
    with pytest.raises(SelectionMismatchError, match="not written by an HFT run"):
        plain.train(resume_from_checkpoint=str(checkpoint))


def test_continual_rounds_on_one_model(tmp_path):
    model = tiny_model("llama")
    halves = []
    for round in range(3):
        trainer = plain_trainer(tmp_path / str(round), model=model, max_steps=1)
        handle = enable_hft(trainer, round=round)
        before = snapshot(model)
        trainer.train()
        check_training(handle.selection, before, snapshot(model), trainer, handle)
        halves.append(handle.selection.trainable_units)
    assert halves[0] != halves[1] != halves[2]


# -- gradient checkpointing, torch.compile -------------------------------------------------------------
def test_gradient_checkpointing_with_frozen_embeddings_still_trains(tmp_path):
    # Reentrant checkpointing: layer weights get gradients only if the layer's input requires grad.
    trainer = plain_trainer(tmp_path, gradient_checkpointing=True,
                            gradient_checkpointing_kwargs={"use_reentrant": True})
    handle = enable_hft(trainer, train_embeddings=False)
    assert not trainer.model.get_input_embeddings().weight.requires_grad
    before = snapshot(trainer.model)
    trainer.train()
    check_training(handle.selection, before, snapshot(trainer.model), trainer, handle)


def test_input_grads_are_enabled_when_the_trainer_does_not(tmp_path):
    # Checkpointing switched on outside the Trainer, without the input hook transformers 5 adds
    # itself (older versions and other trainers do not): HFT adds it, and removes it on disable.
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    trainer = plain_trainer(tmp_path, model=model)
    handle = enable_hft(trainer, train_embeddings=False)
    before = snapshot(model)
    trainer.train()
    check_training(handle.selection, before, snapshot(model), trainer, handle)
    assert getattr(model, "_require_grads_hooks", None)
    disable_hft(trainer)
    assert not getattr(model, "_require_grads_hooks", None)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile(tmp_path, family):
    # aot_eager traces forward and backward through dynamo and AOTAutograd, like inductor, without
    # spending a minute generating C++ on a CPU.
    trainer = plain_trainer(tmp_path, family, torch_compile=True, torch_compile_backend="aot_eager")
    handle = enable_hft(trainer)
    before = snapshot(trainer.model)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    check_training(handle.selection, before, snapshot(trainer.model), trainer, handle)


# -- zero-code activation ------------------------------------------------------------------------------
@pytest.mark.slow
def test_adapter_enables_hft_on_every_trainer_and_unpatches(tmp_path):
    from transformers import Trainer

    from hft_plugin.adapters.transformers import TransformersAdapter, hft_session

    original = Trainer.__dict__["_prepare_for_training"]
    adapter = TransformersAdapter(config={"round": 1})
    assert adapter.instrument() is True
    try:
        assert adapter.instrument() is False  # second call: warning, no second patch
        trainer = plain_trainer(tmp_path, "phi3")
        assert all(flags(trainer.model).values())  # nothing happens until training starts
        before = snapshot(trainer.model)
        trainer.train()
        session = hft_session(trainer)
        assert session is not None and session.config.round == 1
        check_training(session.selection, before, snapshot(trainer.model), trainer, session.handle)

        # Resuming a checkpoint of another round is refused before its weights are loaded.
        trainer.args.save_strategy, trainer.args.save_steps = "steps", 3
        trainer.train()  # a checkpoint of round 1
        other = TransformersAdapter(config={"round": 2})
        adapter.uninstrument()
        assert other.instrument() is True
        try:
            late = plain_trainer(tmp_path, "phi3")
            weights = snapshot(late.model)
            with pytest.raises(SelectionMismatchError, match="round 1, but this run is round 2"):
                late.train(resume_from_checkpoint=True)
            params = dict(late.model.named_parameters())  # with HFT on: its region parameters too
            assert all(torch.equal(weights[n], params[n]) for n in weights)
        finally:
            other.uninstrument()
        adapter.instrument()

        # A trainer with its own enable_hft keeps its options.
        own = plain_trainer(tmp_path / "own", max_steps=1)
        enable_hft(own, round=3)
        own.train()
        assert hft_session(own).config.round == 3

        # HFT asked for but impossible: loud, before the optimizer exists.
        class NoLayers(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(4, 4)

            def forward(self, input_ids=None, labels=None, **_):
                return {"loss": self.proj(torch.ones(1, 4)).sum()}

        bad = plain_trainer(tmp_path / "bad", model=NoLayers(), max_steps=1)
        with pytest.raises(IntegrationError, match="cannot be applied"):
            bad.train()
        assert bad.optimizer is None and bad.model.proj.weight.requires_grad

        # disable_hft opts a trainer out of zero-code activation.
        opted = plain_trainer(tmp_path / "opted", max_steps=1)
        assert disable_hft(opted) is False
        opted.train()
        assert hft_session(opted) is None and all(flags(opted.model).values())
    finally:
        adapter.uninstrument()
    assert Trainer.__dict__["_prepare_for_training"] is original
    plain = plain_trainer(tmp_path / "plain", max_steps=1)
    plain.train()
    assert hft_session(plain) is None and all(flags(plain.model).values())


def test_a_trainer_dropped_after_training_is_collected_with_its_model(tmp_path):
    # one process that trains several models (a sweep, a round per task) must not keep them all
    import gc
    import weakref

    trainer = plain_trainer(tmp_path)
    enable_hft(trainer, round=0)
    trainer.train()
    gone = weakref.ref(trainer), weakref.ref(trainer.model)
    del trainer
    gc.collect()
    assert [ref() for ref in gone] == [None, None]


def test_enable_twice_with_the_same_options_says_nothing_was_ignored(tmp_path, caplog):
    # round="next" resolves to a number: the second call asked for the same, not for other options
    trainer = plain_trainer(tmp_path)
    enable_hft(trainer, round="next")
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        enable_hft(trainer, round="next")
    assert "already enabled" in caplog.text and "ignored" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        enable_hft(trainer, round=3)
    assert "were ignored" in caplog.text
