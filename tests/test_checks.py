"""hft_plugin.checks: a model with nothing left to train is refused before training starts, and the
counts say what actually trains once a selection is applied (tensors the user froze stay frozen)."""

from __future__ import annotations

import pytest
import torch

from hft_plugin import NothingToTrainError, UnsupportedModelError, apply_selection, enable_hft, select_half
from hft_plugin.checks import applied_counts
from hft_plugin.testing import tiny_model

from .helpers import flags, plain_trainer, snapshot


# -- nothing left to train -----------------------------------------------------------------------------
def test_a_model_the_user_froze_entirely_is_refused_before_training(tmp_path):
    trainer = plain_trainer(tmp_path)
    trainer.model.requires_grad_(False)
    methods = set(vars(trainer))
    with pytest.raises(NothingToTrainError, match=r"every one of the model's 39 parameters has requires_grad=False.*"
                                                  r"model\.requires_grad_\(True\)"):
        enable_hft(trainer)
    assert set(vars(trainer)) == methods and not any(flags(trainer.model).values())
    assert isinstance(NothingToTrainError("x"), UnsupportedModelError)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_everything_hft_would_train_frozen_by_the_user_is_refused(family):
    model = tiny_model(family)
    selection = select_half(model, round=1)
    plan = selection.plan()
    for name, param in model.named_parameters():
        if name in plan.trainable or name in plan.partial:
            param.requires_grad_(False)
    before = flags(model)
    assert any(before.values())  # the half HFT freezes is still trainable, and stays untouched
    with pytest.raises(NothingToTrainError, match=r"parameters round 1 trains .* all have requires_grad=False"):
        apply_selection(model, selection)
    assert flags(model) == before


def test_the_counts_are_what_actually_trains():
    model = tiny_model("llama")
    model.lm_head.requires_grad_(False)
    model.model.layers[0].requires_grad_(False)
    selection = select_half(model)
    handle = apply_selection(model, selection)
    counts = applied_counts(selection, model)
    planned = selection.stats()
    assert counts["trainable_params"] == sum(p.numel() for p in handle.parameters())  # the optimizer's elements
    assert counts["trainable_params"] < planned["trainable_params"]
    assert counts["outside_trainable_params"] == planned["outside_trainable_params"] - model.lm_head.weight.numel()
    assert counts["trainable_ratio"] < planned["trainable_ratio"] == 0.5
    assert "lm_head.weight" in counts["frozen_by_user"]
    assert sum(g["trainable"] for g in counts["roles"].values()) == counts["layer_trainable_params"]
    handle.remove()


def test_counts_of_partly_trained_tensors():
    model = tiny_model("phi3")
    selection = select_half(model)
    handle = apply_selection(model, selection)
    counts = applied_counts(selection, model)
    assert counts["trainable_params"] == selection.stats()["trainable_params"]  # nothing frozen by hand
    handle.remove()
    model.model.layers[0].self_attn.qkv_proj.requires_grad_(False)
    counts = applied_counts(selection, model)
    frozen_part = sum(p.numel for u, t in selection.units() if t for p in u.parts
                      if p.param == "model.layers.0.self_attn.qkv_proj.weight")
    assert counts["trainable_params"] == selection.stats()["trainable_params"] - frozen_part


def test_frozen_bits_stay_when_the_user_froze_part(tmp_path):
    model = tiny_model("llama")
    model.model.embed_tokens.requires_grad_(False)
    trainer = plain_trainer(tmp_path, model=model)
    handle = enable_hft(trainer)
    before = snapshot(model)
    trainer.train()
    after = snapshot(model)
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not model.model.embed_tokens.weight.requires_grad
    assert applied_counts(handle.selection, model)["frozen_by_user"] == ["model.embed_tokens.weight"]
