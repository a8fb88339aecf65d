"""The optimizer of a round owns exactly that round's trainable elements and holds no state from
another round: the checks that keep any other optimizer from being used.

An optimizer *fits* a handle when every tensor of the model it owns, and every one it holds state
for, is one of ``handle.parameters()`` (tensors outside the model, such as a value head, are not the
handle's business; a region parameter of a removed selection is another round's), and when no strided region (the q/k/v columns of GPT-2's ``Conv1D``) is
in a group with ``fused=True`` (a fused kernel treats a parameter as contiguous and writes outside a
strided view). Together, the optimizers attached to a handle must own all of
``handle.parameters()``. Both are checked by :meth:`~hft_plugin.freeze.HFTHandle.attach` (the
second before the first step of any attached optimizer) and by the trainer adapters before they use
an optimizer; a misfit raises :class:`~hft_plugin.errors.OptimizerMismatchError` naming what is
extra or missing, with the remedy: build a new optimizer from ``handle.parameters()``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from .errors import OptimizerMismatchError

REMEDY = ("Build a new optimizer from handle.parameters() (the optimizer of a round owns exactly that round's "
          "trainable elements and holds no state from another round).")


def unwrap(optimizer):
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` and similar ``.optimizer`` shells."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def drop_frozen(optimizer) -> int:
    """Remove tensors that do not require grad (and their state) from ``optimizer``'s groups, in
    place so a scheduler bound to it keeps working. Returns how many were removed.

        >>> import torch
        >>> frozen, trained = torch.nn.Parameter(torch.ones(2), requires_grad=False), torch.nn.Parameter(torch.ones(2))
        >>> optimizer = torch.optim.SGD([frozen, trained], lr=0.1)
        >>> drop_frozen(optimizer), len(optimizer.param_groups[0]["params"])
        (1, 1)
    """
    optimizer = unwrap(optimizer)
    removed = 0
    for group in getattr(optimizer, "param_groups", None) or []:
        params = group["params"]
        kept = [p for p in params if not isinstance(p, torch.Tensor) or p.requires_grad]
        for p in params:
            if isinstance(p, torch.Tensor) and not p.requires_grad:
                optimizer.state.pop(p, None)
                removed += 1
        group["params"] = kept
    return removed


def replace_in_groups(optimizer, replacements: dict[int, list[torch.Tensor]]) -> int:
    """In ``optimizer``'s groups, replace each tensor whose id is a key of ``replacements`` by its
    list of tensors (in the same group, so with the same learning rate and weight decay), in place so
    a scheduler bound to the optimizer keeps working; state for a replaced tensor is dropped.
    Returns how many tensors were replaced.

        >>> import torch
        >>> whole = torch.nn.Parameter(torch.ones(4))
        >>> part = torch.nn.Parameter(whole.data[:2])
        >>> optimizer = torch.optim.SGD([whole], lr=0.1)
        >>> replace_in_groups(optimizer, {id(whole): [part]}), optimizer.param_groups[0]["params"][0] is part
        (1, True)
    """
    optimizer = unwrap(optimizer)
    replaced = 0
    for group in getattr(optimizer, "param_groups", None) or []:
        params = []
        for p in group["params"]:
            if isinstance(p, torch.Tensor) and id(p) in replacements:
                optimizer.state.pop(p, None)
                params.extend(replacements[id(p)])
                replaced += 1
            else:
                params.append(p)
        group["params"] = params
    return replaced


def owned(optimizer) -> list[torch.Tensor]:
    """The tensors ``optimizer``'s parameter groups hold."""
    groups = getattr(unwrap(optimizer), "param_groups", None) or []
    return [p for group in groups for p in group["params"] if isinstance(p, torch.Tensor)]


@dataclasses.dataclass
class Fit:
    """How an optimizer (or several) compares with the trainable tensors: names of what it owns but
    should not, holds state for but should not, lacks, and strided regions in fused groups."""

    extra: list[str]
    stale_state: list[str]
    missing: list[str]
    strided_fused: list[str]

    def __bool__(self) -> bool:
        """True when the optimizer fits."""
        return not (self.extra or self.stale_state or self.missing or self.strided_fused)

    def problems(self, plural: bool = False) -> str:
        """What is owned, held or lacking, in one clause ("owns 14 tensors that ..., and lacks ...")."""
        own, hold, lack = ("own", "hold", "lack") if plural else ("owns", "holds", "lacks")
        parts = []
        if self.extra:
            parts.append(f"{own} {len(self.extra)} tensors that do not train in this round (e.g. {self.extra[0]})")
        if self.stale_state:
            parts.append(f"{hold} state for {len(self.stale_state)} of them (e.g. {self.stale_state[0]})")
        if self.missing:
            parts.append(f"{lack} {len(self.missing)} trainable tensors (missing, e.g. {self.missing[0]})")
        return ", and ".join(parts)

    def message(self, what: str = "This optimizer", plural: bool = False) -> str:
        verb, it = ("do", "together they") if plural else ("does", "it")
        problems = self.problems(plural)
        text = f"{what} {verb} not fit the applied selection: {it} {problems}. {REMEDY}" if problems else ""
        if self.strided_fused:
            text += (f"{' ' if text else ''}{len(self.strided_fused)} trainable regions are strided views (e.g. "
                     f"{self.strided_fused[0]}), which a fused optimizer kernel (fused=True) would write outside of: "
                     "build the optimizer with fused=False (foreach=True is exact) for these parameters.")
        return text


def compare(optimizers: Iterable, trainable: dict[int, str], names: dict[int, str], need_all: bool) -> Fit:
    """Compare the union of ``optimizers`` with ``trainable`` (id -> name); ``names`` names the
    model's other tensors (id -> name)."""
    from .regions import is_retired

    def foreign(p: torch.Tensor) -> bool:  # not the model's, and no region of another round
        return id(p) not in names and not is_retired(p)

    fit = Fit([], [], [], [])
    seen: set[int] = set()
    for optimizer in optimizers:
        inner = unwrap(optimizer)
        for group in getattr(inner, "param_groups", None) or []:
            fused = bool(group.get("fused"))
            for p in group["params"]:
                if not isinstance(p, torch.Tensor):
                    continue
                seen.add(id(p))
                if foreign(p):
                    continue
                if id(p) not in trainable:
                    fit.extra.append(_name(p, names))
                elif fused and not p.is_contiguous():
                    fit.strided_fused.append(trainable[id(p)])
        for p in getattr(inner, "state", {}):
            if isinstance(p, torch.Tensor) and id(p) not in trainable and not foreign(p) and inner.state[p]:
                fit.stale_state.append(_name(p, names))
    if need_all:
        fit.missing = [name for i, name in trainable.items() if i not in seen]
    return fit


def _name(tensor: torch.Tensor, names: dict[int, str]) -> str:
    name = names.get(id(tensor))
    return name if name is not None else f"a {tuple(tensor.shape)} region parameter of another round"


def check(optimizers: Iterable, trainable: dict[int, str], names: dict[int, str], need_all: bool,
          what: str = "This optimizer") -> None:
    """Raise :class:`OptimizerMismatchError` unless ``optimizers`` fit ``trainable``."""
    optimizers = list(optimizers)
    fit = compare(optimizers, trainable, names, need_all)
    if not fit:
        raise OptimizerMismatchError(fit.message(what, plural=len(optimizers) > 1))


def unfuse_strided(optimizer, trainable: dict[int, str]) -> list[str]:
    """Turn ``fused`` off for the groups of ``optimizer`` that hold strided regions (a fused kernel
    would write outside them; torch's foreach path is exact). Returns the regions' names."""
    names = []
    for group in getattr(unwrap(optimizer), "param_groups", None) or []:
        if group.get("fused"):
            strided = [trainable[id(p)] for p in group["params"] if id(p) in trainable and not p.is_contiguous()]
            if strided:
                group["fused"] = False
                names.extend(strided)
    return names
