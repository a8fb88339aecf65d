"""Bad input: a typed error that names the bad value, raised before any flag changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hft_plugin import (ConfigError, HFTConfig, HFTError, LayoutError, SelectionMismatchError,
                        UnsupportedModelError, apply_selection, select_half)
from hft_plugin.testing import tiny_model

from .helpers import flags


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=0.0), "ratio=0.0"),
    (dict(ratio=1.0), "ratio=1.0"),
    (dict(ratio=-0.5), "ratio=-0.5"),
    (dict(ratio=float("nan")), "ratio=nan"),
    (dict(ratio="half"), "ratio='half'"),
    (dict(strategy="random"), "'random'"),
    (dict(round=-1), "round=-1"),
    (dict(round=1.5), "round=1.5"),
    (dict(seed=-3), "seed=-3"),
    (dict(train_embeddings="no"), "train_embeddings='no'"),
])
def test_bad_arguments(kwargs, match):
    model = tiny_model("llama")
    before = flags(model)
    with pytest.raises(ConfigError, match=match) as info:
        select_half(model, **kwargs)
    assert isinstance(info.value, HFTError)
    assert flags(model) == before


def test_unknown_config_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'ratio'"):
        HFTConfig.from_dict({"ration": 0.5})


def test_peft_wrapped_model_is_refused():
    class PeftModelForCausalLM(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_model = base
            self.peft_config = {"default": object()}

    model = PeftModelForCausalLM(tiny_model("llama"))
    before = flags(model)
    with pytest.raises(UnsupportedModelError, match="merge_and_unload"):
        select_half(model)
    assert flags(model) == before


def test_integer_and_quantized_parameters_are_refused():
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj.weight = nn.Parameter(torch.zeros(128, 64, dtype=torch.int8), requires_grad=False)
    before = flags(model)
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0.mlp.up_proj.weight.*torch.int8"):
        select_half(model)
    assert flags(model) == before
    quantized = tiny_model("llama")
    quantized.hf_quantizer = object()
    with pytest.raises(UnsupportedModelError, match="quantized"):
        select_half(quantized)


def test_model_without_layers_is_refused():
    with pytest.raises(LayoutError, match=r"Sequential has no repeated blocks.*hft_read_layout"):
        select_half(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(UnsupportedModelError, match="nn.Module"):
        select_half("gpt2")


def test_unplaceable_parameters_are_named():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.extra = nn.Linear(4, 4)  # a module the Llama rules do not know
    with pytest.raises(LayoutError, match=r"model.layers.1.self_attn.extra.weight.*hft_read_layout"):
        select_half(model)


def test_selection_for_another_model_is_refused_before_any_change():
    selection = select_half(tiny_model("llama", num_hidden_layers=2))
    model = tiny_model("llama")
    before = flags(model)
    with pytest.raises(SelectionMismatchError, match="another model"):
        apply_selection(model, selection)
    assert flags(model) == before
