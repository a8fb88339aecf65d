"""Shielded selection: the category rule's shape, with the most important units frozen.

The same granularity and the same ratio rule as ``category`` (per layer and role, whole units: at
0.5 on Llama, 2 of the 4 attention projections, 1 of 2 norms, and 2 of 3 MLP matrices in half the
layers and 1 of 3 in the others, exactly half of each role), but which units freeze is decided by
importance to the base model's behaviour (:mod:`hft_plugin.importance`, read from the scores file
named by ``config.scores``) instead of at random: in each layer and role, the subset of the right
size whose trained units are least important trains; which layers train the larger subset (MLP: 2 of
3) goes to the layers where that costs least importance per parameter. Units with no score (norms,
stacked MoE experts) are chosen as ``category`` chooses them, at random from the seed.

With ``avoid_trained`` in the scores, units that earlier rounds trained are frozen before any other.
A round never trains exactly the previous round's half: if the scores would choose it again, the
previous round's units are avoided too.

Whole units keep every guarantee of the other strategies with no new mechanism: a unit is a whole
tensor or a region the existing region mechanisms already freeze exactly.
"""

from __future__ import annotations

import random
from typing import Callable, Mapping

from ..errors import ScoresError
from ..layouts.base import Layout, Unit
from . import rng as make_rng
from .category import roles_coarsest_first, units_per_layer

_EXHAUSTIVE_MAX_UNITS = 10  # as category: 2**10 subsets per layer and role; more units go greedy


def select(layout: Layout, config, round: int, attempt: int) -> set[str]:
    from ..importance import HOW_TO_COMPUTE, Scores

    if config.scores is None:
        raise ScoresError(f"strategy='shielded' freezes the units most important to the model, so it needs their "
                          f"importance scores (scores=FILE, HFT_SCORES, hft plan --scores): {HOW_TO_COMPUTE}.")
    scores = Scores.load(config.scores)
    scores.check(layout, round, source=config.scores)
    avoid = set(scores.trained_before) if scores.avoid_trained else set()
    chosen = choose(layout, config.ratio, scores.units, avoid, make_rng(config, round, attempt))
    previous = scores.previous_trainable
    if previous is not None and chosen == set(previous):
        # The contract: round r + 1 differs from round r. Stable scores would pick the same half again.
        chosen = choose(layout, config.ratio, scores.units, avoid | set(previous), make_rng(config, round, attempt + 1))
    return chosen


def choose(layout: Layout, ratio: float, importance: Mapping[str, float | None], avoid: set[str],
           rng: random.Random) -> set[str]:
    """The trainable units: per role and layer, balanced to ``ratio``, least important trained.

    Roles go coarsest first and carry what one cannot hit exactly into the next (as ``category``).
    Inside a role, each layer offers its least important subset just below its share and just above
    it; layers start below, and the upgrades that cost least importance per parameter are taken
    while they bring the role closer to its target.
    """
    scale = 1.0 + sum(abs(v) for v in importance.values() if v is not None)  # avoiding outranks any score
    chosen: set[str] = set()
    carry = 0.0
    for role in roles_coarsest_first(layout):
        per_layer = units_per_layer(layout, role)
        options = []
        for units in per_layer:
            if not units:
                continue
            scored = all(importance.get(u.key) is not None for u in units)

            def cost(u: Unit, scored=scored) -> float:
                return (importance[u.key] if scored else 0.0) + (scale if u.key in avoid else 0.0)

            options.append(_below_and_above(units, ratio * sum(u.numel for u in units), cost, rng))
        role_ideal = ratio * sum(sum(u.numel for u in units) for units in per_layer)
        target = role_ideal - carry
        picks = [below for below, _ in options]
        total = sum(_size(p) for p in picks)
        upgrades = [(i, _size(above) - _size(below), _cost(above) - _cost(below))
                    for i, (below, above) in enumerate(options) if _size(above) > _size(below)]
        rng.shuffle(upgrades)  # equal costs (unscored roles): a random order, as category's
        upgrades.sort(key=lambda u: u[2] / u[1])
        for i, grow, _ in upgrades:
            if abs(target - total - grow) < abs(target - total):
                picks[i] = options[i][1]
                total += grow
        carry += total - role_ideal
        for pick in picks:
            chosen.update(u.key for u, _ in pick)
    return chosen


def _size(pick) -> int:
    return sum(u.numel for u, _ in pick)


def _cost(pick) -> float:
    return sum(c for _, c in pick)


def _below_and_above(units: list[Unit], ideal: float, cost: Callable[[Unit], float], rng: random.Random):
    """The least costly subset of the largest size <= ideal, and of the smallest size >= ideal
    (the same subset when a size hits ideal), as lists of (unit, cost). Ties are drawn at random."""
    costs = [cost(u) for u in units]
    if len(units) > _EXHAUSTIVE_MAX_UNITS:
        order = list(range(len(units)))
        rng.shuffle(order)
        order.sort(key=lambda k: costs[k] / max(units[k].numel, 1))
        picked, remaining = [], ideal
        for k in order:  # cheapest per parameter first, filled to the ideal as category's greedy fill
            if remaining >= units[k].numel / 2:
                picked.append((units[k], costs[k]))
                remaining -= units[k].numel
        return picked, picked
    sizes = [u.numel for u in units]
    tolerance = 1e-9 * sum(sizes) + 1e-6
    n = 1 << len(units)
    size_of, cost_of = [0] * n, [0.0] * n
    for mask in range(1, n):
        low = mask & -mask
        bit = low.bit_length() - 1
        size_of[mask] = size_of[mask ^ low] + sizes[bit]
        cost_of[mask] = cost_of[mask ^ low] + costs[bit]
    below_size = max(s for s in size_of if s <= ideal + tolerance)
    above_size = min(s for s in size_of if s >= ideal - tolerance)

    def cheapest(size: int):
        masks = [m for m in range(n) if abs(size_of[m] - size) <= tolerance]
        best = min(cost_of[m] for m in masks)
        ties = [m for m in masks if cost_of[m] <= best + 1e-12 * max(1.0, abs(best))]
        mask = rng.choice(ties)
        return [(u, costs[bit]) for bit, u in enumerate(units) if mask >> bit & 1]

    below = cheapest(below_size)
    return below, (below if above_size == below_size else cheapest(above_size))
