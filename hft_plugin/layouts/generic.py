"""The generic layout: reads architectures no named rule covers, from module structure alone.

The layers are the repeated blocks (the ModuleList holding most parameters). Inside a block every
module that owns parameters is placed by role, read from its path and class names: norms, the
router of a mixture of experts, the MLP (dense or experts), the token mixer (attention, and the
state-space or recurrent mixers of hybrid models), and "other" for what is none of these. Known fused
tensors are split into their parts (``gate_up_proj`` into gate and up; stacked experts per expert);
any other module is one unit. The category strategy then trains the requested share of each role.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .base import Layout
from .reader import Placement, equal_split, per_expert, read_with

_NORM = re.compile(r"(^|[._])(ln|norm|layernorm|layer_norm|rmsnorm|ln_\w+|\w*_norm|\w*norm\d*)$", re.I)
_ROUTER = re.compile(r"(^|\.)(router|gate|gating|switch|classifier)$", re.I)
_MLP = re.compile(
    r"(mlp|ffn|feed_forward|feedforward|ff|experts?|moe|channel_mix|dense_h_to_4h|dense_4h_to_h|"
    r"fc\d*|c_fc|w[123]|up_proj|down_proj|gate_proj|intermediate|shared_expert\w*)", re.I,
)
_MIXER = re.compile(
    r"(attn|attention|mixer|mamba|ssm|time_mix|timemix|temporal|recurrent|rglru|conv|linear_attn|"
    r"retention|token_mix|q_proj|k_proj|v_proj|o_proj|qkv|query|key|value|wqkv)", re.I,
)


def _num_experts(config: Any) -> int | None:
    for name in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_layer"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def classify(path: str, module: nn.Module, config: Any) -> Placement:
    """Place one module of a block by its path (inside the block) and class name."""
    leaf = path.rsplit(".", 1)[-1]
    cls = type(module).__name__
    if "norm" in cls.lower() or _NORM.search(leaf):
        return ("norm", None, None)
    experts = _num_experts(config)
    if experts and _ROUTER.search(path) and not _MLP.search(leaf):
        return ("router", None, None)
    if experts and any(p.dim() >= 2 and _shape0(p) == experts for p in module.parameters(recurse=False)) and "expert" in path.lower():
        return ("mlp", per_expert(experts), None)
    if _MIXER.search(path) or _MIXER.search(cls):
        return ("attention", None, None)
    if _MLP.search(path) or "mlp" in cls.lower():
        if leaf == "gate_up_proj":
            return ("mlp", equal_split(("gate", "up")), None)
        return ("mlp", None, None)
    return ("other", None, None)


def _shape0(p) -> int:
    shape = getattr(p, "ds_shape", None) or p.shape
    return shape[0]


def read_generic(model: nn.Module) -> Layout:
    config = getattr(model, "config", None)
    return read_with(model, "generic", lambda path, module: classify(path, module, config))
