"""The ms-swift adapter on ms-swift's own `TunerMixin.prepare_model` with its real parsed arguments and
a tiny model: a tuner other than `full`, a freeze or LISA is refused before the model changes; full
fine-tuning passes. Runs in the ms-swift environment: bash .ci/swift.sh."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("swift.pipelines", reason="ms-swift tests run in their own environment: bash .ci/swift.sh")

from hft_plugin import IntegrationError  # noqa: E402
from hft_plugin.adapters.swift import SwiftAdapter, conflicting_options  # noqa: E402
from hft_plugin.testing import tiny_model, tiny_tokenizer  # noqa: E402

from .test_adapters_contract import AdapterContract  # noqa: E402


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """ms-swift's SftArguments for a tiny local Llama, parsed from a command line as `swift sft` does."""
    from swift.arguments import SftArguments
    from swift.utils import parse_args

    root = tmp_path_factory.mktemp("swift-args")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    row = {"messages": [{"role": "user", "content": "1 plus 1?"}, {"role": "assistant", "content": "2."}]}
    (root / "data.jsonl").write_text(json.dumps(row))

    def parse(*flags: str):
        argv = ["--model", str(root / "model"), "--model_type", "llama", "--template", "default",
                "--dataset", str(root / "data.jsonl"), "--output_dir", str(root / "out"), "--add_version", "false", "--check_model", "false",
                "--report_to", "none", *flags]
        args, remaining = parse_args(SftArguments, argv)
        assert remaining == []
        return args

    return parse


@pytest.fixture(scope="module")
def full_args(parsed):
    return parsed("--tuner_type", "full")


@pytest.fixture
def adapter():
    adapter = SwiftAdapter()
    adapter.instrument()
    yield adapter
    adapter.uninstrument()


def load(args):
    """The model as ms-swift's pipeline loads it (with its model_meta and model_info)."""
    model, _ = args.get_model_processor()
    return model


def untouched(model) -> bool:
    return type(model).__name__ == "LlamaForCausalLM" and all(p.requires_grad for p in model.parameters())


def prepare(args, model, pipeline="sft"):
    if pipeline == "sft":
        from swift.pipelines.train.sft import SwiftSft as Pipeline
    else:
        from swift.pipelines.train.rlhf import SwiftRLHF as Pipeline
    return Pipeline.prepare_model(args, model)


def test_default_lora_is_refused_before_the_model_changes(adapter, parsed):
    args = parsed()  # ms-swift's default tuner is lora
    assert args.tuner_type == "lora"
    model = load(args)
    with pytest.raises(IntegrationError, match="ms-swift was given --tuner_type lora.*--tuner_type full"):
        prepare(args, model)
    assert untouched(model)


def test_without_the_adapter_lora_wraps_the_model(parsed):
    model = prepare(parsed(), load(parsed()))  # what the refusal prevents
    assert "Peft" in type(model).__name__


@pytest.mark.parametrize("tuner", ["longlora", "adalora", "llamapro", "adapter", "vera", "boft", "fourierft", "reft",
                                   "bone"])
def test_other_tuners_are_refused(adapter, full_args, tuner):
    args = copy.copy(full_args)
    args.tuner_type = tuner
    model = load(args)
    with pytest.raises(IntegrationError, match=f"--tuner_type {tuner}"):
        prepare(args, model)
    assert untouched(model)


@pytest.mark.parametrize("flags, named", [
    (("--freeze_parameters", "model.layers.0", "lm_head"), "--freeze_parameters model.layers.0 lm_head"),
    (("--freeze_parameters_regex", r"model\.layers\.[01]\."), "--freeze_parameters_regex"),
    (("--freeze_parameters_ratio", "0.5"), "--freeze_parameters_ratio 0.5"),
    (("--trainable_parameters", "lm_head"), "--trainable_parameters lm_head"),
    (("--trainable_parameters_regex", "lm_head"), "--trainable_parameters_regex lm_head"),
    (("--lisa_activated_layers", "2"), "--lisa_activated_layers 2"),
])
def test_own_freezing_is_refused_before_the_model_changes(adapter, parsed, flags, named):
    args = parsed("--tuner_type", "full", *flags)
    model = load(args)
    with pytest.raises(IntegrationError, match=f"ms-swift was given {named}"):
        prepare(args, model)
    assert untouched(model)  # ms-swift's own freeze would have run inside prepare_model


def test_full_fine_tuning_passes(adapter, full_args):
    model = prepare(full_args, load(full_args))
    assert untouched(model)  # HFT itself is applied when the trainer prepares its optimizer


def test_rlhf_pipeline_is_checked_too(adapter, parsed):
    args = parsed()
    model = load(args)
    with pytest.raises(IntegrationError, match="--tuner_type lora"):
        prepare(args, model, pipeline="rlhf")
    assert untouched(model)


def test_multimodal_defaults_are_not_refused_but_freeze_llm_is():
    arch = SimpleNamespace(language_model=["model.language_model"], vision_tower=["model.visual"],
                           aligner=["model.visual.merger"], generator=[])
    meta = SimpleNamespace(is_multimodal=True, model_arch=arch)
    # what `--freeze_vit true --freeze_aligner false` (ms-swift's defaults differ per model) leaves in the args
    args = SimpleNamespace(tuner_type="full", model_meta=meta, freeze_parameters=["model.visual"],
                           trainable_parameters=["model.visual.merger"])
    assert conflicting_options(args) == []
    args.freeze_parameters = ["model.visual", "model.language_model"]  # --freeze_llm true
    assert conflicting_options(args) == ["--freeze_parameters model.language_model"]


class TestSwiftContract(AdapterContract):
    adapter_class = SwiftAdapter
    trigger = "swift.pipelines.train.tuner"
    targets = (("swift.pipelines.train.tuner", "TunerMixin.prepare_model"),)

    def check_orders(self, out: dict) -> None:
        # TunerMixin.prepare_model is a classmethod, which has a __wrapped__ of its own (the function):
        # every depth the shared script counts is one more than for a plain function.
        assert out["depth_after_unpatch"] == [1]
        super().check_orders({k: [d - 1 for d in v] if k.startswith("depth_") else v for k, v in out.items()})
