"""The LLaMA-Factory adapter on LLaMA-Factory's own functions (init_adapter, the PPO trainer's
create_optimizer) with tiny models. Runs in the LLaMA-Factory environment: bash .ci/llamafactory.sh."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llamafactory", reason="LLaMA-Factory tests run in their own environment: bash .ci/llamafactory.sh")

from hft_plugin import ConfigError, HFTConfig, IntegrationError  # noqa: E402
from hft_plugin.adapters.llamafactory import LlamaFactoryAdapter  # noqa: E402
from hft_plugin.freeze import active_handle  # noqa: E402
from hft_plugin.testing import tiny_model  # noqa: E402

from .helpers import assert_frozen_and_trained, snapshot, train_steps  # noqa: E402
from .test_adapters_contract import AdapterContract  # noqa: E402


def lf_args(finetuning_type="full", stage="sft", **kwargs):
    from llamafactory.hparams import FinetuningArguments, ModelArguments

    return ModelArguments(model_name_or_path="tiny"), FinetuningArguments(finetuning_type=finetuning_type, stage=stage,
                                                                          **kwargs)


def init_adapter(model, is_trainable=True, **kwargs):
    from llamafactory.model.adapter import init_adapter as lf_init_adapter

    model_args, finetuning_args = lf_args(**kwargs)
    return lf_init_adapter(model.config, model, model_args, finetuning_args, is_trainable)


@pytest.fixture
def adapter():
    adapter = LlamaFactoryAdapter(config=HFTConfig(round=1))
    adapter.instrument()
    yield adapter
    for handle in adapter.handles:
        handle.remove()
    adapter.uninstrument()


def test_trainable_model_trains_one_half(adapter):
    model = init_adapter(tiny_model("llama"))
    handle = active_handle(model)
    assert handle is not None and handle.selection.config.round == 1
    before = snapshot(model)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(model, optimizer, steps=3)
    counts = assert_frozen_and_trained(handle.selection, before, snapshot(model))
    assert counts["frozen"] > 0 and counts["trained"] > 0


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_frozen_half_is_not_upcast(adapter, family):
    model = tiny_model(family).to(torch.bfloat16)
    model = init_adapter(model)  # LLaMA-Factory upcasts trainable parameters to fp32 here
    dtypes = {p.requires_grad: set() for p in model.parameters()}
    for p in model.parameters():
        dtypes[p.requires_grad].add(p.dtype)
    # a partly trained tensor requires grad as a whole (as it would frozen by hand): upcast with the trainable ones
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}
    handle = active_handle(model)
    for name, param in dict(model.named_parameters()).items():  # partly trained tensors are fp32 whole, the rest bf16
        assert param.dtype == (torch.float32 if name in handle.mechanisms() or param.requires_grad else torch.bfloat16)


def test_without_the_adapter_everything_trains_in_fp32():
    model = init_adapter(tiny_model("llama").to(torch.bfloat16))
    assert active_handle(model) is None
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())


def test_reference_models_are_untouched(adapter):
    reference = init_adapter(tiny_model("llama"), is_trainable=False)
    assert active_handle(reference) is None and all(p.requires_grad for p in reference.parameters())
    assert adapter.handles == []


@pytest.mark.parametrize("finetuning_type", ["lora", "freeze", "oft"])
def test_other_finetuning_types_are_an_error(adapter, finetuning_type):
    model = tiny_model("llama")
    with pytest.raises(IntegrationError, match=f"finetuning_type is '{finetuning_type}'.*finetuning_type: full"):
        init_adapter(model, finetuning_type=finetuning_type)
    assert all(p.requires_grad for p in model.parameters())


def test_other_finetuning_types_still_load_reference_models(adapter):
    reference = init_adapter(tiny_model("llama"), is_trainable=False, finetuning_type="freeze")
    assert active_handle(reference) is None


def test_bad_variable_fails_before_the_model_changes(monkeypatch):
    monkeypatch.setenv("HFT_ROUND", "-1")
    adapter = LlamaFactoryAdapter()  # reads the HFT_* variables when the model is set up
    adapter.instrument()
    try:
        model = tiny_model("llama").to(torch.bfloat16)
        with pytest.raises(ConfigError, match="HFT_ROUND='-1'"):
            init_adapter(model)
        assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    finally:
        adapter.uninstrument()


def test_ppo_optimizer_is_attached_and_fused_tensors_stay_exact(adapter):
    from llamafactory.train.ppo.trainer import CustomPPOTrainer
    from transformers import Seq2SeqTrainingArguments
    from trl import AutoModelForCausalLMWithValueHead

    ppo = {"stage": "ppo", "reward_model": "rm", "reward_model_type": "full"}
    model = init_adapter(tiny_model("phi3"), **ppo)  # qkv_proj and gate_up_proj are fused
    handle = active_handle(model)
    assert set(handle.mechanisms().values()) == {"rows"}
    wrapped = AutoModelForCausalLMWithValueHead.from_pretrained(model)
    trainer = CustomPPOTrainer.__new__(CustomPPOTrainer)  # only its create_optimizer is exercised
    args = Seq2SeqTrainingArguments("/tmp/hft-lf-ppo", learning_rate=1e-2, weight_decay=0.1, report_to=[])
    _, finetuning_args = lf_args(**ppo)
    optimizer = trainer.create_optimizer(wrapped, args, finetuning_args)
    assert handle._attachments and handle._attachments[0].optimizer() is optimizer  # attached; the value head is not the handle's
    before = snapshot(model)
    train_steps(model, optimizer, steps=3)
    counts = assert_frozen_and_trained(handle.selection, before, snapshot(model))
    assert counts["partial"] > 0


class TestLlamaFactoryContract(AdapterContract):
    adapter_class = LlamaFactoryAdapter
    trigger = "llamafactory.model.adapter"
    targets = tuple(("llamafactory.model.adapter", f) for f in
                    ("_setup_full_tuning", "_setup_freeze_tuning", "_setup_lora_tuning"))


def test_round_next_is_logged_as_the_round_that_trains_with_the_overall_share(caplog):
    # a model not loaded from a folder has no manifest: round="next" trains round 0, and the log says so
    adapter = LlamaFactoryAdapter(config=HFTConfig(round="next"))
    adapter.instrument()
    try:
        with caplog.at_level("WARNING", logger="hft_plugin"):
            init_adapter(tiny_model("llama"))
    finally:
        for handle in adapter.handles:
            handle.remove()
        adapter.uninstrument()
    assert "sft stage, round 0" in caplog.text and "round next" not in caplog.text
    assert "trainable%:" in caplog.text  # the overall share first, as at every train start
