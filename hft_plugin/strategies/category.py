"""Category-level selection, the paper's default, generalised to any ratio and architecture.

The paper trains, per layer, 2 of the 4 attention projections and 1 of the 2 norms, and splits the
layers into two halves that train 2 and 1 of the 3 MLP matrices, so exactly half of each category
trains. Here each role (attention, mlp, norm, router, other) is balanced on its own: layers are
visited in a random order, and each picks, among all subsets of its units in that role, one of
those that bring the running total closest to ``ratio`` of the role's parameters (ties drawn at
random). At ratio 0.5 on Llama this is exactly the paper's rule; with grouped-query attention it
trains one of q/o and one of k/v (still exactly half); at other ratios every role lands within about
one unit of its target, and the remainder of each role is carried into the next.
"""

from __future__ import annotations

import random

from ..layouts.base import ROLES, Layout, Unit
from . import rng as make_rng

_EXHAUSTIVE_MAX_UNITS = 10  # 2**10 subsets per layer and role; larger roles (MoE experts) go greedy


def select(layout: Layout, config, round: int, attempt: int) -> set[str]:
    rng = make_rng(config, round, attempt)
    chosen: set[str] = set()
    carry = 0.0  # chosen minus ideal so far, in parameters
    for role in roles_coarsest_first(layout):
        per_layer = units_per_layer(layout, role)
        order = [i for i, units in enumerate(per_layer) if units]
        rng.shuffle(order)
        # Largest layers first (random among equals): the smaller ones after them absorb the carry.
        order.sort(key=lambda i: -sum(u.numel for u in per_layer[i]))
        for i in order:
            units = per_layer[i]
            ideal = config.ratio * sum(u.numel for u in units)
            subset = balanced_subset(units, ideal - carry, rng)
            carry += sum(u.numel for u in subset) - ideal
            chosen.update(u.key for u in subset)
    return chosen


def roles_coarsest_first(layout: Layout) -> list[str]:
    """The roles of ``layout``, those with the largest unit first (ties in the order of
    ``ROLES``): what one role cannot hit exactly (at most half a unit) is carried into the next,
    finer one, so the layers' total lands closer than any role alone."""
    largest: dict[str, int] = {}
    for unit in layout.units():
        largest[unit.role] = max(largest.get(unit.role, 0), unit.numel)
    return sorted(largest, key=lambda r: (-largest[r], ROLES.index(r) if r in ROLES else len(ROLES), r))


def units_per_layer(layout: Layout, role: str) -> list[list[Unit]]:
    """Each layer's units of ``role``, by key (an empty list for a layer without that role)."""
    return [sorted((u for u in layer if u.role == role), key=lambda u: u.key) for layer in layout.layers]


def balanced_subset(units: list[Unit], target: float, rng: random.Random) -> list[Unit]:
    """A random subset of ``units`` whose size is as close to ``target`` as any subset's."""
    if len(units) > _EXHAUSTIVE_MAX_UNITS:
        return _greedy_subset(units, target, rng)
    sizes = [u.numel for u in units]
    tolerance = 1e-9 * sum(sizes) + 1e-6
    sums = [0] * (1 << len(units))
    for mask in range(1, len(sums)):
        low = mask & -mask
        sums[mask] = sums[mask ^ low] + sizes[low.bit_length() - 1]
    best = min(abs(s - target) for s in sums)
    candidates = [m for m, s in enumerate(sums) if abs(s - target) <= best + tolerance]
    mask = rng.choice(candidates)
    return [u for bit, u in enumerate(units) if mask >> bit & 1]


def _greedy_subset(units: list[Unit], target: float, rng: random.Random) -> list[Unit]:
    shuffled = list(units)
    rng.shuffle(shuffled)
    picked, remaining = [], target
    for unit in shuffled:
        if remaining >= unit.numel / 2:
            picked.append(unit)
            remaining -= unit.numel
    return picked
