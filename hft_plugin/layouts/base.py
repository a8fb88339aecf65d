"""The data a layout reader produces: a model read into layers, roles and units.

A *unit* is the smallest thing a strategy trains or freezes: one projection with its bias, one
norm, one expert's gate matrix. A unit is made of *parts*; a part is a whole parameter or a region
of one (a slice of a fused ``qkv_proj``, one expert of a stacked expert tensor). A region is a union
of boxes; a box fixes index ranges along some dimensions and leaves the others whole.

Sizes are read without touching weights, so meta-device models and DeepSpeed ZeRO-3 partitioned
parameters (``ds_shape``) read the same as materialised ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import math
from typing import Iterator

import torch
from torch import nn

from ..boxes import Box

ROLES = ("attention", "mlp", "norm", "router", "other")
"""Roles inside a transformer block. The category strategy balances each role on its own."""

GROUPS = ROLES
"""Deprecated name of :data:`ROLES`."""


def param_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a parameter, also when ZeRO-3 has partitioned it away."""
    ds_shape = getattr(param, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(param.shape)


@dataclasses.dataclass(frozen=True)
class Part:
    """A whole parameter (``boxes is None``) or the union of disjoint boxes of it."""

    param: str
    numel: int
    boxes: tuple[Box, ...] | None = None

    @property
    def whole(self) -> bool:
        return self.boxes is None


@dataclasses.dataclass(frozen=True)
class Unit:
    """What trains or freezes as one: e.g. ``layers.3.self_attn.q`` with its weight and bias."""

    key: str
    role: str  # one of ROLES
    layer: int
    parts: tuple[Part, ...]

    @property
    def group(self) -> str:
        """Deprecated name of :attr:`role`."""
        return self.role

    @functools.cached_property  # read many times by the strategies; writes __dict__, so fine when frozen
    def numel(self) -> int:
        return sum(p.numel for p in self.parts)


@dataclasses.dataclass
class Layout:
    """A model read into transformer layers.

    Attributes:
        name: which reader read it, e.g. ``"llama (named)"`` or ``"generic"``.
        layers: per layer, its units.
        outside: names of parameters outside the layers (embeddings, lm_head, final norm...).
        shapes: every parameter's full shape, by name.
    """

    name: str
    layers: list[list[Unit]]
    outside: list[str]
    shapes: dict[str, tuple[int, ...]]

    def units(self) -> Iterator[Unit]:
        for layer in self.layers:
            yield from layer

    def numel(self, name: str) -> int:
        return math.prod(self.shapes[name])

    @property
    def layer_numel(self) -> int:
        return sum(u.numel for u in self.units())

    @property
    def outside_numel(self) -> int:
        return sum(self.numel(n) for n in self.outside)

    def splits(self) -> dict[str, tuple[Box, ...]]:
        """How each parameter cut into regions (a fused ``qkv_proj`` or ``query_key_value``, stacked
        experts) is cut: its parts' boxes, sorted. Whole parameters are not listed."""
        cuts: dict[str, list[Box]] = {}
        for unit in self.units():
            for part in unit.parts:
                if part.boxes is not None:
                    cuts.setdefault(part.param, []).extend(part.boxes)
        return {name: tuple(sorted(boxes)) for name, boxes in cuts.items()}

    def fingerprint(self) -> str:
        """The model's structure as a short hash: parameter names and shapes, and how fused tensors
        are cut into parts (which follows from the config: GPT-NeoX's head count, Phi-3's q/kv sizes,
        expert counts), so two models that differ only there differ here."""
        return fingerprint_shapes(self.shapes, self.splits())


def fingerprint_shapes(shapes: dict[str, tuple[int, ...]], splits: dict[str, tuple[Box, ...]] | None = None) -> str:
    """A short hash of parameter names and shapes and, if given, of how parameters are split into
    parts (:meth:`Layout.splits`). Without splits (or with none) it is the hash of names and shapes
    alone, as format 1 of ``hft_selection.json`` recorded it.

        >>> fingerprint_shapes({"w": (4, 2)}) == fingerprint_shapes({"w": (4, 2)}, {})
        True
        >>> fingerprint_shapes({"w": (4, 2)}) != fingerprint_shapes({"w": (4, 2)}, {"w": (((0, 0, 2),), ((0, 2, 4),))})
        True
    """
    lines = [f"{name}:{','.join(map(str, shape))}" for name, shape in sorted(shapes.items())]
    for name, boxes in sorted((splits or {}).items()):
        cuts = ";".join("/".join(f"{d},{a},{b}" for d, a, b in box) for box in boxes)
        lines.append(f"split {name}:{cuts}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@contextlib.contextmanager
def gc_paused():
    """Pause the garbage collector: reading a large MoE makes ~10^5 small objects, and collecting
    meanwhile triples the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def is_peft(model: nn.Module) -> bool:
    """True for a model wrapped in PEFT adapters (a ``PeftModel``, or a model carrying ``peft_config``)."""
    return hasattr(model, "peft_config") or type(model).__name__.startswith("Peft")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under DDP/DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "PipelineEngine",
        ):
            model = inner
            continue
    return model


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer layers: the ModuleList holding the most parameters, if it holds most of them."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(math.prod(param_shape(p)) for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None or best[0] == 0:
        return None
    return best[1], best[2]
