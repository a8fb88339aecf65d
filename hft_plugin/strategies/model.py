"""Model-level selection: random units model-wide, filled to the ratio.

Units from every layer and role are shuffled together and taken while each brings the total
closer to ``ratio`` of the layers' parameters (the paper's "random matrices" picked by count
cannot hit the ratio; filling by size does, to within about half a unit).
"""

from __future__ import annotations

from ..layouts.base import Layout
from . import rng as make_rng
from .category import _greedy_subset


def select(layout: Layout, config, round: int, attempt: int) -> set[str]:
    units = sorted(layout.units(), key=lambda u: u.key)
    target = config.ratio * sum(u.numel for u in units)
    return {u.key for u in _greedy_subset(units, target, make_rng(config, round, attempt))}
