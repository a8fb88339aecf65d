"""Shared machinery of the layout readers: walk the layers, turn modules into units."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import nn

from ..boxes import Box, numel as box_numel
from ..errors import LayoutError
from .base import Layout, Part, Unit, find_layer_list, param_shape

# A splitter turns one parameter of a fused module into named regions:
# (param_name, shape) -> [(part_name, boxes), ...] covering the parameter exactly once.
Splitter = Callable[[str, tuple[int, ...]], Sequence[tuple[str, tuple[Box, ...]]]]

# A classifier places one module inside a block: (path in block, module, its params) ->
# (role, splitter or None, unit the module follows or None), or None when it cannot place it.
Placement = tuple[str, "Splitter | None", "str | None"]
Classifier = Callable[[str, nn.Module], "Placement | None"]


# One root module of a layer: (its full name in the model, the path the classifier sees it under,
# the module). A layer is usually one root, the block itself: (f"{list}.{i}", "", block). A layer
# spread over parallel lists (XLM's ``attentions[i]``, ``ffns[i]``, ...) has one root per list,
# each seen under its list's name, so the classifier reads ``attentions.q_lin`` and ``ffns.lin1``.
Root = tuple[str, str, nn.Module]


def read_with(
    model: nn.Module, name: str, classify: Classifier, layers: Sequence[Sequence[Root]] | None = None
) -> Layout:
    """Read ``model`` into a Layout, placing each module of each layer with ``classify``.

    ``layers`` gives the roots of each layer; by default, each block of the ModuleList holding the
    most parameters is one layer. A follow target is a path as the classifier sees it.

    Raises LayoutError naming every parameter ``classify`` could not place.
    """
    if layers is None:
        found = find_layer_list(model)
        if found is None:
            raise LayoutError(
                f"{type(model).__name__} has no list of transformer layers (no nn.ModuleList with "
                "parameters). Register a layout for it with the hft_read_layout hook."
            )
        list_name, layer_list = found
        layers = [[(f"{list_name}.{index}", "", block)] for index, block in enumerate(layer_list)]
    canonical = {id(p): n for n, p in model.named_parameters()}  # tied weights appear once
    shapes = {n: param_shape(p) for n, p in model.named_parameters()}
    in_layers: set[str] = set()
    numel_cache: dict = {}
    result: list[list[Unit]] = []
    unplaced: list[str] = []
    for index, roots in enumerate(layers):
        units: dict[str, list[Part]] = {}
        roles: dict[str, str] = {}
        first_unit: dict[str, str] = {}  # classifier path -> the first unit of that module
        follows: list[tuple[str, list[Part]]] = []
        for prefix, base, root in roots:
            for path, module in root.named_modules():
                own = [
                    (pname, p) for pname, p in module.named_parameters(recurse=False)
                    if canonical.get(id(p)) == _join(prefix, path, pname)
                ]
                if not own:
                    continue
                seen_as = _join(base, path)
                placement = classify(seen_as, module)
                if placement is None:
                    unplaced.extend(_join(prefix, path, pname) for pname, _ in own)
                    continue
                role, splitter, follow = placement
                module_key = _join(prefix, path)
                for pname, p in own:
                    full = _join(prefix, path, pname)
                    in_layers.add(full)
                    shape = param_shape(p)
                    if splitter is None:
                        pieces, numels = _WHOLE, (math.prod(shape),)
                    else:
                        pieces = splitter(pname, shape)
                        numels = _piece_numels(pieces, shape, numel_cache)
                    for (piece, boxes), numel in zip(pieces, numels):
                        key = f"{module_key}:{piece}" if piece else module_key
                        part = Part(full, numel, boxes)
                        if follow:
                            follows.append((follow, [part]))
                        else:
                            if key not in units:
                                units[key] = []
                                roles[key] = role
                                first_unit.setdefault(seen_as, key)
                            units[key].append(part)
        for target, parts in follows:
            owner = first_unit.get(target)
            if owner is None:
                unplaced.extend(p.param for p in parts)
            else:
                units[owner].extend(parts)
        result.append([Unit(k, roles[k], index, tuple(ps)) for k, ps in units.items()])
    if unplaced:
        shown = ", ".join(unplaced[:8]) + (f" and {len(unplaced) - 8} more" if len(unplaced) > 8 else "")
        raise LayoutError(
            f"The {name} layout could not place these parameters of {type(model).__name__}: {shown}. "
            "Register a layout for this architecture with the hft_read_layout hook "
            "(see hft_plugin.hookspecs), or report the model type."
        )
    outside = [n for n in shapes if n not in in_layers]
    return Layout(name=name, layers=result, outside=outside, shapes=shapes)


def _join(*names: str) -> str:
    return ".".join(n for n in names if n)


_WHOLE = (("", None),)


def _piece_numels(pieces, shape: tuple[int, ...], cache: dict) -> list[int]:
    """The size of each piece; a splitter that returns the same pieces for every layer (stacked
    experts) has them computed once per shape."""
    hit = cache.get((id(pieces), shape))
    if hit is not None and hit[0] is pieces:
        return hit[1]
    total = math.prod(shape)
    numels = [total if boxes is None else sum(box_numel(shape, b) for b in boxes) for _, boxes in pieces]
    cache[(id(pieces), shape)] = (pieces, numels)
    return numels


# Splitters for the fused tensors transformers uses today.

def split_along(dim_for: Callable[[str, tuple[int, ...]], int], sizes_for: Callable[[int], Sequence[tuple[str, int]]]) -> Splitter:
    """Consecutive blocks along one dimension, e.g. Phi-3 ``qkv_proj`` rows [q | k | v].

    ``dim_for(param_name, shape)`` picks the dimension; ``sizes_for(length)`` names the blocks.
    """

    def split(pname: str, shape: tuple[int, ...]):
        dim = dim_for(pname, shape)
        pieces, start = [], 0
        for piece, size in sizes_for(shape[dim]):
            pieces.append((piece, (((dim, start, start + size),),)))
            start += size
        if start != shape[dim]:
            raise LayoutError(f"Cannot split {pname} of shape {shape}: parts add up to {start}, not {shape[dim]}.")
        return pieces

    return split


def equal_split(names: Sequence[str], dim: int | Callable[[str, tuple[int, ...]], int] = 0) -> Splitter:
    """Equal consecutive blocks, e.g. ``gate_up_proj`` [gate | up] or GPT-2 ``c_attn`` [q | k | v]."""
    dim_for = dim if callable(dim) else (lambda _p, _s: dim)

    def sizes(total: int):
        if total % len(names):
            raise LayoutError(f"Cannot split a dimension of {total} into {len(names)} equal parts.")
        return [(n, total // len(names)) for n in names]

    return split_along(dim_for, sizes)


def interleaved_split(names: Sequence[str], groups: int, dim: int = 0) -> Splitter:
    """Per-head interleaving, e.g. GPT-NeoX ``query_key_value`` rows [h0: q k v | h1: q k v | ...]."""

    def split(pname: str, shape: tuple[int, ...]):
        total = shape[dim]
        if total % (groups * len(names)):
            raise LayoutError(f"Cannot split {pname} of shape {shape} into {groups} heads x {len(names)} parts.")
        size = total // (groups * len(names))
        return [
            (n, tuple(((dim, (g * len(names) + i) * size, (g * len(names) + i + 1) * size),) for g in range(groups)))
            for i, n in enumerate(names)
        ]

    return split


def per_expert(num_experts: int) -> Splitter:
    """Stacked expert tensors (E, ...) split per expert. A fused ``gate_up_proj`` (E, 2I, H) (and its
    bias (E, 2I)) is also split along dim 1 into gate and up, so each expert has gate, up and down
    units like a dense MLP."""

    def split(pname: str, shape: tuple[int, ...]):
        if len(shape) < 2 or shape[0] != num_experts:
            return [("", None)]
        label = pname.removesuffix("_bias").removesuffix("_proj")
        fused = ("gate", "up") if "gate_up" in pname and shape[1] % 2 == 0 else None
        pieces = []
        for e in range(num_experts):
            if fused:
                step = shape[1] // 2
                for i, n in enumerate(fused):
                    pieces.append((f"{e}.{n}", (((0, e, e + 1), (1, i * step, (i + 1) * step)),)))
            else:
                pieces.append((f"{e}.{label}", (((0, e, e + 1),),)))
        return pieces

    return split
