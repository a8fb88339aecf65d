"""How a partly trained tensor trains: one mechanism per tensor, chosen by an ordered dispatch.

A fused ``qkv_proj``, a GPT-2 ``c_attn`` or a stacked expert tensor trains in part: some boxes of
it (:mod:`hft_plugin.boxes`) train, the rest stays bit-identical. Each mechanism is a small module
with the same four names:

* ``NAME``: how handles and summaries call it;
* ``matches(tensor) -> bool``: whether it can train ``tensor`` (a :class:`Candidate`) exactly;
* ``why_not(tensor) -> str | None``: why not, for a tensor of its own kind that it refuses (the
  summary shows it beside the mask), None otherwise;
* for the region mechanisms, ``regions(tensor, root)`` (the region parameters the optimizer owns,
  :mod:`hft_plugin.regions`) and ``install(module, partials)`` (the module's forward that computes
  only the trainable boxes' weight gradient).

:data:`DISPATCH` tries them in order and the first that matches wins: ``experts`` (transformers'
stacked experts), ``rows`` (``nn.Linear`` and ``Conv1D``), then ``mask`` (the gradient mask, which
takes everything). A new mechanism is a new module, tried in its place.

    >>> from hft_plugin.testing import tiny_model
    >>> model = tiny_model("phi3")
    >>> qkv = model.model.layers[0].self_attn.qkv_proj
    >>> choose(Candidate("qkv_proj.weight", qkv.weight, (((0, 0, 64),),), qkv, "weight")).NAME
    'rows'
    >>> choose(Candidate("qkv_proj.weight", qkv.weight, (((0, 0, 64),),), qkv, "weight", blocked="")).NAME
    'mask'
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from torch import nn

from ..boxes import Box
from ..shards import is_sharded
from . import experts, mask, rows

DISPATCH: tuple[ModuleType, ...] = (experts, rows, mask)
"""The mechanisms in the order they are tried; ``mask`` last, as it matches every tensor."""

BY_NAME: dict[str, ModuleType] = {m.NAME: m for m in DISPATCH}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A partly trained tensor, and what decides which mechanism can train it.

    Attributes:
        name: the tensor's name in the model.
        param: the tensor.
        boxes: its trainable boxes.
        module: the module that owns it (None when not found).
        attr: its attribute on ``module`` (``"weight"``, ``"gate_up_proj"``, ...).
        blocked: why no region parameter can view it (sharded, shared by several modules), ``""``
            when the mask was asked for, None when region mechanisms may take it.
    """

    name: str
    param: nn.Parameter
    boxes: tuple[Box, ...]
    module: nn.Module | None
    attr: str
    blocked: str | None = None


def candidate(name: str, param: nn.Parameter, boxes: tuple[Box, ...], module: nn.Module | None, attr: str,
              shared: bool, partial: str) -> Candidate:
    """The :class:`Candidate` for ``param``; ``partial``: the handle's mode (``"mask"`` asks for the mask)."""
    if is_sharded(param):
        blocked = "sharded (a DTensor, e.g. by fully_shard): masked on each rank's shard"
    elif partial == "mask":
        blocked = ""
    elif module is None or shared:
        blocked = "the tensor is shared by several modules"
    else:
        blocked = None
    return Candidate(name, param, boxes, module, attr, blocked)


def choose(tensor: Candidate) -> ModuleType:
    """The first mechanism of :data:`DISPATCH` that matches ``tensor``."""
    return next(m for m in DISPATCH if m.matches(tensor))


def why_mask(tensor: Candidate) -> str:
    """Why ``tensor`` takes the mask: what blocked region parameters, the refusal of a mechanism
    whose kind it is, or its module's type; ``""`` when the mask was asked for."""
    if tensor.blocked is not None:
        return tensor.blocked
    for mechanism in DISPATCH:
        why = mechanism.why_not(tensor)
        if why:
            return why
    return f"a {type(tensor.module).__name__} module"
