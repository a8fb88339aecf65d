"""Tiny models and a tokenizer built in code, for tests, examples and quick trials (nothing downloads).

    >>> model = tiny_model("llama")
    >>> type(model).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

from typing import Any

import torch

# Small but structurally faithful configs: grouped-query attention where the family has it, an even
# number of layers, and sizes divisible the way the fused tensors need.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=128),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128),
    "mixtral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2),
}

TINY_VOCAB = 96


def tiny_config(family: str = "llama", **overrides: Any):
    from transformers import AutoConfig

    values = dict(TINY_CONFIGS[family], vocab_size=TINY_VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return AutoConfig.for_model(family, **values)


def tiny_model(family: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised causal LM of ``family``, a few hundred thousand parameters, in fp32."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def tiny_tokenizer():
    """A character-level tokenizer built with the ``tokenizers`` library, wrapped for transformers,
    with a chat template, so TRL trainers run on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars[: TINY_VOCAB - len(specials)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    return fast


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name, to compare against after training."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def assert_frozen_and_trained(selection, before: dict, after: dict) -> dict[str, int]:
    """Check HFT's promise: every frozen element bit-identical, every trainable tensor (or trainable
    region of a fused tensor) moved. ``before``/``after`` are :func:`snapshot` results.

    Raises AssertionError naming the first tensor that breaks it; returns how many tensors and
    frozen elements were checked, so a caller can tell the check was not vacuous.
    """
    from .boxes import to_mask

    plan = selection.plan()
    counts = {"frozen": 0, "trained": 0, "partial": 0, "frozen_elements": 0}
    for name in plan.frozen:
        if not torch.equal(before[name], after[name]):
            raise AssertionError(f"frozen tensor {name} changed")
        counts["frozen"] += 1
        counts["frozen_elements"] += before[name].numel()
    for name in plan.trainable:
        if torch.equal(before[name], after[name]):
            raise AssertionError(f"trainable tensor {name} did not move")
        counts["trained"] += 1
    for name, boxes in plan.partial.items():
        mask = to_mask(tuple(before[name].shape), boxes, device=before[name].device)
        if not torch.equal(before[name][~mask], after[name][~mask]):
            raise AssertionError(f"frozen region of {name} changed")
        if torch.equal(before[name][mask], after[name][mask]):
            raise AssertionError(f"trainable region of {name} did not move")
        counts["partial"] += 1
        counts["frozen_elements"] += int((~mask).sum())
    return counts

