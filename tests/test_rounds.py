"""hft_plugin.rounds: round="next" continues from the manifest of the folder the model was loaded
from, the history of rounds survives every save, and a round that already ran is a warning that
names the fix. (A model with nothing left to train: tests/test_checks.py.)"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hft_plugin import (ConfigError, HFTConfig, ManifestError, SelectionMismatchError, apply_selection, enable_hft,
                        select_half)
from hft_plugin.rounds import resolve_round
from hft_plugin.selection import MANIFEST_NAME, Selection
from hft_plugin.testing import tiny_model

from ._workers.common import check_training
from .helpers import flags, plain_trainer, snapshot


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder))


def train_round(tmp_path, folder, name, **options):
    """One HFT round with the Trainer on the model saved in ``folder``; its output dir is returned."""
    out = tmp_path / name
    trainer = plain_trainer(out.parent / f"{name}-run", model=load(folder), max_steps=1)
    trainer.args.output_dir = str(out)
    handle = enable_hft(trainer, **options)
    before = snapshot(trainer.model)
    trainer.train()
    check_training(handle.selection, before, snapshot(trainer.model), trainer, handle)
    trainer.save_model()
    return out, handle.selection


# -- round="next" --------------------------------------------------------------------------------------
def test_next_round_continues_from_the_loaded_folder_and_keeps_the_history(tmp_path, caplog):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        out0, first = train_round(tmp_path, base, "task0", round="next", seed=3, strategy="layer", ratio=0.25)
    assert first.config == HFTConfig(round=0, seed=3, strategy="layer", ratio=0.25)
    assert f"round='next' found no {MANIFEST_NAME}" in caplog.text  # a base model: round 0, one line
    out1, second = train_round(tmp_path, out0, "task1", round="next")
    assert second.config == HFTConfig(round=1, seed=3, strategy="layer", ratio=0.25)  # same seed, strategy, ratio
    assert second.trainable_units != first.trainable_units
    assert second.trainable_units == select_half(tiny_model("llama"), config=second.config).trainable_units
    out2, third = train_round(tmp_path, out1, "task2", round="next", seed=5)  # a given option wins
    assert (third.config.round, third.config.seed, third.config.strategy) == (2, 5, "layer")
    saved = Selection.load(str(out2))
    assert [h["round"] for h in saved.history] == [0, 1]
    assert [h["seed"] for h in saved.history] == [3, 3]
    assert saved.history[1]["folder"] == str(out1) and saved.history[0]["fingerprint"] == first.fingerprint
    assert json.loads((out2 / MANIFEST_NAME).read_text())["config"]["round"] == 2


def test_next_from_the_environment_and_select_half(tmp_path):
    from hft_plugin.bootstrap import env

    folder = tmp_path / "round3"
    model = tiny_model("llama")
    model.save_pretrained(folder)
    select_half(model, round=3, seed=7, train_embeddings=False).save(str(folder))
    config = env.load_config({"HFT_ROUND": "next"})
    selection = select_half(load(folder), config=config)
    assert selection.config == HFTConfig(round=4, seed=7, train_embeddings=False)
    assert select_half(load(folder), round="next", train_embeddings=True).config.train_embeddings is True


def test_starting_a_round_that_already_ran_is_a_warning_naming_the_fix(tmp_path, caplog):
    folder = tmp_path / "done"
    model = tiny_model("llama")
    model.save_pretrained(folder)
    done = select_half(model, round=1)
    done.history = ({**done.config.to_dict(), "round": 0, "fingerprint": done.fingerprint},)
    done.save(str(folder))
    for round in (1, 0):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hft_plugin"):
            selection = select_half(load(folder), round=round)
        assert selection.config.round == round  # trained as asked
        assert f"says round {round} already ran on these weights (rounds run: 0, 1)" in caplog.text
        assert "pass round=2 or round='next' (HFT_ROUND=next)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        select_half(load(folder), round=2)
    assert caplog.text == ""


def test_next_with_a_damaged_folder_manifest_is_refused(tmp_path):
    folder = tmp_path / "bad"
    tiny_model("llama").save_pretrained(folder)
    (folder / MANIFEST_NAME).write_text("{")
    with pytest.raises(ManifestError, match=f"{MANIFEST_NAME}.*not valid JSON"):
        select_half(load(folder), round="next")


def test_next_without_a_folder_is_round_zero(caplog):
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        config, history = resolve_round(tiny_model("llama"), HFTConfig(round="next"))
    assert config.round == 0 and history == ()
    assert "not loaded from a local folder" in caplog.text and len(caplog.records) == 1


@pytest.mark.parametrize("value", ["nxt", "1", 1.0, -1, True])
def test_round_must_be_a_number_or_next(value):
    with pytest.raises(ConfigError, match="round="):
        HFTConfig(round=value)


def test_rounds_on_one_model_object_still_apply(tmp_path):
    """apply_selection after another round's handle: the user's flags are those before any round."""
    model = tiny_model("llama")
    first = apply_selection(model, select_half(model, round=0))
    trained_first = {n for n, _ in first.named_parameters()}
    second = apply_selection(model, select_half(model, round=1))  # round 0's frozen half is trainable again
    assert first.removed and {n for n, _ in second.named_parameters()} != trained_first
    second.remove()
    assert all(flags(model).values())


# -- the promises of docs/trainers.md about rounds and resume --------------------------------------------
def test_resume_a_next_round_run(tmp_path):
    """round='next' resolves to a number when HFT is enabled, so a resumed run of it is that round."""
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    select_half(load(base), round=0, seed=4).save(str(base))  # base is the output of round 0
    trainer = plain_trainer(tmp_path / "a", model=load(base), max_steps=2, save_strategy="steps", save_steps=1)
    handle = enable_hft(trainer, round="next")
    assert handle.selection.config == HFTConfig(round=1, seed=4)
    trainer.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-1"
    assert Selection.load(str(checkpoint)).config.round == 1
    resumed = plain_trainer(tmp_path / "a", model=load(base), max_steps=2)
    again = enable_hft(resumed, round="next")
    before = snapshot(resumed.model)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2
    check_training(again.selection, before, snapshot(resumed.model), resumed, again)
    other = plain_trainer(tmp_path / "b", model=load(base), max_steps=2)
    enable_hft(other, round="next", seed=5)  # a given option that differs from the checkpoint's: refused
    with pytest.raises(SelectionMismatchError, match="seed=4 there, 5 here") as refused:
        other.train(resume_from_checkpoint=str(checkpoint))
    assert type(refused.value) is SelectionMismatchError  # a mismatch, not a damaged manifest (a subclass)


def test_resume_a_checkpoint_that_drew_another_half_uses_its_half(tmp_path, caplog, monkeypatch):
    """docs/trainers.md: same options, another half (a changed strategy plugin): the checkpoint's half,
    with a warning. The checkpoint is written by an "installation" whose draw gives the other half."""
    import hft_plugin.selection as selection_module

    draw = selection_module._draw
    with monkeypatch.context() as patched:
        patched.setattr(selection_module, "_draw", lambda layout, config: {
            u.key for u in layout.units()} - draw(layout, config))
        trainer = plain_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
        enable_hft(trainer)
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    drawn = Selection.load(str(checkpoint))
    resumed = plain_trainer(tmp_path, max_steps=2)
    own = enable_hft(resumed).selection
    assert own.trainable_units != drawn.trainable_units and own.config == drawn.config
    before = snapshot(resumed.model)
    with caplog.at_level(logging.WARNING, logger="hft_plugin"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "resuming with the checkpoint's half" in caplog.text
    from hft_plugin.adapters.transformers import hft_session

    session = hft_session(resumed)
    assert session.selection.trainable_units == drawn.trainable_units
    check_training(drawn, before, snapshot(resumed.model), resumed, session.handle)


def test_enable_after_a_distributed_train_is_refused(tmp_path):
    """docs/trainers.md: after a distributed train(), DDP fixed the trained tensors. Stand-in: a
    wrapper class named like torch's DistributedDataParallel (the check reads the class name)."""
    from hft_plugin import IntegrationError

    class DistributedDataParallel(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    trainer = plain_trainer(tmp_path)
    trainer.model_wrapped = DistributedDataParallel(trainer.model)
    before = flags(trainer.model)
    with pytest.raises(IntegrationError, match="already wrapped its model in DistributedDataParallel"):
        enable_hft(trainer)
    assert flags(trainer.model) == before


def test_disable_returns_false_when_hft_was_not_on_and_opts_out_of_zero_code(tmp_path):
    from hft_plugin import disable_hft
    from hft_plugin.adapters.transformers import TransformersAdapter, hft_session

    adapter = TransformersAdapter(config={"round": 1})
    adapter.instrument()
    try:
        trainer = plain_trainer(tmp_path, max_steps=1)
        assert disable_hft(trainer) is False
        trainer.train()
        assert hft_session(trainer) is None and all(flags(trainer.model).values())
    finally:
        adapter.uninstrument()
