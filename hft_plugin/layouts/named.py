"""Named layouts: exact per-family rules for the architectures where the rules matter.

Each family lists every module of its decoder layer and the role it plays; a module that is not
listed is an error, never a guess. Fused tensors are split into their logical parts, so the
category rule treats Phi-3's ``qkv_proj`` like Llama's three projections.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .base import Layout
from .reader import Placement, equal_split, interleaved_split, per_expert, read_with, split_along

Rules = dict[str, Placement]

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")
_QK_NORMS = {"self_attn.q_norm": "self_attn.q_proj", "self_attn.k_norm": "self_attn.k_proj"}


def _rules(attention=_ATTN, mlp=_MLP, norm=_NORMS, follows: dict[str, str] | None = None, **special: Placement) -> Rules:
    rules: Rules = {}
    rules.update({path: ("attention", None, None) for path in attention})
    rules.update({path: ("mlp", None, None) for path in mlp})
    rules.update({path: ("norm", None, None) for path in norm})
    rules.update({path: ("attention", None, target) for path, target in (follows or {}).items()})
    rules.update(special)
    return rules


def llama(config: Any) -> Rules:
    """Llama, Mistral, Qwen2 (q/k/v biases follow their weights): 4 projections, 3 MLP matrices, 2 norms."""
    return _rules()


def qwen3(config: Any) -> Rules:
    """Qwen3: as Llama, with per-head q_norm/k_norm that follow q_proj/k_proj."""
    return _rules(follows=_QK_NORMS)


def gemma(config: Any) -> Rules:
    """Gemma 2/3: four norms per layer (around attention and around the MLP); Gemma 3 adds q/k norms."""
    norms = _NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    return _rules(norm=norms, follows=_QK_NORMS)


def phi3(config: Any) -> Rules:
    """Phi-3: fused ``qkv_proj`` rows [q | k | v] and ``gate_up_proj`` rows [gate | up]."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    qkv = split_along(lambda _p, _s: 0, lambda _total: [("q", q), ("k", kv), ("v", kv)])
    return _rules(
        attention=("self_attn.o_proj",), mlp=("mlp.down_proj",),
        **{"self_attn.qkv_proj": ("attention", qkv, None), "mlp.gate_up_proj": ("mlp", equal_split(("gate", "up")), None)},
    )


def gpt2(config: Any) -> Rules:
    """GPT-2: Conv1D stores weights as (in, out), so ``c_attn`` splits its weight along dim 1 and its
    bias along dim 0 into [q | k | v]."""
    c_attn = equal_split(("q", "k", "v"), dim=lambda pname, shape: 1 if len(shape) == 2 else 0)
    return _rules(
        attention=("attn.c_proj",), mlp=("mlp.c_fc", "mlp.c_proj"), norm=("ln_1", "ln_2"),
        **{"attn.c_attn": ("attention", c_attn, None)},
    )


def gpt_neox(config: Any) -> Rules:
    """GPT-NeoX / Pythia: ``query_key_value`` interleaves [q k v] per head."""
    qkv = interleaved_split(("q", "k", "v"), groups=config.num_attention_heads)
    return _rules(
        attention=("attention.dense",), mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        **{"attention.query_key_value": ("attention", qkv, None)},
    )


def _moe(config: Any, follows: dict[str, str] | None) -> Rules:
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    return _rules(
        follows=follows,
        **{"mlp.gate": ("router", None, None), "mlp.experts": ("mlp", per_expert(experts), None)},
    )


def mixtral(config: Any) -> Rules:
    """Mixtral: a router (``mlp.gate``) and stacked experts (E, 2I, H) / (E, H, I), split per expert
    into gate, up and down."""
    return _moe(config, None)


def qwen3_moe(config: Any) -> Rules:
    """Qwen3-MoE: Mixtral's expert layout, Qwen3's q/k norms; dense-MLP layers read as Llama's."""
    return _moe(config, _QK_NORMS)


FAMILIES: dict[str, Callable[[Any], Rules]] = {
    "llama": llama, "mistral": llama, "qwen2": llama, "qwen3": qwen3,
    "gemma2": gemma, "gemma3_text": gemma, "phi3": phi3, "gpt2": gpt2, "gpt_neox": gpt_neox,
    "mixtral": mixtral, "qwen3_moe": qwen3_moe,
}


def read_named(model: nn.Module) -> Layout | None:
    """Read ``model`` with its family's rules, or return None if no named family covers it."""
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        return None
    rules = family(config)
    if family is qwen3_moe:  # some Qwen3-MoE layers are dense (mlp_only_layers, decoder_sparse_step)
        rules.update(_rules(attention=(), norm=()))
    return read_with(model, f"{config.model_type} (named)", lambda path, _m: rules.get(path))
